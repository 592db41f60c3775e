"""
What the idea at the repository's root leans on but is not the idea: flags, one-line errors, where a model runs
(device, precision, threads, ranks), checkpoint files and a training run's bookkeeping, and the loaders of
pretrained models. A reader of mask.py, model.py, engine.py and train.py never needs to open these.
"""
