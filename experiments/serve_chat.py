"""
What a 16-turn chat costs through `python serve.py`, per mask: context tokens, tokens the server's
KV cache gave (cached_tokens) and the time to the first chunk with content (TTFT, median over
--repeats fresh servers, each warmed up first). One random-weight checkpoint of the default size; a
stateless streaming client sends the conversation's fixed replies back: every mask sees the same
tokens.

    python experiments/serve_chat.py
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


def streamed_turn(url, messages, max_tokens):
    """One streamed request. -> (seconds to the first chunk with content, usage)."""
    body = json.dumps({"messages": messages, "stream": True, "max_tokens": max_tokens,
                       "temperature": 0, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    started, first, usage = time.perf_counter(), None, None
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            chunk = json.loads(line[len(b"data: "):]) if line.startswith(b"data: {") else {}
            if first is None and chunk.get("choices") and "content" in chunk["choices"][0]["delta"]:
                first = time.perf_counter() - started
            usage = chunk.get("usage") or usage
    return first, usage


def play(out_dir, kind, cfg, log):
    """A fresh `python serve.py` on a free port, one warm-up request, then the fixed conversation
    -> a {context, cached, ttft_ms} per turn."""
    process = subprocess.Popen(
        [sys.executable, "serve.py", f"--out_dir={out_dir}", f"--mask={kind}", "--host=127.0.0.1",
         "--port=0", "--device=cpu", "--dtype=float32", f"--threads={cfg.threads}",
         "--temperature=0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = process.stdout.readline()  # "serving http://127.0.0.1:PORT (...)" once it listens
        if not line.startswith("serving "):
            process.wait()
            log.seek(0)
            raise UserError(f"serve.py did not start: {log.read().strip()}")
        url = line.split()[1] + "/v1/chat/completions"
        streamed_turn(url, [{"role": "user", "content": "warm up"}], cfg.max_tokens)
        messages, rows = [{"role": "system", "content": SYSTEM}], []
        for user, reply in TURNS:
            messages.append({"role": "user", "content": user})
            seconds, usage = streamed_turn(url, messages, cfg.max_tokens)
            rows.append({"context": usage["prompt_tokens"], "ttft_ms": seconds * 1e3,
                         "cached": usage["prompt_tokens_details"]["cached_tokens"]})
            messages.append({"role": "assistant", "content": reply})
        return rows
    finally:
        process.terminate()
        process.wait()


def measure(cfg, folder):
    """-> {mask: [per turn {context, cached, ttft_ms (median over repeats)}]}."""
    torch.manual_seed(cfg.seed)
    config, tok = GPTConfig(), get_tokenizer("byte")
    save_checkpoint({"model": GPT(config).state_dict(), "model_args": asdict(config), "config": {},
                     "tokenizer": tok.describe(), "mask": "causal"}, f"{folder}/ckpt.pt")
    runs = {kind: [] for kind in MASKS}
    for repeat in range(cfg.repeats):
        for kind in MASKS:  # the masks take turns: a change in the machine's load touches all
            with open(os.path.join(folder, f"{kind}-{repeat}.log"), "w+") as log:
                runs[kind].append(play(folder, kind, cfg, log))
    # the token counts are the same in every repeat: the first one's, with the median TTFT
    return {kind: [dict(turns[0], ttft_ms=statistics.median(t["ttft_ms"] for t in turns))
                   for turns in zip(*repeats)] for kind, repeats in runs.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = flags.parse(ServeChatConfig(), argv, __doc__)
    with tempfile.TemporaryDirectory() as folder:
        results = measure(cfg, folder)
    lines = ["| turn | context tokens | " + " | ".join(f"{k} cached | {k} TTFT" for k in results)
             + " |", "|---:|---:|" + "---:|---:|" * len(results)]
    for turn, rows in enumerate(zip(*results.values()), 1):
        cells = " | ".join(f"{r['cached']} | {r['ttft_ms']:.1f} ms" for r in rows)
        lines.append(f"| {turn} | {rows[0]['context']} | {cells} |")
    prefilled = {k: sum(r["context"] - r["cached"] for r in rows) for k, rows in results.items()}
    info = machine("cpu")
    print("\n".join(lines + [
        "", "tokens prefilled over the conversation: "
        + ", ".join(f"{k} {n}" for k, n in prefilled.items()),
        f"machine: {info['name']}, {info['cpus']} cores, torch {info['torch']}, server threads "
        f"{cfg.threads}, load average {info.get('load_average', '-')}",
        "command: python experiments/serve_chat.py" + "".join(f" {a}" for a in argv)]))


if __name__ == "__main__":
    flags.run(main)
