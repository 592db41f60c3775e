"""
The statistics and markdown tables of experiments/compare_masks.py (curve_report.py shares them):
every run's scores as mean ± sample std over seeds, the paired ISM - causal difference per seed
with its 95% t-interval (the runs of one seed share their start, data order and held-out answers),
each mask's cost, the start under each mask, and greedy replies side by side.
"""
import math

from data.synthetic import family_label

# Student's t two-sided 95% quantiles by degrees of freedom; past 30, df 30's (a wider interval)
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
        26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}
# table -> (its rows in eval.py's result, the field of a cell, how it is shown: scale and digits)
METRICS = {"by_family": ("by_family", "accuracy", 100.0, 1),
           "by_turn": ("by_turn", "accuracy", 100.0, 1),
           "loss_by_turn": ("val_loss_by_turn", "loss", 1.0, 3)}


def mean_std(values):
    """-> (mean, sample std) of the values not None; std None for one, both None for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired(diffs):
    """Per-seed differences -> (mean, std, 95% t-interval low, high); no interval under 2 seeds."""
    mean, std = mean_std(diffs)
    if std is None:
        return mean, None, None, None
    n = sum(d is not None for d in diffs)
    half = T_95[min(n - 1, 30)] * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def ism_minus_causal(ism, causal):
    """Paired by seed (the same start, data order and answers): the stats of the differences."""
    return paired([None if i is None or c is None else i - c for i, c in zip(ism, causal)])


def by_mask(values, **extra):
    """{name: per-seed values} -> {name: (mean, std)}, then extra, then "ism-causal" (paired) when
    both are there."""
    out = {**{name: mean_std(v) for name, v in values.items()}, **extra}
    if "ism" in values and "causal" in values:
        out["ism-causal"] = ism_minus_causal(values["ism"], values["causal"])
    return out


def fmt(stats, scale=100.0, digits=1, sign=""):
    """(mean, std[, low, high]) -> "mean ± std [low, high]", the parts there are ("-" without a
    mean); sign="+" signs the mean."""
    mean, std = stats[:2]
    if mean is None:
        return "-"
    text = f"{scale * mean:{sign},.{digits}f}"
    if std is not None:
        text += f" ± {scale * std:,.{digits}f}"
    if len(stats) > 2 and stats[2] is not None:
        text += f" [{scale * stats[2]:+,.{digits}f}, {scale * stats[3]:+,.{digits}f}]"
    return text


def markdown(header, rows):
    """The lines of a markdown table: the header's cells, its rule, then each row's cells."""
    lines = [md_row(row) for row in [header, *rows]]
    return [lines[0], "|" + "---|" * len(header), *lines[1:]]


def md_row(cells):
    return "| " + " | ".join(map(str, cells)) + " |"


def cell(result, table, row):
    """One run's value in a table row (eval.py's JSON), or None."""
    rows, field = METRICS[table][:2]
    return result[rows].get(row, {}).get(field)


def summarise(runs, names, seeds, score):
    """runs {(name, seed): {"eval", "train"}} -> the tables (JSON-able): loss by turn (with score
    "exact" also exact match by family and turn), rows {name: (mean, std), "n", "ism-causal"}."""
    evals = {run: runs[run]["eval"] for run in runs}
    summary = {}
    for table in ["loss_by_turn"] + (["by_family", "by_turn"] if score == "exact" else []):
        where = METRICS[table][0]
        counts = evals[names[0], seeds[0]][where]  # the first run's counts
        rows = dict.fromkeys(r for m in names for s in seeds for r in evals[m, s][where])
        summary[table] = {row: by_mask({m: [cell(evals[m, s], table, row) for s in seeds]
                                        for m in names}, n=counts.get(row, {}).get("n"))
                          for row in rows}
    measures = {"loss": lambda e: e["val_loss"], "exact": lambda e: e["overall"]["accuracy"]}
    overall = {k: by_mask({m: [f(evals[m, s]) for s in seeds] for m in names})
               for k, f in measures.items()}  # {measure: {name: stats}}: turned into rows
    summary["overall"] = {name: {k: overall[k][name] for k in measures} for name in overall["loss"]}
    summary["cost"] = {m: cost(runs, m, seeds) for m in names}
    return summary


def cost(runs, name, seeds):
    ev, tr = [runs[name, s]["eval"] for s in seeds], [runs[name, s]["train"] for s in seeds]
    return {"val_loss": mean_std([e["val_loss"] for e in ev]),
            "tokens": mean_std([e["trained_tokens"] for e in ev]),
            "answer_tokens": mean_std([e["trained_answer_tokens"] for e in ev]),
            "wall_seconds": mean_std([t.get("wall_seconds") for t in tr]),
            "step_seconds": mean_std([t.get("step_seconds") for t in tr]),
            "eval_seconds": mean_std([e["seconds"]["val_loss"] + e["seconds"]["chat"] for e in ev])}


def summarise_start(before):
    """{mask: [eval results of each start]} -> {mask: {val_loss, ...}}, mean ± std over starts."""
    out = {}
    for kind, results in before.items():
        families = dict.fromkeys(f for r in results for f in r["by_family"])
        turns = dict.fromkeys(t for r in results for t in r["val_loss_by_turn"])
        out[kind] = {
            "val_loss": mean_std([r["val_loss"] for r in results]),
            "exact_match": mean_std([r["overall"]["accuracy"] for r in results]),
            "unfinished": mean_std([r["unfinished_replies"] / max(r["overall"]["n"], 1)
                                    for r in results]),
            "by_family": {f: mean_std([cell(r, "by_family", f) for r in results])
                          for f in families},
            "loss_by_turn": {t: mean_std([cell(r, "loss_by_turn", t) for r in results])
                             for t in turns},
            "model": results[0]["model"], "n": results[0]["overall"]["n"],
            "replayed": results[0]["replayed"]}
    return out


# ---------------------------------------------------------------------------------- markdown

def report(result):
    s, c = result["summary"], result["settings"]
    masks, lines = c["masks"], header(result) + [""]
    if c["score"] == "exact":
        n = result["runs"][0]["eval"]["overall"]["n"]
        lines += table(masks, s, "by_family", "family (exact match %)", family_label, "exact", n)
        lines += ["", *table(masks, s, "by_turn", "turn (exact match %)"), ""]
    n = sum(row["n"] or 0 for row in s["loss_by_turn"].values())
    lines += table(masks, s, "loss_by_turn", "turn (held-out answer loss)", str, "loss", n)
    lines += ["", *cost_table(masks, s["cost"])]
    if result.get("start"):
        lines += ["", *start_table(result["start"], [m for m in masks if m in result["start"]])]
    if result.get("replies"):
        lines += ["", *replies_table(result["replies"])]
    return "\n".join(lines)


def header(result):
    c, m = result["settings"], result["runs"][0]["eval"]["model_args"]
    family = "Llama-family " if m.get("family") == "llama" else ""
    shape = (f"{family}{m['n_layer']} layers x {m['n_embd']} wide ({m['n_head']} heads), "
             f"block_size {m['block_size']}")
    start = (f"start: per seed, a causal model pretrained from scratch for {c['pretrain_iters']} "
             "steps (train.py's defaults); every mask fine-tuned from those same weights"
             if c["pretrain_iters"] else f"start: every run fine-tuned from {c['init_from']}"
             if c["init_from"] else "start: from scratch")
    scored = (f"greedy through ChatSession (KV cache), {c['history_note']}; exact match % and the "
              "held-out answer loss" if c["score"] == "exact"
              else "the held-out answer loss (mean over answer tokens)")
    equal = (" (prefix-answers: as many answer tokens as causal and ISM)"
             if "prefix-answers" in c["masks"] else "")
    train_args = f"; train.py {c['train_args']}" if c["train_args"] else ""
    return [f"# ismGPT quality: {' vs '.join(c['masks'])}, {len(c['seeds'])} seed(s) "
            f"({', '.join(map(str, c['seeds']))})",
            f"budget: {shape}, {c['max_iters']} optimizer steps of {c['train_batch_size']} rows x "
            f"{c['block_size']} tokens{equal}, the same seeds for every mask (the same initial "
            "weights from scratch; from a start, the same data order); data "
            f"{result['runs'][0]['eval']['data_dir']}{train_args}",
            start,
            f"eval: {c['conversations']} held-out conversations, {scored}, as mean ± std over "
            "seeds; ism - causal paired by seed, with its 95% t-interval in brackets",
            f"machine: {c['machine']}, device {c['device']}; the whole experiment took "
            f"{c['total_seconds'] / 60:.1f} min (runs found already trained or evaluated cost "
            "nothing)",
            f"command: {c['command']}"]


def table(masks, summary, kind, label, name=str, overall=None, n=None):
    """A markdown table of summary[kind], the paired column when ISM and causal are both there;
    overall ("loss" or "exact") adds its row of summary["overall"], of n answers (tokens)."""
    _, _, scale, digits = METRICS[kind]
    paired_column = "ism" in masks and "causal" in masks
    rows = [(name(row), values) for row, values in summary[kind].items()]
    if overall:
        rows.append(("**overall**", {**{k: v[overall] for k, v in summary["overall"].items()},
                                     "n": n}))
    columns = masks + ["ism-causal"] * paired_column
    count = "answer tokens" if kind == "loss_by_turn" else "answers"
    return markdown([label, count, *masks] + ["ism - causal (paired)"] * paired_column,
                    [[row, values["n"]] + [fmt(values[k], scale, digits) for k in columns]
                     for row, values in rows])


def cost_table(masks, cost):
    lines = markdown(["mask", "held-out answer loss", "tokens trained", "answer tokens trained",
                      "train wall s", "in steps s", "eval s"],
                     [[m] + [fmt(v, 1, 4 if key == "val_loss" else 0)
                             for key, v in cost[m].items()] for m in masks])
    if "prefix" in masks:
        lines.append("\nprefix trains on triplet-expanded samples (one per answer, with its whole "
                     "history): the same tokens hold fewer answers; answer tokens trained say how "
                     "many.")
    return lines


def start_table(start, masks):
    """The start before any fine-tuning under every mask: answer loss by turn (and exact match)."""
    first = start[masks[0]]
    turns, exact = list(first["loss_by_turn"]), first["replayed"]
    rows = [[m, fmt(start[m]["val_loss"], 1, 4)]
            + [fmt(start[m]["loss_by_turn"][t], 1, 3) for t in turns]
            + ([fmt(start[m]["exact_match"]), fmt(start[m]["unfinished"])] if exact else [])
            for m in masks]
    said = f"; exact match % of {first['n']} answers and the share of replies that never ended"
    return [f"before fine-tuning: {first['model']} as it is, under each mask (held-out answer "
            "loss by turn" + (said if exact else "") + ")", "",
            *markdown(["mask", "held-out answer loss", *(f"turn {t}" for t in turns)]
                      + ["exact match %", "never ended %"] * exact, rows)]


def replies_table(replies):
    """Greedy replies to the same held-out turns (gold history before each), a column per model."""
    names = list(replies)
    rows = [[f"{record['conversation'] + 1}.{record['turn']}", short(record["user"]),
             short(record["gold"])] + [short(replies[n]["records"][k]["reply"]) for n in names]
            for k, record in enumerate(replies[names[0]]["records"])]
    return ["greedy replies to the first held-out conversations (seed "
            f"{replies[names[0]]['seed']}; the gold answers kept in the history):", "",
            *markdown(["turn", "user", "gold", *names], rows)]


def short(text, limit=80):
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 1] + "…"
