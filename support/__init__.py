"""How the scripts do what they say: devices (compute); pretrained models in (starts, hf, gguf,
weights, lora) and quantized decoding (quantize); checkpoints and a training run's bookkeeping
(checkpoint, run_files, resume, signals, sharding)."""
