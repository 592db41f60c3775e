"""Score a model: held-out answer loss, and exact match of greedy answers given through the chat.

    python eval.py --out_dir=out                     # markdown tables
    python eval.py --out_dir=out --json              # one JSON object, per-turn records included
    python eval.py --init_from=smollm2 --mask=ism --data_dir=data/synthetic-smollm2

The loss: mean cross-entropy of every answer token of data_dir's val split under the mask the model
chats with. Exact match (--replay): each conversation of data_dir/val.jsonl is replayed through
engine.ChatSession, each user turn answered greedily; a reply must equal the gold answer after
stripping surrounding whitespace (one cut by max_new_tokens is wrong). Both are reported per turn
(1..7, then 8+) and overall; exact match also per task family (the synthetic data's "tasks" tags;
the instruction-last ones first and pooled). experiments/compare_masks.py compares masks."""
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

import json
import os
import time
from dataclasses import asdict, dataclass

from cli.errors import UserError
from cli.flags import parse, run, setting
from data.batching import batches_of, heldout_rows
from data.chat import read_jsonl, system_of
from data.store import first_conversations, load_meta, load_split
from data.synthetic import FAMILIES, INSTRUCTION_LAST, POOLED, family_label, percent
from engine import ChatSession
from loss import answer_loss_by_turn
from support.compute import cpu_threads, machine
from support.starts import ModelFlags

FAMILY_ORDER = INSTRUCTION_LAST + tuple(f for f in FAMILIES if f not in INSTRUCTION_LAST)
UNTAGGED = "untagged"
LAST_TURN_BUCKET = 8  # turns 8, 9, ... are reported together as "8+"
HISTORY_NOTE = {"gold": "gold answers kept in the history (teacher-forced: each turn scored on "
                        "the same history)",
                "own": "the model's own replies kept in the history (what a user sees: mistakes "
                       "compound)"}


@dataclass
class EvalConfig(ModelFlags):
    data_dir: str = setting("", "prepared data with val.jsonl (empty: the checkpoint's data_dir)")
    history: str = setting("gold", "gold | own: what stays in the conversation after a scored turn",
                           choices=("gold", "own"))
    max_conversations: int = setting(0, "the first val.jsonl conversations scored (0: all)", min=0)
    max_new_tokens: int = setting(64, "longest reply; one cut here is wrong", min=1)
    batch_size: int = setting(16, "rows per batch for the held-out loss", min=1)
    replay: bool = setting(True, "score exact match; false: the held-out answer loss only (real "
                                 "chats have no one right answer)")
    json: bool = setting(False, "print one JSON object instead of markdown tables")


def score(reply, gold):
    """Exact match: equal after stripping surrounding whitespace, nothing else."""
    return reply.strip() == gold.strip()


def turn_bucket(turn):
    return f"{LAST_TURN_BUCKET}+" if turn >= LAST_TURN_BUCKET else str(turn)


def turns_of(conversation):
    """-> (system text or None, [(user text, gold answer, family), ...])."""
    messages = conversation["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    tasks = conversation.get("tasks") or [UNTAGGED] * len(answers)
    return system_of(messages), list(zip(users, answers, tasks))


def replay(session, conversations, history="gold", max_new_tokens=64):
    """Replay each conversation through a ChatSession, scoring each greedy reply; with history
    "gold" the gold answer replaces it. -> one record per answered turn."""
    records = []
    for number, conversation in enumerate(conversations):
        system, turns = turns_of(conversation)
        session.reset(system=system)
        for turn, (user, gold, family) in enumerate(turns, 1):
            budget = max_new_tokens
            if history == "gold":  # the history does not depend on the reply: stop once it is wrong
                budget = min(max_new_tokens, len(session.tok.encode(gold)) + 8)
            result = session.turn(user, max_new_tokens=budget, temperature=0.0)
            finished = result["stopped"] == "end"
            records.append({"conversation": number, "turn": turn, "family": family, "user": user,
                            "gold": gold, "reply": result["reply"], "finished": finished,
                            "correct": finished and score(result["reply"], gold),
                            "dropped_turns": result["dropped_turns"]})
            if history == "gold":
                session.replace_answer(gold)
    return records


def tally(records):
    """records -> {"overall", "by_family", "by_turn"}, each {"n", "correct", "accuracy"};
    families in FAMILY_ORDER, the pooled instruction-last row after them."""
    def cell(rows):
        n, correct = len(rows), sum(r["correct"] for r in rows)
        return {"n": n, "correct": correct, "accuracy": correct / n if n else None}

    def order(f):
        return FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER), f

    families = sorted({r["family"] for r in records}, key=order)
    by_family = {f: cell([r for r in records if r["family"] == f]) for f in families}
    if any(f in by_family for f in INSTRUCTION_LAST):
        by_family[POOLED] = cell([r for r in records if r["family"] in INSTRUCTION_LAST])
    buckets = sorted({turn_bucket(r["turn"]) for r in records}, key=lambda b: int(b.rstrip("+")))
    by_turn = {b: cell([r for r in records if turn_bucket(r["turn"]) == b]) for b in buckets}
    return {"overall": cell(records), "by_family": by_family, "by_turn": by_turn}


def evaluate(chat_model, data_dir="", history="gold", max_conversations=0, max_new_tokens=64,
             batch_size=16, replay_turns=True):
    """Held-out answer loss and, with replay_turns, exact match of a support.starts.ChatModel.
    -> a JSON-able dict."""
    model, tok, kind = chat_model.model, chat_model.tok, chat_model.mask
    checkpoint, rt = chat_model.checkpoint or {}, chat_model.runtime
    data_dir, meta = heldout_data(chat_model, data_dir)
    conversations = read_jsonl(os.path.join(data_dir, "val.jsonl"))[0][:max_conversations or None]
    t0 = time.time()
    val = first_conversations(load_split(data_dir, "val"), max_conversations)
    width = min(model.config.block_size, meta["block_size"])  # rows as prepared
    rows = heldout_rows(val, kind, width, batch_size)
    by_turn = answer_loss_by_turn(model, batches_of(val, rows, width, batch_size), kind, rt)
    t1 = time.time()
    records = []
    if replay_turns:
        with cpu_threads(1, rt.device):  # one token at a time: a second thread only waits
            records = replay(ChatSession(model, tok, kind), conversations, history, max_new_tokens)
    tokens, info = checkpoint.get("tokens", {}), machine(rt.device)
    return {"model": chat_model.what, "pretrained": chat_model.checkpoint is None, "mask": kind,
            "mask_label": chat_model.mask_label, "data_dir": data_dir,
            "iter_num": checkpoint.get("iter_num"), "model_args": asdict(model.config),
            "trained_tokens": tokens.get("tokens"),
            "trained_answer_tokens": tokens.get("answer_tokens"), "history": history,
            "history_note": HISTORY_NOTE[history], "conversations": len(conversations),
            "max_new_tokens": max_new_tokens, **loss_by_turn(by_turn), "replayed": replay_turns,
            **tally(records), "unfinished_replies": sum(not r["finished"] for r in records),
            "turns_with_dropped_history": sum(r["dropped_turns"] > 0 for r in records),
            "seconds": {"val_loss": round(t1 - t0, 2), "chat": round(time.time() - t1, 2)},
            "device": str(rt.device), "records": records,
            "machine": f"{info['name']} ({info['cpus']} CPUs), torch {info['torch']}"}


def heldout_data(chat_model, data_dir):
    """-> (data_dir, its meta.json): data_dir, or the checkpoint's; UserError when there is none
    or it holds another tokenizer's tokens."""
    data_dir = data_dir or (chat_model.checkpoint or {}).get("config", {}).get("data_dir", "")
    if not data_dir:
        raise UserError(f"{chat_model.what} does not say which data it was trained on: pass "
                        "--data_dir")
    val = os.path.join(data_dir, "val.jsonl")
    if not os.path.exists(val):
        raise UserError(f"no held-out conversations at {val}: pass the --data_dir the model was "
                        "trained on")
    meta, tok = load_meta(data_dir), chat_model.tok
    if meta["tokenizer"] != tok.describe():
        raise UserError(f"{data_dir} holds the tokens of another tokenizer "
                        f"({meta['tokenizer']['name']}) than the model's ({tok.name}): prepare it "
                        f"with python prepare.py --tokenizer={tok.name}, or pass the model's "
                        "--data_dir")
    return data_dir, meta


def loss_by_turn(by_turn):
    """answer_loss_by_turn's sums -> {"val_loss", "val_loss_by_turn": {bucket: {"n", "loss"}}}
    (n: answer tokens; buckets as turn_bucket)."""
    buckets = {}
    for turn, (total, count) in by_turn.items():
        bucket = buckets.setdefault(turn_bucket(turn), [0.0, 0])
        bucket[0], bucket[1] = bucket[0] + total, bucket[1] + count
    count = sum(n for _, n in by_turn.values())
    cells = {b: {"n": n, "loss": t / max(n, 1)} for b, (t, n) in buckets.items()}
    return {"val_loss": sum(t for t, _ in by_turn.values()) / max(count, 1),
            "val_loss_by_turn": cells}


def report(r):
    """The markdown tables of evaluate()'s result."""
    args = r["model_args"]
    trained = "as pretrained" if r["pretrained"] else \
        f"iter {r['iter_num']}, trained on {r['trained_tokens'] or 0:,} tokens"
    how = (f", greedy replies through ChatSession (KV cache), max_new_tokens "
           f"{r['max_new_tokens']}; {r['history_note']}. Exact match after stripping surrounding "
           "whitespace; a reply that did not end by itself is wrong." if r["replayed"]
           else "; held-out answer loss only (--replay=false)")
    lines = [f"# eval {r['model']}: mask {r['mask_label']}, {trained}, {args['n_layer']} layers x "
             f"{args['n_embd']} wide",
             f"{r['conversations']} held-out conversations from {r['data_dir']}/val.jsonl{how}",
             f"machine: {r['machine']}, device {r['device']}; "
             f"{r['seconds']['val_loss']:.0f}s loss, {r['seconds']['chat']:.0f}s chat", "",
             "| turn | answer tokens | held-out answer loss |", "|---|---|---|"]
    lines += [f"| {t} | {c['n']} | {c['loss']:.4f} |" for t, c in r["val_loss_by_turn"].items()]
    total = sum(c["n"] for c in r["val_loss_by_turn"].values())
    lines += [f"| **all** | {total} | {r['val_loss']:.4f} |"]
    if r["replayed"]:
        overall = r["overall"]
        lines += ["", "| held-out answer loss | exact match % | answers | unfinished replies | "
                  "turns after dropped history |", "|---|---|---|---|---|",
                  f"| {r['val_loss']:.4f} | {percent(overall['accuracy'])} | {overall['n']} | "
                  f"{r['unfinished_replies']} | {r['turns_with_dropped_history']} |", "",
                  "| family | answers | exact match % |", "|---|---|---|"]
        lines += [f"| {family_label(f)} | {c['n']} | {percent(c['accuracy'])} |"
                  for f, c in r["by_family"].items()]
        lines += ["", "| turn | answers | exact match % |", "|---|---|---|"]
        lines += [f"| {t} | {c['n']} | {percent(c['accuracy'])} |" for t, c in r["by_turn"].items()]
    return "\n".join(lines)


def main(argv=None):
    cfg = parse(EvalConfig(), argv, __doc__)
    result = evaluate(cfg.load(), cfg.data_dir, cfg.history, cfg.max_conversations,
                      cfg.max_new_tokens, cfg.batch_size, cfg.replay)
    print(json.dumps(result) if cfg.json else report(result))
    return result


if __name__ == "__main__":
    run(main)
