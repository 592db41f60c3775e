"""The sections of bench.py, a module each, and what they share (common.py, models.py)."""
