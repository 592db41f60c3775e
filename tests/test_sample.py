"""sample.py, the command line around the chat engine: piped and scripted chats against fresh sessions, one-line
errors."""
import dataclasses
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import sample
from support.checkpoint import save_checkpoint
from engine import ChatSession
from support.starts import load_chat_model
from cli.flags import run
from model import GPT
from test_engine import CONFIG, MODEL, SYSTEM_TEXT, TOK, USERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    chat_model = load_chat_model(out_dir=out_dir)
    assert chat_model.mask == chat_model.trained_mask == "ism" and chat_model.mask_label == "ism"
    assert chat_model.tok.describe() == TOK.describe() and chat_model.checkpoint["iter_num"] == 0
    torch.testing.assert_close(chat_model.model.state_dict(), MODEL.state_dict())
    assert load_chat_model(out_dir=out_dir, mask="causal").mask_label == "causal (off its training: trained ism)"


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
    err = [line for line in proc.stderr.decode().strip().split("\n") if not line.startswith(CUT)]
    assert len(err) == 2 and err[0] == "(stats on)" and err[1].startswith("[prefilled ")


def test_piped_chat_under_another_mask_than_the_models_says_so(out_dir, monkeypatch, capsys):
    code, out, err = cli([f"--out_dir={out_dir}", "--mask=causal", "--temperature=0", "--max_new_tokens=3"],
                         f"{USERS[0]}\n", monkeypatch, capsys)
    assert code == 0 and out.count("\n") == 1
    assert err == "note: mask causal (off its training: trained ism)\n" + CUT + " 3 tokens, --max_new_tokens: the model " \
        "had not ended it)\n"  # and the reply was cut
    code, out, err = cli([f"--out_dir={out_dir}", "--temperature=0", "--max_new_tokens=3"], f"{USERS[0]}\n",
                         monkeypatch, capsys)
    assert code == 0 and err.startswith(CUT)  # its own mask: nothing to say of it


def test_cli_json_lines_from_stdin(out_dir, monkeypatch, capsys):
    code, out, err = cli([f"--out_dir={out_dir}", "--json", "--temperature=0", "--max_new_tokens=5"],
                         f"{USERS[0]}\n{'y' * 300}\n{USERS[1]}\n", monkeypatch, capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["turn"] for r in rows] == [1, 2] and rows[1]["reused_tokens"] > 0
    assert err.startswith("error: message of 303 tokens does not fit")
    assert "taken by the chat format," in err  # there is no system message to blame


CUT = "(cut at"  # what the chat says after a reply cut at --max_new_tokens


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


def test_help_says_what_a_script_may_hold_and_that_its_answers_are_ignored(monkeypatch, capsys):
    code, out, _ = cli(["--help"], "", monkeypatch, capsys)
    help_line = " ".join(out[out.index("--script="):].split())
    assert code == 0 and "user and assistant messages taking turns, a user first" in help_line
    assert "the file's assistant messages are ignored" in help_line


@pytest.mark.parametrize("flag, message", [
    ("--temperature=-1", "--temperature=-1: must be at least 0"),
    ("--seed=1e23", "--seed=1e23: must be at most 9223372036854775807"),
    ("--top_p=0", "--top_p=0: must be above 0"),
    ("--threads=-3", "--threads=-3: must be at least 0"),
])
def test_cli_rejects_bad_values(out_dir, monkeypatch, capsys, flag, message):
    code, _, err = cli([f"--out_dir={out_dir}", flag], "", monkeypatch, capsys)
    assert code == 2 and err == f"error: {message}\n"


def test_cli_with_stdin_or_stdout_closed_is_one_line(out_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", None)  # what Python gives a program started with `>&-`
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: sample.main([f"--out_dir={out_dir}"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: stdin or stdout is closed: give sample.py a terminal, a pipe or a file\n"


def test_a_reader_that_goes_away_ends_the_output_quietly(out_dir):
    """`python sample.py ... | head -c1`: the pipe closes while replies are still being written."""
    proc = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={out_dir}", "--temperature=0",
                             "--max_new_tokens=50", "--device=cpu"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(("\n".join(USERS * 20) + "\n").encode())
    proc.stdin.close()
    assert len(proc.stdout.read(1)) == 1
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and "Traceback" not in err, err


def test_a_script_conversation_without_a_user_message_says_so(out_dir, tmp_path, monkeypatch, capsys):
    script = tmp_path / "chats.jsonl"
    script.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"}]}) + "\n" +
                      json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    code, out, _ = cli([f"--out_dir={out_dir}", f"--script={script}", "--max_new_tokens=3"], "", monkeypatch, capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and rows[0] == {"conversation": 1, "error": "no user message to answer"}
    assert rows[1]["conversation"] == 2 and rows[1]["user"] == "hi"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_control_characters_reach_a_terminal_as_visible_symbols(tmp_path, monkeypatch):
    """A model that always answers with a carriage return and an escape: a terminal must never receive them."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    with torch.no_grad():  # every position's final vector is e0; token 13 (\r) has a huge e0, token 27 (ESC) next
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.eye(CONFIG.n_embd)[0])
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[13, 0], model.transformer.wte.weight[27, 0] = 50.0, 40.0
    out = str(tmp_path / "out")
    save_checkpoint({"model": model.state_dict(), "model_args": dataclasses.asdict(CONFIG), "config": {},
                     "tokenizer": TOK.describe(), "mask": "ism"}, os.path.join(out, "ckpt.pt"))
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    monkeypatch.setattr(sys, "stdout", terminal)
    run(lambda: sample.main([f"--out_dir={out}", "--temperature=0", "--max_new_tokens=4"]))
    shown = terminal.getvalue()
    assert shown == "\u240d\u240d\u240d\u240d\n"  # four carriage returns, as the symbol for one
    assert "\r" not in shown and "\x1b" not in shown


def test_the_context_full_note_comes_before_the_reply(tmp_path, monkeypatch):
    out = str(tmp_path / "small")
    small = dataclasses.replace(CONFIG, block_size=48)
    model = GPT(small)
    save_checkpoint({"model": model.state_dict(), "model_args": dataclasses.asdict(small), "config": {},
                     "tokenizer": TOK.describe(), "mask": "ism"}, os.path.join(out, "ckpt.pt"))
    both = io.StringIO()  # stdout and stderr in one stream: their order shows
    monkeypatch.setattr(sys, "stdin", io.StringIO("first message here\nsecond message here\n"))
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    run(lambda: sample.main([f"--out_dir={out}", "--temperature=0", "--max_new_tokens=8"]))
    lines = [line for line in both.getvalue().split("\n") if not line.startswith(CUT)]
    note = next(i for i, line in enumerate(lines) if line.startswith("note: context full"))
    assert note == 1 and "dropped the oldest 1 turn(s)" in lines[note]  # after reply 1, before reply 2


def test_a_message_of_several_lines_between_triple_quotes_is_one_turn(out_dir, monkeypatch, capsys):
    pasted = 'what is 2+2?\n\n  and the rest\n'
    code, out, err = cli([f"--out_dir={out_dir}", "--json", "--temperature=0", "--max_new_tokens=4"],
                         f'"""\n{pasted}"""\n{USERS[0]}\n', monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["user"] for r in rows] == [pasted.strip(), USERS[0]]  # the paste is one message, newlines kept
    session = ChatSession(MODEL, TOK, "ism")
    assert rows[0]["reply"] == session.turn(pasted.strip(), 4)["reply"]


def test_a_reply_cut_by_max_new_tokens_or_a_full_context_says_so(out_dir, monkeypatch, capsys):
    code, out, err = cli([f"--out_dir={out_dir}", "--temperature=0", "--max_new_tokens=2"], f"{USERS[0]}\n",
                         monkeypatch, capsys)
    assert code == 0 and err == "(cut at 2 tokens, --max_new_tokens: the model had not ended it)\n"
    code, out, err = cli([f"--out_dir={out_dir}", "--temperature=0", "--max_new_tokens=64"], "x" * 90 + "\n",
                         monkeypatch, capsys)  # 95 prompt tokens: 32 left for the reply in block_size 128
    assert code == 0 and err == "(cut: the context is full, block_size 128; /reset starts afresh)\n"


@pytest.mark.parametrize("tokens, flag, warned", [(2_024, "", True), (2_024, "--mask=causal", False),
                                                  (50_500, "", False)])
def test_a_chat_of_weights_barely_fine_tuned_under_another_mask_suggests_causal(tmp_path, monkeypatch, capsys,
                                                                               tokens, flag, warned):
    """A pretrained (causal) model after a few steps under ISM still answers as a causal model, and badly under
    ISM: the chat says so when it starts, until the run has trained as many tokens as the fine-tunes measured."""
    save_checkpoint({"model": MODEL.state_dict(), "model_args": dataclasses.asdict(CONFIG), "config": {},
                     "tokenizer": TOK.describe(), "mask": "ism", "iter_num": 4, "best_val_loss": 0.0,
                     "start": "smollm2", "tokens": {"tokens": tokens, "answer_tokens": tokens // 6}},
                    str(tmp_path / "ckpt.pt"))
    code, out, err = cli([f"--out_dir={tmp_path}", "--temperature=0", "--max_new_tokens=2", *filter(None, [flag])],
                         f"{USERS[0]}\n", monkeypatch, capsys)
    note = (f"note: these weights trained only {tokens:,} tokens under ism after starting from smollm2: they may "
            "answer badly under ism; try --mask=causal\n")
    assert code == 0 and (note in err) == warned, err
