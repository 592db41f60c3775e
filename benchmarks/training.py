"""1. train: each mask's optimizer step as train.py takes it (loss.train_step), SDPA alone under a
dense mask against is_causal, and one epoch's cost per mask."""
import copy
import functools
import itertools
import math
import tempfile
from dataclasses import replace

import torch

from benchmarks.common import fmt, interleaved, log, median, peak_memory, table
from benchmarks.models import random_model
from cli.errors import UserError
from data.batching import answer_target_count, collate, documents, epoch_rows, token_count
from data.prepare import prepare, prepare_if_default, synthetic_dir
from data.store import load_meta, load_split
from data.tokenizer import get_tokenizer
from loss import batch_mask, train_step
from mask import MASKS
from support.compute import compute_init

OPTIMIZER = dict(weight_decay=0.1, learning_rate=6e-3, betas=(0.9, 0.99))  # train.py's defaults
QUICK_DATA = dict(n_train=48, n_val=4)  # --quick trains on this many synthetic conversations


def bench_data(cfg, tok):
    """-> (vocab_size, train split, temporary folder or None): --data_dir, by default the synthetic
    dataset in tok's tokens (prepared if missing); --quick without a --data_dir makes a small one
    in a temporary folder."""
    block_size = min(cfg.block_size, 512)
    if cfg.quick and not cfg.data_dir:
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        meta = prepare(tmp.name, tokenizer=tok.name, block_size=block_size, seed=cfg.seed,
                       **QUICK_DATA)
        return meta["vocab_size"], load_split(tmp.name, "train"), tmp
    data_dir = cfg.data_dir or synthetic_dir(tok.name)
    prepare_if_default(data_dir, tok.name, block_size, log)
    meta = load_meta(data_dir, cfg.block_size)
    if meta["tokenizer"] != tok.describe():
        raise UserError(f"{data_dir} holds {meta['tokenizer']['name']} tokens, the model reads "
                        f"{tok.name} ones: pass a --data_dir prepared with python prepare.py "
                        f"--tokenizer={tok.name}")
    return meta["vocab_size"], load_split(data_dir, "train"), None


def attention_backends(cfg, device_type):
    names = cfg.attention.split(",") if cfg.attention != "auto" else (
        ["flex", "sdpa"] if device_type == "cuda" else ["sdpa"])
    for name in names:
        if name not in ("sdpa", "flex"):
            raise UserError(f"--attention={cfg.attention}: choose sdpa, flex or both (sdpa,flex)")
        if name == "flex" and device_type != "cuda":
            raise UserError("--attention=flex needs CUDA (FlexAttention has no CPU backward): "
                            "use sdpa on CPU")
    return names


def train_section(cfg, device, start):
    """start: the pretrained start (a fine-tuning step from its float32 weights), or None."""
    tok = start.tok if start else get_tokenizer("byte")
    vocab_size, split, tmp = bench_data(cfg, tok)
    rt = compute_init(device, training=True)
    backends = attention_backends(cfg, rt.device_type)
    torch.manual_seed(cfg.seed)
    if start:
        raw_model = copy.deepcopy(start.model).to(rt.device, torch.float32).train()
    else:
        raw_model = random_model(cfg, cfg.vocab_size or vocab_size).to(rt.device)
    epoch = {kind: epoch_rows(split, kind, cfg.block_size, cfg.seed, 0) for kind in MASKS}
    steps = step_rows(cfg, rt, raw_model, split, epoch, backends)
    ms = {(s["attention"], s["mask"]): s["ms_per_iter"] for s in steps}
    ratios = [{"attention": a, "against": f"causal ({a})", "ratio": ms[a, "ism"] / ms[a, "causal"]}
              for a in backends]
    if "flex" in backends and "sdpa" in backends:
        ratios.append({"attention": "flex", "against": "ISM (sdpa)",
                       "ratio": ms["flex", "ism"] / ms["sdpa", "ism"]})
    result = {"backend": backends[0], "batch_size": cfg.batch_size, "block_size": cfg.block_size,
              "precision": "bf16 autocast" if rt.dtype == "bfloat16" else "float32",
              "compiled": cfg.compile, "conversations": len(split.offsets) - 1,
              "conversation_tokens": int(split.offsets[-1]), "steps": steps, "ratios": ratios,
              "attention_alone": attention_alone(cfg, raw_model.config, rt),
              "epoch": epoch_table(cfg, split, epoch, ms, backends[0])}
    if tmp is not None:
        tmp.cleanup()
    return result


def step_rows(cfg, rt, raw_model, split, epoch, backends):
    """Each (backend, mask) training step timed, interleaved, on two batches of epoch 0's first rows
    (causal and ISM get the very same), with its mask's construction timed alone, MFU on CUDA and
    its peak memory."""
    batches = {}  # mask -> [(batch, answer targets, tokens)], collated once
    for kind in MASKS:
        rows = [epoch[kind][i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(2)]
        rows = [r for r in rows if r] or [epoch[kind]]
        batches[kind] = [(rt.to_device(collate(split, r, cfg.block_size)),
                          answer_target_count(split, r), token_count(r)) for r in rows]
    model = torch.compile(raw_model) if cfg.compile else raw_model
    optimizer = raw_model.configure_optimizers(**OPTIMIZER, device_type=rt.device_type)

    def step(kind, attention, cycle):
        batch, answers, _ = next(cycle)
        train_step(model, optimizer, [batch], kind, answers, replace(rt, attention=attention))

    kinds = ("causal", "ism", "prefix")  # the table's order
    variants = {(a, kind): functools.partial(step, kind, a, itertools.cycle(batches[kind]))
                for a in backends for kind in kinds}
    log(f"train: {len(variants)} variants x {cfg.warmup + cfg.repeats} steps of {cfg.batch_size} x "
        f"{cfg.block_size} tokens")
    step_times = interleaved(variants, cfg.repeats, cfg.warmup, rt.device)
    peak_gib = {v: peak_memory(fn, rt.device) for v, fn in variants.items()}
    masks = {(a, kind): functools.partial(batch_mask, kind, batches[kind][0][0], a)
             for a, kind in variants}
    mask_times = interleaved(masks, cfg.repeats, cfg.warmup, rt.device)
    steps = []
    for (attention, kind), times in step_times.items():
        seconds = median(times)
        tokens = sum(t for _, _, t in batches[kind]) / len(batches[kind])
        mfu = (raw_model.estimate_mfu(cfg.batch_size * cfg.block_size, seconds)
               if rt.device_type == "cuda" else None)
        steps.append({"attention": attention, "mask": kind, "ms_per_iter": seconds * 1e3,
                      "tokens_per_s": tokens / seconds,
                      "mask_ms": median(mask_times[attention, kind]) * 1e3, "mfu": mfu,
                      "peak_gib": peak_gib[attention, kind]})
    return steps


def attention_alone(cfg, config, rt):
    """SDPA's forward and backward at one layer's training shapes, under a dense boolean mask (how
    every mask runs on SDPA) against its built-in is_causal (no mask tensor: on packed rows a
    document would see the ones before it, so a speed reference, not a correct step)."""
    shape = (cfg.batch_size, config.n_head, cfg.block_size, config.head_dim)
    q, k, v = (torch.randn(shape, device=rt.device, requires_grad=True) for _ in range(3))
    dense = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool, device=rt.device).tril()

    def run(**how):
        with rt.autocast():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, **how).sum().backward()
    variants = {"dense": lambda: run(attn_mask=dense), "causal": lambda: run(is_causal=True)}
    times = interleaved(variants, cfg.repeats, cfg.warmup, rt.device)
    return {"dense_ms": median(times["dense"]) * 1e3, "is_causal_ms": median(times["causal"]) * 1e3,
            "layers": config.n_layer}


def epoch_table(cfg, split, epoch, ms, backend):
    """One epoch per mask: samples, tokens processed, steps and the time at backend's step time.
    Prefix trains one sample per answer (triplet expansion), so it processes more tokens."""
    epochs = []
    for kind in MASKS:
        docs = documents(split, kind)
        tokens = sum(end - start for start, end, _ in docs)
        n_steps = math.ceil(len(epoch[kind]) / cfg.batch_size)
        epochs.append({"mask": kind, "samples": len(docs), "tokens": tokens,
                       "expansion": tokens / int(split.offsets[-1]), "rows": len(epoch[kind]),
                       "steps": n_steps, "ms_per_iter": ms[backend, kind],
                       "epoch_s": n_steps * ms[backend, kind] / 1e3})
    return epochs


def train_tables(r):
    rows = [[s["attention"], s["mask"], fmt(s["ms_per_iter"]), fmt(s["tokens_per_s"], 0),
             fmt(s["mask_ms"], 2), "-" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%",
             fmt(s["peak_gib"], 2)] for s in r["steps"]]
    compiled = ", torch.compile" if r["compiled"] else ""
    a = r["attention_alone"]
    extra = a["layers"] * (a["dense_ms"] - a["is_causal_ms"])
    headers = ["attention", "mask", "ms/iter", "tokens/s", "mask build ms", "MFU", "peak GiB"]
    out = [f"### Training step ({r['batch_size']} rows x {r['block_size']} tokens, "
           f"{r['precision']}{compiled}; the step includes building its mask, timed alone in its "
           "column; tokens/s counts non-padding tokens)", table(headers, rows), ""]
    out += [f"- ISM ({x['attention']}) / {x['against']}: {x['ratio']:.3f}" for x in r["ratios"]]
    out += [f"- attention alone, one layer's forward + backward at these shapes: SDPA with a dense "
            f"mask {a['dense_ms']:.2f} ms, with is_causal (no mask tensor; not a correct step on "
            f"packed rows) {a['is_causal_ms']:.2f} ms: the dense mask costs {extra:.1f} ms per "
            f"step over {a['layers']} layers", ""]
    rows = [[e["mask"], f"{e['samples']:,}", f"{e['tokens']:,}", f"{e['expansion']:.2f}x",
             f"{e['steps']:,}", fmt(e["ms_per_iter"]), fmt(e["epoch_s"])] for e in r["epoch"]]
    out += [f"### One epoch ({r['conversations']:,} conversations, {r['conversation_tokens']:,} "
            "tokens; every mask trains each answer once; est. time = steps x "
            f"{r['backend']} ms/iter above)",
            table(["mask", "samples", "tokens processed", "expansion", "steps", "ms/iter",
                   "epoch s (est.)"], rows)]
    return "\n".join(out)
