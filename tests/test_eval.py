"""eval.py: exact-match scoring on hand-made cases, the replay and its tables checked against counts taken straight
from val.jsonl, the gold-history path against a full-recompute greedy decode, and smoke runs of `python eval.py
--compare` (tiny model, 2 optimizer steps; run again, it must reuse every run) and of one checkpoint's evaluation."""
import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

import eval as ev
from data.chat import read_jsonl, render
from data.prepare import prepare
from data.tokenizer import get_tokenizer
from flags import run
from mask import ASSISTANT, MASKS, make_mask
from model import GPT, GPTConfig
from sample import ChatSession

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = get_tokenizer("byte")
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=128", "--train_batch_size=2", "--max_iters=2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation on a shared CPU
    yield
    torch.set_num_threads(threads)


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


def test_step_seconds_reads_the_train_log():
    log = ("model: ...\niter 5/12: loss 1.0, lr 1e-3, 100.0ms/iter, 9 tok/s\neval iter 10: ...\n"
           "iter 10/12: loss 1.0, lr 1e-3, 200.0ms/iter, 9 tok/s\niter 12/12: loss 1, lr 1e-3, 50.0ms/iter, 9 tok/s\n")
    assert ev.step_seconds(log) == pytest.approx(5 * 0.1 + 5 * 0.2 + 2 * 0.05)
    assert ev.step_seconds("no steps here") is None


def test_mean_std():
    assert ev.mean_std([0.5, 0.7, None]) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    assert ev.mean_std([0.5]) == (0.5, None)
    assert ev.mean_std([None]) == (None, None)


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
            token = int(model(torch.tensor([ids]), make_mask(kind, torch.tensor(roles)))[0][0, -1].argmax())
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


# ---------------------------------------------------------------------------------------------------- smoke runs

@pytest.fixture(scope="module")
def compared(data_dir, tmp_path_factory):
    """One tiny --compare (1 seed, 3 masks, 2 steps each), run as a user would: -> (compare_dir, JSON, stderr)."""
    compare_dir = str(tmp_path_factory.mktemp("compare"))
    argv = ["--compare", f"--compare_dir={compare_dir}", f"--data_dir={data_dir}", "--seeds=7",
            "--max_conversations=3", "--device=cpu", *TINY]
    first = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *argv, "--json"], cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    return compare_dir, json.loads(first.stdout), argv


def test_compare_runs_every_mask_and_summarises(compared):
    compare_dir, result, _ = compared
    assert [(r["mask"], r["seed"]) for r in result["runs"]] == [("causal", 7), ("ism", 7), ("prefix", 7)]
    for r in result["runs"]:
        assert r["eval"]["iter_num"] == 2 and r["eval"]["mask"] == r["mask"]
        assert r["eval"]["trained_tokens"] > 0 and r["train"]["wall_seconds"] > 0
        assert r["train"]["step_seconds"] is not None
        assert math.isfinite(r["eval"]["val_loss"])
        assert os.path.exists(os.path.join(compare_dir, f"{r['mask']}-s7", "train.log"))
    summary = result["summary"]
    assert set(summary["cost"]) == set(MASKS)
    for table in ("by_family", "by_turn"):
        for entry in summary[table].values():
            assert set(entry) == set(MASKS) | {"ism-causal", "n"}
    assert result["settings"]["max_iters"] == 2 and result["settings"]["seeds"] == [7]


def test_compare_again_reuses_finished_runs_and_prints_tables(compared, capsys):
    _, _, argv = compared
    ev.main(argv)  # in this process: nothing is trained (no subprocess) and every evaluation is reused
    again = capsys.readouterr()
    assert again.err.count("trained already") == 3 and "python train.py" not in again.err
    assert "evaluated in" not in again.err
    out = again.out
    assert out.startswith("# ismGPT quality: causal vs ism vs prefix, 1 seed(s) (7)")
    assert "budget: 1 layers x 16 wide (2 heads), block_size 128, 2 optimizer steps of 2 rows" in out
    assert "| family (exact match %) | answers | causal | ism | prefix | ism - causal (paired) |" in out
    assert "| turn (exact match %) | answers |" in out and "| **overall** |" in out
    assert "| mask | held-out answer loss |" in out
    for mask in MASKS:
        assert f"| {mask} | " in out


def test_eval_one_checkpoint_counts_match_the_file(compared, data_dir, capsys):
    compare_dir, _, _ = compared
    out_dir = os.path.join(compare_dir, "ism-s7")
    result = ev.main([f"--out_dir={out_dir}", "--json", "--device=cpu"])
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


def test_markdown_report(compared, capsys):
    compare_dir, _, _ = compared
    ev.main([f"--out_dir={os.path.join(compare_dir, 'causal-s7')}", "--max_conversations=2", "--device=cpu"])
    out = capsys.readouterr().out
    assert out.startswith("# eval ") and "mask causal, iter 2" in out
    assert "| held-out answer loss | exact match % | answers |" in out
    assert "| family | answers | exact match % |" in out and "| turn | answers | exact match % |" in out


@pytest.mark.parametrize("args, message", [
    (["--history=teacher"], "--history=teacher: choose gold or own"),
    (["--compare", "--masks=causal,full"], "unknown mask 'full'"),
    (["--compare", "--seeds=1,x"], "--seeds=1,x: expected comma-separated int"),
    (["--out_dir=/nonexistent/run"], "no checkpoint at /nonexistent/run/ckpt.pt"),
    (["--max_new_tokens=0"], "--max_new_tokens=0: must be at least 1"),
    (["--compare", "--train_args=--mask=causal"], "--train_args: --mask is set by eval.py --compare itself"),
])
def test_user_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: ev.main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
