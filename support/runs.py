"""
A training run's bookkeeping, kept apart from the training loop (train.py): one run per out_dir (RunLock), which
files a new run may replace, whether a checkpoint can be resumed with these flags and data, the checkpoint dict a
run writes, its training log (out_dir/log.jsonl), stopping cleanly on a signal, and what a killed run left behind.

Files in out_dir: ckpt.pt (the latest state, to resume), best.pt (--keep_best), log.jsonl, train.lock. None of them
is ever written through a symbolic link: a link planted there is refused, never followed.
"""
import fcntl
import glob
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from support.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from support.compute import resolve_device
from data.batching import documents, expansion_factor
from support.errors import DataError
from data.tokenizer import tokenizer_from_description
from support.errors import UserError
from support.starts import load_start

RUN_FILES = ("ckpt.pt", "best.pt", "log.jsonl")  # what a new run writes, so what it must not silently replace
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
RUN_KEYS = ("seed", "batch_size", "gradient_accumulation_steps", "dropout")  # change the data order or dropout
# Settings that change neither the result nor the plan: a finished run asked again with other values of these
# has nothing to do.
NO_EFFECT = ("threads", "log_interval", "compile", "overwrite")


def planted_link(path, what):
    return UserError(f"{path} is a symbolic link: remove it (a run never writes {what} through a link it did not make)")


def open_no_follow(path, flags, what):
    """os.open that refuses a symbolic link at path (O_NOFOLLOW) with a one-line UserError."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise planted_link(path, what) from None
        raise UserError(f"cannot write {path} ({e.strerror or e}): pick another --out_dir") from None


class RunLock:
    """Hold out_dir/train.lock while a run trains, so that a second run on the same out_dir is refused instead of
    both writing one ckpt.pt. The lock is the kernel's (flock): a killed run releases it with its process. Holding
    it, the run clears the temporary files a killed run's save left behind (no live run can be writing them)."""

    def __init__(self, out_dir):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, "train.lock"), None

    def __enter__(self):
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to {self.out_dir} ({e.strerror}): pick another --out_dir") from None
        self.fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, "its lock")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self.fd, 100).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UserError(f"another training run ({owner}) is using {self.out_dir}: wait for it to finish or pick "
                            "another --out_dir") from None
        try:  # the pid only names the owner in another run's error: a full disk must not stop this run here
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()}".encode())
        except OSError:
            pass
        for pattern in (".ckpt-*.tmp", ".log-*.tmp"):  # checkpoint.save_checkpoint's and TrainingLog's
            for leftover in glob.glob(os.path.join(self.out_dir, pattern)):
                if os.path.isfile(leftover) and not os.path.islink(leftover):
                    os.remove(leftover)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock; the file stays (removing it would race with a new run)


# ---------------------------------------------------------------------------------------- new runs and resumes

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


# ------------------------------------------------------------------------------------------- the run's state

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


def jsonl(lines):
    return "".join(line + "\n" for line in lines).encode("utf-8")


class TrainingLog:
    """out_dir/log.jsonl: one JSON object per evaluation and per logged step, for plots (experiments/plot_training.py).
    A new run starts it afresh. A resumed one keeps what the run had logged up to the step it resumes at and goes on
    from there, so the log is the one an uninterrupted run writes (no step or evaluation twice, even after a kill).
    It is a record, not the run: a log that cannot be read or written (a full disk, a folder in its place) is
    reported once and logging stops, while training and its checkpoints go on. Only a planted link is refused."""

    def __init__(self, out_dir, resumed_at=None, enabled=True):
        self.path, self.fd = os.path.join(out_dir, "log.jsonl"), None
        if not enabled:
            return
        if os.path.islink(self.path):
            raise planted_link(self.path, "its log")
        tmp = None
        try:  # the kept records go to a new file that then takes the log's name: a kill leaves one log or the other
            kept = self._records_before(resumed_at) if resumed_at is not None else []
            self.fd, tmp = tempfile.mkstemp(prefix=".log-", suffix=".tmp", dir=out_dir)
            os.write(self.fd, jsonl(kept))
            os.replace(tmp, self.path)  # replaces a name, never writes through what the name points to
        except OSError as e:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            self.stop_logging(e)

    def stop_logging(self, error):
        print(f"warning: cannot write {self.path} ({error.strerror or error}): training goes on without it",
              file=sys.stderr, flush=True)
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None

    def _records_before(self, step):
        """The lines of an earlier log up to `step`: every record of the steps before it, and the step record of
        `step` itself (written after that step, before the evaluation the resumed run now repeats)."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().decode("utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and isinstance(record.get("iter"), int) and (
                    record["iter"] < step or (record["iter"] == step and "val_loss" not in record)):
                kept.append(line)
        return kept

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def write(self, **record):
        self.write_lines([json.dumps(record)])

    def write_lines(self, lines):
        if self.fd is None or not lines:
            return
        try:
            os.write(self.fd, jsonl(lines))
        except OSError as e:
            self.stop_logging(e)


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the next step boundary, so the checkpoint it writes
    is a consistent one; a second Ctrl-C aborts at once."""

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step to save a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def fmt_duration(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


@dataclass
class Run:
    """What the loop's helpers share: the settings (cfg resolved, flags_given as parsed), where it runs, the raw
    model (neither compiled nor DDP-wrapped: what is saved), its optimizer, the row stream, the RunState that
    checkpoints record, the log and whether every step since the last check had a finite loss."""
    cfg: object  # train.TrainConfig
    flags_given: object
    rt: object  # common.Runtime
    rank: int
    world_size: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: object  # data.batching.RowStream
    state: RunState
    meta: dict
    log: object
    record: TrainingLog = None
    finite: object = True  # a bool tensor on the device: no step loss checked until a sync point needs it
    saved_iter: int = None

    def save(self, reason, name="ckpt.pt"):
        if self.rank == 0:
            path = os.path.join(self.cfg.out_dir, name)
            resumable = (self.optimizer, self.stream) if name == "ckpt.pt" else ()
            save_checkpoint(make_checkpoint(self.model, self.cfg, self.flags_given, self.meta, self.state,
                                            *resumable), path)
            self.log(f"saved {path} ({reason}, iter {self.state.iter_num})")
        self.saved_iter = self.state.iter_num if name == "ckpt.pt" else self.saved_iter

    def check_finite(self, *values):
        """Stop the run, saving nothing, once a loss is not finite (a diverged run): the last checkpoint stays the
        last finite state. Every rank takes part (a sync point)."""
        bad = not bool(self.finite) or not all(math.isfinite(v) for v in values)
        if all_ranks_sum([float(bad)], self.rt.device)[0]:
            kept = (f"{os.path.join(self.cfg.out_dir, 'ckpt.pt')} keeps iter {self.saved_iter}"
                    if self.saved_iter else "nothing was saved; its log.jsonl stays, so pass --overwrite to the next "
                    "run here")
            raise UserError(f"the loss is not finite by iter {self.state.iter_num}: the run diverged (try a lower "
                            f"--learning_rate or --grad_clip); {kept}")


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


class StepTimer:
    """Mean wall time per optimizer step since the last restart (evaluations and logging left out)."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.t0, self.steps = time.time(), 0

    def seconds_per_step(self):
        return (time.time() - self.t0) / max(self.steps, 1)


def all_ranks_sum(values, device):
    """Element-wise sum of a list of numbers over the DDP ranks (the list itself without DDP)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def setup_ddp(cfg):
    """-> (rank, local_rank, world_size); initialises the process group (nccl on CUDA, gloo on CPU) when
    launched by torchrun, which sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    backend = "nccl" if torch.device(resolve_device(cfg.device)).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()


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


def describe_run(log, cfg, rt, model, meta, train_split, rows_per_step, rows_per_epoch, world_size):
    shape = model.config
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {shape.n_layer} layers, {shape.n_head} heads, "
        f"{shape.n_embd} wide, block_size {shape.block_size}, vocab {shape.vocab_size} ({meta['tokenizer']['name']}, "
        f"{meta['vocab_size']} tokens)")
    precision = "float32" if rt.dtype == "float32" else "bf16 autocast"
    log(f"run: mask {cfg.mask}, {rt.device} ({precision}), attention {rt.attention}, {world_size} rank(s), "
        f"{rows_per_step} rows x {cfg.block_size} tokens per step")
    log(f"data: {cfg.data_dir}: {len(train_split.offsets) - 1:,} train conversations ({int(train_split.offsets[-1]):,} "
        f"tokens) -> {len(documents(train_split, cfg.mask)):,} {cfg.mask} training samples in {rows_per_epoch:,} "
        f"rows per epoch ({rows_per_epoch / rows_per_step:.1f} steps); prefix expansion factor "
        f"{expansion_factor(train_split):.2f}x (the tokens --mask=prefix trains on per epoch)")
