"""
Whether a training run may start, must resume, or has nothing to do, and what its checkpoint records: a new run
never silently replaces another run's files; a resumed one must be the run its flags describe (the same mask, seed,
rows per step, data and shape), from a training state that train.py writes.
"""
import os
from dataclasses import asdict, dataclass, field

from data.tokenizer import tokenizer_from_description
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.errors import DataError, UserError
from support.run_files import RUN_FILES
from support.starts import load_start

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
RUN_KEYS = ("seed", "batch_size", "gradient_accumulation_steps", "dropout")  # change the data order or dropout
# Settings that change neither the result nor the plan: a finished run asked again with other values of these
# has nothing to do.
NO_EFFECT = ("threads", "log_interval", "compile", "overwrite")



def check_fresh_start(cfg, flags_given):
    """A new run must not silently replace any file of another run. -> True when out_dir's checkpoint already
    finished exactly this run (the same settings, flags_given: the settings as parsed), so there is nothing to do;
    UserError when out_dir holds another run's files."""
    if cfg.init_from == "resume" or cfg.overwrite:
        return False
    found = [name for name in RUN_FILES if os.path.lexists(os.path.join(cfg.out_dir, name))]
    if not found:
        return False
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if "ckpt.pt" in found and finished_this_run(path, flags_given):
        return True
    if "ckpt.pt" in found:
        raise UserError(f"{path} already holds a model: continue it with --init_from=resume, replace it with "
                        "--overwrite, or pick another --out_dir")
    raise UserError(f"{os.path.join(cfg.out_dir, found[0])} already holds another run's {' and '.join(found)}, and "
                    "no checkpoint to resume: replace it with --overwrite, or pick another --out_dir")


def finished_this_run(path, flags_given):
    """Did the checkpoint at path finish a run of these very settings?"""
    try:
        checkpoint = load_checkpoint(path)
    except UserError:
        return False
    saved = checkpoint.get("flags")
    mine = {k: v for k, v in asdict(flags_given).items() if k not in NO_EFFECT}
    return isinstance(saved, dict) and {k: v for k, v in saved.items() if k not in NO_EFFECT} == mine and \
        checkpoint.get("iter_num") == flags_given.max_iters


RESUMED = {"iter_num": int, "best_val_loss": float, "data_state": dict, "optimizer": dict, "config": dict}


def check_resumable(checkpoint, path, cfg):
    """UserError, naming the flags to pass, when the checkpoint is not the run these flags describe (the flags of
    the run that wrote it are in its config), or when its training state is not one train.py writes."""
    for key, kind in RESUMED.items():
        if not isinstance(checkpoint.get(key), kind) or isinstance(checkpoint.get(key), bool):
            raise UserError(f"{path} holds no usable training state ({key}): start a new run with --overwrite or "
                            "another --out_dir")
    state, optimizer = checkpoint["data_state"], checkpoint["optimizer"]
    if checkpoint["iter_num"] < 0 or not all(isinstance(state.get(k), int) and state[k] >= 0 for k in ("epoch", "row")):
        raise UserError(f"{path} holds an impossible training state (iter_num {checkpoint['iter_num']}, data_state "
                        f"{state}): start a new run with --overwrite or another --out_dir")
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise UserError(f"{path} holds no usable optimizer state: start a new run with --overwrite or another "
                        "--out_dir")
    tokens = checkpoint.get("tokens", {})
    if not (isinstance(tokens, dict) and all(type(tokens.get(k)) is int for k in ("tokens", "answer_tokens"))):
        raise UserError(f"{path} holds no usable token counts (tokens): start a new run with --overwrite or another "
                        "--out_dir")
    saved = checkpoint["config"]
    # A run that started from pretrained weights got its shape from them, not from --n_layer and the like.
    shape = SHAPE_KEYS if checkpoint.get("start", "scratch") == "scratch" else ("block_size",)
    wrong = [f"--mask={checkpoint['mask']}"] if checkpoint["mask"] != cfg.mask else []
    wrong += [f"--{k}={saved[k]}" for k in shape + RUN_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if wrong:
        raise UserError(f"{path} was trained with {' '.join(wrong)}: pass that to resume it, or start a new run "
                        "with --overwrite or another --out_dir")


def data_fingerprint(meta):
    """What identifies a prepared dataset, wherever its folder is: its tokenizer and the size of each split. A
    resumed run must read the same rows (the stream position indexes them) and measure the same held-out loss."""
    return {"tokenizer": meta["tokenizer"]["name"],
            **{name: {k: split[k] for k in ("conversations", "tokens")} for name, split in meta["splits"].items()}}


def check_same_data(checkpoint, path, cfg, meta):
    saved, ours = checkpoint.get("data"), data_fingerprint(meta)
    if saved is None or saved == ours:
        return
    trained = saved.get("train") if isinstance(saved, dict) else None
    count = f"{trained['conversations']:,}" if isinstance(trained, dict) and \
        isinstance(trained.get("conversations"), int) else "an unreadable number of"
    raise UserError(f"{path} was trained on other data than {cfg.data_dir} ({count} train conversations, not "
                    f"{ours['train']['conversations']:,}): pass the --data_dir it was trained on, or start a new "
                    "run with --overwrite or another --out_dir")


@dataclass
class RunState:
    """What a checkpoint records of the run besides the weights and the optimizer."""
    iter_num: int = 0
    best_val_loss: float = float("inf")
    best_iter: int = 0
    tokens: dict = field(default_factory=lambda: {"tokens": 0, "answer_tokens": 0})
    start: str = "scratch"  # where the weights came from: scratch, or train.py's --init_from
    data_state: dict = field(default_factory=dict)  # the row stream's position

    @classmethod
    def of(cls, checkpoint):
        return cls(**{k: checkpoint[k] for k in ("iter_num", "best_val_loss", "best_iter", "tokens", "start",
                                                 "data_state") if k in checkpoint})


def make_checkpoint(model, cfg, flags_given, meta, state, optimizer=None, stream=None):
    """The checkpoint dict; with the optimizer and the row stream it can be resumed, without it (best.pt) it holds
    the weights and what sample.py, eval.py and --init_from need."""
    checkpoint = {"model": model.state_dict(), "model_args": asdict(model.config), "config": asdict(cfg),
                  "flags": asdict(flags_given), "tokenizer": meta["tokenizer"], "mask": cfg.mask,
                  "data": data_fingerprint(meta), **asdict(state)}
    del checkpoint["data_state"]
    if optimizer is not None:
        checkpoint.update(optimizer=optimizer.state_dict(), data_state=stream.state())
    return checkpoint


def resumed_state(cfg, checkpoint, optimizer, meta, log, is_master=True):
    """The RunState of a new run, or of the checkpoint being resumed (whose optimizer state is loaded). A new run
    where best.pt exists got here with --overwrite: those best weights are another run's, removed at once."""
    if checkpoint is None:
        replaced = os.path.join(cfg.out_dir, "best.pt")
        if is_master and os.path.lexists(replaced):
            os.remove(replaced)
            log(f"note: removed {replaced}, the best weights of the run this one replaces")
        return RunState(start=cfg.init_from)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    check_same_data(checkpoint, path, cfg, meta)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: its optimizer state does not fit its model ({type(e).__name__}): start a new "
                        "run with --overwrite or another --out_dir") from None
    state = RunState.of(checkpoint)
    log(f"resuming {path} at iter {state.iter_num} (best val answer loss {state.best_val_loss:.4f})")
    if state.iter_num >= cfg.max_iters:
        log(f"note: the run is already at iter {state.iter_num}, not before --max_iters={cfg.max_iters}: nothing to "
            "train (pass a larger --max_iters to go on)")
    return state


def starting_point(cfg, device, log):
    """-> (model, checkpoint to resume or None, description of the tokenizer the model needs or None for any).
    scratch: a new GPT of the flags' shape (its vocabulary is the data's: built after the data is loaded);
    resume: the checkpoint's model and training state; otherwise a pretrained start (pretrained.load_start)."""
    if cfg.init_from == "scratch":
        return None, None, None
    if cfg.init_from == "resume":
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        checkpoint = load_checkpoint(path, device)
        check_resumable(checkpoint, path, cfg)
        try:
            tokenizer_from_description(checkpoint["tokenizer"])  # the run's data must be in its tokens
        except DataError as e:
            raise UserError(f"{path}: {e}") from None
        return model_from_checkpoint(checkpoint, device, path), checkpoint, checkpoint["tokenizer"]
    start = load_start(cfg.init_from, cfg.block_size, cfg.dropout, device)
    log(f"starting from {start.what}")
    return start.model, None, start.tok.describe()
