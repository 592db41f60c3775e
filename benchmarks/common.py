"""What the sections share: interleaved timing, memory peaks, fixed-length answers, markdown."""
import functools
import random
import statistics
import sys
import time

import torch

from benchmarks.process import memory_mib, peak_mib
from data.chat import render


def log(*args):
    print("bench:", *args, file=sys.stderr, flush=True)


def rotated(items, shift):
    """items from shift on, then the rest: no variant always goes first."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def rounds(fns, repeats, warmup):
    """{name: fn} -> {name: [fn()'s value in each round after the first `warmup`]}. Each round
    calls every fn once in a rotating order: a shared machine's changing load hits all alike."""
    values = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name in rotated(list(fns), round_):
            value = fns[name]()
            if round_ >= warmup:
                values[name].append(value)
    return values


def interleaved(fns, repeats, warmup, device="cpu"):
    """{name: fn} -> {name: [seconds of each call]}, in rounds as above (synchronized on CUDA)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    return rounds({name: functools.partial(timed, fn) for name, fn in fns.items()}, repeats, warmup)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def peak_memory(step, device):
    """GiB at the peak of one more step: on CUDA what torch allocated; on a CPU the process's peak
    resident set, which counts everything else it holds too."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resident_gib(peak_mib(step))


def resident_gib(mib=None):
    """mib, by default the process's resident MiB, in GiB; None without /proc."""
    mib = memory_mib() if mib is None else mib
    return None if mib is None else mib / 1024


def fixed_length(n):
    """Sampling keywords for a greedy answer of exactly n tokens (<|end|> held back until then)."""
    return {"max_new_tokens": n, "temperature": 0.0, "min_new_tokens": n}


def prompt_of(tok, tokens):
    """A user message of random digits and letters whose rendered conversation is `tokens` long
    (exact with the byte tokenizer; at most that with another)."""
    rng = random.Random(tokens)
    text = " ".join(rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(tokens))
    while len(prompt_ids(tok, text)) > tokens:
        text = text[:-1].rstrip()
    return text


def prompt_ids(tok, text):
    """The ids of a conversation of one user message, up to the answer."""
    return render([{"role": "user", "content": text}], tok)[0]


def table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def with_notes(lines, notes):
    return "\n".join(lines + [f"- note: {n}" for n in notes])
