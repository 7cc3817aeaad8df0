"""Small test videos made with PyAV: frame i is a flat colour that encodes i."""

from __future__ import annotations

import io

import numpy as np

CODECS = {
    "mp4": ("mp4", "libx264", "yuv420p"),
    "webm": ("webm", "libvpx", "yuv420p"),
    "avi": ("avi", "mpeg4", "yuv420p"),
    "gif": ("gif", "gif", "rgb8"),
}
"""name -> (container, encoder, pixel format); each one the PyAV wheel can write."""


def frame_colour(i: int) -> tuple[int, int, int]:
    """Frame i's colour, 8 steps from its neighbours' in two channels (frames 0..31 are
    told apart even after lossy codecs)."""
    return (i * 8 % 256, 255 - i * 8 % 256, 128)


def make_video(
    kind: str = "mp4",
    frames: int = 20,
    rate: int = 10,
    width: int = 64,
    height: int = 48,
    rotation: int = 0,
    top: tuple[int, int, int] | None = None,
) -> bytes:
    """A video of `frames` flat-colour frames at `rate` fps; `top` paints the top half of
    every frame, `rotation` (counter-clockwise degrees) goes in the display matrix."""
    import av

    container_format, codec, pix_fmt = CODECS[kind]
    out = io.BytesIO()
    with av.open(out, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[:] = frame_colour(i)
            if top is not None:
                pixels[: height // 2] = top
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def mean_colour(png: bytes) -> tuple[float, float, float]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    r, g, b = pixels.reshape(-1, 3).mean(axis=0)
    return float(r), float(g), float(b)


def which_frame(png: bytes, frames: int) -> int:
    """The index of the test frame whose colour `png` is closest to."""
    got = np.asarray(mean_colour(png))
    distances = [np.abs(got - np.asarray(frame_colour(i))).sum() for i in range(frames)]
    return int(np.argmin(distances))
