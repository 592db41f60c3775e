"""
The learning curve of experiments/learning_curve.sh as tables and a plot: the held-out answer loss
of each mask after every stage (mean ± std over seeds), overall and by turn (1, 2-4, 5+), and the
paired ISM - causal difference per seed with its 95% Student's t interval.

    python experiments/curve_report.py --out_dir=out/chitchat-curve --png=assets/learning_curve.png

Reads OUT/<mask>-s<seed>/eval-<steps>.json (the first 60 held-out conversations), OUT/start-<mask>/
eval-0.json (the start as it is: step 0) and OUT/<mask>-s<seed>/eval-<last>-all.json (all of them).
"""
import glob
import json
import os
import re
import sys
from dataclasses import dataclass

# run as a script, the repository root is not on sys.path: put it first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E402
from cli import flags
from cli.errors import UserError
from cli.flags import setting
from experiments.mask_tables import by_mask, fmt, markdown, md_row
from experiments.plot_training import pyplot, save

GROUPS = {"overall": None, "turn 1": ("1",), "turns 2-4": ("2", "3", "4"),
          "turns 5+": ("5", "6", "7", "8+")}
MASKS = ("causal", "ism")


@dataclass
class CurveConfig:
    out_dir: str = setting("out/chitchat-curve", "the folder learning_curve.sh wrote")
    png: str = setting("", "also draw the curves into this PNG (needs matplotlib)")


def group_loss(result, turns):
    """The held-out answer loss over the answer tokens of some turn buckets (None: all of them);
    None where the held-out conversations have none of those turns (shown as "-")."""
    if turns is None:
        return result["val_loss"]
    cells = [result["val_loss_by_turn"][t] for t in turns if t in result["val_loss_by_turn"]]
    tokens = sum(c["n"] for c in cells)
    return sum(c["loss"] * c["n"] for c in cells) / tokens if tokens else None


def read_runs(out_dir):
    """-> {mask: {seed: {steps or "all": eval.py's result}}}; the start's eval-0.json is every
    seed's step 0."""
    runs = {}
    for path in glob.glob(os.path.join(out_dir, "*-s*", "eval-*.json")):
        name = os.path.relpath(path, out_dir)
        found = re.fullmatch(r"(\w+)-s(\d+)/eval-(\d+)(-all)?\.json", name)
        if found and found.group(1) in MASKS:
            evals = runs.setdefault(found.group(1), {}).setdefault(int(found.group(2)), {})
            evals["all" if found.group(4) else int(found.group(3))] = load(path)
    if not runs:
        raise UserError(f"no eval-N.json under {out_dir}: run experiments/learning_curve.sh first")
    for kind, seeds in runs.items():
        start = os.path.join(out_dir, f"start-{kind}", "eval-0.json")
        if os.path.exists(start):
            for evals in seeds.values():
                evals[0] = load(start)
    return runs


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # a run killed while writing, a file edited by hand
        raise UserError(f"cannot read {path} ({e}): rerun its evaluation or remove it") from None


def common_seeds(runs, key):
    return [s for s in sorted(set.intersection(*[set(v) for v in runs.values()]))
            if all(key in runs[m][s] for m in MASKS)]


def rows(runs, key, groups):
    """(seeds, table rows) of one evaluation (steps, or "all"): each mask, then the paired
    difference, a column per group."""
    seeds = common_seeds(runs, key)[:1 if key == 0 else None]  # step 0: one start, every seed's
    stats = [by_mask({m: [group_loss(runs[m][s][key], turns) for s in seeds] for m in MASKS})
             for turns in groups.values()]
    out = [[m] + [fmt(group[m], 1, 3) for group in stats] for m in MASKS]
    return len(seeds), out + [["ism - causal"] + [fmt(g["ism-causal"], 1, 3, "+") for g in stats]]


def curve_table(runs):
    """Markdown: after each stage, each mask's loss overall and by turn group, and the paired
    ISM - causal difference."""
    steps = sorted({n for seeds in runs.values() for e in seeds.values() for n in e if n != "all"})
    lines = ["| steps | seeds | | " + " | ".join(GROUPS) + " |",
             "|---|---|---|" + "---|" * len(GROUPS)]
    for n in steps:
        count, table = rows(runs, n, GROUPS)
        lines += [md_row([n, count, *row]) for row in table] if count else []
    return "\n".join(lines)


def all_table(runs):
    """Markdown: the last stage scored on every held-out conversation, by turn."""
    seeds = common_seeds(runs, "all")
    if not seeds:
        return "(no eval-N-all.json yet)"
    by_turn = runs["causal"][seeds[0]]["all"]["val_loss_by_turn"]
    groups = {**{t: (t,) for t in by_turn}, "**overall**": None}
    count, table = rows(runs, "all", groups)
    tokens = [sum(by_turn[t]["n"] for t in (turns or by_turn)) for turns in groups.values()]
    columns = list(zip(*table))[1:]  # a group's causal, ism and difference
    return "\n".join(markdown(["turn", "answer tokens", "causal", "ism",
                               f"ism - causal (paired, {count} seeds)"],
                              [[g, n, *c] for g, n, c in zip(groups, tokens, columns)]))


def plot(runs, png):
    """Top row: each mask's loss against the steps, one panel per turn group (seeds thin, their mean
    bold). Bottom row: ISM - causal per seed from the first stage on (step 0 is in the table)."""
    fig, axes = pyplot().subplots(2, len(GROUPS), figsize=(4 * len(GROUPS), 6), sharex=True)
    for (top, bottom), (name, turns) in zip(axes.T, GROUPS.items()):
        curves = {m: {s: {n: group_loss(r, turns) for n, r in e.items() if n != "all"}
                      for s, e in runs[m].items()} for m in MASKS}
        for kind, colour in zip(MASKS, ("tab:blue", "tab:red")):
            for points in curves[kind].values():
                top.plot(*zip(*sorted(points.items())), color=colour, alpha=0.3, lw=1)
            steps = sorted(set.intersection(*[set(p) for p in curves[kind].values()]))
            mean = [sum(p[n] for p in curves[kind].values()) / len(curves[kind]) for n in steps]
            top.plot(steps, mean, color=colour, lw=2, marker="o", label=kind)
        for seed, ism in sorted(curves["ism"].items()):
            causal = curves["causal"].get(seed, {})
            steps = sorted(n for n in set(ism) & set(causal) if n > 0)
            bottom.plot(steps, [ism[n] - causal[n] for n in steps], marker="o",
                        label=f"seed {seed}")
        bottom.axhline(0, color="gray", lw=1)
        top.set_title(name)
        bottom.set_xlabel("optimizer steps")
    axes[0, 0].set_ylabel("held-out answer loss (nats)")
    axes[1, 0].set_ylabel("ISM - causal (nats)")
    axes[0, 0].legend()
    axes[1, 0].legend()
    return save(fig, png, 100)


def main(argv=None):
    cfg = flags.parse(CurveConfig(), argv, __doc__)
    runs = read_runs(cfg.out_dir)
    missing = [m for m in MASKS if m not in runs]
    if missing:
        raise UserError(f"{cfg.out_dir} has no {' or '.join(missing)} runs yet")
    print("First 60 held-out conversations, after each stage:\n\n" + curve_table(runs))
    print("\nEvery held-out conversation, after the last stage:\n\n" + all_table(runs))
    if cfg.png:
        print(f"\nwrote {plot(runs, cfg.png)}")


if __name__ == "__main__":
    flags.run(main)
