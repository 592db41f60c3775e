"""Conversations in, token ids and per-token roles out: tokenizer, chat format, datasets, prepared folders, batching."""
