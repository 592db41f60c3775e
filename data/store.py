"""A prepared folder (data/prepare.py), loaded and checked: damage is one line here, not nonsense
(or a KeyError) in training."""
import json
import os
from dataclasses import dataclass

import numpy as np

from cli.errors import DataError, reason
from data.tokenizer import TOKENIZERS, can_build
from mask import ASSISTANT, SYSTEM

SPLITS = ("train", "val")
ARRAYS = ("ids", "roles", "offsets")
SPLIT_COUNTS = ("conversations", "tokens", "max_tokens")  # what meta.json says of each split


@dataclass
class Split:
    """A prepared split, memory-mapped: ids[T], roles[T], offsets[n_conversations + 1]."""
    ids: np.ndarray
    roles: np.ndarray
    offsets: np.ndarray


def array_name(split, field):
    return f"{split}_{field}.npy"


def array_path(data_dir, split, field):
    return os.path.join(data_dir, array_name(split, field))


def damaged(path, problem):
    """The error for a file that is not what prepare.py writes: preparing again is the fix."""
    return DataError(f"{path}: {problem}; run python prepare.py again")


def load_meta(data_dir, block_size=None):
    """meta.json of a prepared folder, checked, and (given block_size) every conversation fits it.
    prepare.py writes meta.json last: a folder without one is incomplete."""
    if not os.path.exists(data_dir):
        raise DataError(f"no data at {data_dir}: prepare it with python prepare.py "
                        f"--out_dir={data_dir} (or check the path)")
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"no prepared data in {data_dir} (missing meta.json): run python "
                        "prepare.py") from None
    except (ValueError, RecursionError):  # bad JSON or UTF-8, or absurd nesting
        raise damaged(path, "not JSON") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {reason(e)}") from None
    if problem := _meta_problem(meta):
        raise damaged(path, problem)
    longest = max(split["max_tokens"] for split in meta["splits"].values())
    if block_size is not None and block_size < longest:
        raise DataError(f"--block_size={block_size} is shorter than the longest conversation in "
                        f"{data_dir} ({longest} tokens): pass --block_size={longest} or more, or "
                        f"prepare the data with python prepare.py --block_size={block_size}")
    return meta


def _meta_problem(meta):
    """What is wrong with a parsed meta.json, or None: every key code reads from it is checked.
    The tokenizer must be one that can be rebuilt (not built here: a BPE file is slow to read)."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key in ("vocab_size", "block_size"):
        if not _is_positive_int(meta.get(key)):
            return f'"{key}" is missing or not a positive integer'
    tokenizer, splits = meta.get("tokenizer"), meta.get("splits")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("name"), str):
        return '"tokenizer" is missing or has no "name"'
    if tokenizer.get("vocab_size") != meta["vocab_size"]:
        return f'"tokenizer" has a "vocab_size" other than the {meta["vocab_size"]} of "vocab_size"'
    if not can_build(tokenizer["name"]):
        return (f'"tokenizer" names {tokenizer["name"]!r}, which is none of '
                f'{", ".join(TOKENIZERS)}, a .gguf file or a folder holding tokenizer.json here')
    if not isinstance(splits, dict) or sorted(splits) != sorted(SPLITS):
        return f'"splits" is missing or does not hold exactly {" and ".join(SPLITS)}'
    for name in SPLITS:
        if not isinstance(splits[name], dict):
            return f'"splits" has a "{name}" that is not an object'
        for key in SPLIT_COUNTS:
            if not _is_positive_int(splits[name].get(key)):
                return f'"splits" "{name}" has no "{key}", or it is not a positive integer'
        if splits[name]["max_tokens"] > meta["block_size"]:
            return (f'"splits" "{name}" has a "max_tokens" of {splits[name]["max_tokens"]}, more '
                    f'than the "block_size" of {meta["block_size"]}')
    return None


def _is_positive_int(value):  # not isinstance: JSON true would pass as 1
    return type(value) is int and value > 0


def load_split(data_dir, split):
    """One split's arrays, memory-mapped, checked to be what prepare.py writes (role codes outside
    0..2 would train nothing at all) in a few vectorised passes."""
    meta = load_meta(data_dir)
    paths = {field: array_path(data_dir, split, field) for field in ARRAYS}
    loaded = Split(**{field: _load_array(path) for field, path in paths.items()})
    _check_split(loaded, paths, meta["vocab_size"], meta["splits"][split])
    return loaded


def _load_array(path):
    if not os.path.exists(path):
        raise damaged(path, "missing")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickle a file
    except (ValueError, EOFError, OSError) as e:  # truncated, not .npy, object dtype, unreadable
        raise damaged(path, f"not a readable .npy array ({' '.join(str(e).split())})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype.kind not in "ui":
        raise damaged(path, "not a 1-D integer array")
    return array


def _check_split(split, paths, vocab_size, stats):
    ids, roles, offsets = split.ids, split.roles, split.offsets
    if len(roles) != len(ids):
        raise damaged(paths["roles"], f"{len(roles)} roles for {len(ids)} token ids")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(ids) or \
            not np.all(np.diff(offsets) > 0):
        raise damaged(paths["offsets"], f"offsets must increase from 0 to {len(ids)}, the number "
                      "of token ids")
    low, high = ids.min(), ids.max()  # not empty: the offsets rise to len(ids) > 0
    if low < 0 or high >= vocab_size:
        raise damaged(paths["ids"], f"token ids run {low}..{high}, outside meta.json's vocabulary "
                      f"0..{vocab_size - 1}")
    low, high = roles.min(), roles.max()
    if low < SYSTEM or high > ASSISTANT:
        raise damaged(paths["roles"], f"role codes run {low}..{high}, outside "
                      f"{SYSTEM}..{ASSISTANT}")
    if high < ASSISTANT:  # every conversation prepare writes ends with an answer
        raise damaged(paths["roles"], f"no answer token (role code {ASSISTANT}): nothing to train "
                      "on or score")
    # meta.json's counts stand for the data (the block_size check, train.py's data fingerprint)
    lengths = np.diff(offsets)
    found = {"conversations": ("offsets", len(lengths), "conversations"),
             "tokens": ("ids", len(ids), "tokens"),
             "max_tokens": ("offsets", int(lengths.max()), "tokens in the longest conversation")}
    for key, (field, count, what) in found.items():
        if stats[key] != count:
            raise damaged(paths[field], f'holds {count} {what}, where meta.json\'s "{key}" says '
                          f"{stats[key]}")


def first_conversations(split, n):
    """The split's first n conversations (all for n = 0), those {split}.jsonl lists first."""
    if not n or n >= len(split.offsets) - 1:
        return split
    end = int(split.offsets[n])
    return Split(ids=split.ids[:end], roles=split.roles[:end], offsets=split.offsets[:n + 1])
