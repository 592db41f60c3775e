"""Tests for data/: tokenizer, chat rendering and validation, synthetic tasks, prepare, batching."""
import dataclasses
import inspect
import json
import os
import random
import re

import numpy as np
import pytest
import tiktoken

from data import synthetic
from data.bpe import BPE, BYTE_TO_CHAR, GPT2_PATTERN
from data.batching import collate, documents, epoch_rows, expansion_factor, pack
from data.chat import fit_to_block, read_jsonl, render, render_answer, render_start, render_system, render_user, validate
from cli.errors import DataError
from data.prepare import PrepareConfig, main as prepare_main, prepare
from data.store import Split, load_meta, load_split
from data.tokenizer import SPECIAL_TOKENS, get_tokenizer, tokenizer_from_description
from mask import ASSISTANT, SYSTEM, USER

LETTER_ROLES = {"S": SYSTEM, "U": USER, "A": ASSISTANT}


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("byte")


def msgs(*pairs):
    """msgs(("user", "hi"), ("assistant", "yo")) -> list of message dicts."""
    return [{"role": role, "content": content} for role, content in pairs]


def make_split(conversations, tok):
    """An in-memory Split, built here by concatenating renders (independently of data/prepare.py)."""
    ids, roles, offsets = [], [], [0]
    for messages in conversations:
        conv_ids, conv_roles = render(messages, tok)
        ids += conv_ids
        roles += conv_roles
        offsets.append(len(ids))
    return Split(np.array(ids, np.uint16), np.array(roles, np.uint8), np.array(offsets, np.int64))


# ---------------------------------------------------------------------------------------------------- tokenizer

def test_byte_tokenizer_round_trips_any_text(tok):
    for text in ["hello world", "", "  spaces\tand\nnewlines ", "héllo wörld ✓ 日本語 🙂", "<|end|> <|bos|>"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    specials = [tok.bos, tok.system, tok.user, tok.assistant, tok.end]
    assert sorted(specials) == list(range(256, 261))
    assert [tok.token_bytes(i).decode() for i in specials] == list(SPECIAL_TOKENS)


def test_typed_special_tokens_are_plain_bytes(tok):
    text = "".join(SPECIAL_TOKENS)
    assert tok.encode(text) == list(text.encode("utf-8"))
    ids, roles = render(msgs(("user", "x <|end|><|assistant|> y"), ("assistant", "<|user|>")), tok)
    # exactly the structural specials: bos, one user header, two ends, one assistant header
    assert [i for i in ids if i >= 256] == [tok.bos, tok.user, tok.end, tok.assistant, tok.end]
    assert tok.decode(ids) == "<|bos|><|user|>x <|end|><|assistant|> y<|end|><|assistant|><|user|><|end|>"


def test_tokenizer_description_round_trip_and_mismatch(tok):
    desc = json.loads(json.dumps(tok.describe()))
    assert tokenizer_from_description(desc).describe() == tok.describe()
    desc["special_ids"]["<|end|>"] = 3
    with pytest.raises(DataError, match="differs"):
        tokenizer_from_description(desc)
    with pytest.raises(DataError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


def test_gpt2_offline_is_a_one_line_error(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")  # what requests raises: an OSError
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="--tokenizer=byte"):
        get_tokenizer("gpt2")


def test_gpt2_appends_specials_after_its_vocabulary(monkeypatch):
    fake = tiktoken.Encoding(name="gpt2", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.name == "gpt2" and gpt2.vocab_size == 262
    assert [gpt2.bos, gpt2.system, gpt2.user, gpt2.assistant, gpt2.end] == list(range(257, 262))


# ---------------------------------------------------------------------------------------------------- rendering

WORKED = msgs(("system", "ab"), ("user", "c"), ("assistant", "de"), ("user", "f"), ("assistant", "g"))


def test_render_text_round_trip(tok):
    ids, _ = render(WORKED, tok)
    assert tok.decode(ids) == ("<|bos|><|system|>ab<|end|><|user|>c<|end|><|assistant|>de<|end|>"
                               "<|user|>f<|end|><|assistant|>g<|end|>")


def test_roles_of_a_worked_example(tok):
    _, roles = render(WORKED, tok)
    # bos + system header, a, b, end: S | user header, c, end, assistant header: U | d, e, end: A |
    # user header, f, end, assistant header: U | g, end: A
    expected = "SSSSS" + "UUUU" + "AAA" + "UUUU" + "AA"
    assert roles == [LETTER_ROLES[c] for c in expected]
    _, roles = render(WORKED[1:], tok)  # without a system message, bos opens the first user segment
    assert roles == [LETTER_ROLES[c] for c in "U" + expected[5:]]


def random_conversation(rng):
    """Random messages with awkward text: unicode, typed specials, whitespace."""
    words = ["a", "7", "é", "🙂", "<|end|>", "<|assistant|>", " ", "\n", "sort", "日本"]
    def text():
        return "".join(rng.choice(words) for _ in range(rng.randint(1, 6))).strip() or "x"
    messages = msgs(("system", text())) if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 5)):
        messages += msgs(("user", text()), ("assistant", text()))
    return messages


def test_prompt_is_a_prefix_of_the_full_render(tok):
    rng = random.Random(0)
    conversations = [random_conversation(rng) for _ in range(100)]
    conversations += [c["messages"] for c in synthetic.generate(100, seed=5)]
    for messages in conversations:
        full_ids, full_roles = render(messages, tok)
        for i, message in enumerate(messages):
            if message["role"] != "user":
                continue
            ids, roles = render(messages[:i + 1], tok)  # the inference prompt for this turn
            assert full_ids[:len(ids)] == ids and full_roles[:len(roles)] == roles
            assert ids[-1] == tok.assistant and roles[-1] == USER
            assert full_roles[len(ids)] == ASSISTANT  # the answer starts right after the prompt


def test_render_is_the_concatenation_of_its_pieces(tok):
    """How the sampler builds a conversation: piece by piece, answers from generated ids."""
    ids, roles = render_start(SYSTEM, tok)
    for piece in (render_system("ab", tok), render_user("c", tok), render_answer(tok.encode("de"), tok),
                  render_user("f", tok), render_answer("g", tok)):
        ids, roles = ids + piece[0], roles + piece[1]
    assert (ids, roles) == render(WORKED, tok)


# --------------------------------------------------------------------------------------------------- validation

GOOD = json.dumps({"messages": msgs(("user", "hi"), ("assistant", "yo"))})

BAD_LINES = {
    "bad JSON": '{"messages": [',
    'expected an object with a "messages" list': "[1, 2]",
    '"messages" must be a non-empty list': '{"messages": "hi"}',
    'must be a non-empty list': '{"messages": []}',
    'message 1 is not an object with "role" and "content"': '{"messages": ["hi"]}',
    "message 2 has unknown role 'bot'": json.dumps({"messages": msgs(("user", "a"), ("bot", "b"))}),
    "message 2 is 'user' where 'assistant' belongs": json.dumps({"messages": msgs(("user", "a"), ("user", "b"))}),
    "message 1 is 'assistant' where 'user' belongs": json.dumps({"messages": msgs(("assistant", "a"))}),
    "message 3 is 'system' where 'user' belongs":
        json.dumps({"messages": msgs(("user", "a"), ("assistant", "b"), ("system", "c"))}),
    "message 2 has empty content": json.dumps({"messages": msgs(("user", "a"), ("assistant", " \n"))}),
    "message 1 has non-string content (int)": json.dumps({"messages": msgs(("user", 5), ("assistant", "b"))}),
    "no assistant turn": json.dumps({"messages": msgs(("system", "s"), ("user", "a"))}),
    "ends with a user message": json.dumps({"messages": msgs(("user", "a"), ("assistant", "b"), ("user", "c"))}),
    '"tasks" must be a list of 1 string, one per': json.dumps({"messages": msgs(("user", "a"), ("assistant", "b")),
                                                              "tasks": ["x", "y"]}),
    '"tasks" must be a list of 2 strings, one per':
        json.dumps({"messages": msgs(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
                    "tasks": ["x"]}),
}


@pytest.mark.parametrize("problem", list(BAD_LINES))
def test_each_validation_error_names_file_and_line(tmp_path, problem):
    path = tmp_path / "chats.jsonl"
    path.write_text(GOOD + "\n" + BAD_LINES[problem] + "\n" + GOOD + "\n")
    with pytest.raises(DataError) as error:
        read_jsonl(str(path))
    assert str(error.value).startswith(f"{path}:2: ")
    assert problem in str(error.value)
    assert "\n" not in str(error.value)


def test_non_utf8_line_and_missing_file(tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not UTF-8")):
        read_jsonl(str(path))
    with pytest.raises(DataError, match="nope.jsonl"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


def test_a_utf8_bom_is_not_part_of_the_first_line(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    conversations, _ = read_jsonl(str(path))
    assert conversations == [json.loads(GOOD)] * 2


def test_a_prompt_needs_no_answer():
    validate(msgs(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c")), "prompt", need_answer=False)
    with pytest.raises(DataError, match="^prompt: message 2 is 'user'"):
        validate(msgs(("user", "a"), ("user", "c")), "prompt", need_answer=False)


def test_skip_bad_collects_line_numbers_and_problems(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join([GOOD, BAD_LINES["bad JSON"], "", GOOD, BAD_LINES["no assistant turn"]]) + "\n")
    conversations, bad = read_jsonl(str(path), skip_bad=True)
    assert len(conversations) == 2
    assert [n for n, _ in bad] == [2, 5]
    assert bad[0][1].startswith("bad JSON") and bad[1][1] == "no assistant turn"


# --------------------------------------------------------------------------------------------- fitting to block

def test_fit_to_block_cuts_whole_turns_from_the_end(tok):
    conversation = {"messages": msgs(("system", "sys"), ("user", "u1"), ("assistant", "a1"), ("user", "uu2"),
                                     ("assistant", "a2"), ("user", "u3"), ("assistant", "aaa3")),
                    "tasks": ["t1", "t2", "t3"]}
    # byte tokens: bos 1, system 1+3+1, each user 1+len+2, each answer len+1
    head = 1 + 5
    turns = [(1 + 2 + 2) + (2 + 1), (1 + 3 + 2) + (2 + 1), (1 + 2 + 2) + (4 + 1)]
    full = head + sum(turns)
    assert fit_to_block(conversation, tok, full) is conversation
    two_turns = head + turns[0] + turns[1]
    for block_size in (two_turns, full - 1):
        cut = fit_to_block(conversation, tok, block_size)
        assert cut["messages"] == conversation["messages"][:5] and cut["tasks"] == ["t1", "t2"]
    cut = fit_to_block(conversation, tok, two_turns - 1)
    assert cut["messages"] == conversation["messages"][:3] and cut["tasks"] == ["t1"]
    assert len(render(cut["messages"], tok)[0]) <= two_turns - 1
    assert fit_to_block(conversation, tok, head + turns[0] - 1) is None
    assert len(conversation["messages"]) == 7  # the input is left alone


# ---------------------------------------------------------------------------------------------------- synthetic

def key(conversation):
    return json.dumps(conversation["messages"])


def test_synthetic_is_deterministic_and_splits_are_disjoint():
    assert synthetic.generate(60, seed=3) == synthetic.generate(60, seed=3)
    assert synthetic.generate(30, seed=3) == synthetic.generate(60, seed=3)[:30]
    assert synthetic.generate(30, seed=3) != synthetic.generate(30, seed=4)
    train, val = synthetic.splits(400, 50, seed=3)
    assert len(train) == 400 and len(val) == 50
    keys = [key(c) for c in train + val]
    assert len(set(keys)) == len(keys)
    assert synthetic.splits(100, 50, seed=3)[1] == val  # held-out set independent of the train size


def solve(query, facts, state):
    """Answer a synthetic query from its text alone, written independently of the generator."""
    if m := re.fullmatch(r"my (.+) is (\S+)", query):
        facts[m[1]] = m[2]
        return "ok"
    if m := re.fullmatch(r"what is my (.+)\?", query):
        return facts[m[1]]
    if m := re.fullmatch(r"start at (\d+)", query):
        state["value"] = int(m[1])
    elif m := re.fullmatch(r"(add|subtract) (\d+)", query):
        state["value"] += int(m[2]) if m[1] == "add" else -int(m[2])
    elif query in ("double it", "halve it"):
        assert query == "double it" or state["value"] % 2 == 0
        state["value"] = state["value"] * 2 if query == "double it" else state["value"] // 2
    else:
        *items, instruction = query.split(" ")
        if instruction in ("max", "min"):
            assert 4 <= len(items) <= 10 and all(x in "0123456789" for x in items)
            return sorted(items)[-1 if instruction == "max" else 0]
        assert instruction in ("sort", "reverse") and 3 <= len(items) <= 8
        return " ".join(sorted(items) if instruction == "sort" else items[::-1])
    assert 0 <= state["value"] <= 99
    return str(state["value"])


def test_synthetic_answers_are_correct(tok):
    seen_families, turn_counts = set(), set()
    for conversation in synthetic.generate(1000, seed=11):
        validate(conversation["messages"], "synthetic")
        facts, state = {}, {}
        body = [m for m in conversation["messages"] if m["role"] != "system"]
        for user, answer in zip(body[::2], body[1::2]):
            assert solve(user["content"], facts, state) == answer["content"]
        assert len(conversation["tasks"]) == len(body) // 2
        seen_families.update(conversation["tasks"])
        turn_counts.add(len(body) // 2)
        assert len(render(conversation["messages"], tok)[0]) < 400
    assert seen_families == set(synthetic.FAMILIES)
    assert turn_counts == set(range(1, 9))


def test_recall_asks_about_facts_from_at_least_two_turns_back():
    for conversation in synthetic.generate(500, seed=12):
        body = [m["content"] for m in conversation["messages"] if m["role"] == "user"]
        given = {}
        for turn, (query, task) in enumerate(zip(body, conversation["tasks"])):
            if m := re.fullmatch(r"my (.+) is \S+", query):
                given[m[1]] = turn
            if task == "recall":
                assert turn - given[re.fullmatch(r"what is my (.+)\?", query)[1]] >= 2


# ----------------------------------------------------------------------------------------------------- batching

# Hand example (byte tokens). Conversation A: bos | <|user|> a b <|end|> <|assistant|> | c <|end|> |
# <|user|> d <|end|> <|assistant|> | e f <|end|>  -> 15 tokens, answers at [6, 8) and [12, 15).
# Conversation B: bos | <|user|> x <|end|> <|assistant|> | y <|end|>  -> 7 tokens at 15..21, answer at [20, 22).
HAND = [msgs(("user", "ab"), ("assistant", "c"), ("user", "d"), ("assistant", "ef")),
        msgs(("user", "x"), ("assistant", "y"))]


def test_documents_and_expansion_factor_on_a_hand_example(tok):
    split = make_split(HAND, tok)
    assert documents(split, "causal") == documents(split, "ism") == [(0, 15, 0), (15, 22, 15)]
    assert documents(split, "prefix") == [(0, 8, 6), (0, 15, 12), (15, 22, 20)]
    assert expansion_factor(split) == pytest.approx((8 + 15 + 7) / (15 + 7))


def test_prefix_rows_train_only_their_own_answer(tok):
    split = make_split(HAND, tok)
    rows = [[(0, 15, 12), (0, 8, 6)]]
    batch = collate(split, rows, block_size=32)
    trained = batch["targets"][0][batch["targets"][0] >= 0].tolist()
    assert tok.decode(trained) == "ef<|end|>" + "c<|end|>"
    assert batch["doc_ids"][0].tolist() == [0] * 15 + [1] * 8 + [2] * 9
    assert batch["positions"][0, :23].tolist() == list(range(15)) + list(range(8))


def check_batch(split, rows, batch, kind):
    """Invariants of a collated batch, checked against the split and the rows it was built from."""
    ids, roles = np.asarray(split.ids), np.asarray(split.roles)
    for b, row in enumerate(rows):
        t = 0
        for doc_id, (start, end, loss_from) in enumerate(row):
            span = slice(t, t + end - start)
            assert batch["idx"][b, span].tolist() == ids[start:end].tolist()
            assert batch["roles"][b, span].tolist() == roles[start:end].tolist()
            assert batch["positions"][b, span].tolist() == list(range(end - start))
            assert (batch["doc_ids"][b, span] == doc_id).all()
            t = span.stop
        assert (batch["doc_ids"][b, t:] == len(row)).all() and (batch["targets"][b, t:] == -1).all()
    doc, tgt, role = batch["doc_ids"], batch["targets"], batch["roles"]
    has = tgt[:, :-1] >= 0
    assert (doc[:, :-1][has] == doc[:, 1:][has]).all()  # a target never reaches into the next document
    assert (role[:, 1:][has] == ASSISTANT).all()
    assert (tgt[:, :-1][has] == batch["idx"][:, 1:][has]).all()
    assert tgt[:, -1].eq(-1).all()
    if kind == "prefix":  # only the document's final answer: no USER token after a target inside its doc
        for b, t in has.nonzero().tolist():
            same_doc = doc[b] == doc[b, t]
            assert not ((role[b] != ASSISTANT) & same_doc)[t + 1:].any()


@pytest.mark.parametrize("kind", ["causal", "ism", "prefix"])
def test_packing_keeps_documents_whole_and_trains_each_answer_token_once(tok, kind):
    split = make_split([c["messages"] for c in synthetic.generate(80, seed=21)], tok)
    block_size = 400
    rows = epoch_rows(split, kind, block_size, seed=1, epoch=0)
    docs = documents(split, kind)
    assert sorted(d for row in rows for d in row) == sorted(docs)
    assert all(sum(end - start for start, end, _ in row) <= block_size for row in rows)
    batch = collate(split, rows, block_size)
    assert all(batch[k].shape == (len(rows), block_size) for k in ("idx", "targets", "positions", "roles", "doc_ids"))
    check_batch(split, rows, batch, kind)
    # every answer token (content and <|end|>) is a target exactly once per epoch, under every mask
    assert int((batch["targets"] >= 0).sum()) == int((np.asarray(split.roles) == ASSISTANT).sum())


def test_epoch_rows_are_deterministic_per_seed_and_epoch(tok):
    split = make_split([c["messages"] for c in synthetic.generate(40, seed=2)], tok)
    rows = epoch_rows(split, "causal", 512, seed=1, epoch=3)
    assert rows == epoch_rows(split, "causal", 512, seed=1, epoch=3)
    assert rows != epoch_rows(split, "causal", 512, seed=1, epoch=4)


def test_pack_refuses_a_document_longer_than_the_block():
    with pytest.raises(DataError, match="block_size=10"):
        pack([(0, 5, 0), (5, 16, 5)], 10, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------------ prepare

def test_prepare_synthetic_end_to_end(tmp_path, tok):
    meta = prepare(str(tmp_path), n_train=40, n_val=6, seed=9)
    assert load_meta(str(tmp_path)) == json.loads(json.dumps(meta))
    assert tokenizer_from_description(meta["tokenizer"]).describe() == tok.describe()
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".pkl", ".pt"))]
    for name, n in (("train", 40), ("val", 6)):
        split = load_split(str(tmp_path), name)
        assert split.ids.dtype == np.uint16 and split.roles.dtype == np.uint8 and split.offsets.dtype == np.int64
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == n == len(split.offsets) - 1 == meta["splits"][name]["conversations"]
        for i, line in enumerate(lines):  # arrays and text agree, conversation by conversation
            ids, roles = render(json.loads(line)["messages"], tok)
            start, end = split.offsets[i], split.offsets[i + 1]
            assert split.ids[start:end].tolist() == ids and split.roles[start:end].tolist() == roles
        assert meta["splits"][name]["tokens"] == len(split.ids)
        assert meta["splits"][name]["prefix_expansion"] == pytest.approx(expansion_factor(split), abs=1e-3)
    train_lines = set((tmp_path / "train.jsonl").read_text().splitlines())
    assert not train_lines & set((tmp_path / "val.jsonl").read_text().splitlines())


def test_prepare_own_data_cuts_drops_and_skips(tmp_path):
    long_answer = "z" * 40
    lines = [json.dumps({"messages": msgs(("user", f"q{i}"), ("assistant", "a"))}) for i in range(8)]
    lines.append(json.dumps({"messages": msgs(("user", "hi"), ("assistant", "a"), ("user", "more"),
                                              ("assistant", long_answer))}))  # cut to its first turn
    lines.append(json.dumps({"messages": msgs(("user", "hi"), ("assistant", long_answer))}))  # dropped
    lines.append(BAD_LINES["bad JSON"])
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    meta = prepare(str(out), input=str(path), block_size=32, skip_bad=True, val_fraction=0.2, seed=0)
    splits = meta["splits"]
    assert meta["skipped_lines"] == 1 and meta["bad_lines"][0][0] == 11
    assert splits["train"]["cut"] + splits["val"]["cut"] == 1
    assert meta["dropped"] == 1
    assert splits["train"]["conversations"] + splits["val"]["conversations"] == 9
    assert all(len(load_split(str(out), s).ids) <= 32 * 9 for s in ("train", "val"))
    assert max(np.diff(load_split(str(out), "train").offsets)) <= 32


def test_prepare_cli_errors_are_one_line(tmp_path, capsys):
    assert prepare_main(["--block_size=big"]) == 2
    assert prepare_main(["--nope=1"]) == 2
    assert prepare_main([f"--input={tmp_path / 'missing.jsonl'}", f"--out_dir={tmp_path}"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and "missing.jsonl" in errors[2]
    with pytest.raises(DataError, match="run python prepare.py"):
        load_split(str(tmp_path), "train")


def test_prepare_has_the_defaults_of_its_command_line():
    signature = inspect.signature(prepare).parameters
    for f in dataclasses.fields(PrepareConfig):
        if f.name not in ("input", "out_dir"):  # empty flag = None argument = the default folder / synthetic
            assert signature[f.name].default == f.default, f.name


def test_an_encoding_with_a_limit_stops_once_past_it_without_the_work_of_the_whole_text(monkeypatch):
    """A text that needs more tokens than a limit (a message too long for the context) is known to, after
    merging at most about the limit's worth of it: never the work of the whole text."""
    a = BYTE_TO_CHAR[ord("a")]
    b = BYTE_TO_CHAR[ord("b")]
    encoder = BPE([BYTE_TO_CHAR[b] for b in range(256)] + [a * 2, a * 4, b * 16], [f"{a} {a}", f"{a * 2} {a * 2}"],
                  [GPT2_PATTERN], [])
    merged = []  # the characters of every piece merged
    merge = encoder._merge
    monkeypatch.setattr(encoder, "_merge", lambda chars: merged.append(len(chars)) or merge(chars))
    assert encoder.encode("a" * 12) == encoder.encode("a" * 12, limit=3) == [257] * 3
    assert encoder.encode("a" * 12, limit=2) is None
    merged.clear()
    assert encoder.encode("a" * 1_000_000, limit=100) is None and merged == []
    assert encoder.encode("a" * 1000, limit=200) is None and merged == []  # 4 a's a token at most (not 16)
    assert encoder.encode("b" + "a" * 1000, limit=200) is None and merged == []  # 16 characters in one token only
    words = " ".join(f"w{i}" for i in range(100_000))
    assert encoder.encode(words, limit=100) is None and sum(merged) < 500  # the first pieces past the limit only
    byte = get_tokenizer("byte")
    encoded = []
    encode_ordinary = byte.enc.encode_ordinary
    monkeypatch.setattr(byte.enc, "encode_ordinary", lambda text: encoded.append(text) or encode_ordinary(text))
    assert byte.encode("x" * 1_000_000, limit=100) is None and encoded == []  # a byte a token: known unencoded
    assert byte.encode("caf\u00e9", limit=5) == byte.encode("caf\u00e9") and byte.encode("caf\u00e9", limit=4) is None
