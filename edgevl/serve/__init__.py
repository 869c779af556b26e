"""`edgevl serve`: an OpenAI-compatible HTTP server over the torch-free runtime."""
