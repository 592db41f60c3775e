"""Product tools around the chat engine: the OpenAI-compatible HTTP server (serve.py), its page."""
