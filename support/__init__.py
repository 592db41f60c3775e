"""
How the scripts do what they say: where a model computes (compute); pretrained models in (starts,
hf, gguf, weights, lora) and quantized decoding (quantize); checkpoint files and a training run's
bookkeeping (checkpoint, run_files, resume, signals, sharding). train.py says when each of these
happens, these files how. Flags, one-line errors and the Ctrl-C prologue are in cli/.
"""
