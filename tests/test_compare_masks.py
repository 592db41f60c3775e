"""experiments/compare_masks.py: its small parts on hand-made input, and a smoke run as a user starts it (a tiny
random Llama start, scored as it is, then fine-tuned 2 optimizer steps per mask; run again, it must reuse every run)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers

from data.prepare import prepare
from experiments import compare_masks as cm
from experiments import mask_tables
from cli.flags import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=128", "--train_batch_size=2", "--max_iters=2"]


def test_step_seconds_reads_the_train_log():
    log = ("model: ...\niter 5/12: loss 1.0, lr 1e-3, 100.0ms/iter, 9 tok/s\neval iter 10: ...\n"
           "iter 10/12: loss 1.0, lr 1e-3, 200.0ms/iter, 9 tok/s\niter 12/12: loss 1, lr 1e-3, 50.0ms/iter, 9 tok/s\n")
    assert cm.step_seconds(log) == pytest.approx(5 * 0.1 + 5 * 0.2 + 2 * 0.05)
    assert cm.step_seconds("no steps here") is None


def test_mean_std():
    assert mask_tables.mean_std([0.5, 0.7, None]) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    assert mask_tables.mean_std([0.5]) == (0.5, None)
    assert mask_tables.mean_std([None]) == (None, None)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One tiny experiment as a user would run it on a real model (1 seed, causal and ISM, 2 steps each), from a
    small random Llama folder: -> (out_dir, JSON, argv)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    start = str(tmp_path_factory.mktemp("start") / "llama")
    transformers.LlamaForCausalLM(config).save_pretrained(start)
    data_dir = str(tmp_path_factory.mktemp("data") / "synthetic")
    prepare(data_dir, block_size=128, n_train=40, n_val=6)
    out_dir = str(tmp_path_factory.mktemp("compare"))
    argv = [f"--out_dir={out_dir}", f"--data_dir={data_dir}", f"--init_from={start}", "--masks=causal,ism",
            "--seeds=7", "--max_conversations=3", "--max_new_tokens=8", "--device=cpu", *TINY]
    first = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "compare_masks.py"), *argv, "--json"],
                           cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    return out_dir, json.loads(first.stdout), argv


def test_compare_runs_every_mask_and_summarises(compared):
    out_dir, result, _ = compared
    assert [(r["mask"], r["seed"]) for r in result["runs"]] == [("causal", 7), ("ism", 7)]
    for r in result["runs"]:
        assert r["eval"]["iter_num"] == 2 and r["eval"]["mask"] == r["mask"]
        assert r["eval"]["model_args"]["family"] == "llama" and r["eval"]["model_args"]["n_embd"] == 32  # not TINY's
        assert r["eval"]["trained_tokens"] > 0 and r["train"]["wall_seconds"] > 0
        assert r["train"]["step_seconds"] is not None
        assert math.isfinite(r["eval"]["val_loss"])
        assert os.path.exists(os.path.join(out_dir, f"{r['mask']}-s7", "train.log"))
    summary = result["summary"]
    assert set(summary["cost"]) == {"causal", "ism"}
    for table in ("by_family", "by_turn"):
        for entry in summary[table].values():
            assert set(entry) == {"causal", "ism", "ism-causal", "n"}
    assert result["settings"]["max_iters"] == 2 and result["settings"]["seeds"] == [7]
    for kind in ("causal", "ism"):  # the start as it is, scored on the same answers under each mask
        before = result["start"][kind]
        assert before["n"] == result["runs"][0]["eval"]["overall"]["n"] > 0 and math.isfinite(before["val_loss"][0])
    # two layers: with one, an answer's keys and values come from embeddings alone, the same under both masks
    assert result["start"]["causal"]["val_loss"] != result["start"]["ism"]["val_loss"]


def test_compare_again_reuses_finished_runs_and_prints_tables(compared, capsys, monkeypatch):
    out_dir, _, argv = compared
    monkeypatch.chdir(os.path.dirname(out_dir))  # the same folder, named relative to another working directory
    argv = [f"--out_dir={os.path.basename(out_dir)}" if a.startswith("--out_dir=") else a for a in argv]
    cm.main(argv)  # in this process: nothing is trained or scored again (no subprocess would run)
    again = capsys.readouterr()
    assert again.err.count("trained already") == 2 and "python train.py" not in again.err
    assert "evaluated in" not in again.err
    out = again.out
    assert out.startswith("# ismGPT quality: causal vs ism, 1 seed(s) (7)")
    assert "budget: Llama-family 2 layers x 32 wide (2 heads), block_size 128, 2 optimizer steps of 2 rows" in out
    assert "| family (exact match %) | answers | causal | ism | ism - causal (paired) |" in out
    assert "| turn (exact match %) | answers |" in out and "| **overall** |" in out
    assert "| mask | held-out answer loss |" in out
    assert "before fine-tuning: LlamaForCausalLM" in out
    for mask in ("causal", "ism"):
        assert f"| {mask} | " in out


@pytest.mark.parametrize("args, message", [
    (["--masks=causal,full"], "unknown mask 'full'"),
    (["--seeds=1,x"], "--seeds=1,x: expected comma-separated int"),
    (["--train_args=--mask=causal"], "--train_args: --mask is set by the experiment itself"),
])
def test_user_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: cm.main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_warm_start_runs_start_from_their_seeds_pretrained_causal_model(tmp_path, monkeypatch):
    """How the runs are chained (train.py --init_from itself is tested in test_gpt2.py)."""
    trained = []
    monkeypatch.setattr(cm, "train_run", lambda name, run_dir, argv, say: (trained.append(argv), (run_dir, {}))[1])
    cfg = cm.flags.parse(cm.CompareConfig(), [f"--out_dir={tmp_path}", "--pretrain_iters=5", "--max_iters=3",
                                              "--train_args=--learning_rate=1e-3"])
    start = cm.start_of(cfg, 2, lambda text: None)
    assert start == str(tmp_path / "pretrain-s2")
    [pretrain] = trained
    assert {"--mask=causal", "--seed=2", "--max_iters=5", "--init_from=scratch"} <= set(pretrain)
    assert "--learning_rate=1e-3" not in pretrain  # pretraining keeps train.py's own settings
    finetune = cm.train_argv(cfg, "ism", 2, str(tmp_path / "ism-s2"), start)
    assert {"--mask=ism", "--seed=2", "--max_iters=3", f"--init_from={start}", "--learning_rate=1e-3"} <= set(finetune)
    assert cm.start_of(cm.flags.parse(cm.CompareConfig(), ["--init_from=gpt2"]), 2, None) == "gpt2"
    assert cm.start_of(cm.CompareConfig(), 2, None) == "scratch"


def test_help_shows_the_examples_as_typed(capsys):
    # a backslash-newline in a plain docstring joins lines: the examples' continuations must survive --help
    with pytest.raises(SystemExit):
        cm.main(["--help"])
    assert "--n_embd=384 \\\n        --train_batch_size=32" in capsys.readouterr().out


def test_step_seconds_counts_a_resumed_run_from_where_it_went_on():
    log = ("iter 40/100: loss 1, lr 1e-3, 100.0ms/iter, 9 tok/s\n"  # stopped after 45, saved at 40
           "resuming /o/ckpt.pt at iter 40 (best val answer loss 1.0000)\n"
           "iter 60/100: loss 1, lr 1e-3, 200.0ms/iter, 9 tok/s\n")
    assert cm.step_seconds(log) == pytest.approx(40 * 0.1 + 20 * 0.2)


def test_an_unfinished_run_goes_on_from_its_checkpoint_and_a_finished_one_is_reused(tmp_path, monkeypatch):
    launched = []

    def fake_run_script(script, argv, log_path, what, append=False):
        launched.append((argv, append))
        (tmp_path / "ckpt.pt").write_bytes(b"x")
        return "iter 4/4: loss 1, lr 1e-3, 10.0ms/iter, 9 tok/s\n", 2.0
    monkeypatch.setattr(cm, "run_script", fake_run_script)
    argv = ["--mask=ism", "--max_iters=4", "--init_from=smollm2"]
    cm.write_json(str(tmp_path / "run.json"), {"argv": argv, "finished": False, "wall_seconds": 3.0})
    (tmp_path / "ckpt.pt").write_bytes(b"x")  # the stopped run's last save
    _, record = cm.train_run("ism-s1", str(tmp_path), argv, lambda text: None)
    assert launched == [(["--mask=ism", "--max_iters=4", "--init_from=resume"], True)]
    assert record == {"argv": argv, "finished": True, "wall_seconds": 5.0, "step_seconds": 0.04}
    cm.train_run("ism-s1", str(tmp_path), argv, lambda text: None)
    assert len(launched) == 1  # finished: reused
    cm.train_run("ism-s1", str(tmp_path), argv + ["--learning_rate=1"], lambda text: None)
    assert launched[-1] == (argv + ["--learning_rate=1", "--overwrite"], False)  # other flags: a new run


def test_prefix_at_equal_answers_trains_as_many_answer_tokens(tmp_path):
    """The steps it is given, against answer targets counted from collated batches of the rows each run reads."""
    from data.batching import RowStream, collate
    from data.store import load_split
    data_dir = str(tmp_path / "data")
    prepare(data_dir, block_size=256, n_train=300, n_val=4)
    cfg = cm.flags.parse(cm.CompareConfig(), [f"--data_dir={data_dir}", "--block_size=256", "--train_batch_size=2",
                                              "--max_iters=20", "--prefix_answers"])
    specs = cm.run_specs(cfg, ["causal", "prefix"])
    assert specs[:2] == [("causal", "causal", 20), ("prefix", "prefix", 20)] and specs[2][:2] == ("prefix-answers", "prefix")
    split = load_split(data_dir, "train")

    def answers(kind, steps):
        rows = RowStream(split, kind, 256, seed=1).take(2 * steps)
        return int((collate(split, rows, 256)["targets"] != -1).sum())
    assert specs[2][2] > 2 * 20
    assert answers("prefix", specs[2][2]) == pytest.approx(answers("causal", 20), rel=0.15)


def test_score_none_trains_only(compared, capsys):
    out_dir, _, argv = compared
    cm.main([a for a in argv] + ["--score=none"])
    assert "trained 2 runs in" in capsys.readouterr().out


def test_the_paired_interval_is_students_t():
    mean, std, low, high = mask_tables.paired([0.01, 0.02, 0.03])
    assert (mean, std) == (pytest.approx(0.02), pytest.approx(0.01))
    assert (low, high) == (pytest.approx(0.02 - 4.303 * 0.01 / math.sqrt(3)), pytest.approx(0.02 + 4.303 * 0.01 / 3 ** 0.5))
    assert mask_tables.paired([0.5]) == (0.5, None, None, None)


def test_real_conversations_are_scored_by_loss_per_turn_with_replies_side_by_side(compared, capsys):
    out_dir, _, argv = compared
    result = cm.main(argv + ["--score=loss", "--replies=1", "--json"])
    capsys.readouterr()
    runs = {(r["mask"], r["seed"]): r["eval"] for r in result["runs"]}
    assert all(not e["replayed"] for e in runs.values())
    turns = result["summary"]["loss_by_turn"]
    for turn, row in turns.items():  # one seed: the mean is the run's own per-turn loss, the paired one their difference
        assert row["causal"][0] == runs["causal", 7]["val_loss_by_turn"][turn]["loss"]
        assert row["ism-causal"][0] == pytest.approx(runs["ism", 7]["val_loss_by_turn"][turn]["loss"]
                                                     - runs["causal", 7]["val_loss_by_turn"][turn]["loss"])
    replies = result["replies"]
    assert set(replies) == {"causal", "ism", "start (causal)"}
    assert len({len(r["records"]) for r in replies.values()}) == 1 and replies["ism"]["records"]
    text = mask_tables.report(result)
    assert "| turn (held-out answer loss) | answer tokens | causal | ism | ism - causal (paired) |" in text
    assert "greedy replies to the first held-out conversations" in text and "exact match" not in text.split("\n")[3]


def test_evaluations_of_other_settings_are_kept_beside_each_other(tmp_path, monkeypatch):
    """Scoring a run with another --max_conversations keeps the first result: going back to the first settings
    scores nothing again; a new model (another stamp) drops both. A folder's eval.json of one result, as written
    before, is still read."""
    scored = []

    def eval_py(script, argv, *rest):  # what python eval.py --json prints, naming the settings it was given
        scored.append(argv)
        return json.dumps({"settings": argv[0], "val_loss": 1.0, "replayed": False}), 0.0
    monkeypatch.setattr(cm, "run_script", eval_py)
    cm.write_json(str(tmp_path / "eval.json"), {"key": {"argv": ["old"], "model": [1]}, "result": {"settings": "old"}})

    def result(settings, stamp):
        return cm.evaluated([settings], str(tmp_path), stamp, lambda text: None)["settings"]
    assert result("old", [1]) == "old" and not scored
    assert result("all", [1]) == "all" and result("first 60", [1]) == "first 60" and len(scored) == 2
    assert result("all", [1]) == "all" and result("old", [1]) == "old" and len(scored) == 2
    assert result("all", [2]) == "all" and len(scored) == 3  # a new checkpoint: scored again
    assert result("old", [2]) == "old" and len(scored) == 4
