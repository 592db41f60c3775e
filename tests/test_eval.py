"""eval.py: exact-match scoring on hand-made cases, the replay and its tables checked against counts taken straight
from val.jsonl, the gold-history path against a full-recompute greedy decode, and one tiny checkpoint's
evaluation."""
import json
import math
import os
from collections import Counter

import pytest
import torch

import eval as ev
import train
from data.chat import read_jsonl, render
from data.prepare import prepare
from data.tokenizer import get_tokenizer
from cli.errors import UserError
from cli.flags import run
from mask import ASSISTANT, MASKS, make_mask
from model import GPT, GPTConfig
from engine import ChatSession

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = get_tokenizer("byte")
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=128", "--batch_size=2", "--max_iters=2",
        "--device=cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    prepare(path, block_size=128, n_train=40, n_val=6)
    return path


def val_conversations(data_dir):
    """val.jsonl read with json alone (not through data.chat), for independent counts."""
    with open(os.path.join(data_dir, "val.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def expected_counts(conversations):
    """(answers per family tag, answers per turn row) straight from the file."""
    families = Counter(t for c in conversations for t in c["tasks"])
    turns = Counter()
    for c in conversations:
        n = sum(m["role"] == "assistant" for m in c["messages"])
        turns.update("8+" if k >= 8 else str(k) for k in range(1, n + 1))
    return families, turns


# ------------------------------------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("reply, gold, want", [
    ("1 4 7 9", "1 4 7 9", True),
    ("1 4 7", "1 4 7 9", False),           # a prefix of the gold answer
    ("1 4 7 9 1", "1 4 7 9", False),       # the gold answer, then more
    ("1 4 7 9 sort", "1 4 7 9", False),
    ("4821  \n", "4821", True),            # surrounding whitespace is stripped...
    ("\t 4821", "4821", True),
    ("1  4 7 9", "1 4 7 9", False),        # ...inner whitespace is not
    ("Red", "red", False),                 # no case folding
    ("", "ok", False),                     # empty reply
    ("   ", "ok", False),
    ("ok", "ok", True),
])
def test_score(reply, gold, want):
    assert ev.score(reply, gold) is want


def test_turn_buckets():
    assert [ev.turn_bucket(t) for t in (1, 2, 7, 8, 9, 30)] == ["1", "2", "7", "8+", "8+", "8+"]


# ---------------------------------------------------------------------------------------------- replay and tally

class ScriptedSession:
    """ChatSession's interface, answering in conversation order from a list of (reply, stopped)."""

    def __init__(self, answers):
        self.answers, self.calls, self.tok = iter(answers), [], TOK

    def reset(self, system=None):
        self.calls.append(("reset", system))

    def turn(self, user_text, max_new_tokens, temperature):
        assert temperature == 0.0  # greedy
        reply, stopped = next(self.answers)
        self.calls.append(("turn", user_text))
        return {"reply": reply, "stopped": stopped, "dropped_turns": 0}

    def replace_answer(self, text):
        self.calls.append(("answer", text))


@pytest.mark.parametrize("history", ["own", "gold"])
def test_replay_scores_known_answers_and_counts_match_the_file(data_dir, history):
    convs = val_conversations(data_dir)
    answers, want_correct = [], Counter()
    for c in convs:
        golds = [m["content"] for m in c["messages"] if m["role"] == "assistant"]
        for k, (gold, family) in enumerate(zip(golds, c["tasks"])):
            # sort: extra text; reverse: a prefix; the last turn of a conversation: right text but cut off;
            # everything else: the gold answer with a trailing newline
            if k == len(golds) - 1:
                answers.append((gold, "max_new_tokens"))
            elif family == "sort":
                answers.append((gold + " 0", "end"))
            elif family == "reverse":
                answers.append((gold[:-1], "end"))
            else:
                answers.append((gold + "\n", "end"))
                want_correct[family] += 1
    session = ScriptedSession(answers)
    conversations, _ = read_jsonl(os.path.join(data_dir, "val.jsonl"))
    result = ev.tally(ev.replay(session, conversations, history))
    families, turns = expected_counts(convs)
    assert {f: c["n"] for f, c in result["by_family"].items() if f != ev.POOLED} == dict(families)
    assert result["by_family"][ev.POOLED]["n"] == families["minmax"] + families["sort"] + families["reverse"]
    assert {t: c["n"] for t, c in result["by_turn"].items()} == dict(turns)
    assert {f: c["correct"] for f, c in result["by_family"].items() if c["correct"] and f != ev.POOLED} == \
        dict(want_correct)
    assert result["by_family"][ev.POOLED]["correct"] == want_correct["minmax"]
    assert result["overall"]["correct"] == sum(want_correct.values())
    assert list(result["by_family"])[:3] == list(ev.INSTRUCTION_LAST) or not set(ev.INSTRUCTION_LAST) <= set(families)
    # every conversation starts afresh with its own system message; gold history puts the gold answer back
    expected_calls = []
    for c in convs:
        system = c["messages"][0]["content"] if c["messages"][0]["role"] == "system" else None
        expected_calls.append(("reset", system))
        for m in c["messages"]:
            if m["role"] == "user":
                expected_calls.append(("turn", m["content"]))
            elif m["role"] == "assistant" and history == "gold":
                expected_calls.append(("answer", m["content"]))
    assert session.calls == expected_calls


# ------------------------------------------------------------------------------------- gold history, real session

def greedy_reference(model, kind, messages, user, budget):
    """Greedy reply after messages, recomputing the whole context with the full mask for every token."""
    ids, roles = render(messages + [{"role": "user", "content": user}], TOK)
    reply = []
    with torch.no_grad():
        for _ in range(budget):
            logits = model(torch.tensor([ids]), make_mask(kind, torch.tensor(roles)))[0][0, -1]
            logits[[TOK.bos, TOK.system, TOK.user, TOK.assistant]] = float("-inf")  # never part of an answer
            token = int(logits.argmax())
            if token == TOK.end:
                break
            reply.append(token)
            ids, roles = ids + [token], roles + [ASSISTANT]
    return TOK.decode(reply)


@pytest.mark.parametrize("kind", MASKS)
def test_gold_history_replies_equal_a_full_recompute_on_the_gold_history(data_dir, kind):
    torch.manual_seed(0)
    # block_size 256 > the data's 128 + a reply: the session never drops a turn, so the reference needs no dropping
    model = GPT(GPTConfig(block_size=256, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    conversations = sorted(val_conversations(data_dir), key=lambda c: -len(c["messages"]))[:2]
    records = ev.replay(ChatSession(model, TOK, kind), conversations, "gold")
    k = 0
    for c in conversations:
        system, turns = ev.turns_of(c)
        history = [{"role": "system", "content": system}] if system else []
        for user, gold, _ in turns:
            want = greedy_reference(model, kind, history, user, len(TOK.encode(gold)) + 8)
            assert records[k]["reply"] == want
            history += [{"role": "user", "content": user}, {"role": "assistant", "content": gold}]
            k += 1
    assert k == len(records) > 2 and not any(r["dropped_turns"] for r in records)


# ------------------------------------------------------------------------------------------------ one checkpoint

@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """Two tiny checkpoints (ISM, causal; 2 optimizer steps each): -> {mask: out_dir}."""
    out = {}
    for kind in ("ism", "causal"):
        out[kind] = str(tmp_path_factory.mktemp(kind))
        train.main(TINY + [f"--mask={kind}", f"--data_dir={data_dir}", f"--out_dir={out[kind]}"])
    return out


def test_eval_one_checkpoint_counts_match_the_file(trained, data_dir, capsys):
    result = ev.main([f"--out_dir={trained['ism']}", "--json", "--device=cpu"])
    result = json.loads(json.dumps(result))  # what --json prints
    families, turns = expected_counts(val_conversations(data_dir))
    assert result["data_dir"] == data_dir and result["mask"] == "ism" and result["history"] == "gold"
    assert {f: c["n"] for f, c in result["by_family"].items() if f != ev.POOLED} == dict(families)
    assert {t: c["n"] for t, c in result["by_turn"].items()} == dict(turns)
    assert result["overall"]["n"] == sum(families.values()) == len(result["records"])
    assert result["overall"]["correct"] == sum(ev.score(r["reply"], r["gold"]) and r["finished"]
                                               for r in result["records"])
    assert math.isfinite(result["val_loss"]) and result["conversations"] == len(val_conversations(data_dir))
    assert json.loads(capsys.readouterr().out) == result


def test_markdown_report(trained, capsys):
    ev.main([f"--out_dir={trained['causal']}", "--max_conversations=2", "--device=cpu"])
    out = capsys.readouterr().out
    assert out.startswith("# eval ") and "mask causal, iter 2" in out
    assert "| held-out answer loss | exact match % | answers |" in out
    assert "| family | answers | exact match % |" in out and "| turn | answers | exact match % |" in out


@pytest.mark.parametrize("args, message", [
    (["--history=teacher"], "--history=teacher: choose one of gold | own"),
    (["--out_dir=/nonexistent/run"], "no checkpoint at /nonexistent/run/ckpt.pt"),
    (["--max_new_tokens=0"], "--max_new_tokens=0: must be at least 1"),
])
def test_user_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: ev.main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_data_of_another_tokenizer_is_one_line(trained, tmp_path):
    # the model reads byte tokens; held-out data in GPT-2-sized ids would index past its embedding
    other = tmp_path / "other"
    prepare(str(other), block_size=128, n_train=8, n_val=2)
    meta = json.loads((other / "meta.json").read_text())
    meta["tokenizer"] = dict(meta["tokenizer"], special_ids={"<|bos|>": 0})
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"holds the tokens of another tokenizer \(byte\) than the model's \(byte\)"):
        ev.main([f"--out_dir={trained['ism']}", f"--data_dir={other}", "--device=cpu"])


@pytest.mark.parametrize("kind", MASKS)
def test_heldout_loss_by_turn_equals_each_conversation_scored_alone(data_dir, kind):
    """The per-turn held-out answer loss (packed rows, triplet-expanded under prefix) against a forward over each
    conversation alone, answer by answer: under prefix, the conversation up to that answer, which closes it."""
    from support.starts import ChatModel
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    result = ev.evaluate(ChatModel(model, TOK, kind, kind, "a random model"), data_dir, replay_turns=False)
    sums, counts = Counter(), Counter()
    for conversation in val_conversations(data_dir):
        ids, roles = render(conversation["messages"], TOK)
        starts = [i for i in range(len(roles)) if roles[i] == ASSISTANT and roles[i - 1] != ASSISTANT]
        for turn, first in enumerate(starts, 1):
            end = next((i for i in range(first, len(roles)) if roles[i] != ASSISTANT), len(roles))
            upto = end if kind == "prefix" else len(ids)
            with torch.no_grad():
                logits = model(torch.tensor([ids[:upto]]), make_mask(kind, torch.tensor(roles[:upto])))[0][0]
            losses = torch.nn.functional.cross_entropy(logits[first - 1:end - 1], torch.tensor(ids[first:end]),
                                                       reduction="none")
            bucket = "8+" if turn >= 8 else str(turn)
            sums[bucket] += losses.double().sum().item()
            counts[bucket] += end - first
    assert result["replayed"] is False and result["records"] == []
    assert {b: c["n"] for b, c in result["val_loss_by_turn"].items()} == dict(counts)
    for bucket, cell in result["val_loss_by_turn"].items():
        assert cell["loss"] == pytest.approx(sums[bucket] / counts[bucket], rel=1e-5)
    assert result["val_loss"] == pytest.approx(sum(sums.values()) / sum(counts.values()), rel=1e-5)
