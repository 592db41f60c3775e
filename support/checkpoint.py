"""Checkpoint files, written atomically, read with torch.load(weights_only=True): plain dicts and
tensors, which can never run code (support/resume.py's make_checkpoint says what they hold)."""
import contextlib
import os
import tempfile

import torch

from cli.errors import UserError
from model import GPT, GPTConfig

TEMPORARY_PREFIX = ".tmp-"  # atomic()'s files before they are renamed (<prefix>*.tmp)
CHECKPOINT_PREFIX, LOG_PREFIX = ".ckpt-", ".log-"  # in out_dir, where RunLock clears them
REQUIRED_KEYS = {"model", "model_args", "tokenizer", "mask"}


def usual_mode():
    """The mode open() gives a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic(path, write, prefix=TEMPORARY_PREFIX, suffix=".tmp"):
    """write(tmp) into a new temporary file beside path (mkstemp's: no planted link is followed),
    synced, then renamed over path: a crash or a full disk leaves the old file and no other."""
    fd, tmp = tempfile.mkstemp(suffix, prefix, dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, usual_mode())  # mkstemp's file is private; ours are not
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_atomically(path, write, what, prefix=TEMPORARY_PREFIX):
    """atomic(), its folder made first; a failure is a UserError: the previous `what` stays."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic(path, write, prefix)
    except (OSError, RuntimeError) as e:  # a full disk can be the zip writer's RuntimeError
        problem = e.strerror if isinstance(e, OSError) and e.strerror else "the disk may be full"
        raise UserError(f"could not write {path} ({problem}); the previous {what}, if any, is "
                        "unchanged") from None


def save_checkpoint(checkpoint, path):
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
    save_atomically(path, write, "checkpoint", CHECKPOINT_PREFIX)


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
