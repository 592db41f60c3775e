"""
Checkpoint files: out_dir/ckpt.pt, written atomically, read with torch.load(weights_only=True)
(plain dicts and tensors: a checkpoint can never run code). A dict: model (state dict), model_args
(GPTConfig's fields), tokenizer (its description), mask, and from train.py the run's settings and
state (support/resume.py's make_checkpoint).
"""
import os
import tempfile

import torch

from cli.errors import UserError
from model import GPT, GPTConfig

TEMPORARY_PREFIX = ".tmp-"  # atomic()'s files before they are renamed
REQUIRED_KEYS = {"model", "model_args", "tokenizer", "mask"}


def save_checkpoint(checkpoint, path):
    """Write a unique temporary file beside path, synced, then rename it over path: a crash or a
    full disk leaves the previous checkpoint intact and no temporary file (UserError)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)  # follows no symlink
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; a checkpoint is not
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk can be the zip writer's RuntimeError
        _remove(tmp)
        problem = e.strerror if isinstance(e, OSError) and e.strerror else "the disk may be full"
        raise UserError(f"could not write {path} ({problem}); the previous checkpoint, if any, is "
                        "unchanged") from None
    except BaseException:
        _remove(tmp)
        raise


def atomic(path, write):
    """write(tmp) into a temporary file beside path, then rename it over path: a crash leaves the
    old file (adapters, GGUF conversions; checkpoints add a sync and a one-line error)."""
    fd, tmp = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict, or a UserError saying why not."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: run python train.py first (or pass "
                        "--out_dir=DIR)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or malicious files
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); retrain or "
                        "restore it") from None
    missing = REQUIRED_KEYS - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise UserError(f"{path} is not an ismGPT checkpoint (missing "
                        f"{', '.join(sorted(missing))})")
    return checkpoint


def model_from_checkpoint(checkpoint, device="cpu", path="the checkpoint"):
    """The GPT a checkpoint describes, with its weights (eval mode); UserError if they disagree."""
    try:
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:  # not train.py's file
        raise UserError(f"{path}: weights do not match model_args ({type(e).__name__}); retrain "
                        "or restore it") from None
    return model.to(device).eval()
