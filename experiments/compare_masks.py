r"""
Does ISM answer better? Train every mask with every seed, score each model, and summarise.

    python experiments/compare_masks.py             # causal, ISM and prefix x seeds 1, 2, 3
    python experiments/compare_masks.py --max_iters=5000 --n_layer=6 --n_head=6 --n_embd=384 \
        --train_batch_size=32 --device=cuda --out_dir=out/compare-gpu      # larger, on a GPU
    python experiments/compare_masks.py --pretrain_iters=600 --max_iters=300 \
        --train_args='--learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=20' \
        --out_dir=out/compare-warm   # the papers' protocol: pretrain causally, fine-tune each mask

Each run is `python train.py --mask=M --seed=S --out_dir=OUT_DIR/M-sS ...` (its log in train.log
there), then `python eval.py --out_dir=OUT_DIR/M-sS --json`: the user's own training and scoring.
The tables: mean ± std over seeds of exact match per family and per turn and of the held-out answer
loss, the paired ISM - causal difference, and the cost (tokens and answer tokens trained, wall time
and time in optimizer steps). Every mask gets the same model, seeds and steps: prefix's
triplet-expanded samples hold fewer answers per row (--prefix_answers adds prefix runs given as
many answer tokens). A start (--init_from, or per seed --pretrain_iters' causal model) is also
scored as it is under every mask: what switching the mask costs before fine-tuning. Real
conversations (prepare.py --input=chitchat) have no one right answer: --score=loss.

Resuming: a finished run with the same train.py flags (run.json) is reused, and its evaluation
(eval.json) too when the settings match; an unfinished one goes on from its last checkpoint.
"""
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace

# run as a script, the repository root is not on sys.path: put it first
sys.path.insert(0, ROOT := os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

from cli import flags
from cli.errors import UserError
from cli.flags import setting
from data.batching import answer_target_count, epoch_rows
from data.store import load_meta, load_split
from data.synthetic import percent
from experiments.mask_tables import report, summarise, summarise_start
from mask import MASKS
from support.checkpoint import atomic


@dataclass
class CompareConfig:
    out_dir: str = setting("out/compare", "one folder per run, <mask>-s<seed>")
    data_dir: str = setting("", "prepared data (empty: the synthetic data in the model's tokens)")
    device: str = setting("auto", "auto | cpu | cuda, for training and scoring")
    threads: int = setting(0, "torch CPU threads of each training and scoring (0: torch's)", min=0)
    masks: str = setting("causal,ism,prefix", "masks to train, comma-separated")
    seeds: str = setting("1,2,3", "seeds, comma-separated (the same for every mask)")
    max_iters: int = setting(900, "optimizer steps per run", min=1)
    n_layer: int = setting(2, "transformer blocks (shallow: in-query attention matters)", min=1)
    n_head: int = setting(4, "attention heads", min=1)
    n_embd: int = setting(128, "embedding width", min=1)
    block_size: int = setting(512, "tokens per training row", min=1)
    train_batch_size: int = setting(8, "rows per optimizer step", min=1)
    train_args: str = setting("", "more train.py flags for every run, e.g. '--learning_rate=1e-3'")
    pretrain_iters: int = setting(0, "pretrain a causal model per seed for this many steps "
                                  "(train.py's defaults), then fine-tune every mask from it", min=0)
    init_from: str = setting("", "fine-tune every run from this start (train.py --init_from; its "
                             "shape wins over --n_layer etc.), also scored under every mask")
    history: str = setting("gold", "gold | own: what eval.py keeps in the history after a turn",
                           choices=("gold", "own"))
    max_conversations: int = setting(0, "held-out conversations replayed per run (0: all)", min=0)
    max_new_tokens: int = setting(64, "longest reply when scoring", min=1)
    score: str = setting("exact", "exact: held-out answer loss and exact match of greedy replies | "
                         "loss: the held-out answer loss only, by turn (real conversations) | "
                         "none: train only", choices=("exact", "loss", "none"))
    prefix_answers: bool = setting(False, "also train prefix on as many answer tokens as causal "
                                   "and ISM (runs prefix-answers-sS; needs an existing --data_dir)")
    replies: int = setting(0, "show every mask's (and the start's) greedy replies to the first "
                           "this many held-out conversations", min=0)
    save_every: int = setting(50, "checkpoint every this many steps (a stopped run resumes there)",
                              min=1)
    json: bool = setting(False, "print one JSON object instead of markdown tables")


def parse_list(text, key, kind):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"--{key} is empty")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise UserError(f"--{key}={text}: expected comma-separated {kind.__name__} values") \
            from None


def check_config(cfg):
    masks, seeds = parse_list(cfg.masks, "masks", str), parse_list(cfg.seeds, "seeds", int)
    if cfg.pretrain_iters and cfg.init_from:
        raise UserError("--pretrain_iters and --init_from both choose the start: pass one")
    for kind in masks:
        if kind not in MASKS:
            raise UserError(f"--masks: unknown mask {kind!r} (choose from {', '.join(MASKS)})")
    if len(set(masks)) < len(masks) or len(set(seeds)) < len(seeds):
        raise UserError("--masks and --seeds must not repeat an entry")
    if cfg.prefix_answers:  # the data whose answers are counted: there now, or one line
        load_meta(cfg.data_dir or "data/synthetic", cfg.block_size)
    try:
        extra = shlex.split(cfg.train_args)
    except ValueError as e:
        raise UserError(f"--train_args: {e}") from None
    ours = {a.split("=", 1)[0] for a in train_argv(replace(cfg, train_args=""), "ism", 0, "")}
    for key in (arg.split("=", 1)[0] for arg in extra):
        if key in ours | {"--overwrite"}:
            raise UserError(f"--train_args: {key} is set by the experiment itself; pass it to "
                            "compare_masks.py (see --help)")
    return masks, seeds


# ------------------------------------------------------------------------------------- one run

def train_argv(cfg, kind, seed, run_dir, start="scratch", iters=None):
    """One run's train.py flags (max_iters steps unless iters says), also what tells whether a
    finished run can be reused."""
    iters = iters or cfg.max_iters
    values = dict(mask=kind, seed=seed, out_dir=run_dir, data_dir=cfg.data_dir, device=cfg.device,
                  max_iters=iters, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                  block_size=cfg.block_size, batch_size=cfg.train_batch_size,
                  eval_interval=min(iters, cfg.save_every), eval_iters=1,
                  log_interval=max(1, min(20, iters // 10)), init_from=start, threads=cfg.threads)
    return [f"--{key}={value}" for key, value in values.items()] + shlex.split(cfg.train_args)


def run_specs(cfg, masks):
    """-> [(run name, mask, optimizer steps)]: every mask, and with --prefix_answers prefix again
    for as many answer tokens as causal and ISM train in max_iters (from the answer targets per row
    of the first epoch, packed as train.py packs it)."""
    specs = [(kind, kind, cfg.max_iters) for kind in masks]
    if cfg.prefix_answers:
        split = load_split(cfg.data_dir, "train")

        def answers_per_row(kind):
            rows = epoch_rows(split, kind, cfg.block_size, 0, 0)
            return answer_target_count(split, rows) / len(rows)
        steps = math.ceil(cfg.max_iters * answers_per_row("causal") / answers_per_row("prefix"))
        specs.append(("prefix-answers", "prefix", steps))
    return specs


_LOG_LINE = re.compile(r"^(?:iter (\d+)/\d+: .*?([\d.]+)ms/iter|resuming .* at iter (\d+) )", re.M)


def step_seconds(log):
    """Time in optimizer steps from train.py's log: each `iter N/M: ... X ms/iter` line is the mean
    since the previous line, or since the step a `resuming ... at iter N` line went on from (steps
    done again count twice: they took time twice); None if there are none."""
    total, last, found = 0.0, 0, False
    for step, ms, resumed_at in _LOG_LINE.findall(log):
        if not resumed_at:
            total, found = total + (int(step) - last) * float(ms) / 1000, True
        last = int(step or resumed_at)
    return round(total, 2) if found else None


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, obj):
    """Atomically, through a temporary file of its own (mkstemp never follows a planted link)."""
    atomic(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj)))


def run_script(script, argv, log_path, what, append=False):
    """`python script argv` from the repository root, its output into log_path (after what it
    holds, with append) or returned (log_path None) -> (stdout, or all of log_path; seconds). A
    failure is a UserError naming its last line and the log."""
    t0 = time.time()
    with open(log_path or os.devnull, "a" if append else "w") as log:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT,
                              text=True, stdout=log if log_path else subprocess.PIPE,
                              stderr=subprocess.STDOUT if log_path else subprocess.PIPE)
    seconds = time.time() - t0
    output = pathlib.Path(log_path).read_text() if log_path else proc.stdout
    if proc.returncode != 0:
        last = ((output if log_path else proc.stderr).strip().splitlines() or ["(no output)"])[-1]
        where = f" (log: {log_path})" if log_path else ""
        raise UserError(f"{what} failed (exit {proc.returncode}): {last}{where}")
    return output, seconds


def train_run(name, run_dir, argv, say):
    """Train one run unless its folder holds a finished one with the same flags; an unfinished
    one with the same flags goes on from its last checkpoint. -> (run_dir, run.json dict)."""
    path = os.path.join(run_dir, "run.json")
    record = read_json(path) or {}
    same = record.get("argv") == argv and os.path.exists(os.path.join(run_dir, "ckpt.pt"))
    if same and record.get("finished", True):
        say(f"{name}: trained already ({run_dir}), reusing it")
        return run_dir, record
    os.makedirs(run_dir, exist_ok=True)
    earlier = record.get("wall_seconds", 0) if same else 0
    # written before ckpt.pt is overwritten
    write_json(path, {"argv": argv, "finished": False, "wall_seconds": earlier})
    if same:
        launch = [a for a in argv if not a.startswith("--init_from=")] + ["--init_from=resume"]
        say(f"{name}: unfinished: python train.py {' '.join(launch)}")
    else:
        launch = argv + ["--overwrite"]
        say(f"{name}: python train.py {' '.join(argv)}")
    log, seconds = run_script("train.py", launch, os.path.join(run_dir, "train.log"),
                              f"training {name}", append=same)
    record = {"argv": argv, "finished": True, "wall_seconds": round(earlier + seconds, 2),
              "step_seconds": step_seconds(log)}
    write_json(path, record)
    say(f"{name}: trained in {seconds:.0f}s")
    return run_dir, record


def start_of(cfg, seed, say):
    """train.py --init_from of the seed's runs: scratch, --init_from, or the seed's pretrained
    causal model (trained with train.py's own optimizer settings: no --train_args)."""
    if cfg.init_from or not cfg.pretrain_iters:
        return cfg.init_from or "scratch"
    run_dir = os.path.join(cfg.out_dir, f"pretrain-s{seed}")
    argv = train_argv(replace(cfg, train_args=""), "causal", seed, run_dir, "scratch",
                      cfg.pretrain_iters)
    return train_run(f"pretrain-s{seed}", run_dir, argv, say)[0]


def trained_model(cfg, run_dir):
    """(eval.py's flags naming a trained run, its model file)."""
    return [f"--out_dir={run_dir}", f"--data_dir={cfg.data_dir}"], os.path.join(run_dir, "ckpt.pt")


def start_model(start, kind, data_dir):
    """(eval.py's flags naming a start as it is under mask kind, its model file)."""
    return [f"--init_from={start}", f"--mask={kind}", f"--data_dir={data_dir}"], start


def scored(cfg, model, folder, say, replies=False):
    """eval.py's JSON result for model (flags, file), records left out; replies: the records of
    greedy replies to the first cfg.replies conversations, the gold history kept."""
    argv, path = model
    history, count = ("gold", cfg.replies) if replies else (cfg.history, cfg.max_conversations)
    argv = argv + [f"--device={cfg.device}", f"--history={history}",
                   f"--max_conversations={count}", f"--max_new_tokens={cfg.max_new_tokens}",
                   f"--threads={cfg.threads}"]
    argv += ([] if replies else [f"--replay={cfg.score == 'exact'}"]) + ["--json"]
    # size and mtime tell a model file from the one scored before ([]: no file, such as smollm2)
    stamp = [os.stat(path).st_size, os.stat(path).st_mtime_ns] if os.path.exists(path) else []
    os.makedirs(folder, exist_ok=True)
    result = evaluated(argv, folder, stamp, say)
    return result["records"] if replies else {k: v for k, v in result.items() if k != "records"}


def start_scored(cfg, start, kind, data_dir, say):
    """A start as it is, under mask kind, scored in OUT_DIR/start-<name>-<mask>."""
    folder = os.path.join(cfg.out_dir, f"start-{os.path.basename(os.path.normpath(start))}-{kind}")
    return scored(cfg, start_model(start, kind, data_dir), folder, say)


def evaluated(argv, folder, stamp, say):
    """python eval.py argv's JSON result, kept in folder/eval.json beside the results of other
    settings (another --max_conversations, say) and reused when argv and the model's stamp match."""
    key, path = {"argv": argv, "model": stamp}, os.path.join(folder, "eval.json")
    cached = read_json(path) or {}
    kept = cached.get("evaluations", [cached] if "key" in cached else [])  # or an older one result
    kept = [e for e in kept if e["key"]["model"] == stamp]  # another model's results: stale
    found = [e["result"] for e in kept if e["key"] == key]
    if found:
        return found[0]
    output, seconds = run_script("eval.py", argv, None, f"scoring {folder}")
    result = json.loads(output)
    write_json(path, {"evaluations": kept + [{"key": key, "result": result}]})
    exact = f", exact match {percent(result['overall']['accuracy'])}%" if result["replayed"] else ""
    say(f"{os.path.basename(folder)}: evaluated in {seconds:.0f}s{exact}, held-out answer loss "
        f"{result['val_loss']:.4f}")
    return result


# ---------------------------------------------------------------------------------------- main

def compare(cfg, masks, seeds, argv):
    say = (lambda text: print(f"[compare] {text}", file=sys.stderr, flush=True))
    t0, command = time.time(), "python experiments/compare_masks.py " + shlex.join(argv)
    specs = run_specs(cfg, masks)
    names = [name for name, _, _ in specs]
    runs, starts = {}, []
    for seed in seeds:  # seed-major: a stopped experiment already has whole seeds of every mask
        start = start_of(cfg, seed, say)
        starts += [start] if start != "scratch" and start not in starts else []
        for name, kind, iters in specs:
            run_dir = os.path.join(cfg.out_dir, f"{name}-s{seed}")
            argv = train_argv(cfg, kind, seed, run_dir, start, iters)
            run_dir, record = train_run(f"{name}-s{seed}", run_dir, argv, say)
            model = trained_model(cfg, run_dir)
            scores = None if cfg.score == "none" else scored(cfg, model, run_dir, say)
            runs[name, seed] = {"train": record, "eval": scores}
    out_runs = [{"mask": m, "seed": s, **runs[m, s]} for s in seeds for m in names]
    if cfg.score == "none":
        return {"settings": {"command": command}, "runs": out_runs}
    first = runs[names[0], seeds[0]]["eval"]
    # each start as it is, under every mask: what switching the mask costs before fine-tuning
    before = {kind: [start_scored(cfg, start, kind, first["data_dir"], say) for start in starts]
              for kind in masks}
    settings = {"masks": names, "seeds": seeds, "data_dir": cfg.data_dir, "history": cfg.history,
                "history_note": first["history_note"], "conversations": first["conversations"],
                "total_seconds": round(time.time() - t0, 1), "machine": first["machine"],
                "device": first["device"], "command": command,
                **{k: getattr(cfg, k) for k in (
                    "max_iters", "n_layer", "n_head", "n_embd", "block_size", "train_batch_size",
                    "train_args", "max_new_tokens", "pretrain_iters", "init_from", "score")}}
    replies = cfg.replies and side_by_side(cfg, names, seeds[0], starts, first["data_dir"], say)
    return {"settings": settings, "summary": summarise(runs, names, seeds, cfg.score),
            "runs": out_runs, "start": summarise_start(before) if starts else None,
            "replies": replies or None}


def side_by_side(cfg, names, seed, starts, data_dir, say):
    """{model: {"seed", "records"}}: greedy replies of each name's run of `seed` (and of the first
    start, under causal) to the first cfg.replies held-out conversations, gold history kept."""
    models = {name: trained_model(cfg, os.path.join(cfg.out_dir, f"{name}-s{seed}"))
              for name in names}
    if starts:
        models["start (causal)"] = start_model(starts[0], "causal", data_dir)
    folders = {name: os.path.join(cfg.out_dir, f"replies-{name.split()[0]}-s{seed}")
               for name in models}
    return {name: {"seed": seed, "records": scored(cfg, model, folders[name], say, replies=True)}
            for name, model in models.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = flags.parse(CompareConfig(), argv, __doc__)
    # train.py and eval.py run from the repository root: relative folders and files become
    # absolute, naming the same files there (and a finished run whatever spelling named it)
    start = os.path.abspath(cfg.init_from) if os.path.exists(cfg.init_from) else cfg.init_from
    cfg = replace(cfg, out_dir=os.path.abspath(cfg.out_dir), init_from=start,
                  data_dir=cfg.data_dir and os.path.abspath(cfg.data_dir))
    masks, seeds = check_config(cfg)
    result = compare(cfg, masks, seeds, argv)
    if cfg.json:
        print(json.dumps(result))
    elif cfg.score == "none":
        print(f"trained {len(result['runs'])} runs in {cfg.out_dir}: score them with the same "
              "command and --score=exact or --score=loss")
    else:
        print(report(result))
    return result


if __name__ == "__main__":
    flags.run(main)
