"""
What the three masks cost, measured on this project's own code in one run: training steps, a long chat, decoding.

    python bench.py                              # CPU, the default model, every section (~1-2 min on 2 cores)
    python bench.py --device=cuda --compile      # GPU: FlexAttention BlockMask + bf16, compiled model and decode
    python bench.py config/gpt2_small.py         # a settings file written for train.py (its other keys are skipped)
    python bench.py --sections=chat --json       # one section, machine-readable
    python bench.py --quick                      # tiny model and data, one repeat: the smoke test's run
    python bench.py --init_from=smollm2          # SmolLM2-135M-Instruct (2048 tokens of context), its own peer

Tables (markdown; --json prints the same numbers as one JSON object instead):
1. train: ms per optimizer step and tokens/s under causal, ISM and prefix, same model, same backend, each step
   loss.train_step as train.py runs it (mask construction, forward, answer loss, backward, clip, AdamW; batches
   are collated beforehand), and MFU on CUDA. Beside it, attention alone at one layer's shapes: SDPA under a dense
   mask (every mask here) against its built-in is_causal, no mask tensor (on packed rows that would let a
   document see the earlier documents of its row, so it is a speed reference, not a correct step). Then one epoch
   of the dataset per mask: prefix trains one sample per answer (triplet expansion), so it processes more tokens.
2. chat: one conversation of synthetic-style user messages that fills block_size, played through
   engine.ChatSession under ISM and causal (cache reused), prefix (re-prefills the history every turn) and the
   no-cache reference: tokens prefilled and time to first token per turn. Peers with `transformers` installed:
   transformers' implementation of the same model with the same weights, carrying its past_key_values, and
   re-prefilling.
3. decode: ChatSession decode tokens/s with the KV cache (eager; with --compile also the compiled static-shape step)
   and without (the no-cache path) at growing context, the KV cache's size, and transformers' generate()
   with its own cache as the peer.
4. peers (--init_from on a CPU; not run by default): decode tokens/s at 256 tokens of context and prefill tokens/s
   of 511 tokens, at 1 and 2 threads, for the float32 weights (eager, and with --compile the compiled static
   step), their int8 and int4 decode copies (support/quantize.py) and transformers; each decode beside its ceiling here:
   the streaming rate of a float32 matrix-vector product over the bytes one step reads. Then the peak memory of a
   2,000-token prefill and the time of a second load (a GGUF start maps its cached conversion).

Models have random weights (the numbers are costs, not quality), so the bench needs no checkpoint, unless
--init_from names a pretrained one (smollm2, a GGUF file, a Hugging Face folder, a checkpoint): then the costs are
that model's, at its shape, with its tokenizer and chat format, the peers are transformers' implementation of it
with the same weights (LlamaForCausalLM, GPT2LMHeadModel), a training step starts from its weights, and the
no-cache chat variant is left out (it recomputes the whole context for every token: hours at this size; the decode
table still times no cache). Answers have a fixed length (the closing token is held back with min_new_tokens, as
generate() does for the peer). On a CPU, peak memory is the process's peak resident set during the step
(/proc/self/status VmHWM after resetting it), weights included. Timings: warmup rounds
first, then the median of --repeats rounds; variants are interleaved round by round, in a rotating order, so that a
shared machine's changing load hits them alike. Compare the ratios measured in one run; the README says which
ratios the project aims for.
"""
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

import copy
import inspect
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch

from cli import flags
from support.compute import (CHAT_DTYPE_HELP, DEVICE_HELP, DTYPES, THREADS_HELP, compute_init, cpu_threads, machine,
                             resolve_device)
from data import synthetic
from data.batching import answer_target_count, collate, documents, epoch_rows, token_count
from data.chat import plural, render, render_user
from data.prepare import prepare, prepare_if_default, synthetic_dir
from data.store import load_meta, load_split
from data.tokenizer import get_tokenizer
from engine import ChatSession
from cli.errors import UserError
from cli.flags import setting
from loss import batch_mask, train_step
from mask import MASKS
from model import GPT, GPTConfig, KVCache
from support.quantize import QuantizedLinear, quantize
from support.hf import to_transformers
from support.starts import START_HELP, fit_context, load_start, new_model_config

SECTIONS = ("train", "chat", "decode", "peers")
PRETRAINED_CONTEXT = 2048  # a pretrained start's default block_size here: a chat of more than 1,500 tokens
OPTIMIZER = dict(weight_decay=0.1, learning_rate=6e-3, betas=(0.9, 0.99))  # train.py's defaults


@dataclass
class BenchConfig:
    init_from: str = setting("", f"measure a pretrained model ({START_HELP}) at its own shape; empty: a random model "
                                 "of the shape flags below")
    device: str = setting("cpu", DEVICE_HELP)
    sections: str = setting("train,chat,decode", "comma-separated subset of train,chat,decode,peers (peers: a "
                                                  "pretrained start on the CPU, float32 against int8/int4 decode)")
    repeats: int = setting(5, "timed rounds per measurement (the median is reported)", min=1)
    warmup: int = setting(1, "untimed rounds before them", min=0)
    threads: int = setting(0, THREADS_HELP, min=0)
    quick: bool = setting(False, "tiny model and data, one repeat: a smoke run (flags given still win)")
    json: bool = setting(False, "print one JSON object instead of markdown tables")
    compile: bool = setting(False, "torch.compile the model for the training steps, and add the compiled "
                                   "static-shape decode step (a CUDA graph on CUDA) to the decode table")
    dtype: str = setting("auto", f"chat and decode: {CHAT_DTYPE_HELP}; training uses bf16 autocast on CUDA",
                         choices=DTYPES)
    # model and training batch (train.py's defaults)
    n_layer: int = setting(4, "transformer blocks", min=1)
    n_head: int = setting(4, "attention heads", min=1)
    n_embd: int = setting(128, "embedding width", min=1)
    block_size: int = setting(0, f"context length (rows, chat length, KV cache); 0: 512, or {PRETRAINED_CONTEXT} for "
                                 "--init_from", min=0)
    batch_size: int = setting(0, "rows per training step; 0: 8, or 1 for --init_from", min=0)
    vocab_size: int = setting(0, "training section's vocabulary (0: the data's); 50304 = GPT-2's padded, to time a "
                                 "GPT-2 fine-tuning step on byte data", min=0)
    attention: str = setting("auto", "training backends: sdpa | flex | sdpa,flex (auto: sdpa on CPU, flex,sdpa on "
                                     "CUDA); the first one sets the epoch table")
    data_dir: str = setting("", "prepared data for the training section (empty: the synthetic dataset in the model's "
                                "tokens, prepared if missing; --quick makes a small one unless this is given)")
    seed: int = setting(1337, "weights, data order and the chat's messages", min=0)
    # chat and decode
    answer_tokens: int = setting(8, "chat: tokens per answer", min=1)
    chat_repeats: int = setting(15, "chat: timed rounds of the whole conversation (cheap; one turn's TTFT is a few "
                                    "ms, so a busy machine's scheduler shows: more rounds)", min=1)
    new_tokens: int = setting(32, "decode: tokens generated per measurement", min=2)
    hf: bool = setting(True, "add the Hugging Face peer rows (transformers, the same weights) when it is installed")
    out_dir: str = setting("out", "where the TTFT plot goes")
    plot: str = setting("", "PNG path of TTFT vs turn (default out_dir/bench_ttft.png; 'none': no plot)")


QUICK = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, batch_size=2, repeats=1, warmup=1, answer_tokens=4,
             new_tokens=8, chat_repeats=1, threads=1)  # tiny tensors: a second thread only adds synchronisation
QUICK_DATA = dict(n_train=48, n_val=4)  # --quick trains on this many synthetic conversations
PRETRAINED_ROUNDS = dict(repeats=2, chat_repeats=2, new_tokens=8)  # --init_from's defaults (flags still win)


def parse_config(argv):
    # A settings file may be train.py's (config/*.py): its keys this bench does not know are skipped.
    cfg = flags.parse(BenchConfig(), argv, __doc__, shared_files=True)
    if cfg.quick:  # the quick defaults, then the flags again so that explicit ones win
        cfg = flags.parse(replace(BenchConfig(), **QUICK, quick=True), argv, __doc__, shared_files=True)
    elif cfg.init_from:  # fewer rounds at a real model's size, where one round of the chat takes minutes on a CPU
        cfg = flags.parse(replace(BenchConfig(), **PRETRAINED_ROUNDS), argv, __doc__, shared_files=True)
    pretrained = bool(cfg.init_from)
    cfg = replace(cfg, block_size=cfg.block_size or (0 if pretrained else 512),  # 0: set once the model is loaded
                  batch_size=cfg.batch_size or (1 if pretrained else 8))
    sections = [s for s in cfg.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise UserError(f"--sections={cfg.sections}: choose from {','.join(SECTIONS)}")
    new_model_config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)  # a shape it can have, or one line
    resolve_device(cfg.device)  # cpu, cuda, cuda:N or auto, and there
    return cfg, sections


def log(*args):
    print("bench:", *args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ timing

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rounds(fns, repeats, warmup):
    """{name: fn} -> {name: [fn()'s value in each kept round]}. One call of each fn per round, round after round, in
    a rotating order, so a shared machine's changing load and cache effects hit every variant alike; the first
    `warmup` rounds are dropped."""
    values, names = {name: [] for name in fns}, list(fns)
    for round_ in range(warmup + repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotate: no variant always first
            value = fns[name]()
            if round_ >= warmup:
                values[name].append(value)
    return values


def interleaved(fns, repeats, warmup, device="cpu"):
    """{name: fn} -> {name: [seconds of each timed call]}, rounds as above (CUDA: synchronized around each call)."""
    def timed(fn):
        def call():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            return time.perf_counter() - t0
        return call
    return rounds({name: timed(fn) for name, fn in fns.items()}, repeats, warmup)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------------- output

def table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


# ------------------------------------------------------------------------------------------------- 1. training

def bench_data(cfg, tok):
    """(vocab_size, train split, temporary dir or None): cfg.data_dir, by default the synthetic dataset in tok's
    tokens (prepared if missing); --quick without a --data_dir of its own uses a small synthetic set in a temporary
    folder."""
    if cfg.quick and not cfg.data_dir:
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        meta = prepare(tmp.name, tokenizer=tok.name, block_size=min(cfg.block_size, 512), seed=cfg.seed,
                       **QUICK_DATA)
        return meta["vocab_size"], load_split(tmp.name, "train"), tmp
    data_dir = cfg.data_dir or synthetic_dir(tok.name)
    prepare_if_default(data_dir, tok.name, min(cfg.block_size, 512), log)
    meta = load_meta(data_dir, cfg.block_size)
    if meta["tokenizer"] != tok.describe():
        raise UserError(f"{data_dir} holds {meta['tokenizer']['name']} tokens, the model reads {tok.name} ones: pass "
                        f"a --data_dir prepared with python prepare.py --tokenizer={tok.name}")
    return meta["vocab_size"], load_split(data_dir, "train"), None


def attention_backends(cfg, device_type):
    names = cfg.attention.split(",") if cfg.attention != "auto" else (
        ["flex", "sdpa"] if device_type == "cuda" else ["sdpa"])
    for name in names:
        if name not in ("sdpa", "flex"):
            raise UserError(f"--attention={cfg.attention}: choose sdpa, flex or both (sdpa,flex)")
        if name == "flex" and device_type != "cuda":
            raise UserError("--attention=flex needs CUDA (FlexAttention has no CPU backward): use sdpa on CPU")
    return names


def train_section(cfg, device, start):
    """start: the pretrained model (in float32, the weights a fine-tuning step starts from), or None."""
    tok = start.tok if start else get_tokenizer("byte")
    vocab_size, split, tmp = bench_data(cfg, tok)
    rt = compute_init(device, training=True)
    backends = attention_backends(cfg, rt.device_type)
    torch.manual_seed(cfg.seed)
    if start:
        raw_model = copy.deepcopy(start.model).to(rt.device, torch.float32).train()
    else:
        raw_model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size or vocab_size,
                                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)).to(rt.device)
    epoch = {kind: epoch_rows(split, kind, cfg.block_size, cfg.seed, 0) for kind in MASKS}
    batches = train_batches(cfg, split, epoch, rt)
    steps = step_rows(cfg, rt, raw_model, batches, backends)
    ms = {(s["attention"], s["mask"]): s["ms_per_iter"] for s in steps}
    ratios = [{"attention": a, "against": f"causal ({a})", "ratio": ms[(a, "ism")] / ms[(a, "causal")]}
              for a in backends]
    if "flex" in backends and "sdpa" in backends:
        ratios.append({"attention": "flex", "against": "ISM (sdpa)", "ratio": ms[("flex", "ism")] / ms[("sdpa", "ism")]})
    result = {"backend": backends[0], "batch_size": cfg.batch_size, "block_size": cfg.block_size,
              "precision": "bf16 autocast" if rt.dtype == "bfloat16" else "float32", "compiled": cfg.compile,
              "conversations": len(split.offsets) - 1, "conversation_tokens": int(split.offsets[-1]),
              "steps": steps, "ratios": ratios, "attention_alone": attention_alone(cfg, raw_model.config, rt),
              "epoch": epoch_rows_table(cfg, split, epoch, ms, backends[0])}
    if tmp is not None:
        tmp.cleanup()
    return result


def train_batches(cfg, split, epoch, rt):
    """Two batches per mask from the first rows of epoch 0 (causal and ISM get the very same rows), collated once:
    {mask: [(batch, answer targets, tokens)]}."""
    batches = {}
    for kind in MASKS:
        rows = [epoch[kind][i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(2)]
        rows = [r for r in rows if r] or [epoch[kind]]
        batches[kind] = [(rt.to_device(collate(split, r, cfg.block_size)), answer_target_count(split, r),
                          token_count(r)) for r in rows]
    return batches


def step_rows(cfg, rt, raw_model, batches, backends):
    """Each (backend, mask) training step timed, interleaved, with its mask's construction timed alone, MFU on
    CUDA and its peak memory."""
    model = torch.compile(raw_model) if cfg.compile else raw_model
    optimizer = raw_model.configure_optimizers(OPTIMIZER["weight_decay"], OPTIMIZER["learning_rate"],
                                               OPTIMIZER["betas"], rt.device_type)

    def step_fn(kind, attention):
        taken = itertools.count()
        step_rt = replace(rt, attention=attention)

        def step():
            batch, answers, _ = batches[kind][next(taken) % len(batches[kind])]
            train_step(model, optimizer, [batch], kind, answers, step_rt)
        return step

    variants = {(a, kind): step_fn(kind, a) for a in backends for kind in ("causal", "ism", "prefix")}
    log(f"train: {len(variants)} variants x {cfg.warmup + cfg.repeats} steps of {cfg.batch_size} x "
        f"{cfg.block_size} tokens")
    step_times = interleaved(variants, cfg.repeats, cfg.warmup, rt.device)
    peak_gib = {v: peak_memory(fn, rt.device) for v, fn in variants.items()}
    mask_times = interleaved({v: (lambda v=v: batch_mask(v[1], batches[v[1]][0][0], v[0])) for v in variants},
                             cfg.repeats, cfg.warmup, rt.device)
    steps = []
    for (attention, kind), times in step_times.items():
        seconds = statistics.median(times)
        tokens = statistics.mean(t for _, _, t in batches[kind])
        mfu = raw_model.estimate_mfu(cfg.batch_size * cfg.block_size, seconds) if rt.device_type == "cuda" else None
        steps.append({"attention": attention, "mask": kind, "ms_per_iter": seconds * 1e3,
                      "tokens_per_s": tokens / seconds, "mask_ms": median(mask_times[(attention, kind)]) * 1e3,
                      "mfu": mfu, "peak_gib": peak_gib[(attention, kind)]})
    return steps


def attention_alone(cfg, config, rt):
    """SDPA's forward and backward at one layer's training shapes, under a dense boolean mask (what every mask
    here runs on SDPA) against its built-in is_causal (no mask tensor; on packed rows it would let a document see
    the documents before it, so it is a speed reference, not a correct step)."""
    shape = (cfg.batch_size, config.n_head, cfg.block_size, config.head_dim)
    q, k, v = (torch.randn(shape, device=rt.device, requires_grad=True) for _ in range(3))
    dense = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool, device=rt.device).tril()

    def run(**how):
        with rt.autocast():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, **how).sum().backward()
    times = interleaved({"dense mask": lambda: run(attn_mask=dense), "is_causal": lambda: run(is_causal=True)},
                        cfg.repeats, cfg.warmup, rt.device)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"dense_ms": ms["dense mask"], "is_causal_ms": ms["is_causal"], "layers": config.n_layer}


def epoch_rows_table(cfg, split, epoch, ms, backend):
    """One epoch per mask: samples, tokens processed, steps and the estimated time at backend's step time."""
    conversation_tokens, epochs = int(split.offsets[-1]), []
    for kind in MASKS:
        docs = documents(split, kind)
        tokens = sum(end - start for start, end, _ in docs)
        n_steps = math.ceil(len(epoch[kind]) / cfg.batch_size)
        epochs.append({"mask": kind, "samples": len(docs), "tokens": tokens,
                       "expansion": tokens / conversation_tokens, "rows": len(epoch[kind]), "steps": n_steps,
                       "ms_per_iter": ms[(backend, kind)], "epoch_s": n_steps * ms[(backend, kind)] / 1e3})
    return epochs


def peak_memory(step, device):
    """GiB at the peak of one more step: on CUDA the memory torch allocated (weights, optimizer state,
    activations); on a CPU the process's peak resident set (VmHWM, reset before the step; None where /proc cannot
    tell), which also counts everything else the process holds."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size to the current one
    except OSError:
        return None
    step()
    return resident_gib("VmHWM")


def resident_gib(field="VmRSS"):
    """The process's resident memory (VmRSS) or its peak (VmHWM) in GiB, from /proc/self/status; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20
    except (OSError, StopIteration):
        return None


def train_tables(r):
    rows = [[s["attention"], s["mask"], fmt(s["ms_per_iter"]), fmt(s["tokens_per_s"], 0), fmt(s["mask_ms"], 2),
             "-" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%", fmt(s["peak_gib"], 2)] for s in r["steps"]]
    compiled = ", torch.compile" if r["compiled"] else ""
    out = [f"### Training step ({r['batch_size']} rows x {r['block_size']} tokens, {r['precision']}{compiled}; the "
           "step includes building its mask, timed alone in its column; tokens/s counts non-padding tokens)",
           table(["attention", "mask", "ms/iter", "tokens/s", "mask build ms", "MFU", "peak GiB"], rows), ""]
    out += [f"- ISM ({x['attention']}) / {x['against']}: {x['ratio']:.3f}" for x in r["ratios"]]
    a = r["attention_alone"]
    out += [f"- attention alone, one layer's forward + backward at these shapes: SDPA with a dense mask "
            f"{a['dense_ms']:.2f} ms, with is_causal (no mask tensor; not a correct step on packed rows) "
            f"{a['is_causal_ms']:.2f} ms: the dense mask costs {a['layers'] * (a['dense_ms'] - a['is_causal_ms']):.1f} "
            f"ms per step over {a['layers']} layers", ""]
    rows = [[e["mask"], f"{e['samples']:,}", f"{e['tokens']:,}", f"{e['expansion']:.2f}x", f"{e['steps']:,}",
             fmt(e["ms_per_iter"]), fmt(e["epoch_s"])] for e in r["epoch"]]
    out += [f"### One epoch ({r['conversations']:,} conversations, {r['conversation_tokens']:,} tokens; every mask "
            f"trains each answer once; est. time = steps x {r['backend']} ms/iter above)",
            table(["mask", "samples", "tokens processed", "expansion", "steps", "ms/iter", "epoch s (est.)"], rows)]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- 2. chat / 3. decode

def chat_model(cfg, tok, rt, start):
    """The model a chat and a decode run on, in the chat dtype, eval mode: the pretrained start, or a random-weight
    GPT at the bench config."""
    if start:
        return copy.deepcopy(start.model).to(rt.device, getattr(torch, rt.dtype)).eval()
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=tok.vocab_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd))
    return model.to(rt.device, getattr(torch, rt.dtype)).eval()


def chat_messages(tok, block_size, answer_tokens, seed):
    """User messages from the synthetic tasks, as many as fit in block_size with answer_tokens-long answers (no
    turn dropped), so the last prompt sees ~block_size - answer of history."""
    rng = random.Random(seed)
    users, length = [], len(render([], tok)[0])  # <|bos|>, or ChatML's default system message
    while True:
        for message in synthetic.conversation(rng)["messages"]:
            if message["role"] != "user":
                continue
            turn = len(render_user(message["content"], tok, after_answer=bool(users))[0]) + answer_tokens + 1
            if length + turn > block_size:
                return users
            users.append(message["content"])
            length += turn


def hf_model(cfg, model, rt):
    """transformers' own implementation of our model with the very same weights (GPT2LMHeadModel or
    LlamaForCausalLM / Qwen2ForCausalLM), in our dtype, eval mode, or (None, note)."""
    if not cfg.hf:
        return None, "Hugging Face rows skipped (--hf=false)"
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed: no Hugging Face peer rows (pip install transformers)"
    transformers.logging.set_verbosity_error()
    hf = to_transformers(model)
    return hf.to(rt.device, getattr(torch, rt.dtype)).eval(), \
        f"transformers {transformers.__version__} {type(hf).__name__}, the same weights"


class HFChat:
    """The Hugging Face model following the ISM session's conversation, token for token (its own replies are not
    used: the ids are the ISM session's, so every turn has the same lengths). carry=True keeps past_key_values
    across turns and feeds only what the cache lacks, then the answer tokens one by one, as our cached sessions
    do; carry=False re-prefills the whole history each turn (the common chat front-end) and decodes nothing.
    TTFT = the prefill forward + argmax of its last logits."""

    def __init__(self, model, carry, device):
        self.model, self.carry, self.device = model, carry, device
        # transformers 5.x renamed past_key_values to cache (the old name still works, with a warning)
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.reset()

    def forward(self, input_ids, past):
        return self.model(input_ids=input_ids, use_cache=True, **{self.cache_name: past})

    def reset(self):
        self.past, self.cached = None, 0

    @torch.no_grad()
    def turn(self, ids, prompt_end, answer_tokens):
        t0 = time.perf_counter()
        start = self.cached if self.carry else 0
        chunk = torch.tensor([ids[start:prompt_end]], device=self.device)
        out = self.forward(chunk, self.past if self.carry else None)
        int(out.logits[0, -1].argmax())  # the first token: int() waits for the device
        ttft_ms = (time.perf_counter() - t0) * 1e3
        if self.carry:
            past = out[self.cache_name]
            for t in ids[prompt_end:prompt_end + answer_tokens - 1]:  # what our session feeds after sampling
                past = self.forward(torch.tensor([[t]], device=self.device), past)[self.cache_name]
            self.past, self.cached = past, prompt_end + answer_tokens - 1
        return {"prefill_tokens": prompt_end - start, "ttft_ms": ttft_ms}


def fixed_length(n):
    """Sampling keywords for a greedy answer of exactly n tokens: <|end|> is held back until n are out."""
    return {"max_new_tokens": n, "temperature": 0.0, "min_new_tokens": n}


def chat_section(cfg, rt, tok, model, hf):
    users = chat_messages(tok, cfg.block_size, cfg.answer_tokens, cfg.seed)
    sessions = {"ism": ChatSession(model, tok, "ism"), "causal": ChatSession(model, tok, "causal"),
                "prefix": ChatSession(model, tok, "prefix")}
    if not cfg.init_from:  # at a pretrained model's size, recomputing the context for every token takes hours
        sessions["no cache"] = ChatSession(model, tok, "ism", use_cache=False)
    peers = {"HF cache": HFChat(hf, True, rt.device), "HF re-prefill": HFChat(hf, False, rt.device)} if hf else {}
    names = list(sessions) + list(peers)
    log(f"chat: {len(users)} turns x {len(names)} variants x {cfg.warmup + cfg.chat_repeats} rounds")
    runs = {name: [[] for _ in users] for name in names}  # name -> turn -> [result of each timed round]
    for round_ in range(cfg.warmup + cfg.chat_repeats):
        for s in sessions.values():
            s.reset()
        for p in peers.values():
            p.reset()
        for k, text in enumerate(users):
            results, shift = {}, (round_ + k) % len(sessions)
            order = list(sessions)[shift:] + list(sessions)[:shift]  # rotate: no session always goes first
            for name in order:
                results[name] = sessions[name].turn(text, **fixed_length(cfg.answer_tokens))
            ism = sessions["ism"]
            prompt_end = len(ism.ids) - cfg.answer_tokens - 1  # before this turn's answer and its <|end|>
            for name, p in peers.items():
                results[name] = p.turn(ism.ids, prompt_end, cfg.answer_tokens)
            if round_ >= cfg.warmup:
                for name, result in results.items():
                    runs[name][k].append(result)

    turns = []
    for k, text in enumerate(users):
        first = runs["ism"][k][0]
        row = {"turn": k + 1, "user": text, "context": first["context_tokens"] - first["generated_tokens"] - 1}
        for name in names:
            rs = runs[name][k]
            row[name] = {"prefill_tokens": rs[0]["prefill_tokens"], "ttft_ms": median(r["ttft_ms"] for r in rs)}
            for key in ("reused_tokens", "generated_tokens", "context_tokens"):
                if key in rs[0]:
                    row[name][key] = rs[0][key]
        turns.append(row)
    return {"answer_tokens": cfg.answer_tokens, "rounds": cfg.chat_repeats, "turns": turns,
            "summary": chat_summary(turns, users, tok, cfg)}


def new_tokens_per_turn(users, tok, answer_tokens):
    """What a cache-reusing session must feed at each turn, from render() alone: the prompt (with <|bos|> at turn
    1), plus the previous answer's last token and <|end|>, which decoding samples but never feeds."""
    messages, new, fed = [], [], 0
    for text in users:
        messages.append({"role": "user", "content": text})
        prompt_end = len(render(messages, tok)[0])
        new.append(prompt_end - fed)
        messages.append({"role": "assistant", "content": [0] * answer_tokens})
        fed = prompt_end + answer_tokens - 1
    return new


def chat_summary(turns, users, tok, cfg):
    new = new_tokens_per_turn(users, tok, cfg.answer_tokens)
    last = turns[-1]
    ism_ttft = [t["ism"]["ttft_ms"] for t in turns]
    early, late = median(ism_ttft[1:5]), median(ism_ttft[-4:])  # turn 1 left out: it also feeds <|bos|>
    return {
        "turns": len(turns), "last_context": last["context"],
        "ism_prefill_equals_new_tokens": all(t["ism"]["prefill_tokens"] == n for t, n in zip(turns, new)),
        "causal_prefill_equals_new_tokens": all(t["causal"]["prefill_tokens"] == n for t, n in zip(turns, new)),
        "prefix_prefill_equals_history": all(t["prefix"]["prefill_tokens"] == t["context"] for t in turns),
        "ttft_last_ism_over_prefix": last["ism"]["ttft_ms"] / last["prefix"]["ttft_ms"],
        "ism_ttft_late_over_early": late / early if len(turns) >= 8 else None,
        "last_ttft_ms": {name: v["ttft_ms"] for name, v in last.items() if isinstance(v, dict)},
    }


def chat_tables(r, notes):
    names = [n for n in r["turns"][0] if isinstance(r["turns"][0][n], dict)]
    headers = ["turn", "context"] + [f"prefill {n}" for n in names] + [f"TTFT ms {n}" for n in names]
    rows = [[t["turn"], t["context"]] + [t[n]["prefill_tokens"] for n in names] +
            [fmt(t[n]["ttft_ms"], 2) for n in names] for t in r["turns"]]
    s = r["summary"]
    no_cache = "; no cache = ISM with use_cache=False" if "no cache" in names else ""
    out = [f"### Chat: one conversation, {s['turns']} turns, {r['answer_tokens']}-token answers, greedy "
           f"(context = tokens up to the turn's last prompt token{no_cache}; TTFT = median of {r['rounds']} rounds)",
           table(headers, rows), "",
           f"- ISM prefill per turn == new tokens (prompt + the previous answer's last token and its closing token): "
           f"{'yes' if s['ism_prefill_equals_new_tokens'] else 'NO'}; causal: "
           f"{'yes' if s['causal_prefill_equals_new_tokens'] else 'NO'}; prefix re-prefills the whole history: "
           f"{'yes' if s['prefix_prefill_equals_history'] else 'NO'}",
           f"- last turn ({s['last_context']} tokens of context): ISM TTFT / prefix TTFT = "
           f"{s['ttft_last_ism_over_prefix']:.3f}"]
    last = s["last_ttft_ms"]
    if "HF cache" in last:
        out.append(f"- last turn, Hugging Face: carrying its cache {last['HF cache']:.2f} ms (ISM / HF = "
                   f"{last['ism'] / last['HF cache']:.2f}), re-prefilling {last['HF re-prefill']:.2f} ms (ISM / HF "
                   f"= {last['ism'] / last['HF re-prefill']:.3f})")
    if s["ism_ttft_late_over_early"] is not None:
        out.append(f"- ISM TTFT, median of the last 4 turns / turns 2-5: {s['ism_ttft_late_over_early']:.2f} "
                   "(1 = flat)")
    out += [f"- note: {n}" for n in notes]
    return "\n".join(out)


def plot_ttft(r, path, device_name):
    """-> a note saying what happened."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no TTFT plot"
    turns = [t["turn"] for t in r["turns"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"ism": "-o", "causal": "-s", "prefix": "-^", "no cache": ":", "HF cache": "--", "HF re-prefill": "-."}
    for name, style in styles.items():
        if name in r["turns"][0]:
            ax.plot(turns, [t[name]["ttft_ms"] for t in r["turns"]], style, label=name, markersize=4)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"ismGPT chat TTFT per turn ({device_name})", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    if not os.path.splitext(path)[1][1:]:
        path = path.rstrip(".") + ".png"  # what savefig would write: write it by that name, and say it
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"TTFT plot written to {path}"


class TokenClock:
    """A transformers streamer that only timestamps: generate() puts the prompt, then each new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def prompt_of(tok, tokens):
    """A user message whose rendered conversation (<|bos|> + render_user) is `tokens` long (synthetic-style
    digits and letters); with the byte tokenizer that is exact."""
    rng = random.Random(tokens)
    text = " ".join(rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(tokens))
    while len(render([{"role": "user", "content": text}], tok)[0]) > tokens:
        text = text[:-1].rstrip()
    return text


def decode_section(cfg, rt, tok, model, hf):
    """Decode tokens/s at growing context: one turn whose prompt fills context - new_tokens - 1 tokens, then
    new_tokens greedy tokens; tokens/s over the tokens after the first (ChatSession's decode_tokens_per_s)."""
    contexts = sorted({max(cfg.block_size // d, 8) for d in (8, 4, 2, 1)})
    sessions = {"cache": ChatSession(model, tok, "ism"), "no cache": ChatSession(model, tok, "ism", use_cache=False)}
    if cfg.compile:
        sessions["compiled"] = ChatSession(model, tok, "ism", decode="compiled")
    log(f"decode: contexts {contexts} x {len(sessions) + bool(hf)} variants x {cfg.warmup + cfg.repeats} rounds")
    rows = []
    for context in contexts:
        n = min(cfg.new_tokens, context // 2)
        text = prompt_of(tok, context - n - 1)
        prompt = render([{"role": "user", "content": text}], tok)[0]

        def ours(session):
            session.reset()
            return session.turn(text, **fixed_length(n))["decode_tokens_per_s"]

        def theirs():
            clock = TokenClock()
            with torch.no_grad():
                ids = torch.tensor([prompt], device=rt.device)
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, use_cache=True, streamer=clock)
            assert len(clock.times) == n + 1  # the prompt, then n tokens
            return (n - 1) / (clock.times[-1] - clock.times[1])  # first new token to last, as ours

        fns = {name: (lambda s=s: ours(s)) for name, s in sessions.items()}
        if hf:
            fns["HF generate"] = theirs
        speeds = rounds(fns, cfg.repeats, cfg.warmup)
        rows.append({"context": context, "prompt_tokens": len(prompt), "new_tokens": n,
                     **{name: median(v) for name, v in speeds.items()}})
    kv = KVCache(model.config, 1, rt.device, next(model.parameters()).dtype)
    last = rows[-1]
    best = "compiled" if cfg.compile else "cache"
    return {"rows": rows, "kv_bytes_per_token": kv.bytes_per_token,
            "kv_bytes_at_block_size": kv.bytes_per_token * cfg.block_size, "dtype": str(kv.keys[0].dtype),
            "speedup_at_block_size": last["cache"] / last["no cache"],
            "compiled_over_eager": last["compiled"] / last["cache"] if cfg.compile else None,
            "ours_over_hf": last[best] / last["HF generate"] if "HF generate" in last else None, "ours": best}


def decode_tables(r, notes):
    names = [n for n in ("cache", "compiled", "no cache", "HF generate") if n in r["rows"][0]]
    headers = ["context", "prompt", "new tokens"] + [f"tok/s {n}" for n in names] + ["cache / no cache"]
    headers += ["ours / HF"] if "HF generate" in names else []
    rows = []
    for x in r["rows"]:
        row = [x["context"], x["prompt_tokens"], x["new_tokens"]] + [fmt(x[n], 0) for n in names]
        row.append(f"{x['cache'] / x['no cache']:.1f}x")
        if "HF generate" in names:
            row.append(f"{x[r['ours']] / x['HF generate']:.2f}x")
        rows.append(row)
    mib = r["kv_bytes_at_block_size"] / 2**20
    context = r["rows"][-1]["context"]
    out = ["### Decode (ISM session, greedy; tokens/s over the tokens after the first; HF: generate() with its "
           f"own cache, min_new_tokens = max_new_tokens, same interval; ours = {r['ours']})", table(headers, rows), "",
           f"- cache vs no cache at {context} tokens of context: {r['speedup_at_block_size']:.1f}x"]
    if r["compiled_over_eager"] is not None:
        out.append(f"- compiled static step vs eager step at {context} tokens: {r['compiled_over_eager']:.2f}x")
    if r["ours_over_hf"] is not None:
        out.append(f"- ours ({r['ours']}) / Hugging Face generate at {context} tokens: {r['ours_over_hf']:.2f}x")
    out.append(f"- KV cache: {r['kv_bytes_per_token']:,} bytes per token ({r['dtype']}), {mib:.2f} MiB at "
               f"block_size {context}")
    out += [f"- note: {n}" for n in notes]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- 4. peers

PEER_THREADS = (1, 2)
PEER_DECODE_CONTEXT = 256  # tokens before the first decoded one (prompt + answer so far)
PEER_PREFILL = 511  # tokens of one prefill, timed to the first token
PEER_LONG_PREFILL = 2000  # tokens of the prefill whose peak memory is measured
LLAMA_CPP_NOTE = ("llama.cpp (llama-cpp-python) is not a row: its binding builds from source in ~27 minutes here "
                  "and is not a dependency; compare with its own llama-bench on the same GGUF file")


def stream_rate(repeats=5):
    """Bytes per second that a float32 matrix-vector product streams from memory at torch's current thread count:
    what bounds a one-token decode step, which reads every weight once. A 256 MiB matrix, far beyond any cache."""
    matrix, vector = torch.randn(16384, 4096), torch.randn(4096)
    best = min(interleaved({"mv": lambda: matrix @ vector}, repeats, 1)["mv"])
    return matrix.nbytes / best


def decode_bytes(model):
    """Bytes of weights one decode step reads: every Linear's as the step uses them (a QuantizedLinear's int8 or
    int4 copy and its scales, not the float weights it keeps for prefills); norms and one embedding row are left
    out (under 0.1%)."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    kept = {id(m.linear) for m in quantized}
    floats = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in kept]
    return sum(m.weight_q.nbytes + m.scales.nbytes for m in quantized) + sum(m.weight.nbytes for m in floats)


def peer_models(model):
    """{name: model} of the peers' table: float32 as loaded, and its int8 and int4 decode copies."""
    models = {"float32": model}
    for mode in ("int8", "int4"):
        models[mode] = quantize(copy.deepcopy(model), mode)
    return models


def peer_lengths(config):
    """(decode context, prefill tokens, long prefill tokens): the PEER_ lengths, or what a smaller context holds."""
    return (min(PEER_DECODE_CONTEXT, config.block_size // 2), min(PEER_PREFILL, config.block_size // 2),
            min(PEER_LONG_PREFILL, config.block_size - 2))


def peer_fns(cfg, tok, models, hf):
    """{name: (decode tok/s fn, prefill tok/s fn)} for every variant: ours (eager; float32 compiled with --compile)
    and transformers' generate() on the same weights."""
    context, prefill, _ = peer_lengths(models["float32"].config)
    decode_text, prefill_text = prompt_of(tok, context - cfg.new_tokens), prompt_of(tok, prefill)
    fixed = fixed_length(cfg.new_tokens)
    sessions = {name: ChatSession(m, tok, "ism") for name, m in models.items()}
    if cfg.compile:
        sessions["float32 compiled"] = ChatSession(models["float32"], tok, "ism", decode="compiled")

    def ours(session):
        def decode():
            session.reset()
            return session.turn(decode_text, **fixed)["decode_tokens_per_s"]

        def prefill():
            session.reset()
            result = session.turn(prefill_text, max_new_tokens=1)
            return result["prefill_tokens"] / (result["ttft_ms"] / 1e3)
        return decode, prefill
    fns = {name: ours(s) for name, s in sessions.items()}
    if hf:
        fns["transformers"] = hf_decode_prefill(hf, tok, decode_text, prefill_text, cfg.new_tokens)
    return fns


def hf_decode_prefill(hf, tok, decode_text, prefill_text, n):
    """transformers' generate() on the same prompts: (decode tok/s over the tokens after the first, prefill tok/s
    of the prompt to its first token)."""
    def run(text, new_tokens):
        ids = torch.tensor([render([{"role": "user", "content": text}], tok)[0]])
        clock, t0 = TokenClock(), time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, use_cache=True, streamer=clock)
        return ids.shape[1], t0, clock.times  # the streamer's first put is the prompt; then one per token

    def decode():
        _, _, times = run(decode_text, n)
        return (n - 1) / (times[-1] - times[1])

    def prefill():
        tokens, t0, times = run(prefill_text, 1)
        return tokens / (times[1] - t0)
    return decode, prefill


def peers_section(cfg, rt, tok, model, hf):
    """Decode and prefill tokens/s of every variant at 1 and 2 threads, interleaved, beside the ceiling a decode
    step has here (the streaming rate over the bytes it reads); then a prefill's peak memory and a second load."""
    if rt.device_type != "cpu":
        raise UserError("--sections=peers measures the CPU's kernels (int8/int4 decode): run it with --device=cpu")
    model = copy.deepcopy(model).float()  # the table is float32's (the chat model may be in --dtype)
    prefill_memory = long_prefill_peak(tok, model)  # before the quantized copies exist
    models = peer_models(model)
    fns = peer_fns(cfg, tok, models, hf)
    rows, threads_before = [], torch.get_num_threads()
    for threads in PEER_THREADS:
        torch.set_num_threads(threads)
        rate = stream_rate()
        log(f"peers: {threads} thread(s), {len(fns)} variants x {cfg.warmup + cfg.repeats} rounds")
        decode = rounds({name: d for name, (d, _) in fns.items()}, cfg.repeats, cfg.warmup)
        prefill = rounds({name: p for name, (_, p) in fns.items()}, cfg.repeats, cfg.warmup)
        for name in fns:
            weights = decode_bytes(models.get(name.split()[0], model)) if name != "transformers" else None
            rows.append({"threads": threads, "variant": name, "decode": median(decode[name]),
                         "prefill": median(prefill[name]), "bytes_per_token": weights, "stream_gb_s": rate / 1e9,
                         "ceiling": rate / weights if weights else None})
    torch.set_num_threads(threads_before)
    return {"rows": rows, "lengths": peer_lengths(model.config), "resident_before_prefill_gib": prefill_memory[0],
            "prefill_peak_gib": prefill_memory[1],
            "weights_gib": sum(p.nbytes for p in model.parameters()) / 2**30, "second_load_s": second_load(cfg)}


def long_prefill_peak(tok, model):
    """-> (the process's resident GiB before, its peak over one float32 prefill of PEER_LONG_PREFILL tokens): the
    difference is what the prefill itself takes (activations, the KV cache); the bench holds more than one copy of
    the weights, a chat one."""
    session = ChatSession(model, tok, "ism")
    text = prompt_of(tok, peer_lengths(model.config)[2])
    before = resident_gib()
    return before, peak_memory(lambda: session.turn(text, max_new_tokens=1), "cpu")


def second_load(cfg):
    """Seconds to load --init_from again, as a chat script does (a GGUF start maps its cached conversion); None
    for a random model."""
    if not cfg.init_from:
        return None
    t0 = time.perf_counter()
    load_start(cfg.init_from, cfg.block_size or None, 0.0, "cpu")
    return time.perf_counter() - t0


def peers_tables(r, notes):
    headers = ["threads", "variant", "decode tok/s", "of its ceiling", "vs float32", "prefill tok/s",
               "bytes/token (MB)", "ceiling tok/s"]
    rows = []
    for x in r["rows"]:
        base = next(y for y in r["rows"] if y["threads"] == x["threads"] and y["variant"] == "float32")
        share = f"{x['decode'] / x['ceiling']:.0%}" if x["ceiling"] else "-"
        mb = fmt(x["bytes_per_token"] / 1e6, 0) if x["bytes_per_token"] else "-"
        rows.append([x["threads"], x["variant"], fmt(x["decode"]), share, f"{x['decode'] / base['decode']:.2f}x",
                     fmt(x["prefill"], 0), mb, fmt(x["ceiling"])])
    prefill_gib = r["prefill_peak_gib"] - r["resident_before_prefill_gib"]
    rates = ", ".join(f"{x['stream_gb_s']:.1f} GB/s at {x['threads']} thread(s)" for x in r["rows"]
                      if x["variant"] == "float32")
    context, prefill, long_prefill = r["lengths"]
    load = "-" if r["second_load_s"] is None else f"{r['second_load_s']:.2f} s"
    out = [f"### Peers (ISM session, greedy; decode at {context} tokens of context, prefill of {prefill} tokens to "
           "the first token; ceiling = streaming rate / bytes a decode step reads)",
           table(headers, rows), "", f"- streaming rate of a float32 matrix-vector product: {rates}",
           f"- a {long_prefill}-token prefill (float32) raised the peak resident memory {fmt(prefill_gib, 2)} GiB "
           f"over the {fmt(r['resident_before_prefill_gib'], 2)} GiB resident before it (memory the process freed "
           f"earlier is reused first, so this is a floor; the weights are {fmt(r['weights_gib'], 2)} GiB a copy)",
           f"- a second load of the start: {load}"]
    out += [f"- note: {n}" for n in notes]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------------------- main

def main(argv=None):
    """Run the sections the flags ask for, print the tables (or JSON); return the results dict."""
    cfg, sections = parse_config(sys.argv[1:] if argv is None else argv)
    device = resolve_device(cfg.device)
    with cpu_threads(cfg.threads):
        return run_bench(cfg, sections, device)


def load_pretrained(cfg, device, results):
    """pretrained.load_start for --init_from, timed, with the process's resident memory before and after it and its
    peak while loading (host memory, wherever the model goes: a load reads the file on the host)."""
    loaded, before, t0 = [], resident_gib(), time.perf_counter()
    peak = peak_memory(lambda: loaded.append(load_start(cfg.init_from, cfg.block_size or None, 0.0, device)), "cpu")
    start = loaded[0]
    results["model"] = {"what": start.what, "load_s": time.perf_counter() - t0, "resident_before_gib": before,
                        "peak_gib": peak, "resident_gib": resident_gib(), "parameters": start.model.num_params(),
                        "config": asdict(start.model.config)}
    if not cfg.block_size:
        start.model = fit_context(start.model, min(PRETRAINED_CONTEXT, start.model.config.block_size))
    return start


def run_bench(cfg, sections, device):
    info = machine(device)
    results = {"machine": info, "config": asdict(cfg), "notes": []}
    say = (lambda text: None) if cfg.json else (lambda text: print(text + "\n", flush=True))
    load = f", load average {info['load_average']}" if "load_average" in info else ""
    start = load_pretrained(cfg, device, results) if cfg.init_from else None
    if start:
        cfg = replace(cfg, block_size=start.model.config.block_size)
        results["config"] = asdict(cfg)
    shape = start.model.config if start else cfg
    what = f"{start.what}, " if start else "random weights, "
    say(f"## ismGPT bench: {info['name']}, torch {info['torch']}, {plural(info['threads'], 'thread')} "
        f"({info['cpus']} CPUs{load}), python {info['python']}\n"
        f"model: {what}{shape.n_layer} layers, {shape.n_head} heads, {shape.n_embd} wide, block_size "
        f"{cfg.block_size}; {cfg.warmup} warmup + {cfg.repeats} timed rounds, medians")
    if start:
        m = results["model"]
        say(f"- loaded in {m['load_s']:.1f} s; {m['parameters'] / 1e6:.1f}M parameters; the process's resident "
            f"memory {fmt(m['resident_gib'], 2)} GiB after loading (float32)")
    if info.get("load_average", 0) > info["cpus"] and device == "cpu":
        say(f"warning: load average {info['load_average']} > {info['cpus']} CPUs: other work shares this machine, "
            "so timings are noisy; with more torch threads than free cores each op can stall for a scheduler slice"
            + (" (try --threads=1)" if info["threads"] > 1 else ""))
    if "train" in sections:
        results["train"] = train_section(cfg, device, start)
        say(train_tables(results["train"]))
    if {"chat", "decode", "peers"} & set(sections):
        rt = compute_init(device, cfg.dtype)
        tok = start.tok if start else get_tokenizer("byte")
        model = chat_model(cfg, tok, rt, start)
        hf, hf_note = hf_model(cfg, model, rt)
        results["notes"].append(hf_note)
        if "chat" in sections:
            results["chat"] = chat_section(cfg, rt, tok, model, hf)
            notes = [hf_note]
            if cfg.plot != "none":
                notes.append(plot_ttft(results["chat"], cfg.plot or os.path.join(cfg.out_dir, "bench_ttft.png"),
                                       info["name"]))
                results["notes"].append(notes[-1])
            say(chat_tables(results["chat"], notes))
        if "decode" in sections:
            results["decode"] = decode_section(cfg, rt, tok, model, hf)
            say(decode_tables(results["decode"], [hf_note]))
        if "peers" in sections:
            results["peers"] = peers_section(cfg, rt, tok, model, hf)
            say(peers_tables(results["peers"], [hf_note, LLAMA_CPP_NOTE]))
    if cfg.json:
        print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    flags.run(main)
