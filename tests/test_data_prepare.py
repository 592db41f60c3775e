"""Tests for data/prepare.py's guards: flag ranges, its own input, fitting before splitting, and a prepared folder
that a failed run leaves as it was."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli.errors import DataError
from data.prepare import PrepareConfig, check_settings, main as prepare_main, prepare
from data.store import load_meta
from data.store import load_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def line(user, answer):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


def write_chats(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_cli(*args):
    """python prepare.py args -> (exit status, stderr lines)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args], capture_output=True,
                            text=True, timeout=120)
    return result.returncode, result.stderr.splitlines()


def snapshot(folder):
    """{file name: bytes} of everything in folder, hidden files included."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


# ------------------------------------------------------------------------------------------------ flag ranges

# flag -> the same setting as prepare()'s argument
BAD_SETTINGS = {"--seed=-1": {"seed": -1}, "--val_fraction=1": {"val_fraction": 1.0},
                "--val_fraction=-0.1": {"val_fraction": -0.1}, "--n_train=0": {"n_train": 0},
                "--n_val=-3": {"n_val": -3}, "--block_size=6": {"block_size": 6},
                "--block_size=-512": {"block_size": -512},
                # sizes no dataset needs, which would run out of memory (or time) instead
                "--n_train=1e12": {"n_train": 10**12}, "--n_val=1e8": {"n_val": 10**8},
                "--max_turns=1e9": {"max_turns": 10**9}, "--block_size=1e9": {"block_size": 10**9}}


@pytest.mark.parametrize("flag", list(BAD_SETTINGS))
def test_out_of_range_settings_are_one_line_and_write_nothing(tmp_path, capsys, flag):
    out = tmp_path / "out"
    name = flag[2:].split("=")[0]
    assert prepare_main([f"--out_dir={out}", "--n_train=4", "--n_val=2", flag]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: --{name}=")
    with pytest.raises(DataError, match=f"^--{name}="):
        prepare(str(out), **{"n_train": 4, "n_val": 2, **BAD_SETTINGS[flag]})
    assert not out.exists()


# flag -> the largest value allowed, as its --help line says it
UPPER_BOUNDS = {"n_train": "10,000,000", "n_val": "10,000,000", "max_turns": "1,000", "block_size": "1,048,576"}


@pytest.mark.parametrize("name", list(UPPER_BOUNDS))
def test_the_upper_bounds_are_allowed_and_in_the_help(tmp_path, capsys, name):
    largest = int(UPPER_BOUNDS[name].replace(",", ""))
    check_settings(PrepareConfig(out_dir=str(tmp_path / "out"), **{name: largest}))
    with pytest.raises(DataError, match=f"^--{name}={largest + 1}: must be at most {largest}$"):
        check_settings(PrepareConfig(out_dir=str(tmp_path / "out"), **{name: largest + 1}))
    with pytest.raises(SystemExit):
        prepare_main(["--help"])
    [help_line] = [text for text in capsys.readouterr().out.splitlines() if text.lstrip().startswith(f"--{name}=")]
    assert UPPER_BOUNDS[name] in help_line


def test_a_negative_seed_is_one_line_from_the_command_line(tmp_path):
    status, errors = run_cli("--seed=-1", f"--out_dir={tmp_path / 'out'}")
    assert status == 2 and len(errors) == 1 and "--seed=-1" in errors[0] and "Traceback" not in errors[0]


def test_the_shortest_conversation_fits_the_smallest_block(tmp_path):
    # <|bos|> <|user|> x <|end|> <|assistant|> y <|end|>: 7 byte-level tokens
    path = write_chats(tmp_path / "tiny.jsonl", [line("x", "y"), line("z", "w")])
    meta = prepare(str(tmp_path / "out"), input=path, block_size=7)
    assert meta["splits"]["train"]["max_tokens"] == meta["splits"]["val"]["max_tokens"] == 7


def test_val_fraction_zero_still_holds_one_out(tmp_path):
    path = write_chats(tmp_path / "chats.jsonl", [line(f"q{i}", "a") for i in range(5)])
    meta = prepare(str(tmp_path / "out"), input=path, val_fraction=0)
    assert meta["splits"]["val"]["conversations"] == 1 and meta["splits"]["train"]["conversations"] == 4


# ------------------------------------------------------------------------------------------------- its own input

@pytest.fixture
def prepared_own(tmp_path):
    """A folder prepared from a JSONL file, -> (folder, the file)."""
    path = write_chats(tmp_path / "chats.jsonl", [line(f"q{i}", f"a{i}") for i in range(6)])
    out = tmp_path / "out"
    prepare(str(out), input=path, val_fraction=0.4)
    return out, path


@pytest.mark.parametrize("name", ["train.jsonl", "val.jsonl"])
def test_prepare_refuses_to_overwrite_its_input(prepared_own, name):
    out, _ = prepared_own
    before = snapshot(out)
    roundabout = os.path.join(str(out), "..", out.name, name)  # the same file, spelled another way
    for input in (str(out / name), roundabout):
        with pytest.raises(DataError, match="--input=.*--out_dir=") as error:
            prepare(str(out), input=input)
        assert "\n" not in str(error.value)
    assert snapshot(out) == before


def test_overwriting_the_input_is_one_line_from_the_command_line(prepared_own):
    out, _ = prepared_own
    status, errors = run_cli(f"--input={out / 'val.jsonl'}", f"--out_dir={out}")
    assert status == 2 and len(errors) == 1 and "val.jsonl" in errors[0] and "Traceback" not in errors[0]


def test_a_copy_of_a_prepared_split_is_fine_input(prepared_own, tmp_path):
    out, _ = prepared_own
    copy = write_chats(tmp_path / "again.jsonl", (out / "train.jsonl").read_text().splitlines())
    assert prepare(str(out), input=copy)["splits"]["train"]["conversations"] >= 1


# ---------------------------------------------------------------------------------------------- fit, then split

@pytest.mark.parametrize("seed", range(6))
def test_conversations_are_fitted_before_the_split(tmp_path, seed):
    """Two of three conversations fit: whichever the long one is, train and val get one each."""
    long_answer = "z" * 40
    path = write_chats(tmp_path / "chats.jsonl", [line("a", "b"), line("c", long_answer), line("d", "e")])
    meta = prepare(str(tmp_path / "out"), input=path, block_size=16, seed=seed)
    assert meta["dropped"] == 1
    for name in ("train", "val"):
        assert meta["splits"][name]["conversations"] == 1 and meta["splits"][name]["cut"] == 0
        assert long_answer not in (tmp_path / "out" / f"{name}.jsonl").read_text()


def test_fewer_than_two_fitting_conversations_is_one_line(tmp_path):
    path = write_chats(tmp_path / "chats.jsonl", [line("a", "b"), line("c", "z" * 40), line("d", "y" * 40)])
    with pytest.raises(DataError, match=r"1 of 3 conversations fits --block_size=16") as error:
        prepare(str(tmp_path / "out"), input=path, block_size=16)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_cut_conversations_are_counted_in_the_split_that_holds_them(tmp_path):
    two_turns = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})
    path = write_chats(tmp_path / "chats.jsonl", [two_turns, line("e", "f"), line("g", "h"), line("i", "j")])
    out = tmp_path / "out"
    meta = prepare(str(out), input=path, block_size=12, val_fraction=0.5, seed=1)  # one turn is 7 tokens, two 13
    for name in ("train", "val"):
        kept = [json.loads(text)["messages"] for text in (out / f"{name}.jsonl").read_text().splitlines()]
        holds_the_cut_one = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] in kept
        assert meta["splits"][name]["cut"] == int(holds_the_cut_one)
    assert meta["dropped"] == 0


# ------------------------------------------------------------------------------------ failures change nothing

def fail_when_saving(monkeypatch, part):
    """np.save fails, as on a full disk, for files whose name contains part."""
    real_save = np.save

    def save(file, *args, **kwargs):
        if part in os.path.basename(str(file)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(file, *args, **kwargs)
    monkeypatch.setattr(np, "save", save)


def test_a_failed_re_prepare_leaves_the_folder_as_it_was(prepared_own, tmp_path, monkeypatch):
    out, _ = prepared_own
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    other = write_chats(tmp_path / "other.jsonl", [line(f"other {i}", "x") for i in range(6)])
    fail_when_saving(monkeypatch, "val_")
    with pytest.raises(DataError, match="No space left on device") as error:
        prepare(str(out), input=other)
    assert "\n" not in str(error.value) and str(out) in str(error.value)
    assert snapshot(out) == before


def test_a_write_error_without_an_errno_still_says_why(tmp_path, monkeypatch):
    """numpy's own OSError on a full disk has a message and no errno (strerror None)."""
    def save(file, *args, **kwargs):
        raise OSError("100000 requested and 32704 written")
    monkeypatch.setattr(np, "save", save)
    with pytest.raises(DataError) as error:
        prepare(str(tmp_path / "new"), n_train=4, n_val=2)
    assert "(100000 requested and 32704 written)" in str(error.value) and "None" not in str(error.value)


def test_a_failed_first_prepare_leaves_no_folder(tmp_path, monkeypatch):
    fail_when_saving(monkeypatch, "train_")
    with pytest.raises(DataError):
        prepare(str(tmp_path / "new"), n_train=4, n_val=2)
    assert not (tmp_path / "new").exists()


def test_a_re_prepare_replaces_the_data_and_keeps_other_files(prepared_own, tmp_path):
    out, _ = prepared_own
    (out / "notes.txt").write_text("the user's own file")
    other = write_chats(tmp_path / "other.jsonl", [line(f"other {i}", "x") for i in range(6)])
    prepare(str(out), input=other)
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert "other" in (out / "train.jsonl").read_text() and "other" in (out / "val.jsonl").read_text()
    assert sorted(os.listdir(out)) == sorted(["notes.txt", "meta.json", "train.jsonl", "val.jsonl"] +
                                             [f"{s}_{a}.npy" for s in ("train", "val")
                                              for a in ("ids", "roles", "offsets")])
    assert load_meta(str(out))["source"] == other


def test_an_interrupted_move_leaves_a_folder_that_reads_as_incomplete(prepared_own, tmp_path, monkeypatch):
    out, _ = prepared_own
    other = write_chats(tmp_path / "other.jsonl", [line(f"other {i}", "x") for i in range(6)])
    real_replace, moves = os.replace, []

    def replace(source, target):
        moves.append(target)
        if len(moves) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(source, target)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(DataError, match="python prepare.py"):
        prepare(str(out), input=other)
    monkeypatch.undo()
    with pytest.raises(DataError, match="missing meta.json"):
        load_meta(str(out))
    with pytest.raises(DataError, match="missing meta.json"):
        load_split(str(out), "train")
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no leftover work folder


# --------------------------------------------------------------------------------------------------- messages

def test_counts_in_the_summary_are_singular_or_plural(tmp_path, capsys):
    good = [line(f"q{i}", "a") for i in range(4)]
    for bad_lines, said in ((1, "skipped 1 bad line ("), (2, "skipped 2 bad lines (")):
        path = write_chats(tmp_path / "chats.jsonl", good + ["{"] * bad_lines)
        assert prepare_main([f"--input={path}", f"--out_dir={tmp_path / 'out'}", "--skip_bad"]) == 0
        assert said in capsys.readouterr().out
    long_ones = [line("q", "z" * 40)] * 2
    for dropped, said in ((1, "dropped 1 conversation "), (2, "dropped 2 conversations ")):
        path = write_chats(tmp_path / "chats.jsonl", good + long_ones[:dropped])
        assert prepare_main([f"--input={path}", f"--out_dir={tmp_path / 'out'}", "--block_size=16"]) == 0
        assert said in capsys.readouterr().out
