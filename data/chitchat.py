"""
The BYU Chit-Chat Challenge corpus (pip package chitchat-dataset, MIT licence), people chatting in
pairs, as training conversations (python prepare.py --input=chitchat, or --input=PATH of a file of
its format). The file is one JSON object keyed by conversation id, each {"prompt": topic,
"messages": [[{"text", "sender", ...}, ...], ...]} (an inner list is one turn). Kept: conversations
of exactly two senders. The first speaker, who opens the topic, is the user, so every answer has a
turn to answer; a last unanswered turn is dropped, as are blank texts; a speaker's consecutive
messages are one turn. The topic is the system message. The split is by a hash of the id.
"""
import hashlib
import importlib.util
import json
import os
from collections import Counter
from itertools import groupby

from cli.errors import DataError
from data.chat import json_value, plural, read_bytes, shorten, validate

NAME = "chitchat"  # --input=chitchat: the package's file (a file called chitchat is ./chitchat)
COUNTS = ("not_two_speakers", "too_few_turns", "blank_texts", "unanswered_last_turns")  # dropped


def package_file():
    """The dataset.json the chitchat-dataset package ships (found without importing it)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.origin:
        raise DataError(f"--input={NAME} reads the chitchat-dataset package's file, and it is not "
                        "installed: pip install chitchat-dataset (or pass --input=PATH to its "
                        "dataset.json)")
    return os.path.join(os.path.dirname(spec.origin), "dataset.json")


def read(input):
    """-> (conversations, counts) for chitchat or a file of its format, else None (JSONL)."""
    path = package_file() if input == NAME else input
    records = _records(path)
    if records is None:
        return None
    tally = Counter(dict.fromkeys(COUNTS, 0))
    converted = (_conversation(key, record, f"{path}: conversation {shorten(key)}", tally)
                 for key, record in records.items())
    conversations = [conversation for conversation in converted if conversation is not None]
    return conversations, {"file": path, "conversations": len(records),
                           "converted": len(conversations), **tally}


def _records(path):
    """The file's object of conversations, or None for JSONL. Told by content (one object whose
    values hold "messages") or by a .json name: such a file is this format unless it holds JSONL,
    so its problems are told as this format's."""
    raw = read_bytes(path)
    json_name = path.lower().endswith(".json")
    try:
        value = json_value(raw, path)
    except DataError:
        if json_name and not _first_line_is_an_object(raw):
            raise
        return None
    if isinstance(value, dict) and ("messages" in value or "conversations" in value):
        return None  # a file of one JSONL line: one conversation, not an object of them
    if isinstance(value, dict) and any(isinstance(v, dict) and "messages" in v
                                       for v in value.values()):
        return value
    if not json_name:
        return None
    if not isinstance(value, dict):
        raise DataError(f"{path}: not an object of conversations keyed by id")
    return value


def _first_line_is_an_object(raw):  # then it is JSONL, whatever the file's name
    try:
        return isinstance(json.loads(raw.lstrip().partition(b"\n")[0]), dict)
    except (ValueError, RecursionError):
        return False


def _conversation(conversation_id, record, where, tally):
    """One conversation of the file -> {"id", "messages"}, or None when dropped; tally says why."""
    said = _said(record, where)
    if len({sender for sender, _ in said}) != 2:
        tally["not_two_speakers"] += 1
        return None
    texts = [(sender, text) for sender, text in said if text.strip()]
    tally["blank_texts"] += len(said) - len(texts)
    turns = ["\n".join(text for _, text in run) for _, run in groupby(texts, key=lambda m: m[0])]
    if len(turns) < 2:  # a speaker said nothing but blanks
        tally["too_few_turns"] += 1
        return None
    if len(turns) % 2:  # the user (first speaker) has the last word
        turns.pop()
        tally["unanswered_last_turns"] += 1
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    if (record.get("prompt") or "").strip():
        messages.insert(0, {"role": "system", "content": record["prompt"]})
    validate(messages, where)
    return {"id": conversation_id, "messages": messages}


def _said(record, where):
    """[(sender, text)] of every message in order, once the record's shape is checked."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError(f'{where}: not an object with a "messages" list of turns')
    if not isinstance(record.get("prompt", ""), (str, type(None))):
        raise DataError(f'{where}: "prompt" is not a string')
    said = []
    for turn_number, turn in enumerate(record["messages"], 1):
        if not isinstance(turn, list):
            raise DataError(f"{where}: turn {turn_number} is not a list of messages")
        for number, message in enumerate(turn, 1):
            if not (isinstance(message, dict) and isinstance(message.get("text"), str) and
                    isinstance(message.get("sender"), str)):
                raise DataError(f"{where}: turn {turn_number} message {number} is not an object "
                                'with a string "text" and "sender"')
            said.append((message["sender"], message["text"]))
    return said


def split_by_id(kept, val_fraction):
    """kept = [(conversation, was cut)] -> (train, val), by the ids' hashes: an id that hashes below
    val_fraction is in val whatever the others, unless a split would be empty."""
    ranked = sorted(kept, key=lambda item: _rank(item[0]["id"]))
    n_val = sum(_rank(conversation["id"]) < val_fraction for conversation, _ in ranked)
    n_val = min(max(n_val, 1), len(ranked) - 1)
    return ranked[n_val:], ranked[:n_val]


def _rank(conversation_id):
    """An id -> a number in [0, 1), the same on every machine (sha256, unlike hash())."""
    digest = hashlib.sha256(conversation_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def describe(counts):
    """prepare.py's summary line of what reading the file kept and dropped."""
    return (f"read {counts['file']}: {counts['converted']} of "
            f"{plural(counts['conversations'], 'conversation')} converted; dropped "
            f"{counts['not_two_speakers']} without exactly two speakers and "
            f"{counts['too_few_turns']} with too few turns (no user turn and answer); left out "
            f"{plural(counts['blank_texts'], 'blank text')} and "
            f"{plural(counts['unanswered_last_turns'], 'unanswered last turn')}")
