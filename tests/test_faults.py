"""Faults a training run must survive without losing a file or printing a traceback: a disk that fills (on a real
tmpfs), hand-damaged checkpoints, a diverging run, planted links, another run's files, a killed run's leftovers;
and the first-run niceties (a finished run asked again has nothing to do, a busy machine is named)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from support import compute as common
import train
from support.checkpoint import load_checkpoint
from data.prepare import prepare
from support.starts import ChatModel
from cli.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--block_size=128", "--n_layer=2", "--n_head=2", "--n_embd=32", "--log_interval=2",
        "--warmup_iters=2", "--batch_size=2", "--eval_iters=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    prepare(path, block_size=128, n_train=40, n_val=6)
    return path


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A finished 4-step run: its out_dir and the flags that trained it."""
    out_dir = str(tmp_path_factory.mktemp("finished"))
    argv = TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_iters=4", "--eval_interval=2"]
    train.main(argv)
    return out_dir, argv


def run_train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path, finished):
    """A tmpfs with room for one checkpoint of the tiny model and its log, not for a second one beside it."""
    size = os.path.getsize(os.path.join(finished[0], "ckpt.pt"))
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 4096 * 4096 + 8192}", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield str(mount)
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # even where a failed test left a file open


def test_a_full_disk_keeps_the_previous_checkpoint_new_run_and_resume(small_disk, data_dir):
    out = os.path.join(small_disk, "out")
    args = TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=2"]
    with pytest.raises(UserError, match=f"could not write {out}/ckpt.pt .*the previous checkpoint, if any, is unchanged"):
        train.main(args + ["--max_iters=4"])
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 2  # the first save, whole
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]  # no temporary file left
    with pytest.raises(UserError, match="could not write .*unchanged"):
        train.main(args + ["--max_iters=6", "--init_from=resume"])
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 2


def fill(folder, leave=0):
    """Fill folder's filesystem with a file until at most `leave` bytes are free."""
    with open(os.path.join(folder, f"filler-{leave}"), "wb") as f:
        try:
            while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave + 4096:
                f.write(b"\0" * 4096)
                f.flush()
            f.write(b"\0" * max(0, os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize - leave))
            f.flush()
        except OSError:
            pass


def test_a_full_disk_on_best_pt_and_the_log_is_one_line(small_disk, data_dir, finished, capsys):
    fill(small_disk, leave=int(1.1 * os.path.getsize(os.path.join(finished[0], "ckpt.pt"))))  # ckpt.pt fits, no more
    out = os.path.join(small_disk, "best")
    with pytest.raises(UserError, match=f"could not write {out}/best.pt"):
        train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                           "--keep_best", "--learning_rate=1e-3"])
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 2
    fill(small_disk)  # fill what is left, then train a new run: the lock and the log give way, the save does not
    capsys.readouterr()
    with pytest.raises(UserError, match="could not write"):
        train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={os.path.join(small_disk, 'log')}",
                           "--max_iters=2", "--eval_interval=2"])
    assert "warning: cannot write" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ damaged inputs

def edited(finished, tmp_path, **changes):
    checkpoint = load_checkpoint(os.path.join(finished[0], "ckpt.pt"))
    checkpoint.update(changes)
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    return str(tmp_path)


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer": "byte"}, "bad tokenizer description"),
    ({"data": {"val": {"conversations": 6, "tokens": 1}}}, "was trained on other data"),
    ({"tokens": {"tokens": "100", "answer_tokens": 3}}, "holds no usable token counts"),
    ({"optimizer": {"state": {}, "param_groups": []}}, "its optimizer state does not fit its model"),
])
def test_hand_edited_checkpoints_are_one_line_on_resume(finished, data_dir, tmp_path, changes, message):
    out_dir = edited(finished, tmp_path, **changes)
    with pytest.raises(UserError, match=message):
        train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--init_from=resume", "--max_iters=6",
                           "--eval_interval=2"])


def test_a_checkpoint_with_a_string_tokenizer_is_one_line_as_a_start(finished, data_dir, tmp_path):
    start = edited(finished, tmp_path, tokenizer="byte")
    with pytest.raises(UserError, match="ckpt.pt: bad tokenizer description"):
        train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'new'}", f"--init_from={start}"])


def test_a_diverging_run_stops_without_saving_its_nan_weights(data_dir, tmp_path):
    out = str(tmp_path / "out")
    train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"])
    good = load_checkpoint(os.path.join(out, "ckpt.pt"))
    with pytest.raises(UserError, match="the loss is not finite by iter .*: the run diverged .*ckpt.pt keeps iter 2"):
        train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=40", "--eval_interval=20",
                           "--init_from=resume", "--learning_rate=1e12", "--min_lr=1e11", "--grad_clip=0",
                           "--warmup_iters=0"])
    kept = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert kept["iter_num"] == 2 and all(torch.equal(kept["model"][k], v) for k, v in good["model"].items())


# --------------------------------------------------------------------------------------- files of other runs

def test_planted_links_are_refused_never_followed(data_dir, tmp_path):
    for name in ("train.lock", "log.jsonl"):
        out, victim = tmp_path / name.replace(".", "-"), tmp_path / f"victim-{name}"
        out.mkdir()
        victim.write_text("precious")
        os.symlink(victim, out / name)
        args = [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"]
        extra = ["--overwrite"] if name == "log.jsonl" else []  # a link is refused even where replacing is allowed
        with pytest.raises(UserError, match=f"{name} is a symbolic link: remove it"):
            train.main(TINY + args + extra)
        assert victim.read_text() == "precious"


def test_a_new_run_refuses_to_replace_another_runs_best_pt_or_log(data_dir, tmp_path):
    for name in ("best.pt", "log.jsonl"):
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text("another run's")
        with pytest.raises(UserError, match=f"{name} already holds another run's {name}, and no checkpoint to resume: "
                                            "replace it with --overwrite") as refused:
            train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2"])
        assert "--init_from=resume" not in str(refused.value)  # there is nothing to resume: no hint that loops
        assert (out / name).read_text() == "another run's"


def test_a_run_that_diverged_before_its_first_save_says_how_to_run_again(data_dir, tmp_path):
    args = TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=40", "--eval_interval=20"]
    with pytest.raises(UserError, match="nothing was saved; its log.jsonl stays, so pass --overwrite to the next run"):
        train.main(args + ["--learning_rate=1e12", "--min_lr=1e11", "--grad_clip=0", "--warmup_iters=0"])
    assert not (tmp_path / "ckpt.pt").exists()
    train.main(args[:-2] + ["--max_iters=2", "--eval_interval=2", "--overwrite"])
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 2


def test_a_log_that_cannot_be_written_is_a_warning_the_run_goes_on(finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").mkdir()  # neither readable nor writable as a file
    argv = [a for a in finished[1] if not a.startswith(("--out_dir=", "--max_iters="))] + [f"--out_dir={out}"]
    train.main(argv + ["--init_from=resume", "--max_iters=6"])
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 6
    assert f"warning: cannot write {out}/log.jsonl (Is a directory): training goes on without it" in \
        capsys.readouterr().err
    train.main(argv + ["--overwrite", "--max_iters=2"])  # a new run too
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 2 and (out / "log.jsonl").is_dir()


def test_overwrite_replaces_the_old_runs_best_pt_at_once(data_dir, tmp_path, capsys):
    # a new run that keeps no best.pt must not leave the replaced run's beside its own ckpt.pt
    args = TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2"]
    train.main(args + ["--keep_best"])
    assert (tmp_path / "best.pt").exists()
    train.main(args + ["--overwrite", "--learning_rate=1e-3"])
    assert not (tmp_path / "best.pt").exists() and (tmp_path / "ckpt.pt").exists()
    assert "removed" in capsys.readouterr().out


def test_a_finished_run_asked_again_has_nothing_to_do(finished, capsys):
    out_dir, argv = finished
    before = os.stat(os.path.join(out_dir, "ckpt.pt")).st_mtime_ns
    assert train.main(argv + ["--threads=1"]) is None  # a setting that changes nothing
    assert "already holds this run, trained to iter 4: nothing to do" in capsys.readouterr().out
    assert os.stat(os.path.join(out_dir, "ckpt.pt")).st_mtime_ns == before
    with pytest.raises(UserError, match="already holds a model"):  # other settings: refused as before
        train.main(argv + ["--learning_rate=1e-3"])


def test_the_quick_start_runs_twice(tmp_path):
    # the README's one-liner, at a tiny size: the second time it has nothing to do and succeeds
    args = TINY + ["--max_iters=2", "--eval_interval=2", f"--out_dir={tmp_path / 'out'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(2):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout


def test_a_resume_past_max_iters_says_why_nothing_trains(finished, capsys):
    out_dir, argv = finished
    train.main(argv + ["--init_from=resume", "--max_iters=2"])
    assert "the run is already at iter 4, not before --max_iters=2: nothing to train" in capsys.readouterr().out


def test_a_killed_runs_leftovers_are_cleared(finished, data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".ckpt-abc123.tmp").write_bytes(b"\0" * 1000)  # a save killed mid-write
    (out / ".log-def456.tmp").write_text('{"iter": 0}\n')  # a resumed log killed before it took the log's name
    train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"])
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]
    prepared = tmp_path / "data"
    prepare(str(prepared), block_size=128, n_train=8, n_val=2)
    (prepared / ".prepare-xyz").mkdir()  # a prepare killed before it moved its files in
    (prepared / ".prepare-xyz" / "train_ids.npy").write_bytes(b"\0" * 1000)
    prepare(str(prepared), block_size=128, n_train=8, n_val=2)
    assert not (prepared / ".prepare-xyz").exists()


def test_a_run_clears_only_its_own_leftovers(data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".ckpt-backup.pt").write_text("a user's file")  # named like ours, not a leftover
    (out / ".ckpt-abc123.tmp").write_bytes(b"\0" * 1000)
    train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"])
    assert sorted(os.listdir(out)) == [".ckpt-backup.pt", "ckpt.pt", "log.jsonl"]


def test_compare_masks_writes_its_records_through_no_planted_link(tmp_path):
    from experiments import compare_masks
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "run.json.tmp")
    compare_masks.write_json(str(tmp_path / "run.json"), {"argv": []})
    assert victim.read_text() == "precious" and json.loads((tmp_path / "run.json").read_text()) == {"argv": []}


# ---------------------------------------------------------------------------------------------- first runs

@pytest.mark.parametrize("load,cpus,most,threads", [
    (1.9, 2, 2, 1),  # one busy process on two cores: one thread
    (8.7, 2, 2, 1),  # never fewer than one
    (1.4, 4, 4, 3),  # what the load leaves free, rounded
    (0.8, 2, 2, 2),  # an idle machine just after a command: all
    (3.0, 8, 4, 4),  # never more than torch's default
])
def test_auto_threads_take_the_cores_the_load_leaves_free(monkeypatch, load, cpus, most, threads):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 1.0, 1.0))
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    chosen, why = common.auto_threads(most)
    assert chosen == threads and (why is None) == (threads == most)
    if why:
        assert why.startswith(f"{threads} torch thread(s), not {most}: the load average is {load:.1f} on {cpus} CPUs")


def test_threads_0_is_auto_on_a_cpu_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 1.0, 1.0))
    monkeypatch.setattr(common, "TORCH_THREADS", 2)
    before = torch.get_num_threads()
    try:
        common.set_threads(0, "cpu")
        assert torch.get_num_threads() == 1 and capsys.readouterr().err.startswith("note: 1 torch thread(s), not 2")
        common.set_threads(2, "cpu")  # asked for by number: taken, and nothing said
        assert torch.get_num_threads() == 2 and capsys.readouterr().err == ""
    finally:
        torch.set_num_threads(before)


def test_a_model_of_the_synthetic_tasks_is_told_apart(finished):
    checkpoint = load_checkpoint(os.path.join(finished[0], "ckpt.pt"))
    assert ChatModel(None, None, "ism", "ism", "x", checkpoint).knows_only_synthetic_tasks
    assert not ChatModel(None, None, "ism", "ism", "x", dict(checkpoint, start="smollm2")).knows_only_synthetic_tasks
    assert not ChatModel(None, None, "causal", "causal", "a pretrained model").knows_only_synthetic_tasks
