"""The pictures experiments/plot_training.py and bench.py --plot write: the path they print is the file on disk, and
a log line plot_training cannot use is one line naming it, with nothing written."""
import contextlib
import importlib.util
import io
import json
import os

import pytest

from benchmarks.chat import plot_ttft
from cli.errors import UserError
from experiments import plot_training

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")


def write_log(out_dir, lines):
    out_dir.mkdir()
    (out_dir / "log.jsonl").write_text("\n".join(lines) + "\n")
    return str(out_dir)


GOOD_LOG = [json.dumps({"iter": 10, "loss": 2.5, "lr": 1e-3}), json.dumps({"iter": 10, "val_loss": 2.7})]


def plot(argv):
    """plot_training.main(argv) -> what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        plot_training.main(argv)
    return out.getvalue()


def new_files(folder, before):
    return sorted(set(os.listdir(folder)) - before)


# --png as given -> the file written
PICTURES = {"pic": "pic.png", "pic.": "pic.png", "pic.png": "pic.png", "pic.svg": "pic.svg", "pic.PNG": "pic.PNG"}


@needs_matplotlib
@pytest.mark.parametrize("given", list(PICTURES))
def test_plot_training_says_the_file_it_wrote(tmp_path, given):
    run = write_log(tmp_path / "run", GOOD_LOG)
    before = set(os.listdir(tmp_path))
    printed = plot([run, f"--png={tmp_path / given}"])
    assert new_files(tmp_path, before) == [PICTURES[given]]
    assert printed == f"wrote {tmp_path / PICTURES[given]}\n"


@needs_matplotlib
def test_plot_training_refuses_a_format_matplotlib_cannot_write(tmp_path):
    run = write_log(tmp_path / "run", GOOD_LOG)
    before = set(os.listdir(tmp_path))
    with pytest.raises(UserError, match=r"--png=.*pic\.v2: .*\.v2"):
        plot([run, f"--png={tmp_path / 'pic.v2'}"])
    assert new_files(tmp_path, before) == []


BAD_LOG_LINES = {"a list": "[1, 2]", "a number": "3", "null": "null", "not JSON": "{",
                 "a loss without its iter": json.dumps({"loss": 2.0}),
                 "a val_loss that is text": json.dumps({"iter": 5, "val_loss": "low"})}


@pytest.mark.parametrize("damage", list(BAD_LOG_LINES))
def test_a_log_line_it_cannot_plot_is_one_line_and_nothing_is_written(tmp_path, damage):
    run = write_log(tmp_path / "run", [GOOD_LOG[0], BAD_LOG_LINES[damage], GOOD_LOG[1]])
    png = tmp_path / "pic.png"
    with pytest.raises(UserError) as error:
        plot([run, f"--png={png}"])
    message = str(error.value)
    assert message.startswith(f"{os.path.join(run, 'log.jsonl')}:2: ") and "\n" not in message
    assert not png.exists()


@needs_matplotlib
@pytest.mark.parametrize("given", ["ttft", "ttft.png", "ttft.svg"])
def test_bench_plot_note_names_the_file_it_wrote(tmp_path, given):
    turns = [{"turn": n, "ism": {"ttft_ms": 1.0 + n}, "causal": {"ttft_ms": 2.0 + n}} for n in (1, 2, 3)]
    before = set(os.listdir(tmp_path))
    note = plot_ttft({"turns": turns}, str(tmp_path / given), "cpu")
    [written] = new_files(tmp_path, before)
    assert written == (given if "." in given else given + ".png")
    assert note == f"TTFT plot written to {tmp_path / written}"
