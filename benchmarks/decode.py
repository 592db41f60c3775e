"""3. decode: ChatSession's tokens/s with the KV cache (with --compile the compiled static-shape
step too) and without it at growing context, beside transformers' generate(); the cache's size."""
import functools

import torch

from benchmarks.common import (fixed_length, fmt, log, median, prompt_ids, prompt_of, rounds, table,
                               with_notes)
from benchmarks.models import hf_generate
from engine import ChatSession
from model import KVCache


def decode_speed(session, text, n):
    """Tokens/s over the n - 1 tokens after the first of a turn from an empty cache."""
    session.reset()
    return session.turn(text, **fixed_length(n))["decode_tokens_per_s"]


def decode_section(cfg, rt, tok, model, hf):
    """At each context: one turn whose prompt fills context - n - 1 tokens, then n greedy tokens."""
    contexts = sorted({max(cfg.block_size // d, 8) for d in (8, 4, 2, 1)})
    sessions = {"cache": ChatSession(model, tok, "ism"),
                "no cache": ChatSession(model, tok, "ism", use_cache=False)}
    if cfg.compile:
        sessions["compiled"] = ChatSession(model, tok, "ism", decode="compiled")
    log(f"decode: contexts {contexts} x {len(sessions) + bool(hf)} variants x "
        f"{cfg.warmup + cfg.repeats} rounds")
    rows = []
    for context in contexts:
        n = min(cfg.new_tokens, context // 2)
        text = prompt_of(tok, context - n - 1)
        prompt = prompt_ids(tok, text)
        fns = {name: functools.partial(decode_speed, s, text, n) for name, s in sessions.items()}
        if hf:
            ids = torch.tensor([prompt], device=rt.device)
            fns["HF generate"] = lambda: hf_generate(hf, ids, n)[1]
        speeds = rounds(fns, cfg.repeats, cfg.warmup)
        rows.append({"context": context, "prompt_tokens": len(prompt), "new_tokens": n,
                     **{name: median(v) for name, v in speeds.items()}})
    kv = KVCache(model.config, 1, rt.device, next(model.parameters()).dtype)
    last, best = rows[-1], "compiled" if cfg.compile else "cache"
    return {"rows": rows, "kv_bytes_per_token": kv.bytes_per_token,
            "kv_bytes_at_block_size": kv.bytes_per_token * cfg.block_size,
            "dtype": str(kv.keys[0].dtype),
            "speedup_at_block_size": last["cache"] / last["no cache"],
            "compiled_over_eager": last["compiled"] / last["cache"] if cfg.compile else None,
            "ours_over_hf": last[best] / last["HF generate"] if "HF generate" in last else None,
            "ours": best}


def decode_tables(r, notes):
    names = [n for n in ("cache", "compiled", "no cache", "HF generate") if n in r["rows"][0]]
    hf = "HF generate" in names
    headers = ["context", "prompt", "new tokens", *[f"tok/s {n}" for n in names],
               "cache / no cache"] + ["ours / HF"] * hf
    rows = [[x["context"], x["prompt_tokens"], x["new_tokens"], *[fmt(x[n], 0) for n in names],
             f"{x['cache'] / x['no cache']:.1f}x"]
            + ([f"{x[r['ours']] / x['HF generate']:.2f}x"] if hf else []) for x in r["rows"]]
    context = r["rows"][-1]["context"]
    out = ["### Decode (ISM session, greedy; tokens/s over the tokens after the first; HF: "
           "generate() with its own cache, min_new_tokens = max_new_tokens, same interval; "
           f"ours = {r['ours']})", table(headers, rows), "",
           f"- cache vs no cache at {context} tokens of context: {r['speedup_at_block_size']:.1f}x"]
    if r["compiled_over_eager"] is not None:
        out.append(f"- compiled static step vs eager step at {context} tokens: "
                   f"{r['compiled_over_eager']:.2f}x")
    if r["ours_over_hf"] is not None:
        out.append(f"- ours ({r['ours']}) / Hugging Face generate at {context} tokens: "
                   f"{r['ours_over_hf']:.2f}x")
    out.append(f"- KV cache: {r['kv_bytes_per_token']:,} bytes per token ({r['dtype']}), "
               f"{r['kv_bytes_at_block_size'] / 2**20:.2f} MiB at block_size {context}")
    return with_notes(out, notes)
