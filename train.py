"""Train an ismGPT chat model: answer-only loss under a causal, prefix or ISM attention mask.

    python train.py                                 # synthetic data (prepared if missing), ISM
    python train.py --init_from=resume              # continue out/ckpt.pt where it stopped
    python train.py config/finetune_smollm2.py      # a settings file, then flags
    torchrun --standalone --nproc_per_node=8 train.py --device=cuda   # DDP, one GPU per rank

Rows are an endless stream of epochs, each packed afresh from (seed, epoch) (data/batching.py);
every rank reads the same stream and takes its own rows, so the stream's position is all a
checkpoint needs to go on exactly, on any number of ranks. The loss counts answer targets only
(loss.py), a step's gradient that of the mean over ALL its answer tokens. Dropout is reseeded
from (seed, step, row) before every step: no RNG state to save. out_dir/ckpt.pt is always the
latest state, written atomically. CUDA: bf16 autocast, FlexAttention; CPU: float32, SDPA.
"""
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import flags
from cli.errors import DataError, UserError
from cli.flags import setting
from data.batching import (RowStream, answer_target_count, batches_of, collate, documents,
                           expansion_factor, heldout_rows, rank_rows, token_count)
from data.prepare import prepare_if_default, synthetic_dir
from data.store import load_meta, load_split
from data.tokenizer import TOKENIZER_HELP
from loss import answer_loss_totals, train_step
from mask import MASKS
from model import GPT
from support.checkpoint import save_checkpoint
from support.compute import (DEVICE_HELP, DTYPES, THREADS_HELP, all_ranks_sum, check_fits,
                             compute_init, memory_plan)
from support.lora import peft_base, with_lora, write_adapter
from support.resume import (ADAPTER_DIR, RunState, check_fresh_start, make_checkpoint,
                            resumed_state, starting_point, writes_adapter)
from support.run_files import RunLock, StepTimer, TrainingLog, fmt_duration
from support.sharding import full_state, load_optimizer_state, shard, start_on_rank0
from support.signals import StopOnSignal
from support.starts import START_HELP, new_model_config


@dataclass
class TrainConfig:
    # what and where
    mask: str = setting("ism", "attention mask: ism | causal | prefix", choices=MASKS)
    out_dir: str = setting("out", "folder of ckpt.pt (written; read by --init_from=resume)")
    data_dir: str = setting("", "prepared data (python prepare.py); empty: the synthetic dataset "
                                "in the model's tokens, prepared when missing")
    tokenizer: str = setting("byte", f"of a model from scratch: {TOKENIZER_HELP}")
    init_from: str = setting("scratch", f"scratch | resume (out_dir/ckpt.pt) | {START_HELP}")
    keep_best: bool = setting(False, "also keep the best held-out loss's weights in best.pt")
    overwrite: bool = setting(False, "replace another run's files in out_dir (best.pt, log.jsonl "
                                     "at once, ckpt.pt at the first save); else refused")
    # how
    device: str = setting("auto", DEVICE_HELP)
    dtype: str = setting("auto", "auto | float32 | bfloat16 (auto: bf16 on CUDA)", choices=DTYPES)
    attention: str = setting("auto", "auto | sdpa | flex (auto: flex on CUDA)",
                             choices=("auto", "sdpa", "flex"))
    compile: bool = setting(False, "torch.compile the model")
    threads: int = setting(0, THREADS_HELP, min=0)
    # how long, how often
    max_iters: int = setting(1400, "optimizer steps in total", min=0, max=10**9)
    eval_interval: int = setting(200, "evaluate and save ckpt.pt every this many steps", min=1)
    eval_iters: int = setting(0, "held-out batches per evaluation (0: the whole val split)", min=0)
    log_interval: int = setting(20, "print a training line every this many steps", min=1)
    # batches
    batch_size: int = setting(8, "rows per micro-batch (per rank)", min=1, max=2**16)
    gradient_accumulation_steps: int = setting(1, "micro-batches per step", min=1, max=2**16)
    block_size: int = setting(512, "tokens per row, all of a conversation", min=1, max=2**20)
    # model (a pretrained start brings its own shape)
    n_layer: int = setting(4, "transformer blocks", min=1, max=1024)
    n_head: int = setting(4, "attention heads", min=1, max=1024)
    n_embd: int = setting(128, "embedding width (a multiple of n_head)", min=1, max=2**16)
    dropout: float = setting(0.0, "dropout (flex: residual dropout only)", min=0, below=1)
    # optimizer
    learning_rate: float = setting(6e-3, "peak learning rate (AdamW)", above=0)
    min_lr: float = setting(6e-4, "learning rate at the end of the cosine decay", min=0)
    warmup_iters: int = setting(50, "linear warmup steps", min=0)
    lr_decay_iters: int = setting(0, "steps of cosine decay (0: max_iters)", min=0)
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only", min=0)
    beta1: float = setting(0.9, "AdamW beta1", min=0, below=1)
    beta2: float = setting(0.99, "AdamW beta2", min=0, below=1)
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: off)", min=0)
    seed: int = setting(1337, "seed of weights, data order, dropout", min=0, max=2**63 - 1)
    # LoRA, and sharding over ranks
    lora_rank: int = setting(0, "train LoRA adapters of this rank, not every weight (0: off); "
                                "out_dir/adapter/ holds them in PEFT's format", min=0, max=4096)
    lora_alpha: float = setting(0.0, "LoRA's scale: lora_alpha / lora_rank (0: 2 x rank)", min=0)
    lora_targets: str = setting("q_proj,v_proj", "the projections LoRA adapts: q_proj, k_proj, "
                                "v_proj, o_proj, gate_proj, up_proj, down_proj")
    lora_dropout: float = setting(0.0, "dropout on the adapters' input", min=0, below=1)
    adapter: str = setting("", "a PEFT LoRA adapter folded into --init_from's weights first")
    fsdp: bool = setting(False, "shard weights, gradients and optimizer state over the ranks "
                                "(FSDP2; with torchrun); without it several ranks run DDP")
    activation_checkpointing: bool = setting(False, "recompute each block backward: less memory, "
                                                    "a third more compute")


def check_config(cfg):
    """One-line UserErrors for settings that cannot work together."""
    new_model_config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    if (cfg.lora_rank or cfg.adapter) and cfg.init_from == "scratch":
        raise UserError("--lora_rank and --adapter work on a pretrained start: pass --init_from")
    if cfg.min_lr > cfg.learning_rate:
        raise UserError(f"--min_lr={cfg.min_lr} is above --learning_rate={cfg.learning_rate}")


# ------------------------------------------------------------------------ what a run does, in order

def setup(cfg, flags_given, rt, log):
    """Everything a run does before its loop, in order (support/ says how) -> Run."""
    # 1. the start: out_dir's checkpoint to resume, pretrained weights (an --adapter folded in), or
    #    nothing (scratch). Under FSDP rank 0 alone loads it; the others build it on the meta device
    find = partial(starting_point, cfg, rt.device, log, rows_per_step(cfg, rt))
    sharded = cfg.fsdp and rt.world_size > 1 and cfg.init_from != "scratch"
    start = start_on_rank0(find, rt) if sharded else find()
    # 2. the data, in the start's tokens
    cfg, data = load_data(cfg, start.tokenizer, rt, log)
    # 3. the model: the start's, or a new one of the flags' shape and the data's vocabulary
    model = start.model or scratch_model(cfg, data.meta["vocab_size"], rt)
    if model.config.vocab_size < data.meta["vocab_size"]:
        raise UserError(f"the model has {model.config.vocab_size} tokens, {cfg.data_dir} uses "
                        f"{data.meta['vocab_size']}: pass the --data_dir it was trained on")
    # 4. a new LoRA run: fresh adapters on the start (a resumed one has its own); only they train
    if cfg.lora_rank and start.checkpoint is None:
        model = new_adapters(model, cfg)
    # 5. onto the device: sharded (FSDP2) or DDP-wrapped, and compiled, as asked
    step_model, eval_model = wrapped(model.train(), cfg, rt, log)
    # 6. the optimizer over what trains, and the run's state: the checkpoint's, or a new one
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), rt.device_type)
    state = resumed_state(cfg, start, lambda saved: load_optimizer_state(model, optimizer, saved),
                          data.meta, log, rt.is_master)
    # 7. the rows: the stream where the checkpoint left it, and this rank's held-out rows
    stream = RowStream(data.train_split, cfg.mask, cfg.block_size, cfg.seed, **state.data_state)
    describe_run(log, cfg, rt, model, data, len(stream.rows))
    resumed_at = state.iter_num if start.checkpoint else None
    return Run(cfg, flags_given, rt, model, step_model, eval_model, optimizer, stream, data,
               heldout(data.val_split, cfg, rt, log), state, log, resumed_at=resumed_at,
               saved_iter=resumed_at)


def train(cfg, flags_given, rt):
    log = flags.say if rt.is_master else (lambda *a: None)  # a closed stdout costs only messages
    run = setup(cfg, flags_given, rt, log)
    cfg, state, stream, t_start, timer = run.cfg, run.state, run.stream, time.time(), StepTimer()
    with (StopOnSignal(cfg.log_interval if rt.world_size > 1 else 1) as stop,
          TrainingLog(cfg.out_dir, run.resumed_at, rt.is_master) as run.record):
        while True:
            # 1. evaluate the held-out answer loss and save: every eval_interval steps, at the end
            if state.iter_num % cfg.eval_interval == 0 or state.iter_num >= cfg.max_iters:
                evaluate_and_save(run)
                timer.restart()
            # 2. stop when done, or when asked to
            if state.iter_num >= cfg.max_iters:
                break
            stop_if_asked(run, stop)

            # 3. this step's learning rate
            lr = get_lr(state.iter_num, cfg)
            for group in run.optimizer.param_groups:
                group["lr"] = lr

            # 4. the step's rows (every rank's), then this rank's micro-batches
            rows = stream.take(rows_per_step(cfg, rt))
            mine = rank_rows(rows, cfg.batch_size, rt.rank, rt.world_size)
            batches = [rt.to_device(collate(stream.split, r, cfg.block_size)) for r in mine]
            answer_tokens = answer_target_count(stream.split, rows)

            # 5. forward, backward, optimizer step, weighted by the step's answer tokens (all ranks)
            step_loss = train_step(run.step_model, run.optimizer, batches, cfg.mask, answer_tokens,
                                   rt, cfg.grad_clip, rt.world_size,
                                   dropout_seeds(cfg, rt, state.iter_num, len(mine)))
            run.finite = run.finite & torch.isfinite(step_loss)  # checked at the next sync point
            state.tokens["tokens"] += token_count(rows)
            state.tokens["answer_tokens"] += answer_tokens
            state.iter_num += 1
            timer.steps += 1

            # 6. log this rank's loss, the speed and the time left
            if state.iter_num % cfg.log_interval == 0 or state.iter_num == cfg.max_iters:
                log_step(run, mine, lr, step_loss, token_count(rows), answer_tokens, timer)
    log(f"done: {state.iter_num} iters in {fmt_duration(time.time() - t_start)}, best val answer "
        f"loss {state.best_val_loss:.4f} (iter {state.best_iter}), {state.tokens['tokens']:,} "
        f"tokens ({state.tokens['answer_tokens']:,} answer tokens)")
    return run.model


# ---------------------------------------------------------------------------- the steps of setup

@dataclass
class Data:
    meta: dict
    train_split: object  # data.store.Split
    val_split: object


def load_data(cfg, tokenizer, rt, log):
    """-> (cfg naming the data and tokenizer used, Data), in the start's tokens (tokenizer: its
    description; None: any). Rank 0 prepares a missing synthetic dataset (nodes without a shared
    disk: prepare on each first); any other missing data_dir is an error, never a stand-in."""
    if tokenizer is not None and tokenizer["name"] != cfg.tokenizer:
        cfg = replace(cfg, tokenizer=tokenizer["name"])
    if not cfg.data_dir:
        cfg = replace(cfg, data_dir=synthetic_dir(cfg.tokenizer))
    problem = [None]
    if rt.is_master:
        try:
            prepare_if_default(cfg.data_dir, cfg.tokenizer, cfg.block_size, log)
        except DataError as e:
            problem = [str(e)]
    if dist.is_initialized():  # the other ranks wait for rank 0, and learn whether it failed
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise UserError(problem[0])
    meta = load_meta(cfg.data_dir, cfg.block_size)
    name = meta["tokenizer"]["name"]
    if tokenizer is not None and meta["tokenizer"] != tokenizer:
        raise UserError(f"{cfg.data_dir} holds {name} tokens, the start needs {tokenizer['name']} "
                        f"ones: prepare the data with python prepare.py --tokenizer="
                        f"{tokenizer['name']} --out_dir=DIR and pass --data_dir=DIR")
    if name not in (cfg.tokenizer, os.path.abspath(cfg.tokenizer)):
        log(f"note: {cfg.data_dir} holds {name} tokens; --tokenizer={cfg.tokenizer} is ignored")
        cfg = replace(cfg, tokenizer=name)  # the saved config says what was used
    return cfg, Data(meta, load_split(cfg.data_dir, "train"), load_split(cfg.data_dir, "val"))


def scratch_model(cfg, vocab_size, rt):
    """A new model of the flags' shape, its weights drawn from --seed."""
    torch.manual_seed(cfg.seed)
    config = new_model_config(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
    check_fits(config, cfg.batch_size, cfg.block_size, rt.device)
    return GPT(config)


def new_adapters(model, cfg):
    """The start with fresh LoRA adapters, their A drawn from --seed."""
    torch.manual_seed(cfg.seed)
    try:
        return with_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","),
                         cfg.lora_dropout)
    except ValueError as e:
        raise UserError(f"--lora_rank={cfg.lora_rank} --lora_targets={cfg.lora_targets}: {e}") \
            from None


def wrapped(model, cfg, rt, log):
    """-> (the model a step runs, the one evaluation runs): on the device, sharded (FSDP2, in place)
    or DDP-wrapped, and compiled, as asked; evaluation never runs the DDP wrapper."""
    model.checkpoint_blocks = cfg.activation_checkpointing
    if cfg.compile:
        log("compiling the model...")
    if cfg.fsdp:
        for block in model.transformer.h if cfg.compile else ():
            block.compile()  # in place, before sharding: the module stays the one fully_shard wraps
        shard(model, rt)
        return model, model
    model = torch.compile(model.to(rt.device)) if cfg.compile else model.to(rt.device)
    if rt.world_size == 1:
        return model, model
    ids = [torch.device(rt.device).index] if rt.device_type == "cuda" else None
    return DDP(model, device_ids=ids), model


def rows_per_step(cfg, rt):
    """Every rank's rows in one step: the same rows per step train the same on any world size."""
    return cfg.batch_size * cfg.gradient_accumulation_steps * rt.world_size


FEW_VAL_ANSWERS = 2000  # fewer held-out answer tokens than this: a noisy loss, said so
RISING = 1.02  # a held-out loss 2% above the best: say the model may be overfitting


def heldout(val_split, cfg, rt, log):
    """This rank's share of the held-out rows (each rank evaluates its own; the sums are added)."""
    rows = heldout_rows(val_split, cfg.mask, cfg.block_size, cfg.batch_size, cfg.eval_iters)
    answers = answer_target_count(val_split, rows)
    if answers == 0:
        raise UserError(f"{cfg.data_dir}: the held-out rows hold no answer tokens; prepare the "
                        "data again")
    if answers < FEW_VAL_ANSWERS:
        more = "--eval_iters=0 scores every held-out row" if cfg.eval_iters else \
            "hold out more conversations: python prepare.py --val_fraction=..., or --n_val=... " \
            "for the synthetic data"
        log(f"note: the held-out loss is measured on {answers} answer tokens only: it is noisy "
            f"({more})")
    mine = rows[rt.rank::rt.world_size]
    if cfg.fsdp:  # every rank runs as many forwards (each gathers from all): padding rows
        mine += [[]] * (-(-len(rows) // rt.world_size) - len(mine))
    return mine


# ---------------------------------------------------------------------------- the loop's steps

@dataclass
class Run:
    """What the loop works on. model is the raw one, what is saved; step_model runs a step (compiled
    and wrapped), eval_model evaluation (never DDP)."""
    cfg: object
    flags_given: object
    rt: object
    model: GPT
    step_model: torch.nn.Module
    eval_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: RowStream
    data: Data
    eval_rows: list
    state: RunState
    log: object
    record: TrainingLog = None
    finite: object = True  # on the device: no step's loss read until a sync point needs it
    resumed_at: int = None  # the step a resumed run went on from
    saved_iter: int = None  # the step of the latest ckpt.pt written or resumed

    def save(self, reason, name="ckpt.pt"):
        """Write out_dir/name (ckpt.pt with the optimizer's state, to resume), and a LoRA run's
        adapters to out_dir/adapter. Every rank takes part (FSDP gathers the shards)."""
        model_state, optimizer_state = full_state(self.model, self.optimizer)
        latest = name == "ckpt.pt"
        if self.rt.is_master:
            path, c = os.path.join(self.cfg.out_dir, name), self.cfg
            # adapter/ first, ckpt.pt last: a kill between leaves adapter/ a save ahead of ckpt.pt,
            # never behind it, and the resumed run writes that same save again
            if latest and writes_adapter(c):
                write_adapter(model_state, self.model.config, os.path.join(c.out_dir, ADAPTER_DIR),
                              peft_base(self.state.base["init_from"]))
            resumable = (optimizer_state, self.stream.state()) if latest else None
            save_checkpoint(make_checkpoint(model_state, self.model.config, c, self.flags_given,
                                            self.data.meta, self.state, rows_per_step(c, self.rt),
                                            resumable), path)
            self.log(f"saved {path} ({reason}, iter {self.state.iter_num})")
        self.saved_iter = self.state.iter_num if latest else self.saved_iter

    def check_finite(self, *values):
        """Stop the run, saving nothing, once a loss is not finite: the last checkpoint stays the
        last finite state. Every rank takes part (a sync point)."""
        bad = not bool(self.finite) or not all(math.isfinite(v) for v in values)
        if all_ranks_sum([float(bad)], self.rt.device)[0]:
            kept = f"{os.path.join(self.cfg.out_dir, 'ckpt.pt')} keeps iter {self.saved_iter}" \
                if self.saved_iter else "nothing was saved; its log.jsonl stays, so pass " \
                "--overwrite to the next run here"
            raise UserError(f"the loss is not finite by iter {self.state.iter_num}: the run "
                            f"diverged (try a lower --learning_rate or --grad_clip); {kept}")


def evaluate_and_save(run):
    """Step 1: the held-out answer loss, logged and recorded; then the latest state saved (never a
    new run's untrained weights over an existing file), and best.pt with --keep_best."""
    cfg, state = run.cfg, run.state
    batches = batches_of(run.data.val_split, run.eval_rows, cfg.block_size, cfg.batch_size)
    totals = answer_loss_totals(run.eval_model, batches, cfg.mask, run.rt)
    total, count = all_ranks_sum(list(totals), run.rt.device)
    val_loss = total / max(count, 1)
    run.check_finite(val_loss)
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_iter = val_loss, state.iter_num
    run.log(f"eval iter {state.iter_num}: val answer loss {val_loss:.4f} (best "
            f"{state.best_val_loss:.4f}); trained on {state.tokens['tokens']:,} tokens, "
            f"{state.tokens['answer_tokens']:,} answer tokens")
    run.record.write(iter=state.iter_num, val_loss=val_loss, tokens=state.tokens["tokens"],
                     time=time.time())
    if val_loss > RISING * state.best_val_loss:
        run.log(f"note: the held-out loss rose to {val_loss:.4f} from {state.best_val_loss:.4f} "
                f"at iter {state.best_iter}: the model may be overfitting (--keep_best keeps the "
                "best weights)")
    if state.iter_num > 0 and state.iter_num != run.saved_iter:  # a resume's first: no change
        run.save("latest")
        if cfg.keep_best and improved:
            run.save("best", "best.pt")


def stop_if_asked(run, stop):
    """Step 2's signal check: every rank must agree, so several ranks compare at log steps only."""
    cfg, it = run.cfg, run.state.iter_num
    if run.rt.world_size > 1 and it % cfg.log_interval:
        return
    if not all_ranks_sum([float(stop.requested)], run.rt.device)[0]:
        return
    if it == (run.resumed_at or 0):
        run.log(f"interrupted at iter {it} before training: nothing to save")
    else:
        run.check_finite()
        run.save("interrupted")
        run.log(f"interrupted at iter {it}/{cfg.max_iters}: continue with the same flags and "
                "--init_from=resume")
    raise SystemExit(130)


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def dropout_seeds(cfg, rt, iter_num, micro_batches):
    """Each micro-batch's seed, from (seed, step, its place among the step's rows) alone: a resumed
    run, or one on another number of ranks, draws the dropout masks an uninterrupted one would."""
    return [((cfg.seed * 1_000_003 + iter_num) * 1_000_003 + k * rt.world_size + rt.rank) % 2**63
            for k in range(micro_batches)]


def log_step(run, mine, lr, step_loss, step_tokens, answer_tokens, timer):
    """Step 6: this rank's loss, the speed and the time left, on the console and in log.jsonl."""
    cfg, rt, it = run.cfg, run.rt, run.state.iter_num
    local_answers = answer_target_count(run.stream.split, [row for r in mine for row in r])
    loss = step_loss.item() / max(local_answers, 1)  # waits for the GPU: an honest timing
    run.check_finite(loss)
    dt = timer.seconds_per_step()
    gpu = ""
    if rt.device_type == "cuda":
        per_rank_tokens = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size
        gpu = (f", mfu {100 * run.model.estimate_mfu(per_rank_tokens, dt):.1f}%, "
               f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    run.log(f"iter {it}/{cfg.max_iters}: loss {loss:.4f}, lr {lr:.1e}, {1000 * dt:.1f}ms/iter, "
            f"{step_tokens / dt:,.0f} tok/s ({answer_tokens / dt:,.0f} answer tok/s){gpu}, "
            f"eta {fmt_duration((cfg.max_iters - it) * dt)}")
    run.record.write(iter=it, loss=loss, lr=lr, ms_per_iter=1000 * dt, time=time.time())
    timer.restart()


def describe_run(log, cfg, rt, model, data, rows_per_epoch):
    shape, per_step, tok = model.config, rows_per_step(cfg, rt), data.meta["tokenizer"]["name"]
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {shape.n_layer} layers, "
        f"{shape.n_head} heads, {shape.n_embd} wide, block_size {shape.block_size}, vocab "
        f"{shape.vocab_size} ({tok}, {data.meta['vocab_size']} tokens)")
    precision = "float32" if rt.dtype == "float32" else "bf16 autocast"
    ranks = f"{rt.world_size} ranks ({'FSDP2' if cfg.fsdp else 'DDP'})" if rt.world_size > 1 \
        else "1 process"
    log(f"run: mask {cfg.mask}, {rt.device} ({precision}), attention {rt.attention}, {ranks}, "
        f"{per_step} rows x {cfg.block_size} tokens per step")
    split = data.train_split
    log(f"data: {cfg.data_dir}: {len(split.offsets) - 1:,} train conversations "
        f"({int(split.offsets[-1]):,} tokens) -> {len(documents(split, cfg.mask)):,} "
        f"{cfg.mask} training samples in {rows_per_epoch:,} rows per epoch "
        f"({rows_per_epoch / per_step:.1f} steps); prefix expansion factor "
        f"{expansion_factor(split):.2f}x (the tokens --mask=prefix trains on per epoch)")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = memory_plan(shape, trainable, cfg.batch_size, cfg.block_size,
                       rt.world_size if cfg.fsdp else 1, 2 if rt.dtype == "bfloat16" else 4,
                       cfg.activation_checkpointing)
    unit, scale = ("GiB", 2**30) if plan["total"] >= 2**30 else ("MiB", 2**20)
    kinds = ", ".join(f"{kind} {plan[kind] / scale:,.2f}" for kind in plan if kind != "total")
    log(f"memory plan per rank: {kinds} {unit} (activations for {cfg.batch_size} rows x "
        f"{cfg.block_size} tokens): about {plan['total'] / scale:,.2f} {unit}; {trainable:,} "
        "parameters train")


def main(argv=None):
    """Train as the flags say -> the raw trained model; None if out_dir holds this run, finished."""
    cfg = flags_given = flags.parse(TrainConfig(), argv, __doc__)
    check_config(cfg)
    if check_fresh_start(cfg, flags_given):
        print(f"{os.path.join(cfg.out_dir, 'ckpt.pt')} already holds this run, trained to iter "
              f"{cfg.max_iters}: nothing to do (--overwrite trains it again, --init_from=resume "
              "--max_iters=N goes on)", flush=True)
        return None
    try:
        rt = compute_init(cfg.device, cfg.dtype, cfg.attention, cfg.threads, training=True,
                          fsdp=cfg.fsdp)
        with RunLock(cfg.out_dir) if rt.is_master else nullcontext():  # one run per out_dir
            model = train(cfg, flags_given, rt)
        if dist.is_initialized():
            dist.barrier()  # every rank is done with the group before any tears it down
            # gloo's worker threads free the finished collectives' tensors under the GIL: let them
            # take it now, since a thread that asks for it once Python is exiting aborts the rank
            time.sleep(0.1)
        return model
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    flags.run(main)
