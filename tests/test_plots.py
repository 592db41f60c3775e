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


def write_eval(out_dir, run, name, by_turn):
    """An eval.py result: {turn: (loss, answer tokens)} -> val_loss_by_turn and the token-weighted val_loss."""
    os.makedirs(out_dir / run, exist_ok=True)
    cells = {t: {"loss": loss, "n": n} for t, (loss, n) in by_turn.items()}
    total = sum(n for _, n in by_turn.values())
    (out_dir / run / name).write_text(json.dumps(
        {"val_loss": sum(loss * n for loss, n in by_turn.values()) / total, "val_loss_by_turn": cells}))


def test_curve_report_weighs_turn_groups_by_answer_tokens_and_pairs_seeds(tmp_path, capsys):
    from experiments import curve_report
    losses = {("causal", 1): 2.0, ("causal", 2): 2.2, ("ism", 1): 2.1, ("ism", 2): 2.5}
    for (mask, seed), base in losses.items():  # turn 2 weighs 3 tokens for 1 of turn 3
        turn_3 = base + (3 if mask == "ism" else 2)
        write_eval(tmp_path, f"{mask}-s{seed}", "eval-10.json", {"1": (base, 4), "2": (base + 1, 3), "3": (turn_3, 1)})
    curve_report.main([f"--out_dir={tmp_path}"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 10 | 2 | ism - causal"))
    # turns 2-4 per seed: causal (3 (b + 1) + (b + 2)) / 4 = b + 1.25, ism (3 (b + 1) + (b + 3)) / 4 = b + 1.5;
    # ism - causal paired: 0.1 + 0.25 and 0.3 + 0.25 -> mean +0.45 (unweighted turns would give +0.7)
    cells = [c.strip() for c in row.split("|")]
    # overall (8 tokens): causal b + 5/8, ism b + 6/8 -> +0.325; turn 1 +0.2; no turn 5+ at all: "-"
    assert [c[:6] for c in cells[4:8]] == ["+0.325", "+0.200", "+0.450", "-"], row
    (tmp_path / "ism-s2" / "eval-10.json").write_text('{"val_loss": ')  # a run killed while writing
    with pytest.raises(UserError, match=r"cannot read .*ism-s2/eval-10.json") as info:
        curve_report.main([f"--out_dir={tmp_path}"])
    assert "\n" not in str(info.value)
