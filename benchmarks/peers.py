"""4. peers (a pretrained start on the CPU): decode and prefill tokens/s at 1 and 2 threads of the
float32 weights (eager, and with --compile the compiled step), their int8 and int4 decode copies
(support/quantize.py) and transformers, each decode beside its ceiling here: the memory streaming
rate over the bytes one step reads. Then a long prefill's peak memory and a second load's time."""
import copy
import time

import torch

from benchmarks.common import (fixed_length, fmt, interleaved, log, median, peak_memory, prompt_ids,
                               prompt_of, resident_gib, rounds, table, with_notes)
from benchmarks.models import hf_generate
from cli.errors import UserError
from engine import ChatSession
from support.quantize import QuantizedLinear, quantize
from support.starts import load_start

THREADS = (1, 2)
DECODE_CONTEXT = 256  # tokens before the first decoded one (prompt + answer so far)
PREFILL = 511  # tokens of one prefill, timed to the first token
LONG_PREFILL = 2000  # tokens of the prefill whose peak memory is measured
LLAMA_CPP_NOTE = ("llama.cpp (llama-cpp-python) is not a row: it is not a dependency; compare with "
                  "its own llama-bench on the same GGUF file")


def stream_rate(repeats=5):
    """Bytes per second a float32 matrix-vector product streams from memory at torch's current
    thread count: what bounds a one-token decode step, which reads every weight once. 256 MiB, far
    beyond any cache."""
    matrix, vector = torch.randn(16384, 4096), torch.randn(4096)
    return matrix.nbytes / min(interleaved({"mv": lambda: matrix @ vector}, repeats, 1)["mv"])


def decode_bytes(model):
    """Bytes of weights one decode step reads: every Linear's as the step uses them (a
    QuantizedLinear's int8 or int4 copy and its scales, not the float weights it keeps for
    prefills); norms and one embedding row are left out (under 0.1%)."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    kept = {id(m.linear) for m in quantized}
    floats = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in kept]
    return (sum(m.weight_q.nbytes + m.scales.nbytes for m in quantized)
            + sum(m.weight.nbytes for m in floats))


def lengths(config):
    """(decode context, prefill tokens, long prefill tokens), or what a smaller context holds."""
    return (min(DECODE_CONTEXT, config.block_size // 2), min(PREFILL, config.block_size // 2),
            min(LONG_PREFILL, config.block_size - 2))


def peer_fns(cfg, tok, models, hf):
    """{variant: (decode tok/s fn, prefill tok/s fn)}: ours (eager; float32 compiled too with
    --compile) and transformers' generate() on the same weights."""
    context, prefill, _ = lengths(models["float32"].config)
    decode_text, prefill_text = prompt_of(tok, context - cfg.new_tokens), prompt_of(tok, prefill)
    sessions = {name: ChatSession(m, tok, "ism") for name, m in models.items()}
    if cfg.compile:
        sessions["float32 compiled"] = ChatSession(models["float32"], tok, "ism", decode="compiled")

    def ours(session):
        def decode():
            session.reset()
            return session.turn(decode_text, **fixed_length(cfg.new_tokens))["decode_tokens_per_s"]

        def prefill():
            session.reset()
            result = session.turn(prefill_text, max_new_tokens=1)
            return result["prefill_tokens"] / (result["ttft_ms"] / 1e3)
        return decode, prefill
    fns = {name: ours(s) for name, s in sessions.items()}
    if hf:
        decode_ids, prefill_ids = (torch.tensor([prompt_ids(tok, text)])
                                   for text in (decode_text, prefill_text))
        fns["transformers"] = (lambda: hf_generate(hf, decode_ids, cfg.new_tokens)[1],
                               lambda: hf_generate(hf, prefill_ids, 1)[0])
    return fns


def peers_section(cfg, rt, tok, model, hf):
    """Decode and prefill tokens/s of every variant at each thread count, interleaved, beside a
    decode step's ceiling; then a long prefill's peak memory and a second load."""
    if rt.device_type != "cpu":
        raise UserError("--sections=peers measures the CPU's kernels (int8/int4 decode): run it "
                        "with --device=cpu")
    model = copy.deepcopy(model).float()  # the table is float32's (the chat's may be in --dtype)
    prefill_memory = long_prefill_peak(tok, model)  # before the quantized copies exist
    models = {"float32": model}
    models.update({mode: quantize(copy.deepcopy(model), mode) for mode in ("int8", "int4")})
    fns = peer_fns(cfg, tok, models, hf)
    rows, threads_before = [], torch.get_num_threads()
    for threads in THREADS:
        torch.set_num_threads(threads)
        rate = stream_rate()
        log(f"peers: {threads} thread(s), {len(fns)} variants x {cfg.warmup + cfg.repeats} rounds")
        decode = rounds({name: d for name, (d, _) in fns.items()}, cfg.repeats, cfg.warmup)
        prefill = rounds({name: p for name, (_, p) in fns.items()}, cfg.repeats, cfg.warmup)
        for name in fns:
            ours = name != "transformers"
            weights = decode_bytes(models.get(name.split()[0], model)) if ours else None
            rows.append({"threads": threads, "variant": name, "decode": median(decode[name]),
                         "prefill": median(prefill[name]), "bytes_per_token": weights,
                         "stream_gb_s": rate / 1e9, "ceiling": rate / weights if weights else None})
    torch.set_num_threads(threads_before)
    return {"rows": rows, "lengths": lengths(model.config),
            "resident_before_prefill_gib": prefill_memory[0], "prefill_peak_gib": prefill_memory[1],
            "weights_gib": sum(p.nbytes for p in model.parameters()) / 2**30,
            "second_load_s": second_load(cfg)}


def long_prefill_peak(tok, model):
    """-> (the process's resident GiB before, its peak over one float32 prefill of LONG_PREFILL
    tokens): the difference is what the prefill itself takes (activations, the KV cache)."""
    session = ChatSession(model, tok, "ism")
    text = prompt_of(tok, lengths(model.config)[2])
    return resident_gib(), peak_memory(lambda: session.turn(text, max_new_tokens=1), "cpu")


def second_load(cfg):
    """Seconds to load --init_from again, as a chat script does (a GGUF start maps its cached
    conversion); None for a random model."""
    if not cfg.init_from:
        return None
    t0 = time.perf_counter()
    load_start(cfg.init_from, cfg.block_size or None, 0.0, "cpu")
    return time.perf_counter() - t0


def peers_tables(r, notes):
    headers = ["threads", "variant", "decode tok/s", "of its ceiling", "vs float32",
               "prefill tok/s", "bytes/token (MB)", "ceiling tok/s"]
    base = {x["threads"]: x["decode"] for x in r["rows"] if x["variant"] == "float32"}
    rows = []
    for x in r["rows"]:
        share = f"{x['decode'] / x['ceiling']:.0%}" if x["ceiling"] else "-"
        mb = fmt(x["bytes_per_token"] / 1e6, 0) if x["bytes_per_token"] else "-"
        rows.append([x["threads"], x["variant"], fmt(x["decode"]), share,
                     f"{x['decode'] / base[x['threads']]:.2f}x", fmt(x["prefill"], 0), mb,
                     fmt(x["ceiling"])])
    rates = ", ".join(f"{x['stream_gb_s']:.1f} GB/s at {x['threads']} thread(s)" for x in r["rows"]
                      if x["variant"] == "float32")
    context, prefill, long_prefill = r["lengths"]
    before, peak = r["resident_before_prefill_gib"], r["prefill_peak_gib"]
    grown = None if None in (before, peak) else peak - before  # None where /proc cannot tell
    load = "-" if r["second_load_s"] is None else f"{r['second_load_s']:.2f} s"
    return with_notes([
        f"### Peers (ISM session, greedy; decode at {context} tokens of context, prefill of "
        f"{prefill} tokens to the first token; ceiling = streaming rate / bytes a decode step "
        "reads)",
        table(headers, rows), "", f"- streaming rate of a float32 matrix-vector product: {rates}",
        f"- a {long_prefill}-token prefill (float32) raised the peak resident memory "
        f"{fmt(grown, 2)} GiB over the {fmt(before, 2)} GiB resident before it (memory the process "
        "freed earlier is reused first, so this is a floor; the weights are "
        f"{fmt(r['weights_gib'], 2)} GiB a copy)",
        f"- a second load of the start: {load}"], notes)
