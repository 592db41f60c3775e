"""
Train an ismGPT chat model: answer-only loss under a causal, prefix or ISM attention mask.

    python train.py                                   # synthetic data (prepared if missing), ISM, CPU or GPU
    python train.py --mask=causal --out_dir=out-causal
    python train.py --init_from=resume                # continue out/ckpt.pt exactly where it stopped
    python train.py config/finetune_smollm2.py        # fine-tune SmolLM2-135M-Instruct (--init_from=smollm2) with ISM
    python train.py config/finetune_gpt2.py           # fine-tune pretrained GPT-2 (--init_from=gpt2) with ISM
    python train.py config/gpt2_small.py              # a settings file, then flags
    torchrun --standalone --nproc_per_node=8 train.py --device=cuda --batch_size=64   # DDP, one GPU per rank

How it trains
- Batches: causal and ISM pack whole conversations into rows of block_size tokens (documents told apart by
  doc_ids); prefix trains on the triplet-expanded samples, one per answer (data/batching.py). The training rows are
  an endless stream of epochs, each packed afresh from (seed, epoch); every rank reads the same stream and takes its
  own rows, so ranks never share a row, and the stream position is all a checkpoint needs to continue exactly.
- Loss: cross-entropy on the answer targets only (loss.py says why), weighted so that a step's gradient is that of
  the mean over ALL answer tokens of the step, on every micro-batch and rank.
- AdamW (weight decay on matrices only), linear warmup then cosine decay to min_lr, gradient clipping.
- Randomness: weights are initialised from --seed; dropout is reseeded from (seed, rank, iteration) before every
  step, so a resumed run draws the same dropout masks as an uninterrupted one and no RNG state needs saving.
- Checkpoint: one file, out_dir/ckpt.pt, always the LATEST state (written at every evaluation, at the end and on
  Ctrl-C), written atomically; it records the best held-out loss seen. Resume needs the latest state; with the
  cosine schedule the latest model is also the one to sample from.
- Devices: on CUDA, bf16 autocast, TF32, FlexAttention with mask.py's BlockMask; on CPU, float32 (never autocast)
  and SDPA with the dense mask (FlexAttention's backward does not exist on CPU).
"""
import signal
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch imports: exit quietly (flags.run restores)

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import flags
from checkpoint import RunLock, load_checkpoint, model_from_checkpoint, save_checkpoint
from common import THREADS_HELP, resolve_device, runtime, set_threads
from data.batching import answer_target_count, collate, documents, epoch_rows, expansion_factor, token_count
from data.chat import DataError
from data.prepare import prepare_if_default, synthetic_dir
from data.store import load_meta, load_split
from data.tokenizer import TOKENIZER_HELP
from errors import UserError
from flags import setting
from loss import answer_loss_totals, train_step, val_rows
from mask import MASKS
from model import GPT, GPTConfig
from pretrained import START_HELP, load_start


@dataclass
class TrainConfig:
    # what and where
    mask: str = setting("ism", "attention mask: ism | causal | prefix", choices=MASKS)
    out_dir: str = setting("out", "folder of ckpt.pt (written, and read by --init_from=resume)")
    data_dir: str = setting("", "prepared data (python data/prepare.py); empty: the synthetic dataset in the model's "
                                "tokens, data/synthetic (byte) or data/synthetic-TOKENIZER, prepared when missing")
    tokenizer: str = setting("byte", f"of a model from scratch: {TOKENIZER_HELP} (a start brings its own)")
    init_from: str = setting("scratch", f"scratch | resume (continue out_dir/ckpt.pt) | {START_HELP}: the weights "
                                        "that start a new run")
    keep_best: bool = setting(False, "also keep the weights of the lowest held-out loss in out_dir/best.pt "
                                     "(sample.py --ckpt=best.pt); ckpt.pt stays the latest state, to resume")
    overwrite: bool = setting(False, "start a new run even where out_dir holds a checkpoint: its ckpt.pt is replaced "
                                     "at the first save, its log.jsonl and best.pt at once; without it a new run "
                                     "refuses to")
    # how
    device: str = setting("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available)")
    dtype: str = setting("auto", "auto | float32 | bfloat16 (auto: bf16 autocast on CUDA, float32 on CPU)",
                         choices=("auto", "float32", "bfloat16"))
    attention: str = setting("auto", "auto | sdpa | flex (auto: FlexAttention on CUDA, SDPA dense mask on CPU)",
                             choices=("auto", "sdpa", "flex"))
    compile: bool = setting(False, "torch.compile the model")
    threads: int = setting(0, THREADS_HELP, min=0)
    # how long, how often
    max_iters: int = setting(1400, "optimizer steps in total", min=0)
    eval_interval: int = setting(200, "evaluate the held-out answer loss and save ckpt.pt every this many steps",
                                 min=1)
    eval_iters: int = setting(0, "held-out batches per evaluation (0: the whole val split)", min=0)
    log_interval: int = setting(20, "print a training line every this many steps", min=1)
    # batches
    batch_size: int = setting(8, "rows per micro-batch (per rank)", min=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step (per rank)", min=1)
    block_size: int = setting(512, "tokens per row; at least the data's longest conversation", min=1)
    # model
    n_layer: int = setting(4, "transformer blocks (a pretrained start brings its own shape)", min=1)
    n_head: int = setting(4, "attention heads", min=1)
    n_embd: int = setting(128, "embedding width (a multiple of n_head)", min=1)
    dropout: float = setting(0.0, "dropout probability (with --attention=flex, residual dropout only: FlexAttention "
                                  "has no attention dropout)", min=0, below=1)
    # optimizer
    learning_rate: float = setting(6e-3, "peak learning rate (AdamW)", above=0)
    min_lr: float = setting(6e-4, "learning rate at the end of the cosine decay (~learning_rate/10)", min=0)
    warmup_iters: int = setting(50, "linear warmup steps", min=0)
    lr_decay_iters: int = setting(0, "steps of cosine decay (0: max_iters); set it to extend a run later", min=0)
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only", min=0)
    beta1: float = setting(0.9, "AdamW beta1", min=0, below=1)
    beta2: float = setting(0.99, "AdamW beta2", min=0, below=1)
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: off)", min=0)
    seed: int = setting(1337, "seed of the initial weights, the data order and dropout", min=0, max=2**63 - 1)


def check_config(cfg):
    """One-line UserErrors for settings that cannot work together (flags.parse checked each one alone)."""
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd={cfg.n_embd} is not a multiple of --n_head={cfg.n_head}")
    if cfg.min_lr > cfg.learning_rate:
        raise UserError(f"--min_lr={cfg.min_lr} is above --learning_rate={cfg.learning_rate}")


# ------------------------------------------------------------------------------------------------- the system

def setup_ddp(cfg):
    """-> (rank, local_rank, world_size); initialises the process group (nccl on CUDA, gloo on CPU) when
    launched by torchrun, which sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    backend = "nccl" if torch.device(resolve_device(cfg.device)).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()


def all_ranks_sum(values, device):
    """Element-wise sum of a list of numbers over the DDP ranks (the list itself without DDP)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------------------- data

def load_data(cfg, is_master):
    """-> (meta, train split, val split). The synthetic dataset's folder is filled when it does not exist yet (by
    global rank 0: on several nodes without a shared disk, prepare the data on each node first); any other missing
    data_dir is an error, never a silent stand-in."""
    problem = None
    if is_master:
        try:
            prepare_if_default(cfg.data_dir, cfg.tokenizer, cfg.block_size, lambda line: print(line, flush=True))
        except DataError as e:
            problem = str(e)
    if dist.is_initialized():  # the other ranks wait for rank 0's preparation, and learn whether it failed
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise UserError(problem)
    meta = load_meta(cfg.data_dir, cfg.block_size)
    return meta, load_split(cfg.data_dir, "train"), load_split(cfg.data_dir, "val")


class RowStream:
    """The training rows as an endless stream of epochs; epoch e is epoch_rows(split, kind, block_size, seed, e).
    Its position (epoch, row) is saved in checkpoints, so a resumed run reads exactly the rows it would have."""

    def __init__(self, split, kind, block_size, seed, epoch=0, row=0):
        self.split, self.kind, self.block_size, self.seed = split, kind, block_size, seed
        self.epoch, self.row = epoch, row
        self.rows = epoch_rows(split, kind, block_size, seed, epoch)

    def take(self, n):
        """The next n rows (each a list of (start, end, loss_from) documents), crossing into new epochs."""
        out = []
        while len(out) < n:
            if self.row >= len(self.rows):
                self.epoch, self.row = self.epoch + 1, 0
                self.rows = epoch_rows(self.split, self.kind, self.block_size, self.seed, self.epoch)
            part = self.rows[self.row:self.row + n - len(out)]
            out += part
            self.row += len(part)
        return out

    def state(self):
        return {"epoch": self.epoch, "row": self.row}


def rank_rows(rows, batch_size, rank, world_size):
    """This rank's micro-batches (lists of rows) of a step whose rows, all ranks', are `rows`: micro-batch k of
    rank r is rows [(k * world_size + r) * batch_size, ... + batch_size), so 2 ranks x 1 micro-batch train on the
    same rows as 1 rank x 2 micro-batches."""
    n_micro = len(rows) // (batch_size * world_size)
    starts = [(k * world_size + rank) * batch_size for k in range(n_micro)]
    return [rows[s:s + batch_size] for s in starts]


# --------------------------------------------------------------------------------------------- step settings

def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters (0: max_iters)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def reseed_dropout(seed, rank, iter_num):
    """Seed torch's RNG from (seed, rank, iteration) alone: a resumed run then draws the dropout masks an
    uninterrupted run would have, with no RNG state in the checkpoint."""
    torch.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + iter_num) % 2**63)


# ------------------------------------------------------------------------------------------------ checkpoints

FEW_VAL_ANSWERS = 2000  # fewer held-out answer tokens than this: a noisy loss, say so
RISING = 1.02  # a held-out loss 2% above the best one so far: say that the model may be overfitting
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
RUN_KEYS = ("seed", "batch_size", "gradient_accumulation_steps", "dropout")  # change the data order or dropout


RESUMED = {"iter_num": int, "best_val_loss": float, "data_state": dict, "optimizer": dict, "config": dict}


def check_resumable(checkpoint, path, cfg):
    """UserError, naming the flags to pass, when the checkpoint is not the run these flags describe (the flags of
    the run that wrote it are in its config), or when its training state is not one train.py writes."""
    for key, kind in RESUMED.items():
        if not isinstance(checkpoint.get(key), kind) or isinstance(checkpoint.get(key), bool):
            raise UserError(f"{path} holds no usable training state ({key}): start a new run with --overwrite or "
                            "another --out_dir")
    state = checkpoint["data_state"]
    if checkpoint["iter_num"] < 0 or not all(isinstance(state.get(k), int) and state[k] >= 0 for k in ("epoch", "row")):
        raise UserError(f"{path} holds an impossible training state (iter_num {checkpoint['iter_num']}, data_state "
                        f"{state}): start a new run with --overwrite or another --out_dir")
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
    saved = checkpoint.get("data")
    if saved is not None and saved != data_fingerprint(meta):
        raise UserError(f"{path} was trained on other data than {cfg.data_dir} ({saved['train']['conversations']:,} "
                        f"train conversations, not {meta['splits']['train']['conversations']:,}): pass the --data_dir "
                        "it was trained on, or start a new run with --overwrite or another --out_dir")


def make_checkpoint(model, cfg, meta, state, optimizer=None, stream=None):
    """The checkpoint dict; with the optimizer and the row stream it can be resumed, without it (best.pt) it holds
    the weights and what sample.py, eval.py and --init_from need."""
    checkpoint = {"model": model.state_dict(), "model_args": asdict(model.config), "config": asdict(cfg),
                  "tokenizer": meta["tokenizer"], "mask": cfg.mask, "data": data_fingerprint(meta), **state}
    if optimizer is not None:
        checkpoint.update(optimizer=optimizer.state_dict(), data_state=stream.state())
    return checkpoint


class TrainingLog:
    """out_dir/log.jsonl: one JSON object per evaluation and per logged step, for plots (experiments/plot_training.py).
    A new run starts it afresh, a resumed one appends. It is a record, not the run: a write that fails (a full
    disk) is reported once and logging stops, while training and its checkpoints go on."""

    def __init__(self, out_dir, resume, enabled):
        self.path, self.file = os.path.join(out_dir, "log.jsonl"), None
        if enabled:
            self.file = self._guarded(lambda: open(self.path, "a" if resume else "w", encoding="utf-8"))

    def write(self, **record):
        if self.file is not None:
            self._guarded(lambda: (self.file.write(json.dumps(record) + "\n"), self.file.flush()))

    def _guarded(self, action):
        try:
            return action()
        except OSError as e:
            print(f"warning: cannot write {self.path} ({e.strerror}): training goes on without it", file=sys.stderr)
            self.file = None


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


# ------------------------------------------------------------------------------------------------------- main

def check_fresh_start(cfg):
    """A new run must not silently replace the checkpoint of another run."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from != "resume" and os.path.exists(path) and not cfg.overwrite:
        raise UserError(f"{path} already holds a model: continue it with --init_from=resume, replace it with "
                        "--overwrite, or pick another --out_dir")


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
        return model_from_checkpoint(checkpoint, device, path), checkpoint, checkpoint["tokenizer"]
    start = load_start(cfg.init_from, cfg.block_size, cfg.dropout, device)
    log(f"starting from {start.what}")
    return start.model, None, start.tok.describe()


def main(argv=None):
    """Train as the flags say; returns the trained model (raw module, not the compiled/DDP wrapper)."""
    cfg = flags.parse(TrainConfig(), sys.argv[1:] if argv is None else argv, __doc__)
    check_config(cfg)
    check_fresh_start(cfg)
    set_threads(cfg.threads)
    rank, local_rank, world_size = setup_ddp(cfg)
    try:
        rt = runtime(cfg.device, cfg.dtype, cfg.attention, local_rank)
        with RunLock(cfg.out_dir) if rank == 0 else nullcontext():  # one run per out_dir; rank 0 writes it
            model = train(cfg, rt, rank, world_size)
        if dist.is_initialized():
            dist.barrier()  # every rank is done with the group before it goes: no rank tears it down under another
        return model
    except DataError as e:
        raise UserError(str(e)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def start_and_data(cfg, rt, is_master, log):
    """Where the run starts, then its data: -> (cfg, model, checkpoint to resume or None, meta, train, val). The
    start decides the tokenizer (data train.py prepares itself uses it); cfg comes back saying what was used."""
    model, checkpoint, tokenizer = starting_point(cfg, rt.device, log)
    if tokenizer is not None and tokenizer["name"] != cfg.tokenizer:
        cfg = replace(cfg, tokenizer=tokenizer["name"])
    if not cfg.data_dir:
        cfg = replace(cfg, data_dir=synthetic_dir(cfg.tokenizer))
    meta, train_split, val_split = load_data(cfg, is_master)
    if tokenizer is not None and meta["tokenizer"] != tokenizer:
        raise UserError(f"{cfg.data_dir} holds {meta['tokenizer']['name']} tokens, the start needs "
                        f"{tokenizer['name']} ones: prepare the data with python data/prepare.py "
                        f"--tokenizer={tokenizer['name']} --out_dir=DIR and pass --data_dir=DIR")
    if meta["tokenizer"]["name"] != cfg.tokenizer:
        log(f"note: {cfg.data_dir} holds {meta['tokenizer']['name']} tokens; --tokenizer={cfg.tokenizer} is ignored")
        cfg = replace(cfg, tokenizer=meta["tokenizer"]["name"])  # so the saved config says what was used
    if model is None:  # from scratch: the flags' shape, the data's vocabulary
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=meta["vocab_size"], n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
    if model.config.vocab_size < meta["vocab_size"]:
        raise UserError(f"the model has {model.config.vocab_size} tokens, {cfg.data_dir} uses {meta['vocab_size']}: "
                        "pass the --data_dir it was trained on")
    return cfg, model.to(rt.device).train(), checkpoint, meta, train_split, val_split


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


def train(cfg, rt, rank, world_size):
    is_master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if is_master else (lambda *a: None)
    cfg, model, checkpoint, meta, train_split, val_split = start_and_data(cfg, rt, is_master, log)

    # the optimizer and the state of the run, fresh or resumed
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           rt.device_type)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    iter_num, data_state = 0, {}
    state = {"best_val_loss": float("inf"), "best_iter": 0, "tokens": {"tokens": 0, "answer_tokens": 0},
             "start": "scratch" if cfg.init_from == "resume" else cfg.init_from}  # a resume reads the real one
    if checkpoint is not None:  # resume: the training state too
        check_same_data(checkpoint, ckpt_path, cfg, meta)
        optimizer.load_state_dict(checkpoint["optimizer"])
        iter_num, data_state = checkpoint["iter_num"], checkpoint["data_state"]
        state.update({k: checkpoint[k] for k in state if k in checkpoint})
        del checkpoint
        log(f"resuming {ckpt_path} at iter {iter_num} (best val answer loss {state['best_val_loss']:.4f})")
    elif is_master and os.path.exists(os.path.join(cfg.out_dir, "best.pt")):
        os.remove(os.path.join(cfg.out_dir, "best.pt"))  # the best weights of another run
        log(f"note: removed {os.path.join(cfg.out_dir, 'best.pt')} of the run this one replaces")
    stream = RowStream(train_split, cfg.mask, cfg.block_size, cfg.seed, **data_state)
    tokens = state["tokens"]
    raw_model = model
    if cfg.compile:
        log("compiling the model...")
        model = torch.compile(model)
    eval_model = model  # compiled or not, never DDP-wrapped: evaluation needs no gradient sync
    if world_size > 1:
        model = DDP(model, device_ids=[torch.device(rt.device).index] if rt.device_type == "cuda" else None)
    rows_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    describe_run(log, cfg, rt, raw_model, meta, train_split, rows_per_step, len(stream.rows), world_size)

    # held-out rows: this rank's share (each rank evaluates its own rows; the sums are added over ranks)
    all_eval_rows = val_rows(val_split, cfg.mask, cfg.block_size, cfg.batch_size, cfg.eval_iters)
    eval_rows = all_eval_rows[rank::world_size]
    val_answers = answer_target_count(val_split, all_eval_rows)
    if val_answers < FEW_VAL_ANSWERS:
        log(f"note: the held-out loss is measured on {val_answers} answer tokens only: it is noisy (hold out more "
            "conversations: python data/prepare.py --val_fraction=..., or --eval_iters=0)")
    record = TrainingLog(cfg.out_dir, resume=cfg.init_from == "resume", enabled=is_master)

    def evaluate():
        total, count = answer_loss_totals(eval_model, val_split, eval_rows, cfg.mask, cfg.block_size,
                                          cfg.batch_size, rt)
        total, count = all_ranks_sum([total, count], rt.device)
        return total / max(count, 1)

    def save(reason, name="ckpt.pt"):
        if is_master:
            path = os.path.join(cfg.out_dir, name)
            resumable = (optimizer, stream) if name == "ckpt.pt" else ()
            save_checkpoint(make_checkpoint(raw_model, cfg, meta, dict(state, iter_num=iter_num), *resumable), path)
            log(f"saved {path} ({reason}, iter {iter_num})")

    t_start = t_interval = time.time()
    steps_timed, resumed_at = 0, iter_num
    with StopOnSignal() as stop:
        while True:
            # 1. evaluate the held-out answer loss and save the latest state, every eval_interval steps and at the end
            if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters:
                val_loss = evaluate()
                improved = val_loss < state["best_val_loss"]
                if improved:
                    state.update(best_val_loss=val_loss, best_iter=iter_num)
                log(f"eval iter {iter_num}: val answer loss {val_loss:.4f} (best {state['best_val_loss']:.4f}); "
                    f"trained on {tokens['tokens']:,} tokens, {tokens['answer_tokens']:,} answer tokens")
                record.write(iter=iter_num, val_loss=val_loss, tokens=tokens["tokens"], time=time.time())
                if val_loss > RISING * state["best_val_loss"]:
                    log(f"note: the held-out loss rose to {val_loss:.4f} from {state['best_val_loss']:.4f} at iter "
                        f"{state['best_iter']}: the model may be overfitting (--keep_best keeps the best weights)")
                if iter_num > 0:  # a new run never replaces an existing checkpoint with untrained weights
                    save("latest")
                    if cfg.keep_best and improved:
                        save("best", "best.pt")
                t_interval, steps_timed = time.time(), 0  # step timings leave evaluation out
            # 2. stop when done, or when asked to (every rank must agree: under DDP they compare at log steps only)
            if iter_num >= cfg.max_iters:
                break
            may_stop = world_size == 1 or iter_num % cfg.log_interval == 0
            if may_stop and all_ranks_sum([float(stop.requested)], rt.device)[0]:
                if iter_num == 0 or (cfg.init_from == "resume" and iter_num == resumed_at):
                    log(f"interrupted at iter {iter_num} before training: nothing to save")
                    raise SystemExit(130)
                save("interrupted")
                log(f"interrupted at iter {iter_num}/{cfg.max_iters}: continue with the same flags and "
                    "--init_from=resume")
                raise SystemExit(130)

            # 3. this step's learning rate and dropout seed
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            reseed_dropout(cfg.seed, rank, iter_num)

            # 4. the step's rows (every rank's), then this rank's micro-batches
            rows = stream.take(rows_per_step)
            mine = rank_rows(rows, cfg.batch_size, rank, world_size)
            batches = [rt.to_device(collate(train_split, r, cfg.block_size)) for r in mine]
            answer_tokens = answer_target_count(train_split, rows)

            # 5. forward, backward and the optimizer step, weighted by the step's answer tokens over all ranks
            step_loss = train_step(model, optimizer, batches, cfg.mask, answer_tokens, rt, cfg.grad_clip, world_size)
            step_tokens = token_count(rows)
            tokens["tokens"] += step_tokens
            tokens["answer_tokens"] += answer_tokens
            iter_num += 1
            steps_timed += 1

            # 6. log this rank's loss, the speed and the time left
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                local_answers = answer_target_count(train_split, [row for r in mine for row in r])
                loss = step_loss.item() / max(local_answers, 1)  # waits for the GPU, so the timing is honest
                dt = (time.time() - t_interval) / steps_timed
                gpu = ""
                if rt.device_type == "cuda":
                    per_rank_tokens = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size
                    gpu = (f", mfu {100 * raw_model.estimate_mfu(per_rank_tokens, dt):.1f}%, "
                           f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
                log(f"iter {iter_num}/{cfg.max_iters}: loss {loss:.4f}, lr {lr:.1e}, {1000 * dt:.1f}ms/iter, "
                    f"{step_tokens / dt:,.0f} tok/s ({answer_tokens / dt:,.0f} answer tok/s){gpu}, "
                    f"eta {fmt_duration((cfg.max_iters - iter_num) * dt)}")
                record.write(iter=iter_num, loss=loss, lr=lr, ms_per_iter=1000 * dt, time=time.time())
                t_interval, steps_timed = time.time(), 0
    log(f"done: {iter_num} iters in {fmt_duration(time.time() - t_start)}, best val answer loss "
        f"{state['best_val_loss']:.4f} (iter {state['best_iter']}), {tokens['tokens']:,} tokens "
        f"({tokens['answer_tokens']:,} answer tokens)")
    return raw_model


if __name__ == "__main__":
    flags.run(main)
