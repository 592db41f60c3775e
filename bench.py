"""What the three masks cost, measured on this project's own code in one run.

    python bench.py                          # CPU, the default model, every section
    python bench.py --device=cuda --compile  # GPU: FlexAttention + bf16, compiled model and decode
    python bench.py config/gpt2_small.py     # a train.py settings file (its other keys skipped)
    python bench.py --sections=chat --json   # one section, machine-readable
    python bench.py --quick                  # tiny model and data, one repeat: the smoke test's run
    python bench.py --init_from=smollm2      # SmolLM2-135M-Instruct (2048 tokens of context)

Sections, a module each in benchmarks/: train (each mask's training step, and an epoch), chat (time
to first token per turn of a long conversation), decode (tokens/s with and without the KV cache),
peers (a pretrained start on the CPU; not by default: float32 against int8, int4 and transformers).
Weights are random (costs, not quality) unless --init_from names pretrained ones. Timings: warmup
rounds, then the median of --repeats rounds, the variants interleaved in a rotating order so that a
shared machine's changing load hits them alike: compare the ratios of one run."""
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

import json
import os
from dataclasses import asdict, dataclass, replace

from benchmarks.chat import chat_section, chat_tables, plot_ttft
from benchmarks.common import fmt
from benchmarks.decode import decode_section, decode_tables
from benchmarks.models import PRETRAINED_CONTEXT, chat_model, hf_model, load_pretrained
from benchmarks.peers import LLAMA_CPP_NOTE, peers_section, peers_tables
from benchmarks.training import train_section, train_tables
from cli.errors import UserError
from cli.flags import parse, run, setting
from data.chat import plural
from data.tokenizer import get_tokenizer
from support.compute import (CHAT_DTYPE_HELP, DEVICE_HELP, DTYPES, THREADS_HELP, compute_init,
                             cpu_threads, machine, resolve_device)
from support.starts import START_HELP, new_model_config

SECTIONS = ("train", "chat", "decode", "peers")


@dataclass
class BenchConfig:
    init_from: str = setting("", f"measure a pretrained model ({START_HELP}) at its own shape; "
                                 "empty: a random model of the shape flags below")
    device: str = setting("cpu", DEVICE_HELP)
    sections: str = setting("train,chat,decode", "comma-separated: train,chat,decode,peers")
    repeats: int = setting(5, "timed rounds per measurement (the median is reported)", min=1)
    warmup: int = setting(1, "untimed rounds before them", min=0)
    threads: int = setting(0, THREADS_HELP, min=0)
    quick: bool = setting(False, "tiny model and data, one repeat: a smoke run (flags still win)")
    json: bool = setting(False, "print one JSON object instead of markdown tables")
    compile: bool = setting(False, "torch.compile the training steps; add the compiled decode step")
    dtype: str = setting("auto", f"chat and decode: {CHAT_DTYPE_HELP}; training uses bf16 "
                         "autocast on CUDA", choices=DTYPES)
    # model and training batch (train.py's defaults)
    n_layer: int = setting(4, "transformer blocks", min=1)
    n_head: int = setting(4, "attention heads", min=1)
    n_embd: int = setting(128, "embedding width", min=1)
    block_size: int = setting(0, "context length (rows, chat length, KV cache); 0: 512, or "
                              f"{PRETRAINED_CONTEXT} for --init_from", min=0)
    batch_size: int = setting(0, "rows per training step; 0: 8, or 1 for --init_from", min=0)
    vocab_size: int = setting(0, "training's vocabulary (0: the data's; 50304: GPT-2's)", min=0)
    attention: str = setting("auto", "training: sdpa | flex | sdpa,flex (auto: sdpa; flex,sdpa on "
                             "CUDA); the first sets the epoch table")
    data_dir: str = setting("", "prepared data to train on (empty: the synthetic dataset, "
                            "prepared if missing)")
    seed: int = setting(1337, "weights, data order and the chat's messages", min=0)
    # chat and decode
    answer_tokens: int = setting(8, "chat: tokens per answer", min=1)
    chat_repeats: int = setting(15, "chat: timed rounds of the whole conversation", min=1)
    new_tokens: int = setting(32, "decode: tokens generated per measurement", min=2)
    hf: bool = setting(True, "transformers' rows (the same weights) if it is installed")
    out_dir: str = setting("out", "where the TTFT plot goes")
    plot: str = setting("", "PNG of TTFT vs turn (default out_dir/bench_ttft.png; none: no plot)")


# --quick: tiny tensors, where a second thread only adds synchronisation
QUICK = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, batch_size=2, repeats=1, warmup=1,
             answer_tokens=4, new_tokens=8, chat_repeats=1, threads=1)
PRETRAINED_ROUNDS = dict(repeats=2, chat_repeats=2, new_tokens=8)  # --init_from's (flags still win)


def parse_config(argv):
    """-> (config, sections). A train.py settings file (config/*.py): its other keys are skipped."""
    cfg = parse(BenchConfig(), argv, __doc__, shared_files=True)
    defaults = dict(QUICK, quick=True) if cfg.quick else PRETRAINED_ROUNDS if cfg.init_from else {}
    if defaults:  # those defaults, then the flags again so that explicit ones win
        cfg = parse(replace(BenchConfig(), **defaults), argv, __doc__, shared_files=True)
    cfg = replace(cfg, block_size=cfg.block_size or (0 if cfg.init_from else 512),  # 0: once loaded
                  batch_size=cfg.batch_size or (1 if cfg.init_from else 8))
    sections = [s for s in cfg.sections.split(",") if s]
    if not sections or any(s not in SECTIONS for s in sections):
        raise UserError(f"--sections={cfg.sections}: choose from {','.join(SECTIONS)}")
    # a shape the model can have and a device that is there, or a one-line error
    new_model_config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    resolve_device(cfg.device)
    return cfg, sections


def main(argv=None):
    """Run the sections the flags ask for, print the tables (or JSON); return the results dict."""
    cfg, sections = parse_config(argv)
    device = resolve_device(cfg.device)
    with cpu_threads(cfg.threads):
        return run_bench(cfg, sections, device)


def header(cfg, info, device, start, results):
    """The lines above the tables: machine, model, rounds, and a busy machine's warning."""
    load = f", load average {info['load_average']}" if "load_average" in info else ""
    shape = start.model.config if start else cfg
    lines = [f"## ismGPT bench: {info['name']}, torch {info['torch']}, "
             f"{plural(info['threads'], 'thread')} ({info['cpus']} CPUs{load}), python "
             f"{info['python']}\nmodel: {start.what if start else 'random weights'}, "
             f"{shape.n_layer} layers, {shape.n_head} heads, {shape.n_embd} wide, block_size "
             f"{cfg.block_size}; {cfg.warmup} warmup + {cfg.repeats} timed rounds, medians"]
    if start:
        m = results["model"]
        lines.append(f"- loaded in {m['load_s']:.1f} s; {m['parameters'] / 1e6:.1f}M parameters; "
                     f"the process's resident memory {fmt(m['resident_gib'], 2)} GiB after "
                     "loading (float32)")
    if info.get("load_average", 0) > info["cpus"] and device == "cpu":
        lines.append(f"warning: load average {info['load_average']} > {info['cpus']} CPUs: other "
                     "work shares this machine, so timings are noisy; with more torch threads "
                     "than free cores each op can stall for a scheduler slice"
                     + (" (try --threads=1)" if info["threads"] > 1 else ""))
    return lines


def run_bench(cfg, sections, device):
    info = machine(device)
    results = {"machine": info, "config": asdict(cfg), "notes": []}
    say = (lambda text: None) if cfg.json else (lambda text: print(text + "\n", flush=True))
    start = load_pretrained(cfg, device, results) if cfg.init_from else None
    if start:
        cfg = replace(cfg, block_size=start.model.config.block_size)
        results["config"] = asdict(cfg)
    say("\n\n".join(header(cfg, info, device, start, results)))
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
                path = cfg.plot or os.path.join(cfg.out_dir, "bench_ttft.png")
                notes.append(plot_ttft(results["chat"], path, info["name"]))
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
    run(main)
