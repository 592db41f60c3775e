"""
The BYU Chit-Chat Challenge corpus (pip package chitchat-dataset, MIT licence): real people chatting in pairs,
turned into training conversations.

    python prepare.py --input=chitchat                # the installed package's dataset.json -> data/chitchat/
    python prepare.py --input=PATH/dataset.json       # any file of its format

The file is one JSON object keyed by conversation id, each {"prompt": topic (sometimes missing), "start",
"ratings", "messages": [[{"text", "timestamp", "sender"}, ...], ...]}, an inner list being one turn: consecutive
messages of one sender. A conversation becomes {"id", "messages": [...]} in the chat format of data/chat.py:

- only conversations with exactly two senders: the two roles are two people;
- the first speaker is the user, the other the assistant: the first opens the conversation on its topic and the
  other responds, so every answer has a turn to answer. A trailing user turn is dropped: it has no answer to train;
- a speaker's consecutive messages (and turns) are one turn, joined by "\\n"; blank texts are dropped;
- the topic prompt, when there is one, is the system message: it tells the model what the two were asked to talk
  about (and without it ChatML tokenizers put their model's default system message there);
- each passes data/chat.py's validate(), as a JSONL line does, and keeps its id (train.jsonl and val.jsonl say
  where every conversation came from).

The split is by a hash of the id, not a shuffle: a conversation lands in the same split whatever else the file
holds and in whatever order. Bad input is a DataError naming the file (and the conversation), never a traceback.
"""
import hashlib
import importlib.util
import json
import os
from collections import Counter
from itertools import groupby

from data.chat import json_value, plural, shorten, validate
from cli.errors import DataError, reason

NAME = "chitchat"  # --input=chitchat: the installed package's file (a file called chitchat is ./chitchat)
# What reading a file counts, besides its conversations and those converted: see read().
COUNTS = ("not_two_speakers", "too_few_turns", "blank_texts", "unanswered_last_turns")


def package_file():
    """The dataset.json that the chitchat-dataset package ships (found without importing it)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.origin:
        raise DataError(f"--input={NAME} reads the chitchat-dataset package's file, and it is not installed: pip "
                        "install chitchat-dataset (or pass --input=PATH to its dataset.json)")
    return os.path.join(os.path.dirname(spec.origin), "dataset.json")


def read(input):
    """-> (conversations, counts) when input is chitchat or a file of this format, else None: the caller reads it
    as JSONL. counts: the file, its conversations, how many were converted, and COUNTS, what was dropped and why."""
    path = package_file() if input == NAME else input
    records = _records(path)
    if records is None:
        return None
    tally, conversations = Counter(), []
    for conversation_id, record in records.items():
        conversation = _conversation(conversation_id, record, f"{path}: conversation {shorten(conversation_id)}",
                                     tally)
        if conversation is not None:
            conversations.append(conversation)
    counts = {"file": path, "conversations": len(records), "converted": len(conversations)}
    return conversations, {**counts, **{key: tally[key] for key in COUNTS}}


# ----------------------------------------------------------------------------------------------- the file itself

def _records(path):
    """The file's object of conversations, or None for JSONL. Recognised by content (one JSON object whose values
    hold "messages"), or by a .json name: a .json file is this format unless it holds JSONL, so that its problems
    are told as this format's (not JSON, not an object). Any other file is left to the JSONL reader."""
    try:
        with open(path, "rb") as f:
            raw = f.read().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as read_jsonl allows
    except OSError as e:
        raise DataError(f"cannot read {path}: {reason(e)}") from None
    json_name = path.lower().endswith(".json")
    try:
        value = json_value(raw, path)
    except DataError:
        if json_name and not _first_line_is_an_object(raw):
            raise
        return None
    if _is_jsonl_line(value):
        return None
    if isinstance(value, dict) and any(isinstance(v, dict) and "messages" in v for v in value.values()):
        return value
    if not json_name:
        return None
    if not isinstance(value, dict):
        raise DataError(f"{path}: not an object of conversations keyed by id")
    return value


def _first_line_is_an_object(raw):
    """Whether the first non-blank line is a JSON object by itself: JSONL, whatever the file's name."""
    first = raw.lstrip().partition(b"\n")[0]
    try:
        return isinstance(json.loads(first), dict)
    except (ValueError, RecursionError):
        return False


def _is_jsonl_line(value):
    """A file holding one JSONL line is one JSON object too: one conversation, not an object of them."""
    return isinstance(value, dict) and ("messages" in value or "conversations" in value)


# ------------------------------------------------------------------------------------------------ conversations

def _conversation(conversation_id, record, where, tally):
    """One conversation of the file -> {"id", "messages"}, or None when it is dropped; tally counts why, and the
    blank texts and unanswered last turns left out."""
    said = _said(record, where)
    if len({sender for sender, _ in said}) != 2:
        tally["not_two_speakers"] += 1
        return None
    texts = [(sender, text) for sender, text in said if text.strip()]
    tally["blank_texts"] += len(said) - len(texts)
    turns = [(sender, "\n".join(text for _, text in run)) for sender, run in groupby(texts, key=lambda m: m[0])]
    if len(turns) < 2:  # a speaker said nothing but blanks: no user turn with an answer
        tally["too_few_turns"] += 1
        return None
    if len(turns) % 2:  # the user (first speaker) has the last word
        turns.pop()
        tally["unanswered_last_turns"] += 1
    messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, (_, text) in enumerate(turns)]
    if (record.get("prompt") or "").strip():
        messages.insert(0, {"role": "system", "content": record["prompt"]})
    validate(messages, where)
    return {"id": conversation_id, "messages": messages}


def _said(record, where):
    """[(sender, text)] of a conversation, every message in order, once its shape is checked (prompt included)."""
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
                raise DataError(f'{where}: turn {turn_number} message {number} is not an object with a string '
                                '"text" and "sender"')
            said.append((message["sender"], message["text"]))
    return said


# ---------------------------------------------------------------------------------------------------- the split

def split_by_id(kept, val_fraction):
    """kept = [(conversation, was cut)] -> (train, val), each in the order of the ids' hashes. A conversation is in
    val when its id hashes below val_fraction, so adding or reordering others never moves it; only when that would
    leave a split empty does the lowest (or highest) hash move over, as train and val need one each."""
    ranked = sorted(kept, key=lambda item: _rank(item[0]["id"]))
    n_val = sum(_rank(conversation["id"]) < val_fraction for conversation, _ in ranked)
    n_val = min(max(n_val, 1), len(ranked) - 1)
    return ranked[n_val:], ranked[:n_val]


def _rank(conversation_id):
    """A conversation id -> a number in [0, 1), the same on every machine and Python (sha256, unlike hash())."""
    digest = hashlib.sha256(conversation_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def describe(counts):
    """The line of prepare.py's summary that says what reading the file kept and dropped."""
    return (f"read {counts['file']}: {counts['converted']} of {plural(counts['conversations'], 'conversation')} "
            f"converted; dropped {counts['not_two_speakers']} without exactly two speakers and "
            f"{counts['too_few_turns']} with too few turns (no user turn and answer); left out "
            f"{plural(counts['blank_texts'], 'blank text')} and "
            f"{plural(counts['unanswered_last_turns'], 'unanswered last turn')}")
