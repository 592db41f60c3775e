"""
Plot training runs from the log.jsonl that train.py writes into each out_dir: training loss and held-out answer loss
against the optimizer step, one colour per run.

    python experiments/plot_training.py out out-causal            # -> training.png
    python experiments/plot_training.py --png=loss.png out         # somewhere else

Needs matplotlib (pip install matplotlib); the rest of ismGPT does not.
"""
import json
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flags  # noqa: E402  (after the path: run as a script, the repository root is not on it)
from errors import UserError  # noqa: E402
from flags import setting  # noqa: E402


@dataclass
class PlotConfig:
    png: str = setting("training.png", "the picture to write")


def read_log(out_dir):
    """-> (training records, evaluation records) of out_dir/log.jsonl."""
    path = os.path.join(out_dir, "log.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): is {out_dir} a train.py out_dir?") from None
    except ValueError:
        raise UserError(f"{path} is not JSON lines: was it written by train.py?") from None
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out_dirs = [a for a in argv if not a.startswith("-")]
    cfg = flags.parse(PlotConfig(), [a for a in argv if a.startswith("-")], __doc__)
    if not out_dirs:
        raise UserError("name at least one out_dir: python experiments/plot_training.py out")
    runs = {out_dir: read_log(out_dir) for out_dir in out_dirs}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (name, (steps, evals)) in enumerate(runs.items()):
        colour = f"C{k}"
        ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], color=colour, alpha=0.35, lw=1)
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", color=colour, ms=3,
                label=f"{name} (held-out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer loss (faint: training batches)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(cfg.png, dpi=120)
    print(f"wrote {cfg.png}")


if __name__ == "__main__":
    flags.run(main)
