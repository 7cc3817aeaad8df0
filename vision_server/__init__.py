"""The vision server: images in, InternVL image features out (`dvd vision`)."""
