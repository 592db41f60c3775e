"""Tests for reading input lines (data/chat.py): odd JSON values are file:line: errors, never crashes; ShareGPT
lines read as their OpenAI twins."""
import json
import re
import sys

import numpy as np
import pytest

from data.chat import read_jsonl

from cli.errors import DataError
from data.prepare import prepare
from data.store import load_split

GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})

# Written by hand: json.dumps would refuse some of these, and "\ud800" must reach the file as a JSON escape.
ODD_LINES = {
    "non-string role (list)":
        '{"messages": [{"role": ["user"], "content": "a"}, {"role": "assistant", "content": "b"}]}',
    "message 2 content is not valid Unicode":
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\\ud800"}]}',
    '"tasks" entry 1 is not valid Unicode':
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
        '"tasks": ["\\udfff"]}',
    "JSON nested too deeply": "[" * 100_000 + "]" * 100_000,
    # Python's int() refuses more digits than this (4,300 by default): json.loads raises a plain ValueError
    f"bad JSON (an integer of more than {sys.get_int_max_str_digits()} digits)":
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "id": ' +
        "9" * (sys.get_int_max_str_digits() + 1) + "}",
    'expected an object with a "messages" list': "null",  # JSON's null is a value, not a blank line
    # OpenAI's fine-tuning format: "do not train on this answer", which packing cannot honour
    'message 2 has "weight": 0':
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
        '"weight": 0}]}',
}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("problem", list(ODD_LINES))
def test_odd_values_are_errors_at_file_and_line(tmp_path, problem):
    path = write_lines(tmp_path / "chats.jsonl", [GOOD, ODD_LINES[problem], GOOD])
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    message = str(error.value)
    assert message.startswith(f"{path}:2: ") and problem in message
    assert "\n" not in message and len(message) < 300


def test_a_weight_of_one_trains_as_if_absent(tmp_path):
    weighted = json.loads(GOOD)
    weighted["messages"][1]["weight"] = 1
    path = write_lines(tmp_path / "chats.jsonl", [json.dumps(weighted)])
    assert read_jsonl(path)[0] == [json.loads(GOOD)]


def test_skip_bad_skips_odd_values(tmp_path):
    path = write_lines(tmp_path / "chats.jsonl", [GOOD, *ODD_LINES.values(), GOOD])
    conversations, bad = read_jsonl(path, skip_bad=True)
    assert conversations == [json.loads(GOOD)] * 2
    assert [n for n, _ in bad] == list(range(2, 2 + len(ODD_LINES)))


@pytest.mark.parametrize("problem", list(ODD_LINES))
def test_a_prompt_script_reports_odd_values_the_same_way(tmp_path, problem):
    """sample.py --script reads its prompts with need_answer=False."""
    path = write_lines(tmp_path / "script.jsonl", [GOOD, ODD_LINES[problem]])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: ")):
        read_jsonl(path, need_answer=False)


def test_only_blank_lines_are_ignored(tmp_path):
    path = write_lines(tmp_path / "chats.jsonl", [GOOD, "", "  \t", "null", GOOD])
    conversations, bad = read_jsonl(path, skip_bad=True)
    assert conversations == [json.loads(GOOD)] * 2 and [n for n, _ in bad] == [4]


def test_a_long_unknown_role_is_shortened_in_the_error(tmp_path):
    role = "x" * 10_000
    line = json.dumps({"messages": [{"role": role, "content": "a"}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(DataError, match="unknown role 'x+'") as error:
        read_jsonl(write_lines(tmp_path / "chats.jsonl", [line]))
    assert len(str(error.value)) < 300


# ----------------------------------------------------------------------------------------------------- ShareGPT

def openai_line(*pairs):
    return json.dumps({"messages": [{"role": role, "content": text} for role, text in pairs]})


def sharegpt_line(*pairs):
    return json.dumps({"conversations": [{"from": speaker, "value": text} for speaker, text in pairs]})


# The same conversations in both formats, each ShareGPT speaker name at least once.
TWINS = [
    (openai_line(("user", "hi"), ("assistant", "hello")), sharegpt_line(("human", "hi"), ("gpt", "hello"))),
    (openai_line(("system", "be brief"), ("user", "sort 3 1 2"), ("assistant", "1 2 3"), ("user", "thanks"),
                 ("assistant", "ok")),
     sharegpt_line(("system", "be brief"), ("user", "sort 3 1 2"), ("chatgpt", "1 2 3"), ("human", "thanks"),
                   ("assistant", "ok"))),
    (openai_line(("user", "日本 🙂"), ("assistant", "é")), sharegpt_line(("human", "日本 🙂"), ("gpt", "é"))),
]


def test_sharegpt_lines_read_as_their_openai_twins(tmp_path):
    openai = write_lines(tmp_path / "openai.jsonl", [a for a, _ in TWINS])
    mixed = write_lines(tmp_path / "mixed.jsonl", [b if i % 2 == 0 else a for i, (a, b) in enumerate(TWINS)])
    assert read_jsonl(mixed) == read_jsonl(openai)


def test_sharegpt_lines_prepare_into_the_same_arrays(tmp_path):
    openai = write_lines(tmp_path / "openai.jsonl", [a for a, _ in TWINS])
    sharegpt = write_lines(tmp_path / "sharegpt.jsonl", [b for _, b in TWINS])
    prepare(str(tmp_path / "a"), input=openai, seed=3)
    prepare(str(tmp_path / "b"), input=sharegpt, seed=3)
    for name in ("train", "val"):
        a, b = load_split(str(tmp_path / "a"), name), load_split(str(tmp_path / "b"), name)
        for field in ("ids", "roles", "offsets"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (name, field)
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()


BAD_SHAREGPT = {
    'message 2 is not an object with "from" and "value"': '{"conversations": [{"from": "human", "value": "a"}, '
                                                         '{"from": "gpt"}]}',
    "message 2 has unknown \"from\" 'bot' (expected human, gpt or system)":
        sharegpt_line(("human", "a"), ("bot", "b")),
    'message 1 has a non-string "from" (int)': '{"conversations": [{"from": 1, "value": "a"}]}',
    '"conversations" must be a non-empty list': '{"conversations": "hi"}',
    'message 1 is not an object with "from" and "value"': '{"conversations": ["hi"]}',
    "message 2 has empty content": sharegpt_line(("human", "a"), ("gpt", "  ")),
    "message 2 is 'user' where 'assistant' belongs": sharegpt_line(("human", "a"), ("user", "b")),
    'has both "messages" and "conversations"': '{"messages": [], "conversations": []}',
}


@pytest.mark.parametrize("problem", list(BAD_SHAREGPT))
def test_malformed_sharegpt_lines_are_errors_at_file_and_line(tmp_path, problem):
    path = write_lines(tmp_path / "chats.jsonl", [GOOD, BAD_SHAREGPT[problem]])
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert str(error.value).startswith(f"{path}:2: ") and problem in str(error.value)
