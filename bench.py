"""
What the three masks cost, measured on this project's own code in one run: training steps, a long chat, decoding.

    python bench.py                              # CPU, the default model, every section (~2-5 min on 2 cores)
    python bench.py --device=cuda                # GPU: FlexAttention BlockMask + bf16 autocast for training
    python bench.py --sections=chat --json       # one section, machine-readable
    python bench.py --quick                      # tiny model and data, one repeat: the smoke test's run

Tables (markdown; --json prints the same numbers as one JSON object instead):
1. train: ms per optimizer step and tokens/s under causal, ISM and prefix, same model, same backend, each step built
   as train.py builds it (train.train_step: mask construction, forward, answer loss, backward, clip, AdamW; batches
   are collated beforehand). Plus a ceiling row, SDPA with is_causal=True and no mask built: on packed rows it lets a
   document see the earlier documents of its row, so it is a speed ceiling, not a correct step. Then one epoch of
   the dataset per mask: prefix trains one sample per answer (triplet expansion), so it processes more tokens.
2. chat: one conversation of synthetic-style user messages that fills block_size, played through sample.ChatSession
   (never a copy of it) under ISM and causal (cache reused), prefix (re-prefills the history every turn) and the
   no-cache reference: tokens prefilled and time to first token per turn. Peers with `transformers` installed:
   Hugging Face GPT-2 at the same config, carrying its past_key_values, and re-prefilling.
3. decode: ChatSession decode tokens/s with the KV cache and without (--no_cache path) at growing context, the KV
   cache's size, and Hugging Face GPT-2 generate() with its own cache as the peer.

Models in chat and decode have random weights (the numbers are costs, not quality), so the bench needs no
checkpoint. Timings: warmup rounds first, then the median of --repeats rounds; variants are interleaved round by
round so that a shared machine's changing load hits them alike. Ratios measured in one run are what to compare.
"""
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace

import torch
from torch.nn import functional as F

import flags
import model as model_module
import train as train_module
from data import synthetic
from data.batching import answer_target_count, collate, documents, epoch_rows
from data.chat import render, render_user
from data.prepare import load_meta, prepare
from data.tokenizer import get_tokenizer
from flags import UserError, setting
from mask import MASKS
from model import GPT, GPTConfig, KVCache, resolve_device
from sample import ChatSession
from train import TrainConfig, attention_mask, load_data, setup_device, to_device, token_count

SECTIONS = ("train", "chat", "decode")
DEFAULTS = TrainConfig()


@dataclass
class BenchConfig:
    device: str = setting("cpu", "cpu | cuda | auto")
    sections: str = setting("train,chat,decode", "comma-separated subset of train,chat,decode")
    repeats: int = setting(5, "timed rounds per measurement (the median is reported)")
    warmup: int = setting(1, "untimed rounds before them")
    threads: int = setting(0, "torch threads (0: torch's default)")
    quick: bool = setting(False, "tiny model and data, one repeat: a smoke run (flags given still win)")
    json: bool = setting(False, "print one JSON object instead of markdown tables")
    # model and training batch (train.py's defaults)
    n_layer: int = setting(DEFAULTS.n_layer, "transformer blocks")
    n_head: int = setting(DEFAULTS.n_head, "attention heads")
    n_embd: int = setting(DEFAULTS.n_embd, "embedding width")
    block_size: int = setting(DEFAULTS.block_size, "context length (rows, chat length, KV cache)")
    batch_size: int = setting(DEFAULTS.batch_size, "rows per training step")
    attention: str = setting("auto", "training backends: sdpa | flex | sdpa,flex (auto: sdpa on CPU, flex,sdpa on "
                                     "CUDA); the first one sets the epoch table and the target")
    data_dir: str = setting(DEFAULTS.data_dir, "prepared data for the training section (synthetic if missing)")
    seed: int = setting(1337, "weights, data order and the chat's messages")
    # chat and decode
    answer_tokens: int = setting(8, "chat: tokens per answer (fixed: <|end|> is never chosen)")
    chat_repeats: int = setting(15, "chat: timed rounds of the whole conversation (cheap; one turn's TTFT is a few "
                                    "ms, so a busy machine's scheduler shows: more rounds)")
    new_tokens: int = setting(32, "decode: tokens generated per measurement")
    hf: bool = setting(True, "add Hugging Face GPT-2 peer rows when transformers is installed")
    out_dir: str = setting("out", "where the TTFT plot goes")
    plot: str = setting("", "PNG path of TTFT vs turn (default out_dir/bench_ttft.png; 'none': no plot)")


QUICK = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, batch_size=2, repeats=1, warmup=1, answer_tokens=4,
             new_tokens=8, chat_repeats=1, threads=1)  # tiny tensors: a second thread only adds synchronisation
QUICK_DATA = dict(n_train=48, n_val=4)  # --quick trains on this many synthetic conversations
TARGETS = {"ism_vs_causal": {"sdpa": 1.03, "flex": 1.10}, "ttft_last_turn": 0.15, "ttft_flat": 1.5,
           "decode_speedup": 10.0, "decode_vs_hf": 1.3}


def parse_config(argv):
    cfg = flags.parse(BenchConfig(), argv, __doc__)
    if cfg.quick:  # the quick defaults, then the flags again so that explicit ones win
        cfg = flags.parse(replace(BenchConfig(), **QUICK, quick=True), argv, __doc__)
    sections = [s for s in cfg.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise UserError(f"--sections={cfg.sections}: choose from {','.join(SECTIONS)}")
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise UserError(f"--device={cfg.device}: choose one of cpu | cuda | auto")
    for key in ("repeats", "chat_repeats", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "answer_tokens", "new_tokens"):
        if getattr(cfg, key) < 1:
            raise UserError(f"--{key}={getattr(cfg, key)}: must be at least 1")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd={cfg.n_embd} is not a multiple of --n_head={cfg.n_head}")
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


def timeit(fn, repeats, warmup, device="cpu"):
    """Median seconds of one call of fn, after warmup calls (CUDA: synchronized before and after each call)."""
    return statistics.median(interleaved({"fn": fn}, repeats, warmup, device)["fn"])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------------- output

def table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value, target, at_most=True):
    if value is None:
        return "n/a"
    met = value <= target if at_most else value >= target
    return f"{'met' if met else 'MISSED'} ({'<=' if at_most else '>='} {target:g})"


def fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def machine(device):
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or "unknown CPU"
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    info = {"device": device, "name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        info["load_average"] = round(os.getloadavg()[0], 2)  # > cpus: other work shares the machine, timings noisy
    return info


# ------------------------------------------------------------------------------------------------- 1. training

@contextmanager
def is_causal_ceiling():
    """The ceiling row: inside this block every attention call of model.py is SDPA with is_causal=True (flash or
    memory-efficient kernels on CUDA; no mask tensor read) and train.py builds no mask. Bench-only: it swaps the
    two module-level names those calls go through and puts them back on exit."""

    class CausalF:  # torch.nn.functional, with SDPA told is_causal and the mask argument ignored
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)

    ignored = torch.ones(1, 1, dtype=torch.bool)  # the model reshapes the mask it is handed; this one is never read
    saved = model_module.F, train_module.attention_mask
    model_module.F, train_module.attention_mask = CausalF(), lambda kind, batch, attention: ignored
    try:
        yield
    finally:
        model_module.F, train_module.attention_mask = saved


def bench_data(cfg):
    """(meta, train split, temporary dir or None): cfg.data_dir, prepared with the synthetic set if missing; --quick
    uses a small synthetic set of its own in a temporary folder."""
    tmp = None
    data_dir = cfg.data_dir
    if cfg.quick:
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        data_dir = tmp.name
        prepare(data_dir, block_size=cfg.block_size, seed=cfg.seed, **QUICK_DATA)
    elif not os.path.exists(data_dir):
        log(f"no data at {data_dir}: preparing the synthetic dataset there (block_size {cfg.block_size})")
        prepare(data_dir, block_size=cfg.block_size)
    meta, split, _ = load_data(TrainConfig(data_dir=data_dir, block_size=cfg.block_size,
                                           tokenizer=load_meta(data_dir)["tokenizer"]["name"]),
                               is_master=True)
    return meta, split, tmp


def attention_backends(cfg, device_type):
    names = cfg.attention.split(",") if cfg.attention != "auto" else (
        ["flex", "sdpa"] if device_type == "cuda" else ["sdpa"])
    for name in names:
        if name not in ("sdpa", "flex"):
            raise UserError(f"--attention={cfg.attention}: choose sdpa, flex or both (sdpa,flex)")
        if name == "flex" and device_type != "cuda":
            raise UserError("--attention=flex needs CUDA (FlexAttention has no CPU backward): use sdpa on CPU")
    return names


def train_section(cfg, device):
    meta, split, tmp = bench_data(cfg)
    device, device_type, ctx, _ = setup_device(TrainConfig(device=torch.device(device).type))
    backends = attention_backends(cfg, device_type)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=meta["vocab_size"], n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd)).to(device)
    optimizer = model.configure_optimizers(DEFAULTS.weight_decay, DEFAULTS.learning_rate,
                                           (DEFAULTS.beta1, DEFAULTS.beta2), device_type)

    # Two batches per mask from the first rows of epoch 0 (causal and ISM get the very same rows), collated once.
    epoch = {kind: epoch_rows(split, kind, cfg.block_size, cfg.seed, 0) for kind in MASKS}
    batches = {}
    for kind in MASKS:
        rows = [epoch[kind][i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(2)]
        rows = [r for r in rows if r] or [epoch[kind]]
        batches[kind] = [(to_device(collate(split, r, cfg.block_size), device), answer_target_count(split, r),
                          token_count(r)) for r in rows]

    def step_fn(kind, attention, ceiling=False):
        state = {"i": 0}

        def step():
            batch, answers, _ = batches[kind][state["i"] % len(batches[kind])]
            state["i"] += 1
            with is_causal_ceiling() if ceiling else nullcontext():
                train_module.train_step(model, optimizer, [batch], kind, answers, attention, ctx,
                                        DEFAULTS.grad_clip)
        return step

    def mask_fn(kind, attention):
        return lambda: attention_mask(kind, batches[kind][0][0], attention)

    variants = {(a, kind): step_fn(kind, a) for a in backends for kind in ("causal", "ism", "prefix")}
    variants[("sdpa is_causal", "causal")] = step_fn("causal", "sdpa", ceiling=True)
    log(f"train: {len(variants)} variants x {cfg.warmup + cfg.repeats} steps of {cfg.batch_size} x "
        f"{cfg.block_size} tokens")
    step_times = interleaved(variants, cfg.repeats, cfg.warmup, device)
    mask_s = {v: timeit(mask_fn(v[1], v[0]), cfg.repeats, cfg.warmup, device)
              for v in variants if v[0] != "sdpa is_causal"}

    steps = []
    for (attention, kind), times in step_times.items():
        seconds = statistics.median(times)
        tokens = statistics.mean(t for _, _, t in batches[kind])
        mask_ms = mask_s[(attention, kind)] * 1e3 if (attention, kind) in mask_s else None
        steps.append({"attention": attention, "mask": kind, "ms_per_iter": seconds * 1e3,
                      "tokens_per_s": tokens / seconds, "mask_ms": mask_ms})
    ms = {(s["attention"], s["mask"]): s["ms_per_iter"] for s in steps}
    ratios = []
    for attention in backends:
        target = TARGETS["ism_vs_causal"][attention]
        for against, label in (((attention, "causal"), f"causal ({attention})"),
                               (("sdpa is_causal", "causal"), "ceiling (sdpa is_causal)")):
            ratio = ms[(attention, "ism")] / ms[against]
            ratios.append({"attention": attention, "against": label, "ratio": ratio, "target": target,
                           "met": ratio <= target})

    conversation_tokens = int(split.offsets[-1])
    main_backend = backends[0]
    epochs = []
    for kind in MASKS:
        docs = documents(split, kind)
        tokens = sum(end - start for start, end, _ in docs)
        n_steps = math.ceil(len(epoch[kind]) / cfg.batch_size)
        epochs.append({"mask": kind, "samples": len(docs), "tokens": tokens,
                       "expansion": tokens / conversation_tokens, "rows": len(epoch[kind]), "steps": n_steps,
                       "ms_per_iter": ms[(main_backend, kind)],
                       "epoch_s": n_steps * ms[(main_backend, kind)] / 1e3})
    if tmp is not None:
        tmp.cleanup()
    return {"backend": main_backend, "batch_size": cfg.batch_size, "block_size": cfg.block_size,
            "precision": "bf16 autocast" if device_type == "cuda" else "float32",
            "conversations": len(split.offsets) - 1, "conversation_tokens": conversation_tokens,
            "steps": steps, "ratios": ratios, "epoch": epochs}


def train_tables(r):
    rows = [[s["attention"], s["mask"], fmt(s["ms_per_iter"]), fmt(s["tokens_per_s"], 0), fmt(s["mask_ms"], 2)]
            for s in r["steps"]]
    out = [f"### Training step ({r['batch_size']} rows x {r['block_size']} tokens, {r['precision']}; the step "
           "includes building its mask, timed alone in the last column; tokens/s counts non-padding tokens)",
           table(["attention", "mask", "ms/iter", "tokens/s", "mask build ms"], rows), ""]
    out += [f"- ISM / {x['against']}: {x['ratio']:.3f} ({verdict(x['ratio'], x['target'])})" for x in r["ratios"]]
    out += ["- the sdpa is_causal row ignores document boundaries inside packed rows (not a correct step): "
            "a speed ceiling only", ""]
    rows = [[e["mask"], f"{e['samples']:,}", f"{e['tokens']:,}", f"{e['expansion']:.2f}x", f"{e['steps']:,}",
             fmt(e["ms_per_iter"]), fmt(e["epoch_s"])] for e in r["epoch"]]
    out += [f"### One epoch ({r['conversations']:,} conversations, {r['conversation_tokens']:,} tokens; every mask "
            f"trains each answer once; est. time = steps x {r['backend']} ms/iter above)",
            table(["mask", "samples", "tokens processed", "expansion", "steps", "ms/iter", "epoch s (est.)"], rows)]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- 2. chat / 3. decode

def chat_model(cfg, tok, device):
    """A random-weight GPT at the bench config whose <|end|> logit is -inf (a forward hook), so every greedy answer
    runs to max_new_tokens: each mask and path then feeds exactly the same number of tokens, turn after turn.
    The hook changes only the output logits, identically on the cached and the no-cache path (ChatSession's
    code is untouched), and costs one in-place write per forward."""
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=tok.vocab_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd)).to(device).eval()

    def never_end(module, args, output):
        logits, loss = output
        logits[..., tok.end] = float("-inf")
        return logits, loss

    model.register_forward_hook(never_end)
    return model


def chat_messages(tok, block_size, answer_tokens, seed):
    """User messages from the synthetic tasks, as many as fit in block_size with answer_tokens-long answers (no
    turn dropped), so the last prompt sees ~block_size - answer of history."""
    rng = random.Random(seed)
    users, length = [], 1  # <|bos|>
    while True:
        for message in synthetic.conversation(rng)["messages"]:
            if message["role"] != "user":
                continue
            turn = len(render_user(message["content"], tok)[0]) + answer_tokens + 1
            if length + turn > block_size:
                return users
            users.append(message["content"])
            length += turn


def hf_model(cfg, tok, device):
    """Hugging Face GPT-2 at our config (random weights, exact GELU like ours, fp32, eval), or (None, note)."""
    if not cfg.hf:
        return None, "Hugging Face rows skipped (--hf=false)"
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None, "transformers is not installed: no Hugging Face GPT-2 peer rows (pip install transformers)"
    transformers.logging.set_verbosity_error()
    torch.manual_seed(cfg.seed)
    config = GPT2Config(vocab_size=tok.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu",
                        bos_token_id=tok.bos, eos_token_id=tok.end, pad_token_id=tok.end)
    return GPT2LMHeadModel(config).to(device).eval(), f"transformers {transformers.__version__}"


class HFChat:
    """Hugging Face GPT-2 following the ISM session's conversation, token for token (its own replies are not
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


def chat_section(cfg, device, tok, model, hf):
    users = chat_messages(tok, cfg.block_size, cfg.answer_tokens, cfg.seed)
    sessions = {"ism": ChatSession(model, tok, "ism"), "causal": ChatSession(model, tok, "causal"),
                "prefix": ChatSession(model, tok, "prefix"),
                "no cache": ChatSession(model, tok, "ism", use_cache=False)}
    peers = {"HF cache": HFChat(hf, True, device), "HF re-prefill": HFChat(hf, False, device)} if hf else {}
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
                results[name] = sessions[name].turn(text, max_new_tokens=cfg.answer_tokens, temperature=0.0)
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
    return {"answer_tokens": cfg.answer_tokens, "rounds": cfg.chat_repeats, "turns": turns, "summary": chat_summary(turns, users, tok, cfg)}


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
    ratio = last["ism"]["ttft_ms"] / last["prefix"]["ttft_ms"]
    return {
        "turns": len(turns), "last_context": last["context"],
        "ism_prefill_equals_new_tokens": all(t["ism"]["prefill_tokens"] == n for t, n in zip(turns, new)),
        "causal_prefill_equals_new_tokens": all(t["causal"]["prefill_tokens"] == n for t, n in zip(turns, new)),
        "prefix_prefill_equals_history": all(t["prefix"]["prefill_tokens"] == t["context"] for t in turns),
        "ttft_last_ism_over_prefix": ratio, "ttft_last_target": TARGETS["ttft_last_turn"],
        "ttft_last_met": ratio <= TARGETS["ttft_last_turn"],
        "ism_ttft_late_over_early": late / early if len(turns) >= 8 else None,
        "ttft_flat_target": TARGETS["ttft_flat"],
        "last_ttft_ms": {name: v["ttft_ms"] for name, v in last.items() if isinstance(v, dict)},
    }


def chat_tables(r, notes):
    names = [n for n in r["turns"][0] if isinstance(r["turns"][0][n], dict)]
    headers = ["turn", "context"] + [f"prefill {n}" for n in names] + [f"TTFT ms {n}" for n in names]
    rows = [[t["turn"], t["context"]] + [t[n]["prefill_tokens"] for n in names] +
            [fmt(t[n]["ttft_ms"], 2) for n in names] for t in r["turns"]]
    s = r["summary"]
    out = [f"### Chat: one conversation, {s['turns']} turns, {r['answer_tokens']}-token answers, greedy "
           f"(context = tokens up to the turn's last prompt token; no cache = ISM with use_cache=False; TTFT = "
           f"median of {r['rounds']} rounds)",
           table(headers, rows), "",
           f"- ISM prefill per turn == new tokens (prompt + the previous answer's last token and <|end|>): "
           f"{'yes' if s['ism_prefill_equals_new_tokens'] else 'NO'}; causal: "
           f"{'yes' if s['causal_prefill_equals_new_tokens'] else 'NO'}; prefix re-prefills the whole history: "
           f"{'yes' if s['prefix_prefill_equals_history'] else 'NO'}",
           f"- last turn ({s['last_context']} tokens of context): ISM TTFT / prefix TTFT = "
           f"{s['ttft_last_ism_over_prefix']:.3f} ({verdict(s['ttft_last_ism_over_prefix'], s['ttft_last_target'])})"]
    last = s["last_ttft_ms"]
    if "HF cache" in last:
        out.append(f"- last turn, Hugging Face GPT-2: carrying its cache {last['HF cache']:.2f} ms (ISM / HF = "
                   f"{last['ism'] / last['HF cache']:.2f}), re-prefilling {last['HF re-prefill']:.2f} ms (ISM / HF "
                   f"= {last['ism'] / last['HF re-prefill']:.3f})")
    if s["ism_ttft_late_over_early"] is not None:
        out.append(f"- ISM TTFT, median of the last 4 turns / turns 2-5: {s['ism_ttft_late_over_early']:.2f} "
                   f"(roughly flat: {verdict(s['ism_ttft_late_over_early'], s['ttft_flat_target'])})")
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


def decode_section(cfg, device, tok, model, hf):
    """Decode tokens/s at growing context: one turn whose prompt fills context - new_tokens - 1 tokens, then
    new_tokens greedy tokens; tokens/s over the tokens after the first (ChatSession's decode_tokens_per_s)."""
    contexts = sorted({max(cfg.block_size // d, 8) for d in (8, 4, 2, 1)})
    cached, nocache = ChatSession(model, tok, "ism"), ChatSession(model, tok, "ism", use_cache=False)
    log(f"decode: contexts {contexts} x {2 + bool(hf)} variants x {cfg.warmup + cfg.repeats} rounds")
    rows = []
    for context in contexts:
        n = min(cfg.new_tokens, context // 2)
        text = prompt_of(tok, context - n - 1)
        prompt = render([{"role": "user", "content": text}], tok)[0]

        def ours(session):
            session.reset()
            result = session.turn(text, max_new_tokens=n, temperature=0.0)
            assert result["generated_tokens"] == n, result
            return result["decode_tokens_per_s"]

        def theirs():
            clock = TokenClock()
            with torch.no_grad():
                ids = torch.tensor([prompt], device=device)
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, use_cache=True, streamer=clock)
            assert len(clock.times) == n + 1  # the prompt, then n tokens
            return (n - 1) / (clock.times[-1] - clock.times[1])  # first new token to last, as ours

        fns = {"cache": lambda: ours(cached), "no cache": lambda: ours(nocache)}
        if hf:
            fns["HF generate"] = theirs
        speeds = rounds(fns, cfg.repeats, cfg.warmup)
        rows.append({"context": context, "prompt_tokens": len(prompt), "new_tokens": n,
                     **{name: median(v) for name, v in speeds.items()}})
    kv = KVCache(model.config, 1, device, next(model.parameters()).dtype)
    last = rows[-1]
    speedup = last["cache"] / last["no cache"]
    vs_hf = last["cache"] / last["HF generate"] if "HF generate" in last else None
    return {"rows": rows, "kv_bytes_per_token": kv.bytes_per_token,
            "kv_bytes_at_block_size": kv.bytes_per_token * cfg.block_size, "dtype": str(kv.kv.dtype),
            "speedup_at_block_size": speedup, "speedup_target": TARGETS["decode_speedup"],
            "ours_over_hf": vs_hf, "ours_over_hf_target": TARGETS["decode_vs_hf"]}


def decode_tables(r, notes):
    hf = "HF generate" in r["rows"][0]
    headers = ["context", "prompt", "new tokens", "tok/s cache", "tok/s no cache", "cache speedup"]
    headers += ["tok/s HF generate", "ours / HF"] if hf else []
    rows = []
    for x in r["rows"]:
        row = [x["context"], x["prompt_tokens"], x["new_tokens"], fmt(x["cache"], 0), fmt(x["no cache"], 0),
               f"{x['cache'] / x['no cache']:.1f}x"]
        if hf:
            row += [fmt(x["HF generate"], 0), f"{x['cache'] / x['HF generate']:.2f}x"]
        rows.append(row)
    mib = r["kv_bytes_at_block_size"] / 2**20
    out = ["### Decode (ISM session, greedy; tokens/s over the tokens after the first; HF: generate() with its "
           "own cache, min_new_tokens = max_new_tokens, same interval)", table(headers, rows), "",
           f"- cache vs no cache at {r['rows'][-1]['context']} tokens of context: {r['speedup_at_block_size']:.1f}x "
           f"({verdict(r['speedup_at_block_size'], r['speedup_target'], at_most=False)})"]
    if r["ours_over_hf"] is not None:
        out.append(f"- ours / HF GPT-2 generate at {r['rows'][-1]['context']} tokens: {r['ours_over_hf']:.2f}x "
                   f"({verdict(r['ours_over_hf'], r['ours_over_hf_target'], at_most=False)})")
    out.append(f"- KV cache: {r['kv_bytes_per_token']:,} bytes per token ({r['dtype']}), {mib:.2f} MiB at "
               f"block_size {r['rows'][-1]['context']}")
    out += [f"- note: {n}" for n in notes]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------------------- main

def main(argv=None):
    """Run the sections the flags ask for, print the tables (or JSON); return the results dict."""
    cfg, sections = parse_config(sys.argv[1:] if argv is None else argv)
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return run_bench(cfg, sections, device)
    finally:
        torch.set_num_threads(threads)


def run_bench(cfg, sections, device):
    info = machine(device)
    results = {"machine": info, "config": asdict(cfg), "notes": []}
    say = (lambda text: None) if cfg.json else (lambda text: print(text + "\n", flush=True))
    load = f", load average {info['load_average']}" if "load_average" in info else ""
    say(f"## ismGPT bench: {info['name']}, torch {info['torch']}, {info['threads']} threads "
        f"({info['cpus']} CPUs{load}), python {info['python']}\n"
        f"model: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block_size {cfg.block_size}; "
        f"{cfg.warmup} warmup + {cfg.repeats} timed rounds, medians")
    if info.get("load_average", 0) > info["cpus"] and device == "cpu":
        say(f"warning: load average {info['load_average']} > {info['cpus']} CPUs: other work shares this machine, "
            "so timings are noisy; with more torch threads than free cores each op can stall for a scheduler "
            "slice (try --threads=1)")
    if "train" in sections:
        results["train"] = train_section(cfg, device)
        say(train_tables(results["train"]))
    if "chat" in sections or "decode" in sections:
        tok = get_tokenizer("byte")
        model = chat_model(cfg, tok, device)
        hf, hf_note = hf_model(cfg, tok, device)
        results["notes"].append(hf_note)
        if "chat" in sections:
            results["chat"] = chat_section(cfg, device, tok, model, hf)
            notes = [hf_note]
            if cfg.plot != "none":
                notes.append(plot_ttft(results["chat"], cfg.plot or os.path.join(cfg.out_dir, "bench_ttft.png"),
                                       info["name"]))
                results["notes"].append(notes[-1])
            say(chat_tables(results["chat"], notes))
        if "decode" in sections:
            results["decode"] = decode_section(cfg, device, tok, model, hf)
            say(decode_tables(results["decode"], [hf_note]))
    if cfg.json:
        print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    flags.run(main)
