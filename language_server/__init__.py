"""The language server: chat in, tokens out; runs only the LLM on vLLM (`dvd language`)."""
