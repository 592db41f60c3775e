"""
Product tools around the chat engine, fenced off from the spec: the OpenAI-compatible HTTP server (serve.py runs it)
and its chat page. A reader of mask.py, model.py, engine.py and train.py never needs to open these.
"""
