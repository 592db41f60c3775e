"""
Measure answer quality: held-out answer loss and exact match of greedy answers given through the chat path.

    python eval.py --out_dir=out                     # one checkpoint: markdown tables
    python eval.py --out_dir=out --json              # the same, one JSON object
    python eval.py --compare                         # the experiment: train causal, ISM and prefix, 3 seeds each
    python eval.py --compare --device=cuda --max_iters=5000 --n_layer=6 --n_head=6 --n_embd=384 \
        --train_batch_size=32 --compare_dir=out/compare-gpu          # the larger version, on a GPU

One checkpoint
- Held-out answer loss: train.estimate_val_loss on the val split of the checkpoint's data_dir, with its mask (every
  answer token counted once under every mask, so the numbers compare across masks).
- Exact match: every held-out conversation (data_dir/val.jsonl, its system message included) is replayed through
  sample.ChatSession with KV-cache reuse, as a user gets it: for each user turn the model answers greedily and the
  reply is scored against the gold answer with score(). Exact match strips surrounding whitespace and nothing
  else: an answer that is a prefix of the gold one is wrong, so is one with extra text, and so is a reply cut by
  max_new_tokens before the model ended it.
- What stays in the conversation after a turn (--history):
    gold  the gold answer (teacher-forced history): every turn is scored on the same history under every mask, and
          an early mistake does not spoil later turns (an arith chain, a recall of a misheard fact). The fair
          per-turn-index comparison (the default; ChatSession.replace_answer puts the gold answer in).
    own   the model's own reply, what a user sees: mistakes compound, so late turns also measure earlier ones.
- Reported per task family (the "tasks" tags of the synthetic data; minmax, sort and reverse, the "instruction after the
  data" families where bidirectional attention inside a query matters mechanically, come first and also pooled),
  per turn index (1..7, then 8+) and overall.

The experiment (--compare)
Trains every mask in --masks with every seed in --seeds by running `python train.py --mask=M --seed=S
--out_dir=COMPARE_DIR/M-sS --max_iters=N ...` as a subprocess (exactly the user's training; its log goes to
train.log in that folder), evaluates each checkpoint as above, and prints mean ± std over seeds of exact match per
family and per turn index, the paired ISM - causal difference, held-out answer loss and the training cost (tokens
processed and answer tokens trained, read from the checkpoint; wall time of the training process and its time in
optimizer steps, read from the train log). Same model size, seeds (so the same initial weights) and optimizer
steps for every mask: rows of block_size tokens are equally full, so every mask processes about the same tokens,
and prefix, whose samples are triplet-expanded, trains on fewer answers in those tokens (the table says how many).
Default budget: 2 layers x 128 wide (0.5M parameters), 900 steps of 8 rows x 512 tokens (~1.5 epochs of the
synthetic data for causal/ISM), seeds 1, 2, 3: about 30 min for all 9 runs on a free 2-core CPU (~0.19 s a step,
~20 s to evaluate a run; a busy CPU takes longer). The header prints the budget and the time it took. Scale it up
with --max_iters, --n_layer/--n_head/--n_embd, --train_batch_size, --seeds and --device=cuda (second line above).
Resuming: a run whose folder holds a finished ckpt.pt trained with the same train.py flags (run.json records them)
is not trained again, and its evaluation (eval.json) is reused when the evaluation settings match too; an
interrupted experiment continues where it stopped (the run it was in starts over).
"""
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

import flags
from data.batching import load_split
from data.chat import DataError, read_jsonl
from data.synthetic import FAMILIES
from flags import UserError, setting
from mask import MASKS
from bench import machine
from model import resolve_device
from sample import ChatSession, load_chat_model
from train import estimate_val_loss

ROOT = os.path.dirname(os.path.abspath(__file__))
INSTRUCTION_LAST = ("minmax", "sort", "reverse")  # data first, the instruction is the query's last word
POOLED = "instruction-last"
FAMILY_ORDER = INSTRUCTION_LAST + tuple(f for f in FAMILIES if f not in INSTRUCTION_LAST)
UNTAGGED = "untagged"
LAST_TURN_BUCKET = 8  # turns 8, 9, ... are reported together as "8+"


@dataclass
class EvalConfig:
    # one checkpoint
    out_dir: str = setting("out", "folder of the ckpt.pt to evaluate")
    data_dir: str = setting("", "prepared data holding val.jsonl (empty: the checkpoint's data_dir; --compare: "
                                "data/synthetic, prepared by train.py if missing)")
    device: str = setting("auto", "auto | cpu | cuda (auto: cuda when available)")
    history: str = setting("gold", "gold | own: what stays in the conversation after a scored turn (see top)")
    max_conversations: int = setting(0, "held-out conversations replayed (0: all of val.jsonl); the loss always "
                                              "uses the whole val split")
    max_new_tokens: int = setting(64, "longest reply; one cut here is wrong (with --history=gold a turn stops "
                                      "once the reply is 8 tokens longer than the gold answer: it is wrong by then)")
    batch_size: int = setting(16, "rows per batch for the held-out loss")
    json: bool = setting(False, "print one JSON object instead of markdown tables")
    # the experiment
    compare: bool = setting(False, "run the experiment: train each mask x seed, evaluate each, summarise")
    compare_dir: str = setting("out/compare", "--compare: one folder per run, <mask>-s<seed>")
    masks: str = setting("causal,ism,prefix", "--compare: masks to train, comma-separated")
    seeds: str = setting("1,2,3", "--compare: seeds, comma-separated (the same for every mask)")
    max_iters: int = setting(900, "--compare: optimizer steps per run")
    n_layer: int = setting(2, "--compare: transformer blocks (2: shallow, where in-query attention should matter)")
    n_head: int = setting(4, "--compare: attention heads")
    n_embd: int = setting(128, "--compare: embedding width")
    block_size: int = setting(512, "--compare: tokens per training row")
    train_batch_size: int = setting(8, "--compare: rows per optimizer step")
    train_args: str = setting("", "--compare: more train.py flags for every run, e.g. '--learning_rate=1e-3'")


def check_config(cfg):
    if cfg.history not in ("gold", "own"):
        raise UserError(f"--history={cfg.history}: choose gold or own")
    for key in ("max_new_tokens", "batch_size", "max_iters", "n_layer", "n_head", "n_embd", "block_size",
                "train_batch_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"--{key}={getattr(cfg, key)}: must be at least 1")
    if cfg.max_conversations < 0:
        raise UserError(f"--max_conversations={cfg.max_conversations}: must not be negative (0: all)")
    if cfg.compare:
        masks, seeds = parse_list(cfg.masks, "masks", str), parse_list(cfg.seeds, "seeds", int)
        for kind in masks:
            if kind not in MASKS:
                raise UserError(f"--masks: unknown mask {kind!r} (choose from {', '.join(MASKS)})")
        if len(set(masks)) < len(masks) or len(set(seeds)) < len(seeds):
            raise UserError("--masks and --seeds must not repeat an entry")
        try:
            extra = shlex.split(cfg.train_args)
        except ValueError as e:
            raise UserError(f"--train_args: {e}") from None
        own = train_argv(replace(cfg, train_args=""), "ism", 0, "", "", "cpu")
        ours = {a.split("=", 1)[0] for a in own} | {"--init_from"}
        for arg in extra:
            if arg.split("=", 1)[0] in ours:
                raise UserError(f"--train_args: {arg.split('=', 1)[0]} is set by eval.py --compare itself; "
                                f"pass it to eval.py (see --help)")


def parse_list(text, key, kind):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"--{key} is empty")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise UserError(f"--{key}={text}: expected comma-separated {kind.__name__} values") from None


# ------------------------------------------------------------------------------------------------------- scoring

def score(reply, gold):
    """Exact match: equal after stripping surrounding whitespace, nothing else (no case folding, no inner spaces).
    A reply that is a prefix of the gold answer, or the gold answer with more text, is wrong."""
    return reply.strip() == gold.strip()


def turn_bucket(turn):
    """1-based turn index -> its row in the per-turn table: "1" .. "7", then "8+"."""
    return f"{LAST_TURN_BUCKET}+" if turn >= LAST_TURN_BUCKET else str(turn)


def turns_of(conversation):
    """-> (system text or None, [(user text, gold answer, family), ...])."""
    messages = conversation["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    tasks = conversation.get("tasks") or [UNTAGGED] * len(answers)
    return system, list(zip(users, answers, tasks))


def replay(session, conversations, history="own", max_new_tokens=64):
    """Replay each conversation through session (ChatSession's API: reset(system), turn(user, max_new_tokens,
    temperature) -> {"reply", "stopped", "dropped_turns", ...}; replace_answer(text) for history="gold"), scoring
    each greedy reply. -> one record per answered turn: {conversation, turn, family, correct, reply, gold}."""
    records = []
    for number, conversation in enumerate(conversations):
        system, turns = turns_of(conversation)
        session.reset(system=system)
        for turn, (user, gold, family) in enumerate(turns, 1):
            budget = max_new_tokens
            if history == "gold":  # the history does not depend on the reply: stop once it cannot match any more
                budget = min(max_new_tokens, len(session.tok.encode(gold)) + 8)
            result = session.turn(user, max_new_tokens=budget, temperature=0.0)
            finished = result["stopped"] == "end"
            records.append({"conversation": number, "turn": turn, "family": family, "gold": gold,
                            "reply": result["reply"], "correct": finished and score(result["reply"], gold),
                            "finished": finished, "dropped_turns": result["dropped_turns"]})
            if history == "gold":
                session.replace_answer(gold)
    return records


def tally(records):
    """records -> {"overall", "by_family", "by_turn"}, each {"n", "correct", "accuracy"}. Families in
    FAMILY_ORDER (the instruction-last families first) with their pooled row after them; turns as turn_bucket."""
    def cell(rows):
        n, correct = len(rows), sum(r["correct"] for r in rows)
        return {"n": n, "correct": correct, "accuracy": correct / n if n else None}

    families = sorted({r["family"] for r in records},
                      key=lambda f: (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER), f))
    by_family = {f: cell([r for r in records if r["family"] == f]) for f in families}
    if any(f in by_family for f in INSTRUCTION_LAST):
        by_family[POOLED] = cell([r for r in records if r["family"] in INSTRUCTION_LAST])
    buckets = sorted({turn_bucket(r["turn"]) for r in records}, key=lambda b: int(b.rstrip("+")))
    by_turn = {b: cell([r for r in records if turn_bucket(r["turn"]) == b]) for b in buckets}
    return {"overall": cell(records), "by_family": by_family, "by_turn": by_turn}


# ----------------------------------------------------------------------------------------- one checkpoint

def machine_line(device):
    info = machine(device)
    return f"{info['name']} ({info['cpus']} CPUs), torch {info['torch']}"


@contextmanager
def one_cpu_thread(device):
    """Decoding feeds one token at a time: on a CPU a second intra-op thread only adds synchronisation, which on a
    busy machine made the replay ~15x slower (each tiny op waits for a descheduled thread)."""
    threads = torch.get_num_threads()
    if str(device).startswith("cpu"):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def evaluate(out_dir, data_dir="", device="cpu", history="gold", max_conversations=0, max_new_tokens=64,
             batch_size=16):
    """Held-out answer loss and exact match of one checkpoint (see the module docstring). -> a JSON-able dict."""
    model, tok, kind, checkpoint = load_chat_model(out_dir, device)
    data_dir = data_dir or checkpoint.get("config", {}).get("data_dir", "")
    if not data_dir:
        raise UserError(f"{out_dir}/ckpt.pt does not say which data it was trained on: pass --data_dir")
    val_path = os.path.join(data_dir, "val.jsonl")
    if not os.path.exists(val_path):
        raise UserError(f"no held-out conversations at {val_path}: pass the --data_dir the model was trained on")
    conversations, _ = read_jsonl(val_path)
    if max_conversations:
        conversations = conversations[:max_conversations]
    t0 = time.time()
    val_loss = estimate_val_loss(model, load_split(data_dir, "val"), kind, model.config.block_size, batch_size,
                                 device)
    t1 = time.time()
    session = ChatSession(model, tok, kind, use_cache=True, device=device)
    with one_cpu_thread(device):
        records = replay(session, conversations, history, max_new_tokens)
    t2 = time.time()
    tokens = checkpoint.get("tokens", {})
    return {"out_dir": out_dir, "mask": kind, "data_dir": data_dir, "iter_num": checkpoint.get("iter_num"),
            "model_args": checkpoint["model_args"], "trained_tokens": tokens.get("tokens"),
            "trained_answer_tokens": tokens.get("answer_tokens"), "history": history,
            "conversations": len(conversations), "max_new_tokens": max_new_tokens, "val_loss": val_loss,
            **tally(records), "unfinished_replies": sum(not r["finished"] for r in records),
            "turns_with_dropped_history": sum(r["dropped_turns"] > 0 for r in records),
            "seconds": {"val_loss": round(t1 - t0, 2), "chat": round(t2 - t1, 2)}, "device": str(device),
            "machine": machine_line(device), "records": records}


def percent(x):
    return "-" if x is None else f"{100 * x:.1f}"


HISTORY_NOTE = {"gold": "gold answers kept in the history (teacher-forced: each turn scored on the same history)",
                "own": "the model's own replies kept in the history (what a user sees: mistakes compound)"}


def family_label(family):
    if family == POOLED:
        return f"**{POOLED}** (pooled)"
    return f"**{family}**" if family in INSTRUCTION_LAST else family


def report(result):
    r = result
    args = r["model_args"]
    lines = [f"# eval {r['out_dir']}: mask {r['mask']}, iter {r['iter_num']}, {args['n_layer']} layers x "
             f"{args['n_embd']} wide, trained on {r['trained_tokens'] or 0:,} tokens",
             f"{r['conversations']} held-out conversations from {r['data_dir']}/val.jsonl, greedy replies through "
             f"ChatSession (KV cache), max_new_tokens {r['max_new_tokens']}; {HISTORY_NOTE[r['history']]}. Exact "
             "match after stripping surrounding whitespace; a reply that did not end by itself is wrong.",
             f"machine: {r['machine']}, device {r['device']}; {r['seconds']['val_loss']:.0f}s loss, "
             f"{r['seconds']['chat']:.0f}s chat",
             "", "| held-out answer loss | exact match % | answers | unfinished replies | turns after dropped history |",
             "|---|---|---|---|---|",
             f"| {r['val_loss']:.4f} | {percent(r['overall']['accuracy'])} | {r['overall']['n']} | "
             f"{r['unfinished_replies']} | {r['turns_with_dropped_history']} |",
             "", "| family | answers | exact match % |", "|---|---|---|"]
    lines += [f"| {family_label(f)} | {c['n']} | {percent(c['accuracy'])} |" for f, c in r["by_family"].items()]
    lines += ["", "| turn | answers | exact match % |", "|---|---|---|"]
    lines += [f"| {t} | {c['n']} | {percent(c['accuracy'])} |" for t, c in r["by_turn"].items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the experiment

def train_argv(cfg, kind, seed, run_dir, data_dir, device):
    """The train.py flags of one run (also the record that says whether a finished run can be reused)."""
    return [f"--mask={kind}", f"--seed={seed}", f"--out_dir={run_dir}", f"--data_dir={data_dir}",
            f"--device={device}", f"--max_iters={cfg.max_iters}", f"--n_layer={cfg.n_layer}",
            f"--n_head={cfg.n_head}", f"--n_embd={cfg.n_embd}", f"--block_size={cfg.block_size}",
            f"--batch_size={cfg.train_batch_size}", f"--eval_interval={cfg.max_iters}", "--eval_iters=1",
            f"--log_interval={max(1, min(20, cfg.max_iters // 10))}"] + shlex.split(cfg.train_args)


_ITER_LINE = re.compile(r"^iter (\d+)/\d+: .*?([\d.]+)ms/iter", re.M)


def step_seconds(log):
    """Time spent in optimizer steps, from train.py's `iter N/M: ... X ms/iter` lines (each the mean over the steps
    since the previous line); None if the log has none."""
    total, last, found = 0.0, 0, False
    for match in _ITER_LINE.finditer(log):
        n, ms = int(match.group(1)), float(match.group(2))
        total += (n - last) * ms / 1000
        last, found = n, True
    return round(total, 2) if found else None


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def train_run(cfg, kind, seed, data_dir, device, say):
    """Train one run unless its folder holds a finished one with the same flags. -> (run_dir, run.json dict)."""
    run_dir = os.path.join(cfg.compare_dir, f"{kind}-s{seed}")
    argv = train_argv(cfg, kind, seed, run_dir, data_dir, device)
    record = read_json(os.path.join(run_dir, "run.json"))
    if record and record.get("argv") == argv and os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        say(f"{kind}-s{seed}: trained already ({run_dir}), reusing it")
        return run_dir, record
    os.makedirs(run_dir, exist_ok=True)
    if record:  # it described another run: forget it before ckpt.pt is overwritten
        os.remove(os.path.join(run_dir, "run.json"))
    log_path = os.path.join(run_dir, "train.log")
    say(f"{kind}-s{seed}: python train.py {' '.join(argv)}")
    t0 = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.call([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--init_from=scratch"],
                             stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    with open(log_path) as f:
        text = f.read()
    if rc != 0:
        last = text.strip().splitlines()[-1] if text.strip() else "(no output)"
        raise UserError(f"training {kind}-s{seed} failed (exit {rc}): {last} (log: {log_path})")
    record = {"argv": argv, "wall_seconds": round(seconds, 2), "step_seconds": step_seconds(text)}
    write_json(os.path.join(run_dir, "run.json"), record)
    say(f"{kind}-s{seed}: trained in {seconds:.0f}s")
    return run_dir, record


def eval_run(cfg, run_dir, history, device, say):
    """evaluate() one run, reusing run_dir/eval.json when the checkpoint and the evaluation settings match."""
    ckpt = os.stat(os.path.join(run_dir, "ckpt.pt"))
    key = {"history": history, "max_conversations": cfg.max_conversations, "max_new_tokens": cfg.max_new_tokens,
           "data_dir": cfg.data_dir, "ckpt": [ckpt.st_size, ckpt.st_mtime_ns]}
    cached = read_json(os.path.join(run_dir, "eval.json"))
    if cached and cached.get("key") == key:
        return cached["result"]
    t0 = time.time()
    result = evaluate(run_dir, cfg.data_dir, device, history, cfg.max_conversations, cfg.max_new_tokens,
                      cfg.batch_size)
    write_json(os.path.join(run_dir, "eval.json"), {"key": key, "result": result})
    say(f"{os.path.basename(run_dir)}: evaluated in {time.time() - t0:.0f}s, exact match "
        f"{percent(result['overall']['accuracy'])}%, held-out answer loss {result['val_loss']:.4f}")
    return result


def mean_std(values):
    """-> (mean, sample std or None for one value); None values are left out, (None, None) if none is left."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt_mean_std(pair, scale=100.0, digits=1):
    mean, std = pair
    if mean is None:
        return "-"
    text = f"{scale * mean:,.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:,.{digits}f}"


def summarise(runs, masks, seeds):
    """runs {(mask, seed): {"eval", "train"}} -> mean/std tables (JSON-able), accuracy as fractions."""
    def acc(kind, table, row):
        return [runs[kind, s]["eval"][table].get(row, {}).get("accuracy") for s in seeds]

    first = runs[masks[0], seeds[0]]["eval"]
    rows = {"by_family": list(dict.fromkeys(r for m in masks for s in seeds for r in runs[m, s]["eval"]["by_family"])),
            "by_turn": list(first["by_turn"])}  # the same conversations for every run: the same turn rows
    summary = {}
    for table, names in rows.items():
        summary[table] = {}
        for row in names:
            entry = {m: mean_std(acc(m, table, row)) for m in masks}
            entry["n"] = first[table].get(row, {}).get("n")
            if "ism" in masks and "causal" in masks:  # paired by seed: the same initial weights and conversations
                diffs = [None if i is None or c is None else i - c
                         for i, c in zip(acc("ism", table, row), acc("causal", table, row))]
                entry["ism-causal"] = mean_std(diffs)
            summary[table][row] = entry
    overall = {m: mean_std([runs[m, s]["eval"]["overall"]["accuracy"] for s in seeds]) for m in masks}
    cost = {}
    for m in masks:
        ev = [runs[m, s]["eval"] for s in seeds]
        tr = [runs[m, s]["train"] for s in seeds]
        cost[m] = {"val_loss": mean_std([e["val_loss"] for e in ev]), "exact_match": overall[m],
                   "tokens": mean_std([e["trained_tokens"] for e in ev]),
                   "answer_tokens": mean_std([e["trained_answer_tokens"] for e in ev]),
                   "wall_seconds": mean_std([t.get("wall_seconds") for t in tr]),
                   "step_seconds": mean_std([t.get("step_seconds") for t in tr]),
                   "eval_seconds": mean_std([e["seconds"]["val_loss"] + e["seconds"]["chat"] for e in ev])}
    return {"overall": overall, "cost": cost, **summary}


def compare_report(result):
    s, c = result["summary"], result["settings"]
    masks = c["masks"]
    paired = "ism" in masks and "causal" in masks
    lines = [f"# ismGPT quality: {' vs '.join(masks)}, {len(c['seeds'])} seed(s) ({', '.join(map(str, c['seeds']))})",
             f"budget: {c['n_layer']} layers x {c['n_embd']} wide ({c['n_head']} heads), block_size "
             f"{c['block_size']}, {c['max_iters']} optimizer steps of {c['train_batch_size']} rows x "
             f"{c['block_size']} tokens, the same seeds (initial weights) for every mask; data {c['data_dir']}"
             + (f"; train.py {c['train_args']}" if c["train_args"] else ""),
             f"eval: {c['conversations']} held-out conversations, greedy through ChatSession (KV cache), "
             f"{HISTORY_NOTE[c['history']]}; exact match % as mean ± std over seeds",
             f"machine: {c['machine']}, device {c['device']}; the whole experiment took {c['total_seconds'] / 60:.1f} "
             "min (runs found already trained or evaluated cost nothing)",
             f"command: {c['command']}", ""]
    head = "| {} | answers | " + " | ".join(masks) + (" | ism - causal (paired) |" if paired else " |")
    rule = "|---|---|" + "---|" * (len(masks) + paired)

    def table(name, label, rows):
        out = [head.format(label), rule]
        for row, entry in rows.items():
            cells = [fmt_mean_std(entry[m]) for m in masks] + ([fmt_mean_std(entry["ism-causal"])] if paired else [])
            out.append(f"| {name(row)} | {entry['n']} | " + " | ".join(cells) + " |")
        return out

    lines += table(family_label, "family (exact match %)", s["by_family"])
    overall = {"n": result["runs"][0]["eval"]["overall"]["n"], **s["overall"]}
    if paired:
        by_seed = {(r["mask"], r["seed"]): r["eval"]["overall"]["accuracy"] for r in result["runs"]}
        diffs = [by_seed["ism", seed] - by_seed["causal", seed] for seed in c["seeds"]]
        overall["ism-causal"] = mean_std(diffs)
    lines += table(lambda r: "**overall**", "family (exact match %)", {"overall": overall})[2:]
    lines += [""] + table(str, "turn (exact match %)", s["by_turn"])
    lines += ["", "| mask | held-out answer loss | exact match % | tokens trained | answer tokens trained | "
                  "train wall s | in steps s | eval s |", "|---|---|---|---|---|---|---|---|"]
    for m in masks:
        k = s["cost"][m]
        lines.append(f"| {m} | {fmt_mean_std(k['val_loss'], 1, 4)} | {fmt_mean_std(k['exact_match'])} | "
                     f"{fmt_mean_std(k['tokens'], 1, 0)} | {fmt_mean_std(k['answer_tokens'], 1, 0)} | "
                     f"{fmt_mean_std(k['wall_seconds'], 1, 0)} | {fmt_mean_std(k['step_seconds'], 1, 0)} | "
                     f"{fmt_mean_std(k['eval_seconds'], 1, 0)} |")
    lines.append("\nsame optimizer steps for every mask: prefix trains on triplet-expanded samples (one per answer, "
                 "with its whole history), so the same tokens hold fewer answers; answer tokens trained say how many.")
    return "\n".join(lines)


def compare(cfg, device, history, argv):
    masks, seeds = parse_list(cfg.masks, "masks", str), parse_list(cfg.seeds, "seeds", int)
    data_dir = cfg.data_dir or "data/synthetic"
    cfg = replace(cfg, data_dir=data_dir)
    say = (lambda text: print(f"[compare] {text}", file=sys.stderr, flush=True))
    t0 = time.time()
    runs = {}
    for seed in seeds:  # seed-major: an interrupted experiment already has whole seeds of every mask
        for kind in masks:
            run_dir, train_record = train_run(cfg, kind, seed, data_dir, device, say)
            runs[kind, seed] = {"train": train_record, "eval": eval_run(cfg, run_dir, history, device, say)}
    settings = {"masks": masks, "seeds": seeds, "data_dir": data_dir, "history": history,
                "conversations": runs[masks[0], seeds[0]]["eval"]["conversations"],
                "total_seconds": round(time.time() - t0, 1), "machine": machine_line(device), "device": device,
                "command": "python eval.py " + " ".join(argv),
                **{k: getattr(cfg, k) for k in ("max_iters", "n_layer", "n_head", "n_embd", "block_size",
                                                "train_batch_size", "train_args", "max_new_tokens")}}
    out_runs = [{"mask": m, "seed": s, "train": runs[m, s]["train"],
                 "eval": {k: v for k, v in runs[m, s]["eval"].items() if k != "records"}}
                for s in seeds for m in masks]
    return {"settings": settings, "summary": summarise(runs, masks, seeds), "runs": out_runs}


# --------------------------------------------------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = flags.parse(EvalConfig(), argv, __doc__)
    check_config(cfg)
    device = resolve_device(cfg.device)
    history = cfg.history
    try:
        if cfg.compare:
            result = compare(cfg, device, history, argv)
            print(json.dumps(result) if cfg.json else compare_report(result))
        else:
            result = evaluate(cfg.out_dir, cfg.data_dir, device, history, cfg.max_conversations, cfg.max_new_tokens,
                              cfg.batch_size)
            print(json.dumps(result) if cfg.json else report(result))
    except DataError as e:
        raise UserError(str(e)) from None
    return result


if __name__ == "__main__":
    flags.run(main)
