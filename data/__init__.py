"""Conversations in, token ids and roles out: tokenizers, chat format, datasets, batching."""
