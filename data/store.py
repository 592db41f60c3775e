"""
A prepared folder, as data/prepare.py writes it and training reads it back: meta.json plus, per split (train, val),
{split}_ids.npy, {split}_roles.npy and {split}_offsets.npy (see prepare.py's docstring for their contents).
"""
import json
import os
from dataclasses import dataclass

import numpy as np

from data.chat import DataError

SPLITS = ("train", "val")
ARRAYS = ("ids", "roles", "offsets")


@dataclass
class Split:
    """A prepared split, memory-mapped: ids[T], roles[T], offsets[n_conversations + 1]."""
    ids: np.ndarray
    roles: np.ndarray
    offsets: np.ndarray


def array_path(data_dir, split, field):
    return os.path.join(data_dir, f"{split}_{field}.npy")


def load_meta(data_dir):
    """meta.json of a prepared folder (written last, so its presence means the folder is complete)."""
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"no prepared data in {data_dir} (missing meta.json): run python data/prepare.py") from None


def load_split(data_dir, split):
    arrays = {}
    for field in ARRAYS:
        path = array_path(data_dir, split, field)
        if not os.path.exists(path):
            raise DataError(f"no prepared data at {path}: run python data/prepare.py")
        arrays[field] = np.load(path, mmap_mode="r")
    return Split(**arrays)
