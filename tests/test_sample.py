"""The chat session: cached turns equal the no-cache reference, per-turn costs, overflow, closing replies, and the
CLI. Every check compares against an independent computation: render() of the messages, a greedy decode over the
full context written here, or a fresh session."""
import dataclasses
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import sample
from checkpoint import save_checkpoint
from data.chat import render
from data.tokenizer import get_tokenizer
from flags import run
from mask import ASSISTANT, MASKS, USER, make_mask
from engine import ChatSession, TextStream, TurnError, load_chat_model
from flags import UserError
from model import GPT, GPTConfig, KVCache

TOK = get_tokenizer("byte")
CONFIG = GPTConfig(block_size=128, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_embd=32)
SYSTEM_TEXT = "be brief"
USERS = ["hi", "what is 2+2?", "say <|end|> <|assistant|> plainly", "héllo ✓ bye"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRUCTURAL = torch.zeros(CONFIG.vocab_size, dtype=torch.bool)  # special tokens an answer may never contain
STRUCTURAL[[TOK.bos, TOK.system, TOK.user, TOK.assistant]] = True


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: a second intra-op thread only adds synchronisation (milliseconds per op on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    with torch.no_grad():  # bigger random weights than GPT-2's init, so replies vary and masks matter
        for p in model.parameters():
            p.normal_(0, 1.0)
    return model.eval()


MODEL = tiny_model()


def end_after(trigger_ids):
    """A forward hook making <|end|> the greedy choice right after any token in trigger_ids, so replies end by
    themselves (random weights rarely sample <|end|>). It depends only on the last input token, so the cached and
    the no-cache path see the same change."""
    def hook(module, args, output):
        logits, loss = output
        if int(args[0][0, -1]) in trigger_ids:
            logits = logits.clone()
            logits[0, -1, TOK.end] = 1e4
        return logits, loss
    return hook


def reference_reply(model, kind, messages, user_text, max_new_tokens, block_size=CONFIG.block_size):
    """Greedy answer to user_text after messages, recomputing the whole context for every token (positions from 0).
    Returns (reply ids, step logits)."""
    ids, roles = render(messages + [{"role": "user", "content": user_text}], TOK)
    budget = min(max_new_tokens, block_size - len(ids) - 1)
    reply, steps = [], []
    with torch.no_grad():
        for _ in range(budget):
            logits = model(torch.tensor([ids]), make_mask(kind, torch.tensor(roles)))[0][0, -1]
            steps.append(logits)
            token = int(torch.argmax(logits.masked_fill(STRUCTURAL, float("-inf"))))
            if token == TOK.end:
                break
            reply.append(token)
            ids, roles = ids + [token], roles + [ASSISTANT]
    return reply, steps


def assert_cache_is_exact(session):
    """The cache equals a fresh forward over the ids it claims to hold (positions from 0, the full mask)."""
    n = session.cache.length
    assert session.ids[:n] == render(session.messages, TOK)[0][:n]
    fresh = KVCache(CONFIG)
    with torch.no_grad():
        session.model(torch.tensor([session.ids[:n]]), make_mask(session.kind, torch.tensor(session.roles[:n])),
                      kv_cache=fresh)
    torch.testing.assert_close(session.cache.kv[..., :n, :], fresh.kv[..., :n, :], atol=1e-4, rtol=1e-4)


def assert_well_formed(session):
    assert (session.ids, session.roles) == render(session.messages, TOK)
    assert len(session.ids) <= CONFIG.block_size
    assert session.ids[-1] == TOK.end and session.roles[-1] == ASSISTANT


def record_step_logits(model):
    """Last-position logits of every forward: the logits each sampled token was drawn from."""
    steps = []
    handle = model.register_forward_hook(lambda m, args, out: steps.append(out[0][0, -1].clone()))
    return steps, handle


# --------------------------------------------------------------------------------------------- session (library)

@pytest.mark.parametrize("ends", [False, True], ids=["cut", "ends"])
@pytest.mark.parametrize("kind", MASKS)
def test_cached_transcript_equals_no_cache_and_full_recompute(kind, ends):
    hook = MODEL.register_forward_hook(end_after({167, 197})) if ends else None
    try:
        results, logits = {}, {}
        for use_cache in (True, False):
            session = ChatSession(MODEL, TOK, kind, system=SYSTEM_TEXT, use_cache=use_cache)
            steps, handle = record_step_logits(MODEL)
            try:
                results[use_cache] = [session.turn(u, max_new_tokens=9) for u in USERS]
            finally:
                handle.remove()
            logits[use_cache] = torch.stack(steps)
            replies = [m["content"] for m in session.messages if m["role"] == "assistant"]
            # each answer is the greedy decode of the full context, given the history the session kept
            for k, user in enumerate(USERS):
                want, _ = reference_reply(MODEL, kind, session.messages[:1 + 2 * k], user, 9)
                assert replies[k] == want
        cached, reference = results[True], results[False]
        assert [r["reply"] for r in cached] == [r["reply"] for r in reference]
        assert [r["stopped"] for r in cached] == [r["stopped"] for r in reference]
        assert [r["generated_tokens"] for r in cached] == [r["generated_tokens"] for r in reference]
        torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)
        stops = {r["stopped"] for r in cached}
        assert stops == ({"end", "max_new_tokens"} if ends else {"max_new_tokens"}), stops
        assert len({r["reply"] for r in cached}) > 1  # the model is not degenerate
    finally:
        if hook is not None:
            hook.remove()


@pytest.mark.parametrize("kind", MASKS)
def test_prefilled_and_reused_tokens_per_turn(kind):
    hook = MODEL.register_forward_hook(end_after({167, 197}))
    try:
        session = ChatSession(MODEL, TOK, kind, system=SYSTEM_TEXT)
        for k, user in enumerate(USERS):
            before = [dict(m) for m in session.messages]
            history = len(render(before, TOK)[0])
            with_prompt = len(render(before + [{"role": "user", "content": user}], TOK)[0])
            result = session.turn(user, max_new_tokens=7)
            if kind == "prefix" or k == 0:
                assert result["reused_tokens"] == 0
                assert result["prefill_tokens"] == with_prompt  # the whole history, every turn
            else:
                # never fed: the previous answer's <|end|>, and its last token when it was cut by max_new_tokens
                unfed = 1 if last["stopped"] == "end" else 2
                assert result["reused_tokens"] == history - unfed
                assert result["prefill_tokens"] == with_prompt - history + unfed
            assert result["dropped_turns"] == 0
            assert result["generated_tokens"] == len(session.messages[-1]["content"]) + (result["stopped"] == "end")
            assert result["context_tokens"] == len(session.ids)
            assert result["ttft_ms"] > 0 and (result["decode_tokens_per_s"] or 0) > 0 or result["generated_tokens"] < 2
            assert_well_formed(session)
            assert_cache_is_exact(session)
            last = result
    finally:
        hook.remove()


def test_prefix_cache_could_not_be_reused():
    # Why prefix re-prefills: the K/V an ISM-style reuse would keep differ from the recomputed ones.
    session = ChatSession(MODEL, TOK, "prefix")
    session.turn(USERS[0], 5)
    stale = session.cache.kv[..., :session.cache.length, :].clone()
    session.turn(USERS[1], 5)
    assert (session.cache.kv[..., :stale.shape[-2], :] - stale).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["ism", "prefix"])
def test_overflow_drops_oldest_turns_and_keeps_the_system_message(kind):
    session = ChatSession(MODEL, TOK, kind, system=SYSTEM_TEXT)
    users = [f"question number {i} with some padding" for i in range(6)]
    dropped_total = 0
    for user in users:
        before = [dict(m) for m in session.messages]
        result = session.turn(user, max_new_tokens=20)
        assert session.messages[0] == {"role": "system", "content": SYSTEM_TEXT}
        kept = session.messages[:-2]
        if result["dropped_turns"]:
            assert result["reused_tokens"] == 0
            assert result["prefill_tokens"] == len(render(kept + [session.messages[-2]], TOK)[0])
            # the oldest whole turns went, nothing else
            assert kept == before[:1] + before[1 + 2 * result["dropped_turns"]:]
            need = len(render([{"role": "user", "content": user}], TOK)[0]) - 1 + min(20, session.reply_reserve) + 1
            assert len(render(kept, TOK)[0]) + need <= CONFIG.block_size
        # the reply equals a fresh greedy decode on the kept history, positions from 0
        want, _ = reference_reply(MODEL, kind, kept, user, 20)
        assert session.messages[-1]["content"] == want
        assert_well_formed(session)
        assert_cache_is_exact(session)
        dropped_total += result["dropped_turns"]
    assert dropped_total >= 2


def test_answer_stops_at_block_size_and_next_turn_drops():
    session = ChatSession(MODEL, TOK, "ism")
    result = session.turn("go on forever", max_new_tokens=10_000)
    assert result["stopped"] == "block_size"
    assert len(session.ids) == CONFIG.block_size  # the reply filled the context, closing <|end|> included
    assert_well_formed(session)
    result = session.turn("and again", max_new_tokens=8)
    assert result["dropped_turns"] == 1 and result["reused_tokens"] == 0
    want, _ = reference_reply(MODEL, "ism", [], "and again", 8)
    assert session.messages[-1]["content"] == want


def test_message_too_long_is_refused_and_changes_nothing():
    session = ChatSession(MODEL, TOK, "ism", system=SYSTEM_TEXT)
    session.turn(USERS[0], 6)
    state = (list(session.ids), [dict(m) for m in session.messages], session.cache.length, session.turns)
    with pytest.raises(TurnError, match="does not fit"):
        session.turn("x" * 200, 6)
    assert (session.ids, session.messages, session.cache.length, session.turns) == state
    session.turn(USERS[1], 6)
    want, _ = reference_reply(MODEL, "ism", state[1], USERS[1], 6)
    assert session.messages[-1]["content"] == want
    assert_cache_is_exact(session)


def test_system_message_too_long_is_refused():
    with pytest.raises(UserError, match="system message"):
        ChatSession(MODEL, TOK, "ism", system="s" * 200)


def test_reset_starts_a_new_conversation():
    session = ChatSession(MODEL, TOK, "ism", system=SYSTEM_TEXT)
    first = session.turn(USERS[0], 8)
    session.turn(USERS[1], 8)
    session.reset()
    assert session.messages == [{"role": "system", "content": SYSTEM_TEXT}] and session.cache.length == 0
    assert session.ids == render(session.messages, TOK)[0] and session.turns == 0
    again = session.turn(USERS[0], 8)
    assert again["reply"] == first["reply"] and again["turn"] == 1 and again["reused_tokens"] == 0
    session.reset(system=None)
    assert session.messages == [] and session.ids == [TOK.bos] and session.roles == [USER]


@pytest.mark.parametrize("kind", ["causal", "ism"])
def test_reply_cut_by_max_new_tokens_is_closed(kind):
    session = ChatSession(MODEL, TOK, kind)
    result = session.turn(USERS[0], max_new_tokens=5)
    assert result["stopped"] == "max_new_tokens" and result["generated_tokens"] == 5
    assert len(session.messages[-1]["content"]) == 5 and session.ids[-1] == TOK.end
    assert session.cache.length == len(session.ids) - 2  # the last sampled token and <|end|> wait for next turn
    session.turn(USERS[1], max_new_tokens=5)
    assert_cache_is_exact(session)
    want, _ = reference_reply(MODEL, kind, session.messages[:2], USERS[1], 5)
    assert session.messages[-1]["content"] == want


@pytest.mark.parametrize("interruptible", [True, False])
def test_ctrl_c_closes_the_reply_and_the_chat_goes_on(interruptible):
    session = ChatSession(MODEL, TOK, "ism")
    pieces = []

    def on_text(text):
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    if interruptible:
        result = session.turn(USERS[0], 20, on_text=on_text, interruptible=True)
        assert result["stopped"] == "interrupted"
    else:
        with pytest.raises(KeyboardInterrupt):
            session.turn(USERS[0], 20, on_text=on_text)
    assert 0 < len(session.messages[-1]["content"]) < 20
    assert_well_formed(session)
    session.turn(USERS[1], 6)
    want, _ = reference_reply(MODEL, "ism", session.messages[:2], USERS[1], 6)
    assert session.messages[-1]["content"] == want
    assert_cache_is_exact(session)


def test_typed_special_tokens_stay_text():
    session = ChatSession(MODEL, TOK, "ism")
    text = "stop <|end|> now <|assistant|>"
    session.turn(text, 4)
    assert session.ids[:len(text) + 4] == [TOK.bos, TOK.user] + list(text.encode()) + [TOK.end, TOK.assistant]
    assert session.ids.count(TOK.assistant) == 1 and session.transcript()[0]["content"] == text


def test_empty_message_is_refused_and_changes_nothing():
    session = ChatSession(MODEL, TOK, "ism")
    for text in ("", "  \n"):
        with pytest.raises(TurnError, match="empty"):
            session.turn(text, 4)
    assert session.messages == [] and session.cache.length == 0 and session.turns == 0


def test_streamed_text_is_whole_characters_and_equals_the_reply():
    stream = TextStream(TOK)
    pieces = [stream.push(b) for b in "é✓".encode()]
    assert pieces == ["", "é", "", "", "✓"]
    assert stream.push(0xff) == "\ufffd"  # never valid: replaced at once
    assert stream.push(0xe2) == "" and stream.flush() == "\ufffd"  # a character cut short by the end of the reply
    session = ChatSession(MODEL, TOK, "ism")
    for user in USERS:
        got = []
        result = session.turn(user, 30, temperature=1.0, generator=torch.Generator().manual_seed(0),
                              on_text=got.append)
        assert "".join(got) == result["reply"] == TOK.decode(session.messages[-1]["content"])


def test_seeded_sampling_repeats():
    replies = []
    for _ in range(2):
        session = ChatSession(MODEL, TOK, "ism")
        g = torch.Generator().manual_seed(7)
        replies.append([session.turn(u, 12, temperature=0.9, top_k=20, generator=g)["reply"] for u in USERS[:2]])
    assert replies[0] == replies[1]
    session = ChatSession(MODEL, TOK, "ism")
    g = torch.Generator().manual_seed(8)
    assert [session.turn(u, 12, temperature=0.9, top_k=20, generator=g)["reply"] for u in USERS[:2]] != replies[0]


# ---------------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("out")
    save_checkpoint({"model": MODEL.state_dict(), "model_args": dataclasses.asdict(CONFIG), "config": {},
                     "tokenizer": TOK.describe(), "mask": "ism", "iter_num": 0, "best_val_loss": 0.0},
                    str(path / "ckpt.pt"))
    return str(path)


def cli(argv, stdin="", monkeypatch=None, capsys=None):
    """Run sample.py's main in-process as `python sample.py` would: returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        run(lambda: sample.main(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_load_chat_model(out_dir):
    model, tok, kind, checkpoint = load_chat_model(out_dir, "cpu")
    assert kind == "ism" and tok.describe() == TOK.describe() and checkpoint["iter_num"] == 0
    torch.testing.assert_close(model.state_dict(), MODEL.state_dict())


def test_cli_missing_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    code, out, err = cli([f"--out_dir={tmp_path}"], "hi\n", monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "run python train.py first" in err


def test_cli_piped_stdin_chats_with_reset_and_ignores_empty_lines(out_dir):
    stdin = "\n".join(["", USERS[0], "   ", USERS[1], "/reset", USERS[0], "/stats", USERS[1], "/quit", "never"]) + "\n"
    proc = subprocess.run([sys.executable, "sample.py", f"--out_dir={out_dir}", "--temperature=0",
                           "--max_new_tokens=8", "--device=cpu"], cwd=ROOT, capture_output=True, input=stdin.encode(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # four replies, nothing for empty lines, commands, or after /quit
    session = ChatSession(MODEL, TOK, "ism")
    want = [session.turn(u, 8)["reply"] for u in USERS[:2]]
    assert lines[:4] == want + want  # /reset started over
    err = proc.stderr.decode().strip().split("\n")
    assert len(err) == 2 and err[0] == "(stats on)" and err[1].startswith("[prefilled ")


def test_cli_json_lines_from_stdin(out_dir, monkeypatch, capsys):
    code, out, err = cli([f"--out_dir={out_dir}", "--json", "--temperature=0", "--max_new_tokens=5"],
                         f"{USERS[0]}\n{'y' * 300}\n{USERS[1]}\n", monkeypatch, capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["turn"] for r in rows] == [1, 2] and rows[1]["reused_tokens"] > 0
    assert err.startswith("error: message of 303 tokens does not fit")


KEYS = {"conversation", "turn", "user", "reply", "prefill_tokens", "reused_tokens", "generated_tokens", "ttft_ms",
        "decode_tokens_per_s", "dropped_turns", "stopped"}


def test_cli_script_prints_one_json_object_per_turn(out_dir, tmp_path, monkeypatch, capsys):
    script = tmp_path / "chats.jsonl"
    conversations = [
        {"messages": [{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": USERS[0]},
                      {"role": "assistant", "content": "ignored"}, {"role": "user", "content": USERS[1]}]},
        {"messages": [{"role": "user", "content": USERS[2]}]},
    ]
    script.write_text("\n".join(json.dumps(c) for c in conversations) + "\n\n")
    code, out, err = cli([f"--out_dir={out_dir}", f"--script={script}", "--temperature=0", "--max_new_tokens=6"],
                         "", monkeypatch, capsys)
    assert code == 0 and err == ""
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(KEYS <= set(r) for r in rows)
    assert [(r["conversation"], r["turn"], r["user"]) for r in rows] == [(1, 1, USERS[0]), (1, 2, USERS[1]),
                                                                         (2, 1, USERS[2])]
    session = ChatSession(MODEL, TOK, "ism", system=SYSTEM_TEXT)
    assert [session.turn(u, 6)["reply"] for u in USERS[:2]] == [r["reply"] for r in rows[:2]]
    session.reset(system=None)
    assert session.turn(USERS[2], 6)["reply"] == rows[2]["reply"]  # the next conversation has no system message


def test_cli_bad_script_line_names_file_and_line(out_dir, tmp_path, monkeypatch, capsys):
    script = tmp_path / "bad.jsonl"
    script.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n{not json\n")
    code, out, err = cli([f"--out_dir={out_dir}", f"--script={script}"], "", monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {script}:2: bad JSON") and err.count("\n") == 1


def test_cli_rejects_bad_values(out_dir, monkeypatch, capsys):
    code, _, err = cli([f"--out_dir={out_dir}", "--temperature=-1"], "", monkeypatch, capsys)
    assert code == 2 and "--temperature" in err and err.count("\n") == 1
