"""Where a training run starts, whether it may, and what its checkpoint records: a new run never
silently replaces another run's files; a resumed one must be the run its flags describe."""
import os
from dataclasses import asdict, dataclass, field, fields

from cli.errors import UserError
from support.checkpoint import load_checkpoint
from support.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_fingerprint,
                          check_adapter_folder, merged)
from support.run_files import RUN_FILES
from support.starts import from_checkpoint, load_start

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
# Settings that change the data order, dropout or what trains (rows per step are checked as a
# product: the same rows per step train the same on any number of ranks).
RUN_KEYS = ("seed", "dropout", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "adapter")
NO_EFFECT = ("threads", "log_interval", "compile", "overwrite")  # change neither result nor plan
RESUMED = dict(iter_num=int, best_val_loss=float, data_state=dict, optimizer=dict, config=dict)
AGAIN = "start a new run with --overwrite or another --out_dir"
ADAPTER_DIR = "adapter"  # out_dir/adapter/: a LoRA run's adapters in PEFT's format


@dataclass
class RunStart:
    """What a run starts from: the model (None: from scratch), the checkpoint it resumes, the
    tokenizer description its data must match (None: any), and a new LoRA run's base."""
    model: object = None
    checkpoint: dict = None
    tokenizer: dict = None
    base: dict = None


def starting_point(cfg, device, log, rows_per_step):
    """-> RunStart: nothing (scratch), out_dir's checkpoint if it is this run's, or load_start's."""
    if cfg.init_from == "scratch":
        return RunStart()
    if cfg.init_from == "resume":
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        start = from_checkpoint(path, device, lambda checkpoint: check_resumable(
            checkpoint, path, cfg, rows_per_step))
        return RunStart(start.model, start.checkpoint, start.checkpoint["tokenizer"])
    start = load_start(cfg.init_from, cfg.block_size, cfg.dropout, device, adapter=cfg.adapter)
    log(f"starting from {start.what}")
    if start.model.adapter_params() and not cfg.lora_rank:  # a LoRA checkpoint: all of it trains
        start.model = merged(start.model)
    if cfg.lora_rank and cfg.adapter:
        log(f"note: this run writes no out_dir/{ADAPTER_DIR}/: peft would put it on "
            f"{cfg.init_from} without --adapter={cfg.adapter}, folded in here (ckpt.pt holds it)")
    base = {"init_from": cfg.init_from, "adapter": cfg.adapter,
            "fingerprint": base_fingerprint(start.model)} if cfg.lora_rank else None
    return RunStart(start.model, None, start.tok.describe(), base)


def writes_adapter(cfg):
    """A LoRA run writes out_dir/adapter/, unless --adapter is folded into its start."""
    return bool(cfg.lora_rank) and not cfg.adapter


def adapter_is_start(cfg):
    """Whether out_dir/adapter/ is the --adapter this run starts from: never replaced."""
    here = os.path.join(cfg.out_dir, ADAPTER_DIR)
    return bool(cfg.adapter) and os.path.realpath(cfg.adapter) == os.path.realpath(here)


def remove_adapter(folder, log):
    """Remove the adapter files of a run that --overwrite replaces by one that writes none."""
    if os.path.islink(folder):
        os.remove(folder)  # the link, never what it points to
    elif os.path.isdir(folder):
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        if not os.listdir(folder):
            os.rmdir(folder)
    else:
        return
    log(f"note: removed {folder}, the adapter of the run this one replaces")


def check_fresh_start(cfg, flags_given):
    """UserError when a new run would replace another run's files (or write through a link); True
    when out_dir's checkpoint finished exactly this run (flags_given, as parsed): nothing to do."""
    # another run's adapter/ too, whether this run writes one, unless it is this run's --adapter
    written = RUN_FILES + (() if adapter_is_start(cfg) else (ADAPTER_DIR,))
    if writes_adapter(cfg):
        check_adapter_folder(os.path.join(cfg.out_dir, ADAPTER_DIR))
    if cfg.init_from == "resume" or cfg.overwrite:
        return False
    found = [name for name in written if os.path.lexists(os.path.join(cfg.out_dir, name))]
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if "ckpt.pt" in found and finished_this_run(path, flags_given):
        return True
    if "ckpt.pt" in found:
        raise UserError(f"{path} already holds a model: continue it with --init_from=resume, "
                        "replace it with --overwrite, or pick another --out_dir")
    if found:
        raise UserError(f"{os.path.join(cfg.out_dir, found[0])} already holds another run's "
                        f"{' and '.join(found)}, and no checkpoint to resume: replace it with "
                        "--overwrite, or pick another --out_dir")
    return False


def finished_this_run(path, flags_given):
    try:
        checkpoint = load_checkpoint(path)
    except UserError:
        return False
    saved = checkpoint.get("flags")
    mine = {k: v for k, v in asdict(flags_given).items() if k not in NO_EFFECT}
    return isinstance(saved, dict) and checkpoint.get("iter_num") == flags_given.max_iters and \
        {k: v for k, v in saved.items() if k not in NO_EFFECT} == mine


def check_resumable(checkpoint, path, cfg, rows_per_step):
    """UserError, naming the flags to pass, when the checkpoint is not the run these flags describe
    (its config holds the flags that wrote it), or its training state is not one train.py writes."""
    for key, kind in RESUMED.items():
        if not isinstance(checkpoint.get(key), kind) or isinstance(checkpoint.get(key), bool):
            raise UserError(f"{path} holds no usable training state ({key}): {AGAIN}")
    state, optimizer = checkpoint["data_state"], checkpoint["optimizer"]
    if checkpoint["iter_num"] < 0 or \
            not all(isinstance(state.get(k), int) and state[k] >= 0 for k in ("epoch", "row")):
        raise UserError(f"{path} holds an impossible training state (iter_num "
                        f"{checkpoint['iter_num']}, data_state {state}): {AGAIN}")
    if not isinstance(optimizer.get("state"), dict) or \
            not isinstance(optimizer.get("param_groups"), list):
        raise UserError(f"{path} holds no usable optimizer state: {AGAIN}")
    tokens = checkpoint.get("tokens", {})
    if not (isinstance(tokens, dict) and
            all(type(tokens.get(k)) is int for k in ("tokens", "answer_tokens"))):
        raise UserError(f"{path} holds no usable token counts (tokens): {AGAIN}")
    saved = {**checkpoint["config"], "mask": checkpoint["mask"]}
    # A run from pretrained weights got its shape from them, not from --n_layer and the like.
    shape = SHAPE_KEYS if checkpoint.get("start", "scratch") == "scratch" else ("block_size",)
    wrong = [f"--{k}={saved[k]}" for k in ("mask",) + shape + RUN_KEYS
             if k in saved and saved[k] != getattr(cfg, k)]
    saved_rows = checkpoint.get("rows_per_step", saved.get("batch_size", 0) *
                                saved.get("gradient_accumulation_steps", 1))
    if saved_rows != rows_per_step:
        wrong.append(f"{saved_rows} rows per step (--batch_size x --gradient_accumulation_steps x "
                     f"ranks; now {rows_per_step})")
    if wrong:
        raise UserError(f"{path} was trained with {' '.join(wrong)}: pass that to resume it, or "
                        f"{AGAIN}")


def data_fingerprint(meta):
    """A prepared dataset, wherever it lies: its tokenizer and its splits' sizes."""
    return {"tokenizer": meta["tokenizer"]["name"],
            **{name: {k: split[k] for k in ("conversations", "tokens")}
               for name, split in meta["splits"].items()}}


def check_same_data(checkpoint, path, cfg, meta):
    """UserError unless the checkpoint was trained on meta's data (or records none)."""
    saved, ours = checkpoint.get("data"), data_fingerprint(meta)
    if saved is None or saved == ours:
        return
    trained = saved.get("train") if isinstance(saved, dict) else None
    count = f"{trained['conversations']:,}" if isinstance(trained, dict) and \
        isinstance(trained.get("conversations"), int) else "an unreadable number of"
    raise UserError(f"{path} was trained on other data than {cfg.data_dir} ({count} train "
                    f"conversations, not {ours['train']['conversations']:,}): pass the --data_dir "
                    f"it was trained on, or {AGAIN}")


@dataclass
class RunState:
    """What a checkpoint records of the run besides the weights and the optimizer."""
    iter_num: int = 0
    best_val_loss: float = float("inf")
    best_iter: int = 0
    tokens: dict = field(default_factory=lambda: {"tokens": 0, "answer_tokens": 0})
    start: str = "scratch"  # where the weights came from: scratch, or --init_from
    data_state: dict = field(default_factory=dict)  # the row stream's position
    base: dict = None  # LoRA: the weights the adapters sit on, named and fingerprinted

    @classmethod
    def of(cls, checkpoint):
        return cls(**{f.name: checkpoint[f.name] for f in fields(cls) if f.name in checkpoint})


def make_checkpoint(model_state, config, cfg, flags_given, meta, state, rows_per_step,
                    resumable=None):
    """The checkpoint dict (a LoRA run's adapters only: state.base names its base); resumable:
    (the optimizer's state dict, the row stream's position), None for best.pt."""
    checkpoint = {"model": model_state, "model_args": asdict(config), "config": asdict(cfg),
                  "flags": asdict(flags_given), "tokenizer": meta["tokenizer"], "mask": cfg.mask,
                  "data": data_fingerprint(meta), "rows_per_step": rows_per_step, **asdict(state)}
    del checkpoint["data_state"]
    if resumable is not None:
        checkpoint.update(optimizer=resumable[0], data_state=resumable[1])
    return checkpoint


def resumed_state(cfg, start, load_optimizer, meta, log, is_master=True):
    """The RunState of the resumed checkpoint (load_optimizer loads its optimizer state), or of a
    new run, which removes a replaced run's best.pt and adapter."""
    if start.checkpoint is None:
        replaced = os.path.join(cfg.out_dir, "best.pt")
        if is_master and os.path.lexists(replaced):
            os.remove(replaced)
            log(f"note: removed {replaced}, the best weights of the run this one replaces")
        if is_master and not writes_adapter(cfg) and not adapter_is_start(cfg):
            remove_adapter(os.path.join(cfg.out_dir, ADAPTER_DIR), log)
        return RunState(start=cfg.init_from, base=start.base)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    check_same_data(start.checkpoint, path, cfg, meta)
    try:
        load_optimizer(start.checkpoint["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: its optimizer state does not fit its model ({type(e).__name__}): "
                        f"{AGAIN}") from None
    state = RunState.of(start.checkpoint)
    log(f"resuming {path} at iter {state.iter_num} (best val answer loss "
        f"{state.best_val_loss:.4f})")
    if state.iter_num >= cfg.max_iters:
        log(f"note: the run is already at iter {state.iter_num}, not before --max_iters="
            f"{cfg.max_iters}: nothing to train (pass a larger --max_iters to go on)")
    return state
