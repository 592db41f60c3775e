"""4. peers (a pretrained start on the CPU): ours in float32, int8 and int4 (support/quantize.py;
with --compile the compiled int4 step) against transformers and llama.cpp (when it imports) on the
same weights and token ids, at 1 and 2 threads: decode, prefill, a cached chat turn, each decode
beside its memory-bound ceiling; then the int4 model and llama.cpp each alone in a process
(benchmarks/process.py): memory, and a second start to ready."""
import copy
import functools
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.common import (fixed_length, fmt, interleaved, log, median, prompt_ids, prompt_of,
                               rounds, table, with_notes)
from benchmarks.models import hf_generate
from cli.errors import UserError
from data.tokenizer import SMOLLM2, smollm2_path
from engine import ChatSession
from support.quantize import QuantizedLinear, quantize

THREADS = (1, 2)
DECODE_CONTEXT = 256  # tokens before the first decoded one (prompt + answer so far)
PREFILL = 511  # tokens of one prefill, timed to the first token
LONG_CONTEXT = 2000  # the long decode's context; its prefill is the long prefill
CHAT_TURNS, CHAT_PROMPT = 10, 30  # the cached chat: turns (the first is not timed), prompt tokens
MIN_NEW_TOKENS = 32  # decode rates over at least this many tokens
LLAMA_CPP_NOTE = ("llama.cpp: llama-cpp-python (an optional peer: pip install llama-cpp-python) "
                  "on the start's GGUF file, fed our token ids, its prompt cache reset between "
                  "rounds")
MEASURES = ("decode", "prefill", "decode_long", "prefill_long", "ttft_ms")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stream_rate(repeats=5):
    """Bytes/s a float32 matrix-vector product streams from memory at torch's thread count: what
    bounds a one-token decode step, which reads every weight once (256 MiB, beyond any cache)."""
    matrix, vector = torch.randn(16384, 4096), torch.randn(4096)
    return matrix.nbytes / min(interleaved({"mv": lambda: matrix @ vector}, repeats, 1)["mv"])


def decode_bytes(model):
    """Bytes of weights a decode step reads: every Linear's as the step uses them (int8 or int4
    weights and scales); norms and one embedding row are left out (under 0.1%)."""
    return sum(m.weight_q.nbytes + m.scales.nbytes if isinstance(m, QuantizedLinear) else
               m.weight.nbytes for m in model.modules()
               if isinstance(m, (QuantizedLinear, torch.nn.Linear)))


def prompts(tok, block_size, new_tokens):
    """-> ([decode context, prefill tokens, long context], or what a smaller block_size holds; the
    decode's new tokens; the texts of a short decode, a prefill, a long decode; the chat's)."""
    lengths = [min(DECODE_CONTEXT, block_size // 2), min(PREFILL, block_size // 2),
               min(LONG_CONTEXT, block_size - 2)]
    context, prefill, long = lengths
    new_tokens = min(max(new_tokens, MIN_NEW_TOKENS), context // 2)
    texts = [prompt_of(tok, n) for n in (context - new_tokens, prefill, long - new_tokens)]
    framing = len(prompt_ids(tok, "x"))  # a message's tokens besides its own (a system message)
    chat = [prompt_of(tok, framing + CHAT_PROMPT + i) for i in range(CHAT_TURNS)]
    return lengths, new_tokens, texts, chat


class Process:
    """benchmarks/process.py's model in a process of its own: timed from its start to ready."""

    def __init__(self, *args):
        t0 = time.perf_counter()
        path = os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.process", *map(str, args)],
            env=dict(os.environ, PYTHONPATH=path), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        self.ready = self.ask()  # no request: the line it prints once ready
        self.ready["ready_s"] = time.perf_counter() - t0

    def ask(self, **request):
        if request:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmarks/process.py {self.process.args[3:]} ended early")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def alone(*args, peak):
    """Start the process twice (the first warms the file cache; ours writes its conversion) ->
    the second's {resident_mib after load, ready_s, prefill_peak_mib over a prefill of peak}."""
    Process(*args).close()
    process = Process(*args)
    facts = dict(process.ready, prefill_peak_mib=process.ask(peak=peak))
    process.close()
    return facts


def llama_cpp_file(init_from):
    """-> (the GGUF file llama.cpp runs, or None; a note saying which, or why not)."""
    path = smollm2_path() if init_from == SMOLLM2 else init_from \
        if init_from.endswith(".gguf") else None
    try:
        import llama_cpp
    except ImportError:
        return None, "llama.cpp: not installed (pip install llama-cpp-python)"
    if path is None:
        return None, "llama.cpp: not a row (it runs GGUF files: --init_from=smollm2 or FILE.gguf)"
    return path, f"llama.cpp: llama-cpp-python {llama_cpp.__version__}"


def measures(turn, prompts_, new_tokens, chat_ttft):
    """One round's MEASURES: turn(prompt, n) -> a turn's record from an empty cache (a short decode,
    a prefill, a long decode); chat_ttft() -> the cached chat's TTFTs (the first not counted)."""
    short, prefill, long = (turn(p, n) for p, n in zip(prompts_, (new_tokens, 1, new_tokens)))

    def per_second(record):  # prefill tokens/s, to the first token
        return record["prefill_tokens"] / (record["ttft_ms"] / 1e3)
    return dict(zip(MEASURES, (short["decode_tokens_per_s"], per_second(prefill),
                               long["decode_tokens_per_s"], per_second(long),
                               median(chat_ttft()[1:]))))


def ours(session, texts, new_tokens, chat, answer_tokens):
    """-> measure(): one round of every measure, as a chat does them through the session."""
    def turn(text, n):
        session.reset()
        return session.turn(text, **fixed_length(n))

    def chat_ttft():
        session.reset()
        return [session.turn(text, **fixed_length(answer_tokens))["ttft_ms"] for text in chat]
    return functools.partial(measures, turn, texts, new_tokens, chat_ttft)


def conversation(session, chat, new_tokens):
    """The cached chat as the session had it: [(ids up to the answer, the answer's ids)]."""
    session.reset()
    turns = []
    for text in chat:
        session.turn(text, **fixed_length(new_tokens))
        answer = session.last.reply  # then its closing token
        turns.append((session.ids[:len(session.ids) - len(answer) - 1], answer))
    return turns


def llama_cpp(process, ids, new_tokens, turns):
    """-> measure(): the same round in llama.cpp's process, fed the same ids (the chat's turns
    with our answers, decoded one token at a time), its cache emptied before each measure."""
    def turn(prompt, n):
        process.ask(reset=True)
        return process.ask(turn=prompt, new_tokens=n)

    def chat_ttft():
        process.ask(reset=True)
        return [process.ask(turn=prompt, answer=answer)["ttft_ms"] for prompt, answer in turns]
    return functools.partial(measures, turn, ids, new_tokens, chat_ttft)


def transformers(hf, ids, new_tokens):
    """-> measure(): generate() on the same ids (no chat: the chat section has its cached turn)."""
    def measure():
        (_, decode), (prefill, _), (prefill_long, decode_long) = (
            hf_generate(hf, torch.tensor([i]), n) for i, n in zip(ids, (new_tokens, 1, new_tokens)))
        return dict(zip(MEASURES, (decode, prefill, decode_long, prefill_long, None)))
    return measure


def processes(cfg, path, long_text, long_ids):
    """The chat model (int4) and llama.cpp each alone in a process: resident memory after load and
    its peak over the long prefill, and the start to ready."""
    if not cfg.init_from:
        return {"processes": {}, "second_load_s": None}
    alone_ = {"int4": alone("ismgpt", cfg.init_from, 1, cfg.block_size, "int4", peak=long_text)}
    if path:
        alone_["llama.cpp"] = alone("llama.cpp", path, 1, cfg.block_size, peak=long_ids)
    return {"processes": alone_, "second_load_s": alone_["int4"]["ready_s"]}


def peers_section(cfg, rt, tok, model, hf):
    """Every variant at each thread count, interleaved, beside a decode step's ceiling; then the
    chat model and llama.cpp each alone in a process."""
    if rt.device_type != "cpu":
        raise UserError("--sections=peers measures the CPU's kernels (int8/int4 decode): run it "
                        "with --device=cpu")
    model = copy.deepcopy(model).float()  # the table is float32's (the chat's may be in --dtype)
    models = {"float32": model, **{mode: quantize(copy.deepcopy(model), mode)
                                   for mode in ("int8", "int4")}}
    sessions = {name: ChatSession(m, tok, "ism") for name, m in models.items()}
    if cfg.compile:
        sessions["int4 compiled"] = ChatSession(models["int4"], tok, "ism", decode="compiled")
    weights = {name: decode_bytes(session.model) for name, session in sessions.items()}
    lengths, new_tokens, texts, chat = prompts(tok, model.config.block_size, cfg.new_tokens)
    ids = [prompt_ids(tok, text) for text in texts]
    fns = {name: ours(session, texts, new_tokens, chat, cfg.answer_tokens)
           for name, session in sessions.items()}
    if hf:
        fns["transformers"] = transformers(hf, ids, new_tokens)
    path, note = llama_cpp_file(cfg.init_from)
    if path:
        turns = conversation(sessions["float32"], chat, cfg.answer_tokens)
        weights["llama.cpp"] = os.path.getsize(path)  # its tensors, 98%
    rows, threads_before = [], torch.get_num_threads()
    for threads in THREADS:
        torch.set_num_threads(threads)
        rate = stream_rate()
        if path:
            worker = Process("llama.cpp", path, threads, model.config.block_size)
            fns["llama.cpp"] = llama_cpp(worker, ids, new_tokens, turns)
            agree = all(worker.ask(tokenize=tok.decode(i)) == i for i in ids + [turns[-1][0]])
        log(f"peers: {threads} thread(s), {len(fns)} variants x {cfg.warmup + cfg.repeats} rounds")
        for name, measured in rounds(fns, cfg.repeats, cfg.warmup).items():
            rows.append({"threads": threads, "variant": name, "bytes_per_token": weights.get(name),
                         **{m: median([v[m] for v in measured]) for m in MEASURES},
                         "stream_gb_s": rate / 1e9,
                         "ceiling": rate / weights[name] if name in weights else None})
        if path:
            worker.close()
    torch.set_num_threads(threads_before)
    if path:
        note += f"; its tokenizer {'gives' if agree else 'DOES NOT give'} our ids for each " \
                "prompt's text"
    return {"rows": rows, "lengths": lengths, "new_tokens": new_tokens,
            "answer_tokens": cfg.answer_tokens, "llama_cpp": note,
            **processes(cfg, path, texts[2], ids[2])}


def peers_tables(r, notes):
    context, prefill, long = r["lengths"]
    headers = ["threads", "variant", "decode tok/s", "of its ceiling", "vs float32",
               f"decode tok/s at {long}", "prefill tok/s", f"prefill tok/s at {long}",
               "cached turn TTFT ms", "bytes/token (MB)", "ceiling tok/s"]
    float32 = {x["threads"]: x for x in r["rows"] if x["variant"] == "float32"}
    rows = [[x["threads"], x["variant"], fmt(x["decode"]),
             f"{x['decode'] / x['ceiling']:.0%}" if x["ceiling"] else "-",
             f"{x['decode'] / float32[x['threads']]['decode']:.2f}x", fmt(x["decode_long"]),
             fmt(x["prefill"], 0), fmt(x["prefill_long"], 0), fmt(x["ttft_ms"], 0),
             fmt(x["bytes_per_token"] / 1e6, 0) if x["bytes_per_token"] else "-", fmt(x["ceiling"])]
            for x in r["rows"]]
    rates = ", ".join(f"{x['stream_gb_s']:.1f} GB/s at {t} thread(s)" for t, x in float32.items())
    lines = [f"### Peers (ISM session, greedy; decode of {r['new_tokens']} tokens at {context} and "
             f"{long} tokens of context, prefill of {prefill} tokens to the first token, a cached "
             f"chat turn's TTFT: the median of turns 2-{CHAT_TURNS} ({CHAT_PROMPT}+ token "
             f"messages, {r['answer_tokens']}-token answers); ceiling = streaming rate / bytes a "
             "decode step reads)", table(headers, rows), "",
             f"- streaming rate of a float32 matrix-vector product: {rates}", f"- {r['llama_cpp']}"]
    for name, p in r["processes"].items():
        lines.append(f"- {name} alone in a process (1 thread): resident "
                     f"{p['resident_mib']:.0f} MiB after load, peak {p['prefill_peak_mib']:.0f} "
                     f"MiB over a {long}-token prefill; a second start to ready "
                     f"{p['ready_s']:.2f} s")
    return with_notes(lines, notes)
