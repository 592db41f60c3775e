"""
What a 16-turn chat costs through the HTTP server, per mask: context tokens, tokens reused from the
server's KV cache (usage.prompt_tokens_details.cached_tokens) and the time to first token (TTFT) as
the client sees it.

    python experiments/serve_chat.py

For each mask it starts `python serve.py --port=0 ...` (a free port, every setting explicit) on a
random-weight model of the default size (GPTConfig(), byte tokenizer; the same weights for every
mask, saved as a checkpoint in a temporary folder) and plays one fixed conversation through it as a
stateless client does: every request carries the whole history, streamed (standard library only),
temperature 0. The conversation's fixed replies, not the server's, go back as the history, so every
mask sees the same tokens: the server keeps its cache up to the start of that reply, and each turn
prefills the reply and the new prompt.

TTFT runs from sending the request to the first chunk with content (sent with the first sampled
token: after the prefill), median over --repeats fresh servers (the masks take turns), each warmed
up first by one request in another conversation.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass

# run as a script, the repository root is not on sys.path: put it first
sys.path.insert(0, ROOT := os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

import torch

from cli import flags
from cli.errors import UserError
from cli.flags import setting
from data.tokenizer import get_tokenizer
from mask import MASKS
from model import GPT, GPTConfig
from support.checkpoint import save_checkpoint
from support.compute import machine

SYSTEM = "answer briefly."
TURNS = [  # (user, the reply sent back as history), in the synthetic data's words
    ("my pin is 4821", "ok"), ("7 2 9 4 1 max", "9"), ("start at 12", "12"), ("add 30", "42"),
    ("what is my pin?", "4821"), ("b d a c sort", "a b c d"), ("1 2 3 reverse", "3 2 1"),
    ("5 8 3 min", "3"), ("my lucky number is 7", "ok"), ("double it", "84"),
    ("q w e reverse", "e w q"), ("what is my lucky number?", "7"), ("9 1 7 sort", "1 7 9"),
    ("add 5", "89"), ("4 6 2 max", "6"), ("what is my pin?", "4821"),
]


@dataclass
class ServeChatConfig:
    repeats: int = setting(5, "fresh servers per mask; TTFT is the median over them", min=1)
    max_tokens: int = setting(8, "max_tokens of every request", min=1)
    threads: int = setting(1, "torch threads of the server (the client shares the machine)", min=0)
    seed: int = setting(0, "seed of the random weights", min=0)


def write_checkpoints(folder, seed):
    """One checkpoint per mask, of the same random weights. -> {mask: out_dir}."""
    torch.manual_seed(seed)
    config, tok = GPTConfig(), get_tokenizer("byte")
    model = GPT(config)
    out_dirs = {kind: os.path.join(folder, kind) for kind in MASKS}
    for kind, out_dir in out_dirs.items():
        checkpoint = {"model": model.state_dict(), "model_args": asdict(config), "config": {},
                      "tokenizer": tok.describe(), "mask": kind}
        save_checkpoint(checkpoint, os.path.join(out_dir, "ckpt.pt"))
    return out_dirs


def start_server(out_dir, threads, log):
    """`python serve.py` on a free port -> (process, base URL) once it listens."""
    process = subprocess.Popen(
        [sys.executable, "serve.py", f"--out_dir={out_dir}", "--host=127.0.0.1", "--port=0",
         "--device=cpu", "--dtype=float32", f"--threads={threads}", "--temperature=0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()  # "serving http://127.0.0.1:PORT (...)"
    if not line.startswith("serving "):
        process.wait()
        log.seek(0)
        raise UserError(f"serve.py did not start: {log.read().strip()}")
    return process, line.split()[1]


def streamed_turn(url, messages, max_tokens):
    """One streamed request. -> (seconds to the first chunk with content, usage)."""
    body = json.dumps({"model": "ismgpt", "messages": messages, "stream": True,
                       "max_tokens": max_tokens, "temperature": 0,
                       "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    started, first, usage = time.perf_counter(), None, None
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: "):])
            if first is None and chunk["choices"] and "content" in chunk["choices"][0]["delta"]:
                first = time.perf_counter() - started
            usage = chunk.get("usage") or usage
    return first, usage


def play(url, max_tokens):
    """The fixed conversation after one warm-up request -> a {context, cached, ttft_ms} per turn."""
    streamed_turn(url, [{"role": "user", "content": "warm up"}], max_tokens)
    messages, rows = [{"role": "system", "content": SYSTEM}], []
    for user, reply in TURNS:
        messages.append({"role": "user", "content": user})
        seconds, usage = streamed_turn(url, messages, max_tokens)
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        rows.append({"context": usage["prompt_tokens"], "cached": cached, "ttft_ms": seconds * 1e3})
        messages.append({"role": "assistant", "content": reply})
    return rows


def measure(cfg, out_dirs, folder):
    """-> {mask: [per turn {context, cached, ttft_ms (median over repeats)}]}. The masks take turns
    within each repeat, so that a change in the machine's load touches them alike."""
    runs = {kind: [] for kind in out_dirs}
    for repeat in range(cfg.repeats):
        for kind, out_dir in out_dirs.items():
            with open(os.path.join(folder, f"{kind}-{repeat}.log"), "w+") as log:
                process, url = start_server(out_dir, cfg.threads, log)
                try:
                    runs[kind].append(play(url, cfg.max_tokens))
                finally:
                    process.terminate()
                    process.wait()
    # the token counts are the same in every repeat: the first one's, with the median TTFT
    return {kind: [dict(turns[0], ttft_ms=statistics.median(t["ttft_ms"] for t in turns))
                   for turns in zip(*repeats)] for kind, repeats in runs.items()}


def report(results, cfg, argv):
    kinds = list(results)
    lines = ["| turn | context tokens | " + " | ".join(f"{k} cached | {k} TTFT" for k in kinds)
             + " |", "|---:|---:|" + "---:|---:|" * len(kinds)]
    for turn, rows in enumerate(zip(*results.values()), 1):
        cells = " | ".join(f"{r['cached']} | {r['ttft_ms']:.1f} ms" for r in rows)
        lines.append(f"| {turn} | {rows[0]['context']} | {cells} |")
    prefilled = {k: sum(r["context"] - r["cached"] for r in rows) for k, rows in results.items()}
    info = machine("cpu")
    lines += ["", "tokens prefilled over the conversation: "
              + ", ".join(f"{k} {n}" for k, n in prefilled.items()),
              f"machine: {info['name']}, {info['cpus']} cores, torch {info['torch']}, server "
              f"threads {cfg.threads}, load average {info.get('load_average', '-')}",
              "command: python experiments/serve_chat.py" + "".join(f" {a}" for a in argv)]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = flags.parse(ServeChatConfig(), argv, __doc__)
    with tempfile.TemporaryDirectory() as folder:
        results = measure(cfg, write_checkpoints(folder, cfg.seed), folder)
    print(report(results, cfg, argv))


if __name__ == "__main__":
    flags.run(main)
