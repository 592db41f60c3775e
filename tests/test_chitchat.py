"""Tests for the Chit-Chat corpus as input (data/chitchat.py, python prepare.py --input=chitchat): who is the
user, what is joined, kept and dropped, cuts at turn boundaries, a split by conversation id, one-line errors, and the
real file of the installed package. Expectations are written out by hand from the format's rules."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from data import chitchat
from cli.errors import DataError
from data.prepare import default_out_dir, main as prepare_main, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def turn(sender, *texts):
    """One turn of the file's format: consecutive messages of one sender."""
    return [{"text": text, "timestamp": "2018-05-02T19:38:15Z", "sender": sender} for text in texts]


def chat(*turns, prompt=None):
    record = {"start": "2018-05-02T19:38:15Z", "ratings": {"witty": 3}, "messages": list(turns)}
    if prompt is not None:
        record["prompt"] = prompt
    return record


LONG = [turn("ann" if i % 2 == 0 else "bob", f"{i:02d}" + "x" * 28) for i in range(10)]  # 30 characters each

CORPUS = {
    # consecutive messages and consecutive turns of one sender, a blank text between two turns of ann, and ann's
    # unanswered last word
    "pair": chat(turn("ann", "hi", "how are you?"), turn("bob", "fine"), turn("bob", "and you?"), turn("ann", "  \n"),
                 turn("ann", "good"), turn("bob", "great"), turn("ann", "bye"), prompt="Talk about dogs"),
    "solo": chat(turn("ann", "anyone there?"), turn("ann", "hello?"), prompt="Pets"),
    "trio": chat(turn("ann", "a"), turn("bob", "b"), turn("cid", "c"), turn("ann", "d")),
    # bob speaks first, so bob is the user; no prompt at all
    "no-prompt": chat(turn("bob", "hello"), turn("ann", "hey")),
    "blank-prompt": chat(turn("ann", "q"), turn("bob", "a"), prompt=" "),
    # bob only ever says something blank: no answer is left
    "no-answer": chat(turn("ann", "anyone?"), turn("bob", ""), turn("ann", "hello?")),
    "long": chat(*LONG),
    "huge": chat(turn("ann", "y" * 200), turn("bob", "ok")),
}
# In byte tokens (data/chat.py's format), <|bos|> is 1 token, a user turn its text + 3 (<|user|> ... <|end|>
# <|assistant|>), an answer its text + 1 (<|end|>): a pair of "long" turns is 33 + 31 = 64 tokens. In 150 tokens,
# two pairs fit (129) and three do not (193); "huge"'s first turn alone (203) does not fit; the rest fit whole.
BLOCK_SIZE = 150


def write_corpus(path, corpus=CORPUS):
    path.write_text(json.dumps(corpus))
    return str(path)


def read_split(folder, name):
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def by_id(folder):
    """{conversation id: (split, messages)} of a prepared folder."""
    return {c["id"]: (name, c["messages"]) for name in ("train", "val") for c in read_split(folder, name)}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------------------------- conversations

def test_speakers_become_user_and_assistant(tmp_path):
    conversations, _ = chitchat.read(write_corpus(tmp_path / "dataset.json"))
    got = {c["id"]: c["messages"] for c in conversations}
    assert sorted(got) == ["blank-prompt", "huge", "long", "no-prompt", "pair"]
    assert got["pair"] == [{"role": "system", "content": "Talk about dogs"}, user("hi\nhow are you?"),
                           assistant("fine\nand you?"), user("good"), assistant("great")]
    assert got["no-prompt"] == [user("hello"), assistant("hey")]
    assert got["blank-prompt"] == [user("q"), assistant("a")]
    assert got["long"] == [(user if i % 2 == 0 else assistant)(f"{i:02d}" + "x" * 28) for i in range(10)]


def test_what_is_dropped_is_counted(tmp_path):
    path = write_corpus(tmp_path / "dataset.json")
    _, counts = chitchat.read(path)
    assert counts == {"file": path, "conversations": 8, "converted": 5, "not_two_speakers": 2, "too_few_turns": 1,
                      "blank_texts": 2, "unanswered_last_turns": 1}


def test_long_conversations_are_cut_at_turn_boundaries(tmp_path):
    out = tmp_path / "out"
    meta = prepare(str(out), input=write_corpus(tmp_path / "dataset.json"), block_size=BLOCK_SIZE, val_fraction=0.5)
    kept = by_id(out)
    assert sorted(kept) == ["blank-prompt", "long", "no-prompt", "pair"]
    assert kept["long"][1] == [user("00" + "x" * 28), assistant("01" + "x" * 28), user("02" + "x" * 28),
                               assistant("03" + "x" * 28)]
    assert meta["dropped"] == 1  # huge
    assert sum(split["cut"] for split in meta["splits"].values()) == 1  # long
    assert meta["chitchat"]["converted"] == 5 and meta["chitchat"]["not_two_speakers"] == 2
    assert meta["splits"]["train"]["conversations"] + meta["splits"]["val"]["conversations"] == 4


def test_the_summary_says_what_was_dropped(tmp_path, capsys):
    path = write_corpus(tmp_path / "dataset.json")
    assert prepare_main([f"--input={path}", f"--out_dir={tmp_path / 'out'}", f"--block_size={BLOCK_SIZE}"]) == 0
    out = capsys.readouterr().out
    assert "5 of 8 conversations converted" in out and "dropped 2 without exactly two speakers" in out
    assert "1 with too few turns" in out and "2 blank texts" in out and "1 unanswered last turn" in out
    assert "dropped 1 conversation whose first turn alone exceeds block_size 150" in out


# ----------------------------------------------------------------------------------------------------- the split

def numbered(n, start=0):
    return {f"conversation-{i}": chat(turn("ann", f"q{i}"), turn("bob", f"a{i}")) for i in range(start, start + n)}


def test_the_split_is_by_id_whatever_else_the_file_holds(tmp_path):
    first = numbered(40)
    prepare(str(tmp_path / "a"), input=write_corpus(tmp_path / "a.json", first), val_fraction=0.3)
    before = {cid: split for cid, (split, _) in by_id(tmp_path / "a").items()}
    assert len(before) == 40 and 0 < list(before.values()).count("val") < 40
    more = dict(reversed(list({**first, **numbered(60, start=40)}.items())))  # other order, more conversations
    prepare(str(tmp_path / "b"), input=write_corpus(tmp_path / "b.json", more), val_fraction=0.3)
    after = {cid: split for cid, (split, _) in by_id(tmp_path / "b").items()}
    assert {cid: after[cid] for cid in first} == before


def test_val_fraction_is_honoured(tmp_path):
    out = tmp_path / "out"
    prepare(str(out), input=write_corpus(tmp_path / "dataset.json", numbered(400)), val_fraction=0.25)
    assert 60 <= len(read_split(out, "val")) <= 140  # 100 expected; a binomial's spread is 9
    prepare(str(out), input=write_corpus(tmp_path / "dataset.json", numbered(20)), val_fraction=0)
    assert len(read_split(out, "val")) == 1 and len(read_split(out, "train")) == 19  # still one held out


# ------------------------------------------------------------------------------------------------ which reader

def test_recognised_by_content_whatever_the_name(tmp_path):
    conversations, _ = chitchat.read(write_corpus(tmp_path / "corpus.txt"))
    assert len(conversations) == 5


@pytest.mark.parametrize("lines", [1, 2])
def test_jsonl_named_json_stays_jsonl(tmp_path, lines):
    line = json.dumps({"messages": [user("hi"), assistant("yo")]})
    path = tmp_path / "chats.json"
    path.write_text("\n".join([line] * lines) + "\n")
    assert chitchat.read(str(path)) is None


def test_chitchat_names_the_installed_package(tmp_path, monkeypatch):
    assert default_out_dir("chitchat") == os.path.join(ROOT, "data", "chitchat")
    assert default_out_dir("chitchat", "smollm2") == os.path.join(ROOT, "data", "chitchat-smollm2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install chitchat-dataset"):
        prepare(str(tmp_path / "out"), input="chitchat")


# ------------------------------------------------------------------------------------------------------ errors

MALFORMED = {
    "bad JSON": '{"c1": {"messages": [',
    "not an object of conversations": '[{"messages": []}]',
    "conversation 'c1': not an object": '{"c1": [1, 2]}',
    "conversation 'c1': turn 1 is not a list": '{"c1": {"messages": [{"text": "a", "sender": "ann"}]}}',
    "conversation 'c2': turn 2 message 1 is not an object with a string": '{"c1": {"messages": [[]]}, "c2": '
                                                                           '{"messages": [[], [{"text": "a"}]]}}',
    "conversation 'c1': turn 1 message 2 is not an object with a string": '{"c1": {"messages": [[{"text": "a", '
                                                                           '"sender": "ann"}, {"text": 5, "sender": '
                                                                           '"bob"}]]}}',
    "conversation 'c1': \"prompt\" is not a string": '{"c1": {"prompt": ["x"], "messages": []}}',
    # the same validation as a JSONL line: a lone surrogate cannot be encoded
    "conversation 'c1': message 2 content is not valid Unicode": '{"c1": {"messages": [[{"text": "a", "sender": '
                                                                  '"ann"}], [{"text": "b\\ud800", "sender": "bob"}]]}}',
    "not UTF-8 text": b'{"c1": {"messages": [[{"text": "\xff", "sender": "ann"}]]}}',
}


@pytest.mark.parametrize("problem", list(MALFORMED))
def test_malformed_files_are_one_line_naming_the_file(tmp_path, problem):
    path = tmp_path / "dataset.json"
    content = MALFORMED[problem]
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as error:
        prepare(str(tmp_path / "out"), input=str(path))
    assert str(error.value).startswith(f"{path}: ") and problem in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_malformed_file_is_one_line_from_the_command_line(tmp_path):
    path = write_corpus(tmp_path / "dataset.json", {"c1": {"messages": "hello"}})
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), f"--input={path}",
                             f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f'error: {path}: conversation \'c1\': not an object with a "messages" list '
                                          "of turns"]


# ------------------------------------------------------------------------------------------------ the real file

@pytest.mark.skipif(importlib.util.find_spec("chitchat_dataset") is None, reason="pip install chitchat-dataset")
def test_the_installed_corpus_prepares_into_thousands_of_chats(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--input=chitchat",
                             "--tokenizer=byte", "--block_size=512", f"--out_dir={out}"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    conversations = read_split(out, "train") + read_split(out, "val")
    assert len(conversations) >= 3000
    for conversation in conversations:
        roles = [m["role"] for m in conversation["messages"]]
        roles = roles[1:] if roles[0] == "system" else roles
        assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) >= 2
