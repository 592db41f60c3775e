"""Tests for reading input lines (data/chat.py): odd JSON values are file:line: errors, never crashes."""
import json

import pytest

from data.chat import DataError, read_jsonl

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


def test_skip_bad_skips_odd_values(tmp_path):
    path = write_lines(tmp_path / "chats.jsonl", [GOOD, *ODD_LINES.values(), GOOD])
    conversations, bad = read_jsonl(path, skip_bad=True)
    assert conversations == [json.loads(GOOD)] * 2
    assert [n for n, _ in bad] == list(range(2, 2 + len(ODD_LINES)))


def test_a_long_unknown_role_is_shortened_in_the_error(tmp_path):
    role = "x" * 10_000
    line = json.dumps({"messages": [{"role": role, "content": "a"}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(DataError, match="unknown role 'x+'") as error:
        read_jsonl(write_lines(tmp_path / "chats.jsonl", [line]))
    assert len(str(error.value)) < 300
