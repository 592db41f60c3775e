"""
Score a model: held-out answer loss and exact match of greedy answers given through the chat path.

    python eval.py --out_dir=out                     # markdown tables
    python eval.py --out_dir=out --json              # the same, one JSON object (per-turn records included)
    python eval.py --init_from=smollm2 --mask=ism --data_dir=data/synthetic-smollm2   # a pretrained model as it is

- Held-out answer loss: loss.estimate_val_loss on the val split of the checkpoint's data_dir (or --data_dir, which
  a pretrained model needs), with the mask it chats with (every answer token counted once under every mask, so the
  numbers compare across masks).
- Exact match: every held-out conversation (data_dir/val.jsonl, its system message included) is replayed through
  engine.ChatSession with KV-cache reuse, as a user gets it: for each user turn the model answers greedily and the
  reply is scored against the gold answer with score(). Exact match strips surrounding whitespace and nothing
  else: an answer that is a prefix of the gold one is wrong, so is one with extra text, and so is a reply cut by
  max_new_tokens before the model ended it.
- What stays in the conversation after a turn (--history):
    gold  the gold answer (teacher-forced history): every turn is scored on the same history under every mask, and
          an early mistake does not spoil later turns (an arith chain, a recall of a misheard fact). The fair
          per-turn-index comparison (the default; ChatSession.replace_answer puts the gold answer in).
    own   the model's own reply, what a user sees: mistakes compound, so late turns also measure earlier ones.
- Reported per task family (the "tasks" tags of the synthetic data; minmax, sort and reverse, the "instruction after
  the data" families where bidirectional attention inside a query matters mechanically, come first and also
  pooled), per turn index (1..7, then 8+) and overall.

Comparing masks (train each one, then score it here) is experiments/compare_masks.py.
"""
import signal
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch imports: exit quietly (flags.run restores)

import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from support import flags
from support.compute import THREADS_HELP, Runtime, cpu_threads, machine, set_threads
from support.starts import ModelFlags
from data.store import first_conversations, load_meta, load_split
from data.chat import read_jsonl, system_of
from data.synthetic import FAMILIES, INSTRUCTION_LAST, POOLED, family_label, percent
from engine import ChatSession
from support.errors import UserError
from support.flags import setting
from loss import estimate_val_loss

FAMILY_ORDER = INSTRUCTION_LAST + tuple(f for f in FAMILIES if f not in INSTRUCTION_LAST)
UNTAGGED = "untagged"
LAST_TURN_BUCKET = 8  # turns 8, 9, ... are reported together as "8+"
HISTORY_NOTE = {"gold": "gold answers kept in the history (teacher-forced: each turn scored on the same history)",
                "own": "the model's own replies kept in the history (what a user sees: mistakes compound)"}


@dataclass
class EvalConfig(ModelFlags):
    data_dir: str = setting("", "prepared data holding val.jsonl (empty: the checkpoint's data_dir)")
    history: str = setting("gold", "gold | own: what stays in the conversation after a scored turn (see top)",
                           choices=("gold", "own"))
    max_conversations: int = setting(0, "held-out conversations scored, the first of val.jsonl (0: all): replayed, "
                                        "and the answers the held-out loss is measured on", min=0)
    max_new_tokens: int = setting(64, "longest reply; one cut here is wrong (with --history=gold a turn stops "
                                      "once the reply is 8 tokens longer than the gold answer: it is wrong by then)",
                                  min=1)
    batch_size: int = setting(16, "rows per batch for the held-out loss", min=1)
    threads: int = setting(0, THREADS_HELP + " (the replay decodes one token at a time with 1 thread on a CPU)",
                           min=0)
    json: bool = setting(False, "print one JSON object instead of markdown tables")


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
    system = system_of(messages)
    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    tasks = conversation.get("tasks") or [UNTAGGED] * len(answers)
    return system, list(zip(users, answers, tasks))


def replay(session, conversations, history="gold", max_new_tokens=64):
    """Replay each conversation through session (ChatSession's API: reset(system), turn(user, max_new_tokens,
    temperature) -> {"reply", "stopped", "dropped_turns", ...}), scoring each greedy reply; with history="gold",
    session.replace_answer(gold) puts the gold answer in its place. -> one record per answered turn: {conversation,
    turn, family, correct, reply, gold}."""
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


# ---------------------------------------------------------------------------------------------------- evaluate

def evaluate(chat_model, data_dir="", history="gold", max_conversations=0, max_new_tokens=64, batch_size=16,
             device="cpu"):
    """Held-out answer loss and exact match of an engine.ChatModel (see the module docstring). -> a JSON-able
    dict."""
    model, tok, kind, checkpoint = chat_model.model, chat_model.tok, chat_model.mask, chat_model.checkpoint or {}
    data_dir = data_dir or checkpoint.get("config", {}).get("data_dir", "")
    if not data_dir:
        raise UserError(f"{chat_model.what} does not say which data it was trained on: pass --data_dir")
    val_path = os.path.join(data_dir, "val.jsonl")
    if not os.path.exists(val_path):
        raise UserError(f"no held-out conversations at {val_path}: pass the --data_dir the model was trained on")
    meta = load_meta(data_dir)
    if meta["tokenizer"] != tok.describe():
        raise UserError(f"{data_dir} holds the tokens of another tokenizer ({meta['tokenizer']['name']}) than the "
                        f"model's ({tok.name}): prepare it with python data/prepare.py --tokenizer={tok.name}, or pass "
                        "the model's --data_dir")
    conversations, _ = read_jsonl(val_path)
    if max_conversations:
        conversations = conversations[:max_conversations]
    t0 = time.time()
    val_split = first_conversations(load_split(data_dir, "val"), max_conversations)
    rows = min(model.config.block_size, meta["block_size"])  # packed as prepared (not 8192 wide for SmolLM2)
    val_loss = estimate_val_loss(model, val_split, kind, rows, batch_size, Runtime(device))
    t1 = time.time()
    session = ChatSession(model, tok, kind)
    # Decoding feeds one token at a time: on a CPU a second intra-op thread only adds synchronisation, which on a
    # busy machine made the replay ~15x slower (each tiny op waits for a descheduled thread).
    with cpu_threads(1, device):
        records = replay(session, conversations, history, max_new_tokens)
    t2 = time.time()
    tokens = checkpoint.get("tokens", {})
    info = machine(device)
    return {"model": chat_model.what, "pretrained": chat_model.checkpoint is None, "mask": kind,
            "mask_label": chat_model.mask_label, "data_dir": data_dir,
            "iter_num": checkpoint.get("iter_num"), "model_args": asdict(model.config),
            "trained_tokens": tokens.get("tokens"), "trained_answer_tokens": tokens.get("answer_tokens"),
            "history": history, "history_note": HISTORY_NOTE[history], "conversations": len(conversations),
            "max_new_tokens": max_new_tokens, "val_loss": val_loss, **tally(records),
            "unfinished_replies": sum(not r["finished"] for r in records),
            "turns_with_dropped_history": sum(r["dropped_turns"] > 0 for r in records),
            "seconds": {"val_loss": round(t1 - t0, 2), "chat": round(t2 - t1, 2)}, "device": str(device),
            "machine": f"{info['name']} ({info['cpus']} CPUs), torch {info['torch']}", "records": records}


def report(result):
    r = result
    args = r["model_args"]
    trained = "as pretrained" if r["pretrained"] else \
        f"iter {r['iter_num']}, trained on {r['trained_tokens'] or 0:,} tokens"
    lines = [f"# eval {r['model']}: mask {r['mask_label']}, {trained}, {args['n_layer']} layers x {args['n_embd']} "
             "wide",
             f"{r['conversations']} held-out conversations from {r['data_dir']}/val.jsonl, greedy replies through "
             f"ChatSession (KV cache), max_new_tokens {r['max_new_tokens']}; {r['history_note']}. Exact "
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


def main(argv=None):
    cfg = flags.parse(EvalConfig(), sys.argv[1:] if argv is None else argv, __doc__)
    set_threads(cfg.threads, cfg.device)
    chat_model = cfg.load()
    result = evaluate(chat_model, cfg.data_dir, cfg.history, cfg.max_conversations, cfg.max_new_tokens,
                      cfg.batch_size, str(next(chat_model.model.parameters()).device))
    print(json.dumps(result) if cfg.json else report(result))
    return result


if __name__ == "__main__":
    flags.run(main)
