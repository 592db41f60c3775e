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
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data.batching import (RowStream, answer_target_count, batches_of, collate, documents, expansion_factor,
                           heldout_rows, rank_rows, token_count)
from data.prepare import prepare_if_default, synthetic_dir
from data.store import load_meta, load_split
from data.tokenizer import TOKENIZER_HELP
from loss import answer_loss_totals, train_step
from mask import MASKS
from model import GPT
from cli import flags
from support.checkpoint import save_checkpoint
from support.compute import DEVICE_HELP, DTYPES, THREADS_HELP, all_ranks_sum, check_fits, compute_init, memory_plan
from cli.errors import DataError, UserError
from cli.flags import setting
from support.resume import RunState, check_fresh_start, make_checkpoint, resumed_state, starting_point
from support.run_files import RunLock, TrainingLog
from support.lora import write_adapter
from support.sharding import full_state, load_optimizer_state, shard, start_on_rank0
from support.signals import StopOnSignal
from support.starts import START_HELP, new_model_config


@dataclass
class TrainConfig:
    # what and where
    mask: str = setting("ism", "attention mask: ism | causal | prefix", choices=MASKS)
    out_dir: str = setting("out", "folder of ckpt.pt (written, and read by --init_from=resume)")
    data_dir: str = setting("", "prepared data (python prepare.py); empty: the synthetic dataset in the model's "
                                "tokens, data/synthetic (byte) or data/synthetic-TOKENIZER, prepared when missing")
    tokenizer: str = setting("byte", f"of a model from scratch: {TOKENIZER_HELP} (a start brings its own)")
    init_from: str = setting("scratch", f"scratch | resume (continue out_dir/ckpt.pt) | {START_HELP}: the weights "
                                        "that start a new run")
    keep_best: bool = setting(False, "also keep the weights of the lowest held-out loss in out_dir/best.pt "
                                     "(sample.py --ckpt=best.pt); ckpt.pt stays the latest state, to resume")
    overwrite: bool = setting(False, "start a new run even where out_dir holds another run's files: its ckpt.pt is "
                                     "replaced at the first save, its log.jsonl and best.pt at once (without it, a new "
                                     "run refuses to replace any of them)")
    # how
    device: str = setting("auto", DEVICE_HELP)
    dtype: str = setting("auto", "auto | float32 | bfloat16 (auto: bf16 autocast on CUDA, float32 on CPU)",
                         choices=DTYPES)
    attention: str = setting("auto", "auto | sdpa | flex (auto: FlexAttention on CUDA, SDPA dense mask on CPU)",
                             choices=("auto", "sdpa", "flex"))
    compile: bool = setting(False, "torch.compile the model")
    threads: int = setting(0, THREADS_HELP, min=0)
    # how long, how often
    max_iters: int = setting(1400, "optimizer steps in total", min=0, max=10**9)
    eval_interval: int = setting(200, "evaluate the held-out answer loss and save ckpt.pt every this many steps",
                                 min=1)
    eval_iters: int = setting(0, "held-out batches per evaluation (0: the whole val split)", min=0)
    log_interval: int = setting(20, "print a training line every this many steps", min=1)
    # batches
    batch_size: int = setting(8, "rows per micro-batch (per rank)", min=1, max=2**16)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step (per rank)", min=1, max=2**16)
    block_size: int = setting(512, "tokens per row; at least the data's longest conversation", min=1, max=2**20)
    # model
    n_layer: int = setting(4, "transformer blocks (a pretrained start brings its own shape)", min=1, max=1024)
    n_head: int = setting(4, "attention heads", min=1, max=1024)
    n_embd: int = setting(128, "embedding width (a multiple of n_head)", min=1, max=2**16)
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
    # LoRA, and sharding over ranks
    lora_rank: int = setting(0, "train LoRA adapters of this rank instead of every weight (0: a full fine-tune); a "
                                "checkpoint then holds the adapters and names its base, and out_dir/adapter/ holds "
                                "them in PEFT's format", min=0, max=4096)
    lora_alpha: float = setting(0.0, "LoRA's scale is lora_alpha / lora_rank (0: twice the rank, as MAS's 32/64)",
                                min=0)
    lora_targets: str = setting("q_proj,v_proj", "the projections LoRA adapts, Hugging Face's names: q_proj, k_proj, "
                                                 "v_proj, o_proj, gate_proj, up_proj, down_proj (MAS: q_proj,v_proj)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA adapters' input", min=0, below=1)
    adapter: str = setting("", "a LoRA adapter in PEFT's format on --init_from, merged into its weights first")
    fsdp: bool = setting(False, "shard weights, gradients and optimizer state over the ranks (FSDP2, torch's "
                                "fully_shard per block; with torchrun); without it several ranks run DDP")
    activation_checkpointing: bool = setting(False, "keep only each block's input for the backward pass and compute "
                                                    "the rest again: less memory for long rows, about a third more "
                                                    "compute")


def check_config(cfg):
    """One-line UserErrors for settings that cannot work together (flags.parse checked each one alone)."""
    new_model_config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    if (cfg.lora_rank or cfg.adapter) and cfg.init_from == "scratch":
        raise UserError("--lora_rank and --adapter work on a pretrained start: pass --init_from")
    if cfg.min_lr > cfg.learning_rate:
        raise UserError(f"--min_lr={cfg.min_lr} is above --learning_rate={cfg.learning_rate}")


# ------------------------------------------------------------------------------------------------------- data

def load_data(cfg, rt):
    """-> (meta, train split, val split). The synthetic dataset's folder is filled when it does not exist yet (by
    global rank 0: on several nodes without a shared disk, prepare the data on each node first); any other missing
    data_dir is an error, never a silent stand-in."""
    problem = None
    if rt.is_master:
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


def dropout_seeds(cfg, rt, iter_num, micro_batches):
    """The seed of each of this rank's micro-batches, from (seed, iteration, the micro-batch's place among the
    step's rows) alone: a resumed run draws the dropout masks an uninterrupted one would, with no RNG state in the
    checkpoint, and so does a run on another number of ranks with the same rows per step."""
    return [((cfg.seed * 1_000_003 + iter_num) * 1_000_003 + k * rt.world_size + rt.rank) % 2**63
            for k in range(micro_batches)]


# ------------------------------------------------------------------------------------------------ the start

def start_and_data(cfg, rt, log):
    """Where the run starts, then its data: -> (cfg, model, checkpoint to resume or None, a new LoRA run's base or
    None, meta, train, val). The start decides the tokenizer (data train.py prepares itself uses it); cfg comes
    back saying what was used."""
    def start():
        return starting_point(cfg, rt.device, log, rows_per_step(cfg, rt))
    sharded = cfg.fsdp and rt.world_size > 1 and cfg.init_from != "scratch"  # a scratch model is cheap on every rank
    model, checkpoint, tokenizer, base = start_on_rank0(start, rt) if sharded else start()
    if tokenizer is not None and tokenizer["name"] != cfg.tokenizer:
        cfg = replace(cfg, tokenizer=tokenizer["name"])
    if not cfg.data_dir:
        cfg = replace(cfg, data_dir=synthetic_dir(cfg.tokenizer))
    meta, train_split, val_split = load_data(cfg, rt)
    if tokenizer is not None and meta["tokenizer"] != tokenizer:
        raise UserError(f"{cfg.data_dir} holds {meta['tokenizer']['name']} tokens, the start needs "
                        f"{tokenizer['name']} ones: prepare the data with python prepare.py "
                        f"--tokenizer={tokenizer['name']} --out_dir=DIR and pass --data_dir=DIR")
    if meta["tokenizer"]["name"] not in (cfg.tokenizer, os.path.abspath(cfg.tokenizer)):
        log(f"note: {cfg.data_dir} holds {meta['tokenizer']['name']} tokens; --tokenizer={cfg.tokenizer} is ignored")
        cfg = replace(cfg, tokenizer=meta["tokenizer"]["name"])  # so the saved config says what was used
    if model is None:  # from scratch: the flags' shape, the data's vocabulary
        torch.manual_seed(cfg.seed)
        config = new_model_config(block_size=cfg.block_size, vocab_size=meta["vocab_size"], n_layer=cfg.n_layer,
                                  n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
        check_fits(config, cfg.batch_size, cfg.block_size, rt.device)
        model = GPT(config)
    if model.config.vocab_size < meta["vocab_size"]:
        raise UserError(f"the model has {model.config.vocab_size} tokens, {cfg.data_dir} uses {meta['vocab_size']}: "
                        "pass the --data_dir it was trained on")
    return cfg, (model if model.lm_head.weight.is_meta else model.to(rt.device)).train(), checkpoint, base, meta, \
        train_split, val_split


# ---------------------------------------------------------------------------------------------- the run itself

FEW_VAL_ANSWERS = 2000  # fewer held-out answer tokens than this: a noisy loss, say so
RISING = 1.02  # a held-out loss 2% above the best one so far: say that the model may be overfitting


@dataclass
class Run:
    """What the loop works on: the settings (cfg resolved, flags_given as parsed), where it runs, the raw model
    (neither compiled nor DDP-wrapped: what is saved) and the two that run it (step_model: compiled and wrapped
    as asked; eval_model: never DDP), the optimizer, the training row stream, this rank's held-out rows, the
    RunState that checkpoints record, the data's meta, the log, and whether every step since the last check had a
    finite loss."""
    cfg: object
    flags_given: object
    rt: object
    model: torch.nn.Module
    step_model: torch.nn.Module
    eval_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: RowStream
    val_split: object
    eval_rows: list
    state: RunState
    meta: dict
    log: object
    record: TrainingLog = None
    finite: object = True  # a bool tensor on the device: no step loss checked until a sync point needs it
    resumed: bool = False
    resumed_at: int = 0  # the step a resumed run went on from
    saved_iter: int = None  # the step of the latest ckpt.pt this run wrote or resumed from

    def save(self, reason, name="ckpt.pt"):
        """Write the run's state to out_dir/name (the optimizer's too in ckpt.pt, to resume), and a LoRA run's
        adapters in PEFT's format to out_dir/adapter. Every rank takes part (under FSDP the shards are gathered)."""
        model_state, optimizer_state = full_state(self.model, self.optimizer)
        if self.rt.is_master:
            path = os.path.join(self.cfg.out_dir, name)
            resumable = (optimizer_state, self.stream.state()) if name == "ckpt.pt" else None
            save_checkpoint(make_checkpoint(model_state, self.model.config, self.cfg, self.flags_given, self.meta,
                                            self.state, rows_per_step(self.cfg, self.rt), resumable), path)
            if self.model.config.lora_rank and name == "ckpt.pt":
                write_adapter(model_state, self.model.config, os.path.join(self.cfg.out_dir, "adapter"),
                              self.state.base["init_from"])
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


def start_run(cfg, flags_given, rt, log):
    """The start, the data, the optimizer and the training state (a resumed one's, or a new one) -> Run."""
    cfg, model, checkpoint, base, meta, train_split, val_split = start_and_data(cfg, rt, log)
    step_model, eval_model = wrapped(model, cfg, rt, log)  # sharded in place under FSDP: the optimizer comes after
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           rt.device_type)
    state = resumed_state(cfg, checkpoint, lambda saved: load_optimizer_state(model, optimizer, saved), meta, log,
                          rt.is_master, base)
    stream = RowStream(train_split, cfg.mask, cfg.block_size, cfg.seed, **state.data_state)
    describe_run(log, cfg, rt, model, meta, train_split, len(stream.rows))
    return Run(cfg, flags_given, rt, model, step_model, eval_model, optimizer, stream, val_split,
               heldout(val_split, cfg, rt, log), state, meta, log, resumed=checkpoint is not None,
               resumed_at=state.iter_num if checkpoint is not None else 0,
               saved_iter=state.iter_num if checkpoint is not None else None)


def rows_per_step(cfg, rt):
    """Rows of every rank in one optimizer step: the same rows per step give the same training on any world size."""
    return cfg.batch_size * cfg.gradient_accumulation_steps * rt.world_size


def heldout(val_split, cfg, rt, log):
    """This rank's share of the held-out rows (each rank evaluates its own; the sums are added over ranks)."""
    rows = heldout_rows(val_split, cfg.mask, cfg.block_size, cfg.batch_size, cfg.eval_iters)
    answers = answer_target_count(val_split, rows)
    if answers == 0:
        raise UserError(f"{cfg.data_dir}: the held-out rows hold no answer tokens; prepare the data again")
    if answers < FEW_VAL_ANSWERS:
        more = ("--eval_iters=0 scores every held-out row" if cfg.eval_iters else "hold out more conversations: "
                "python prepare.py --val_fraction=..., or --n_val=... for the synthetic data")
        log(f"note: the held-out loss is measured on {answers} answer tokens only: it is noisy ({more})")
    mine = rows[rt.rank::rt.world_size]
    if cfg.fsdp:  # every rank runs as many forwards (each gathers the shards from all): rows of padding, no targets
        mine += [[]] * (-(-len(rows) // rt.world_size) - len(mine))
    return mine


def evaluate_and_save(run):
    """Step 1 of the loop: the held-out answer loss, logged and recorded; then the latest state saved (never a
    new run's untrained weights over an existing file), and best.pt with --keep_best."""
    cfg, state = run.cfg, run.state
    batches = batches_of(run.val_split, run.eval_rows, cfg.block_size, cfg.batch_size)
    total, count = all_ranks_sum(list(answer_loss_totals(run.eval_model, batches, cfg.mask, run.rt)), run.rt.device)
    val_loss = total / max(count, 1)
    run.check_finite(val_loss)
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_iter = val_loss, state.iter_num
    run.log(f"eval iter {state.iter_num}: val answer loss {val_loss:.4f} (best {state.best_val_loss:.4f}); trained "
            f"on {state.tokens['tokens']:,} tokens, {state.tokens['answer_tokens']:,} answer tokens")
    run.record.write(iter=state.iter_num, val_loss=val_loss, tokens=state.tokens["tokens"], time=time.time())
    if val_loss > RISING * state.best_val_loss:
        run.log(f"note: the held-out loss rose to {val_loss:.4f} from {state.best_val_loss:.4f} at iter "
                f"{state.best_iter}: the model may be overfitting (--keep_best keeps the best weights)")
    if state.iter_num > 0 and state.iter_num != run.saved_iter:  # a resumed run's first evaluation changes nothing
        run.save("latest")
        if cfg.keep_best and improved:
            run.save("best", "best.pt")


def stop_if_asked(run, stop):
    """Step 2's signal check: every rank must agree, so with several ranks they compare at log steps only."""
    cfg, it = run.cfg, run.state.iter_num
    if run.rt.world_size > 1 and it % cfg.log_interval:
        return
    if not all_ranks_sum([float(stop.requested)], run.rt.device)[0]:
        return
    if it == run.resumed_at:
        run.log(f"interrupted at iter {it} before training: nothing to save")
    else:
        run.check_finite()
        run.save("interrupted")
        run.log(f"interrupted at iter {it}/{cfg.max_iters}: continue with the same flags and --init_from=resume")
    raise SystemExit(130)


def log_step(run, mine, lr, step_loss, step_tokens, answer_tokens, timer):
    """Step 6: this rank's loss, the speed and the time left, on the console and in log.jsonl."""
    cfg, rt, it = run.cfg, run.rt, run.state.iter_num
    local_answers = answer_target_count(run.stream.split, [row for r in mine for row in r])
    loss = step_loss.item() / max(local_answers, 1)  # waits for the GPU, so the timing is honest
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


def wrapped(model, cfg, rt, log):
    """-> (the model a step runs, the model evaluation runs): compiled, and sharded (FSDP2, in place) or DDP-wrapped
    as asked; evaluation never runs the DDP wrapper."""
    model.checkpoint_blocks = cfg.activation_checkpointing
    if cfg.compile:
        log("compiling the model...")
    if cfg.fsdp:
        for block in model.transformer.h if cfg.compile else ():
            block.compile()  # in place, before sharding: the module stays the one fully_shard wraps
        shard(model, rt)
        return model, model
    model = torch.compile(model) if cfg.compile else model
    if rt.world_size == 1:
        return model, model
    return DDP(model, device_ids=[torch.device(rt.device).index] if rt.device_type == "cuda" else None), model


def train(cfg, flags_given, rt):
    log = flags.say if rt.is_master else (lambda *a: None)  # a closed stdout costs the messages, never the run
    run = start_run(cfg, flags_given, rt, log)
    cfg, state, stream, t_start, timer = run.cfg, run.state, run.stream, time.time(), StepTimer()
    with StopOnSignal() as stop, TrainingLog(cfg.out_dir, run.resumed_at if run.resumed else None,
                                             rt.is_master) as run.record:
        while True:
            # 1. evaluate the held-out answer loss and save the latest state, every eval_interval steps and at the end
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

            # 5. forward, backward and the optimizer step, weighted by the step's answer tokens over all ranks
            step_loss = train_step(run.step_model, run.optimizer, batches, cfg.mask, answer_tokens, rt,
                                   cfg.grad_clip, rt.world_size, dropout_seeds(cfg, rt, state.iter_num, len(mine)))
            run.finite = run.finite & torch.isfinite(step_loss)  # on the device: checked at the next sync point
            state.tokens["tokens"] += token_count(rows)
            state.tokens["answer_tokens"] += answer_tokens
            state.iter_num += 1
            timer.steps += 1

            # 6. log this rank's loss, the speed and the time left
            if state.iter_num % cfg.log_interval == 0 or state.iter_num == cfg.max_iters:
                log_step(run, mine, lr, step_loss, token_count(rows), answer_tokens, timer)
    log(f"done: {state.iter_num} iters in {fmt_duration(time.time() - t_start)}, best val answer loss "
        f"{state.best_val_loss:.4f} (iter {state.best_iter}), {state.tokens['tokens']:,} tokens "
        f"({state.tokens['answer_tokens']:,} answer tokens)")
    return run.model


# ------------------------------------------------------------------------------------------ what it prints

def describe_run(log, cfg, rt, model, meta, train_split, rows_per_epoch):
    shape, per_step = model.config, rows_per_step(cfg, rt)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {shape.n_layer} layers, {shape.n_head} heads, "
        f"{shape.n_embd} wide, block_size {shape.block_size}, vocab {shape.vocab_size} ({meta['tokenizer']['name']}, "
        f"{meta['vocab_size']} tokens)")
    precision = "float32" if rt.dtype == "float32" else "bf16 autocast"
    log(f"run: mask {cfg.mask}, {rt.device} ({precision}), attention {rt.attention}, {rt.world_size} rank(s), "
        f"{per_step} rows x {cfg.block_size} tokens per step")
    log(f"data: {cfg.data_dir}: {len(train_split.offsets) - 1:,} train conversations ({int(train_split.offsets[-1]):,} "
        f"tokens) -> {len(documents(train_split, cfg.mask)):,} {cfg.mask} training samples in {rows_per_epoch:,} "
        f"rows per epoch ({rows_per_epoch / per_step:.1f} steps); prefix expansion factor "
        f"{expansion_factor(train_split):.2f}x (the tokens --mask=prefix trains on per epoch)")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = memory_plan(shape, trainable, cfg.batch_size, cfg.block_size, rt.world_size if cfg.fsdp else 1,
                       2 if rt.dtype == "bfloat16" else 4, cfg.activation_checkpointing)
    unit, scale = ("GiB", 2**30) if plan["total"] >= 2**30 else ("MiB", 2**20)
    log("memory plan per rank: " + ", ".join(f"{kind} {plan[kind] / scale:,.2f}" for kind in plan if kind != "total")
        + f" {unit} (activations for {cfg.batch_size} rows x {cfg.block_size} tokens): about "
        f"{plan['total'] / scale:,.2f} {unit}; {trainable:,} parameters train")


class StepTimer:
    """Mean wall time per optimizer step since the last restart (evaluations and logging left out)."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.t0, self.steps = time.time(), 0

    def seconds_per_step(self):
        return (time.time() - self.t0) / max(self.steps, 1)


def fmt_duration(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def main(argv=None):
    """Train as the flags say; returns the trained model (raw module, not the compiled/DDP wrapper), or None when
    out_dir already holds this very run, finished."""
    flags_given = flags.parse(TrainConfig(), sys.argv[1:] if argv is None else argv, __doc__)
    cfg = flags_given
    check_config(cfg)
    if check_fresh_start(cfg, flags_given):
        print(f"{os.path.join(cfg.out_dir, 'ckpt.pt')} already holds this run, trained to iter {cfg.max_iters}: "
              "nothing to do (--overwrite trains it again, --init_from=resume --max_iters=N goes on)", flush=True)
        return None
    try:
        rt = compute_init(cfg.device, cfg.dtype, cfg.attention, cfg.threads, training=True)
        with RunLock(cfg.out_dir) if rt.is_master else nullcontext():  # one run per out_dir; rank 0 writes it
            model = train(cfg, flags_given, rt)
        if dist.is_initialized():
            dist.barrier()  # every rank is done with the group before it goes: no rank tears it down under another
        return model
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    flags.run(main)
