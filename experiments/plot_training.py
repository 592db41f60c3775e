"""
Plot training runs from the log.jsonl train.py writes into each out_dir: training loss and held-out
answer loss against the optimizer step, a colour per run.

    python experiments/plot_training.py out out-causal            # -> training.png
    python experiments/plot_training.py --png=loss.png out         # somewhere else

Needs matplotlib (pip install matplotlib); the rest of ismGPT does not.
"""
import json
import os
import sys
from dataclasses import dataclass

# run as a script, the repository root is not on sys.path: put it first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E402
from cli import flags
from cli.errors import UserError
from cli.flags import setting


@dataclass
class PlotConfig:
    png: str = setting("training.png", "the picture to write")


def read_log(out_dir):
    """-> (training records, evaluation records) of out_dir/log.jsonl."""
    path = os.path.join(out_dir, "log.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): is {out_dir} a train.py out_dir?") \
            from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: was it written by train.py?") from None
    records = [_record(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def _record(line, where):
    """One log line as train.py writes it: an object whose "loss" or "val_loss", and "iter", are
    numbers (not bools)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # bad JSON or a number too long for int()
        record = None
    if not isinstance(record, dict):
        raise UserError(f"{where}: not a JSON object: was it written by train.py?")
    for key in ("loss", "val_loss"):
        if key in record and not all(type(record.get(k)) in (int, float) for k in (key, "iter")):
            raise UserError(f'{where}: "{key}" and "iter" must be numbers: was it written by '
                            'train.py?')
    return record


def pyplot():
    """matplotlib.pyplot drawing into files; a UserError where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    return plt


def save(fig, png, dpi):
    """Write fig to png in the format its extension names (without one: png + ".png", the name
    matplotlib would give it) -> the path written, for the caller to say."""
    path, picture_format = png, os.path.splitext(png)[1][1:].lower()
    if not picture_format:
        path, picture_format = png.rstrip(".") + ".png", "png"
    if picture_format not in fig.canvas.get_supported_filetypes():
        raise UserError(f"--png={png}: matplotlib cannot write .{picture_format} files (try "
                        ".png, .svg or .pdf)")
    fig.tight_layout()
    fig.savefig(path, format=picture_format, dpi=dpi)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out_dirs = [a for a in argv if not a.startswith("-")]
    cfg = flags.parse(PlotConfig(), [a for a in argv if a.startswith("-")], __doc__)
    if not out_dirs:
        raise UserError("name at least one out_dir: python experiments/plot_training.py out")
    runs = {out_dir: read_log(out_dir) for out_dir in out_dirs}
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for k, (name, (steps, evals)) in enumerate(runs.items()):
        ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], color=f"C{k}", alpha=0.35,
                lw=1)
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", color=f"C{k}",
                ms=3, label=f"{name} (held-out)")
    ax.set(xlabel="optimizer step", ylabel="answer loss (faint: training batches)")
    ax.legend()
    ax.grid(alpha=0.3)
    print(f"wrote {save(fig, cfg.png, 120)}")


if __name__ == "__main__":
    flags.run(main)
