"""Tests for reading a prepared folder back (data/store.py): each kind of damage is one line naming the file."""
import json
import os
import shutil

import numpy as np
import pytest

from cli.errors import DataError
from data.prepare import prepare
from data.store import load_meta, load_split


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    prepare(str(folder), n_train=8, n_val=3, seed=4)
    return folder


@pytest.fixture
def folder(prepared, tmp_path):
    """A fresh copy of the prepared folder, to damage."""
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    return copy


def edit_meta(folder, change):
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def assert_one_line_naming(error, path):
    message = str(error.value)
    assert str(path) in message and "python prepare.py" in message
    assert "\n" not in message


# damage -> (what the error says, what is done to the folder)
META_DAMAGE = {
    "not JSON": ("not JSON", lambda f: (f / "meta.json").write_text('{"splits": ')),
    "not UTF-8": ("not JSON", lambda f: (f / "meta.json").write_bytes(b"\xff\xfe{}")),
    "a list": ("not a JSON object", lambda f: (f / "meta.json").write_text("[1, 2]")),
    "no vocab_size": ('"vocab_size"', lambda f: edit_meta(f, lambda m: m.pop("vocab_size"))),
    "vocab_size a string": ('"vocab_size"', lambda f: edit_meta(f, lambda m: m.update(vocab_size="261"))),
    "no tokenizer": ('"tokenizer"', lambda f: edit_meta(f, lambda m: m.pop("tokenizer"))),
    "tokenizer a string": ('"tokenizer"', lambda f: edit_meta(f, lambda m: m.update(tokenizer="byte"))),
    "no splits": ('"splits"', lambda f: edit_meta(f, lambda m: m.pop("splits"))),
    "no val split": ('"splits"', lambda f: edit_meta(f, lambda m: m["splits"].pop("val"))),
    "no max_tokens": ('"max_tokens"', lambda f: edit_meta(f, lambda m: m["splits"]["train"].pop("max_tokens"))),
    # what train.py's data fingerprint and eval.py read
    "no conversations":
        ('"conversations"', lambda f: edit_meta(f, lambda m: m["splits"]["train"].pop("conversations"))),
    "tokens a string": ('"tokens"', lambda f: edit_meta(f, lambda m: m["splits"]["val"].update(tokens="900"))),
    "conversations zero":
        ('"conversations"', lambda f: edit_meta(f, lambda m: m["splits"]["val"].update(conversations=0))),
    "a split a list": ('"val"', lambda f: edit_meta(f, lambda m: m["splits"].update(val=[]))),
    "a third split": ('"splits"', lambda f: edit_meta(f, lambda m: m["splits"].update(test=m["splits"]["val"]))),
    "no block_size": ('"block_size"', lambda f: edit_meta(f, lambda m: m.pop("block_size"))),
    "block_size a float": ('"block_size"', lambda f: edit_meta(f, lambda m: m.update(block_size=512.0))),
    "block_size below max_tokens": ('"block_size"', lambda f: edit_meta(f, lambda m: m.update(block_size=5))),
    "tokenizer name a number": ('"tokenizer"', lambda f: edit_meta(f, lambda m: m["tokenizer"].update(name=1))),
    "tokenizer of another vocab_size":
        ('"vocab_size"', lambda f: edit_meta(f, lambda m: m["tokenizer"].update(vocab_size=VOCAB_SIZE + 1))),
    "unknown tokenizer": ("'foo'", lambda f: edit_meta(f, lambda m: m["tokenizer"].update(name="foo"))),
    "a .gguf file that is not there":
        ("nowhere.gguf", lambda f: edit_meta(f, lambda m: m["tokenizer"].update(name=str(f / "nowhere.gguf")))),
    "a folder without tokenizer.json":
        ("tokenizer.json", lambda f: edit_meta(f, lambda m: m["tokenizer"].update(name=str(f)))),
}


@pytest.mark.parametrize("damage", list(META_DAMAGE))
def test_damaged_meta_json_is_one_line(folder, damage):
    said, change = META_DAMAGE[damage]
    change(folder)
    for load in (lambda: load_meta(str(folder)), lambda: load_split(str(folder), "train")):
        with pytest.raises(DataError) as error:
            load()
        assert_one_line_naming(error, folder / "meta.json")
        assert said in str(error.value)


def truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def rewrite(path, change, dtype=None):
    """Save change(a copy of the array at path), as a plain .npy file like prepare's."""
    array = np.array(np.load(path), dtype=dtype)
    np.save(path, change(array))


def set_first(value, dtype=None):
    def change(path):
        rewrite(path, lambda a: np.r_[np.array([value], a.dtype), a[1:]], dtype)
    return change


def swap_second_and_third(array):
    array[[1, 2]] = array[[2, 1]]
    return array


VOCAB_SIZE = 256 + 5  # byte tokens and the five chat specials

# damage -> (the file damaged, what is done to it)
ARRAY_DAMAGE = {
    "missing": ("train_roles", lambda p: p.unlink()),
    "empty": ("val_ids", lambda p: truncate(p, 0)),
    "header cut": ("train_ids", lambda p: truncate(p, 20)),
    "data cut": ("train_ids", lambda p: truncate(p, os.path.getsize(p) - 2)),
    "float ids": ("train_ids", lambda p: rewrite(p, lambda a: a, np.float32)),
    "2-D offsets": ("val_offsets", lambda p: rewrite(p, lambda a: a[:, None])),
    "roles shorter than ids": ("train_roles", lambda p: rewrite(p, lambda a: a[:-1])),
    "offsets not from 0": ("train_offsets", lambda p: rewrite(p, lambda a: a + 1)),
    "offsets not increasing": ("train_offsets", lambda p: rewrite(p, swap_second_and_third)),
    "offsets short of the end": ("val_offsets", lambda p: rewrite(p, lambda a: a[:-1])),
    "no conversation": ("val_offsets", lambda p: rewrite(p, lambda a: a[:1])),
    "token id = vocab_size": ("train_ids", set_first(VOCAB_SIZE)),
    "negative token id": ("val_ids", set_first(-1, np.int32)),
    "role code 3": ("val_roles", set_first(3)),
    # role codes: 0 system, 1 user, 2 assistant (an answer token); prepare's every conversation ends with an answer
    "no answer tokens": ("val_roles", lambda p: rewrite(p, lambda a: np.minimum(a, 1))),
}


@pytest.mark.parametrize("damage", list(ARRAY_DAMAGE))
def test_damaged_arrays_are_one_line(folder, damage):
    name, change = ARRAY_DAMAGE[damage]
    path = folder / f"{name}.npy"
    change(path)
    with pytest.raises(DataError) as error:
        load_split(str(folder), name.split("_")[0])
    assert_one_line_naming(error, path)


# meta.json's count -> how to count it in the arrays (each conversation is offsets[i]..offsets[i + 1])
COUNTS = {"conversations": ("offsets", lambda split: len(split.offsets) - 1),
          "tokens": ("ids", lambda split: len(split.ids)),
          "max_tokens": ("offsets", lambda split: max(int(b - a) for a, b in zip(split.offsets, split.offsets[1:])))}


@pytest.mark.parametrize("count", list(COUNTS))
def test_counts_in_meta_json_must_match_the_arrays(folder, count):
    name, measure = COUNTS[count]
    true_count = measure(load_split(str(folder), "train"))
    edit_meta(folder, lambda m: m["splits"]["train"].update({count: true_count + 1}))
    with pytest.raises(DataError) as error:
        load_split(str(folder), "train")
    assert_one_line_naming(error, folder / f"train_{name}.npy")
    assert f'"{count}"' in str(error.value)


@pytest.mark.parametrize("name", ["byte", "gpt2", "smollm2", "model.gguf", "hf-folder"])
def test_a_tokenizer_that_can_be_built_is_accepted_without_building_it(folder, name):
    (folder / "model.gguf").write_bytes(b"")  # only looked for: building it would fail
    (folder / "hf-folder").mkdir()
    (folder / "hf-folder" / "tokenizer.json").write_text("{}")
    path = name if name in ("byte", "gpt2", "smollm2") else str(folder / name)
    edit_meta(folder, lambda m: m["tokenizer"].update(name=path))
    assert load_meta(str(folder))["tokenizer"]["name"] == path


def test_the_undamaged_copy_loads(folder):
    assert load_meta(str(folder))["vocab_size"] == VOCAB_SIZE
    for name in ("train", "val"):
        load_split(str(folder), name)


class Unpickled:
    """Leaves a file behind if it is ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_an_object_array_is_refused_without_unpickling(folder, tmp_path):
    path, marker = folder / "train_ids.npy", tmp_path / "unpickled"
    np.save(path, np.array([Unpickled(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(DataError) as error:
        load_split(str(folder), "train")
    assert_one_line_naming(error, path)
    assert not marker.exists()
