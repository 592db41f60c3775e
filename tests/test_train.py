"""train.py: a tiny run learns and its checkpoint reloads, the loss counts answer tokens only, resume is exact, DDP
ranks agree (and equal one process with gradient accumulation), and user mistakes give one-line errors."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli import flags
import train
from support.checkpoint import load_checkpoint, model_from_checkpoint
from data.batching import RowStream, answer_target_count, batches_of, collate, epoch_rows, token_count
from data.prepare import prepare
from data.store import Split, load_split
from cli.errors import UserError
from mask import ASSISTANT, USER
from support.compute import Runtime
from loss import answer_loss_sum, answer_loss_totals, batch_mask, estimate_val_loss
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = Runtime()  # float32 on the CPU, SDPA with the dense mask
TINY = ["--device=cpu", "--block_size=128", "--n_layer=2", "--n_head=2", "--n_embd=32", "--log_interval=5",
        "--warmup_iters=5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    prepare(path, block_size=128, n_train=150, n_val=20)
    return path


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory):
    """So few conversations that a short run crosses epochs."""
    path = str(tmp_path_factory.mktemp("small") / "synthetic")
    prepare(path, block_size=128, n_train=16, n_val=4)
    return path


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A tiny ISM run: (out_dir, trained model)."""
    out_dir = str(tmp_path_factory.mktemp("out"))
    model = train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_iters=40",
                               "--eval_interval=20", "--batch_size=8", "--learning_rate=1e-2", "--min_lr=1e-3"])
    return out_dir, model


def run_train(*args):
    """`python train.py args` from the repository root, one thread (tests share a small CPU)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def in_last_answer(roles, docs):
    """True on ASSISTANT tokens with no query token after them in their document: a prefix sample's answer."""
    keep = torch.zeros_like(roles, dtype=torch.bool)
    for b in range(roles.shape[0]):
        docs_with_a_later_query = set()
        for t in reversed(range(roles.shape[1])):
            if roles[b, t] != ASSISTANT:
                docs_with_a_later_query.add(int(docs[b, t]))
            else:
                keep[b, t] = int(docs[b, t]) not in docs_with_a_later_query
    return keep


def answer_loss_by_hand(logits, batch, rows, kind):
    """Mean cross-entropy where the next token is an answer token of the same real (not padding) document (under
    prefix: of the document's last answer), computed from ids, roles and doc_ids alone (not batch["targets"])."""
    idx, roles, docs = batch["idx"], batch["roles"], batch["doc_ids"]
    real_doc = docs < torch.tensor([len(row) for row in rows])[:, None]  # padding is the doc after the last
    counted = (roles[:, 1:] == ASSISTANT) & (docs[:, 1:] == docs[:, :-1]) & real_doc[:, 1:]
    if kind == "prefix":
        counted &= in_last_answer(roles, docs)[:, 1:]
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, idx[:, 1:, None])[..., 0]
    return -(logp[counted]).mean().item(), int(counted.sum())


# ----------------------------------------------------------------------------------------------- learning

def test_tiny_run_lowers_the_held_out_answer_loss(trained, data_dir):
    _, model = trained
    val = load_split(data_dir, "val")
    torch.manual_seed(1337)  # the initial weights of the run (train.py seeds with --seed before building)
    untrained = GPT(model.config)
    before = estimate_val_loss(untrained, val, "ism", 128, 8, CPU)
    after = estimate_val_loss(model, val, "ism", 128, 8, CPU)
    assert before > 5.0  # ~ln(261): uniform guessing
    assert after < 0.6 * before


def test_checkpoint_reloads_the_trained_model(trained, data_dir):
    out_dir, model = trained
    checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    assert checkpoint["mask"] == "ism" and checkpoint["iter_num"] == 40
    assert checkpoint["tokenizer"]["name"] == "byte" and checkpoint["config"]["n_embd"] == 32
    assert checkpoint["best_val_loss"] < 5.0
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])
    reloaded = model_from_checkpoint(checkpoint)
    split = load_split(data_dir, "val")
    batch = collate(split, epoch_rows(split, "ism", 128, 0, 0)[:4], 128)
    mask = batch_mask("ism", batch, "sdpa")
    model.eval()
    with torch.no_grad():
        expected = model(batch["idx"], mask, positions=batch["positions"])[0]
        got = reloaded(batch["idx"], mask, positions=batch["positions"])[0]
    assert torch.equal(got, expected)


def test_val_loss_is_the_mean_over_answer_tokens(trained, data_dir):
    _, model = trained
    split = load_split(data_dir, "val")
    rows = epoch_rows(split, "ism", 128, 0, 0)
    total, count = answer_loss_totals(model, batches_of(split, rows, 128, 3), "ism", CPU)
    batch = collate(split, rows, 128)
    with torch.no_grad():
        logits = model.eval()(batch["idx"], batch_mask("ism", batch, "sdpa"), batch["positions"])[0]
    by_hand, n = answer_loss_by_hand(logits, batch, rows, "ism")
    assert count == n
    assert total / count == pytest.approx(by_hand, rel=1e-5)


# -------------------------------------------------------------------------------------------- loss masking

class FixedLogits(torch.nn.Module):
    """Stands in for the model: logits that ignore the input, so only the targets can move the loss."""

    def __init__(self, shape):
        super().__init__()
        self.logits = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def forward(self, idx, mask, positions=None, targets=None, loss_reduction="mean"):
        """GPT.forward's contract with targets: the logits where a loss is taken (targets != -1), their loss."""
        trained = targets != -1
        return self.logits[trained], F.cross_entropy(self.logits[trained], targets[trained], reduction=loss_reduction)


@pytest.mark.parametrize("kind", ["ism", "prefix"])
def test_loss_sees_answer_targets_only(data_dir, kind):
    split = load_split(data_dir, "val")
    rows = epoch_rows(split, kind, 128, 0, 0)[:2]
    stub = FixedLogits((2, 128, 261))
    loss = answer_loss_sum(stub, collate(split, rows, 128), kind)
    start, end, loss_from = rows[0][0]
    roles = np.asarray(split.roles)
    query = next(p for p in range(start + 1, end) if roles[p] == USER)  # the target of position query - 1
    answer = next(p for p in range(max(start + 1, loss_from), end) if roles[p] == ASSISTANT)  # a trained one
    for p, should_change in ((query, False), (answer, True)):
        ids = np.array(split.ids)
        ids[p] = (ids[p] + 1) % 256
        changed = answer_loss_sum(stub, collate(Split(ids, split.roles, split.offsets), rows, 128), kind)
        assert (changed.item() != loss.item()) == should_change


@pytest.mark.parametrize("kind", ["ism", "prefix", "causal"])
def test_answer_loss_sum_matches_a_hand_computation(data_dir, kind):
    split = load_split(data_dir, "train")
    rows = epoch_rows(split, kind, 128, 0, 0)[:3]
    batch = collate(split, rows, 128)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        loss_sum = answer_loss_sum(model, batch, kind)
        logits = model(batch["idx"], batch_mask(kind, batch, "sdpa"), batch["positions"])[0]
    by_hand, n = answer_loss_by_hand(logits, batch, rows, kind)
    assert loss_sum.item() / n == pytest.approx(by_hand, rel=1e-5)
    assert int((batch["targets"] != -1).sum()) == n > 0


# --------------------------------------------------------------------------------------------------- resume

def test_a_fresh_run_keeps_the_old_checkpoint_until_it_has_trained(trained, data_dir):
    out_dir, _ = trained
    path = os.path.join(out_dir, "ckpt.pt")
    before = open(path, "rb").read()
    with pytest.raises(UserError, match="already holds a model: continue it with --init_from=resume, replace it "
                                        "with --overwrite"):
        train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_iters=0", "--mask=causal"])
    train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_iters=0", "--mask=causal",
                       "--overwrite"])
    assert open(path, "rb").read() == before


def test_resume_is_exact(small_data_dir, tmp_path):
    common = TINY + [f"--data_dir={small_data_dir}", "--mask=prefix", "--batch_size=2",
                     "--gradient_accumulation_steps=2", "--dropout=0.1", "--lr_decay_iters=14", "--eval_interval=5"]
    whole = train.main(common + [f"--out_dir={tmp_path / 'whole'}", "--max_iters=14"])
    train.main(common + [f"--out_dir={tmp_path / 'parts'}", "--max_iters=6"])
    resumed = train.main(common + [f"--out_dir={tmp_path / 'parts'}", "--max_iters=14", "--init_from=resume"])
    ckpt = load_checkpoint(str(tmp_path / "parts" / "ckpt.pt"))
    assert ckpt["iter_num"] == 14 and ckpt["data_state"]["epoch"] >= 1  # the run crossed an epoch boundary
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # and the run did something: the weights moved
    torch.manual_seed(1337)
    assert not torch.equal(GPT(whole.config).lm_head.weight, whole.lm_head.weight)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    proc = run_train(*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=100000",
                     "--log_interval=1", "--eval_interval=100000")
    for line in proc.stdout:
        if line.startswith("iter 3/"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted at iter" in out and "--init_from=resume" in out
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] >= 3


def test_ctrl_c_after_the_reader_of_its_output_died_still_saves_and_resumes(data_dir, tmp_path):
    """`python train.py 2>&1 | tee log`: a terminal's Ctrl-C reaches tee and python together, and tee may die
    first. Every message then meets a closed pipe; the run must still save, and resume."""
    argv = [*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--log_interval=1", "--eval_interval=100000"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--max_iters=100000"], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if line.startswith("iter 3/"):
            break
    proc.stdout.close()  # tee is gone: nobody reads stdout or stderr any more
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    saved = load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"]
    assert saved >= 3
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, f"--max_iters={saved + 1}",
                              "--init_from=resume"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == saved + 1


# ------------------------------------------------------------------------------------------------------ DDP

DDP_WORKER = """
import os, sys
sys.path.insert(0, {root!r})
import torch
from cli import flags
import train
model = train.main(sys.argv[1:])
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def test_ddp_two_ranks_hold_identical_weights_equal_to_one_process(data_dir, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER.format(root=ROOT, out=str(tmp_path)))
    common = TINY + [f"--data_dir={data_dir}", "--max_iters=6", "--eval_interval=3", "--batch_size=2",
                     "--device=cpu", "--learning_rate=1e-2"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker), *common, f"--out_dir={tmp_path / 'ddp'}"],
                         capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("eval iter 6:") == 1  # rank 0 logs, rank 1 does not
    assert "2 ranks (DDP), 4 rows" in ddp.stdout  # the run's line says how the ranks share the work
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # the same rows through one process with two micro-batches per step: the same mean over answer tokens
    single = train.main(common + [f"--out_dir={tmp_path / 'single'}", "--gradient_accumulation_steps=2"])
    torch.manual_seed(1337)
    initial = GPT(single.config).state_dict()
    for name, value in single.state_dict().items():
        got, start = rank0[name], initial[name]
        if name.endswith("attn.c_attn.bias"):  # [query, key, value] biases: the key bias has no true gradient
            n = len(value) // 3                # (softmax ignores it), so Adam turns round-off there into steps
            got, value, start = (torch.cat([x[:n], x[2 * n:]]) for x in (got, value, start))
        moved = (value - start).abs().max()
        # noise here is ~1e-7; a per-micro-batch mean instead of the mean over all answer tokens differs by ~1e-2
        torch.testing.assert_close(got, value, atol=2e-6 + 1e-3 * moved, rtol=0)
    assert os.path.exists(tmp_path / "ddp" / "ckpt.pt")


# ------------------------------------------------------------------------------------------- user mistakes

def one_line_error(argv, capsys):
    """Run train.py's main as the command line does (flags.run); -> (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        flags.run(lambda: train.main(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,expected", [
    (["--max_iter=5"], "unknown flag --max_iter (did you mean --max_iters?)"),
    (["--mask=bidirectional"], "--mask=bidirectional: choose one of causal | prefix | ism"),
    (["--batch_size=big"], "--batch_size=big: expected int"),
    (["--init_from=resume", "--out_dir={missing}"], "no checkpoint at"),
    (["--init_from=resume", "--out_dir={out}", "--mask=causal"], "was trained with --mask=ism: pass that to resume"),
    (["--init_from=resume", "--out_dir={out}", "--n_embd=64"], "was trained with --n_embd=32: pass that to resume"),
    (["--init_from=resume", "--out_dir={out}", "--seed=7"], "was trained with --seed=1337: pass that to resume"),
    (["--block_size=64"], "--block_size=64 is shorter than the longest conversation"),
    (["--n_layer=1e8"], "--n_layer=1e8: must be at most 1024"),
    (["--block_size=9223372036854775807"], "--block_size=9223372036854775807: must be at most 1048576"),
    (["--n_layer=1024", "--n_embd=8192", "--n_head=64"], "need about"),  # ~825B parameters: before allocating
    (["--batch_size=65536", "--block_size=1048576", "--n_embd=4096", "--n_head=32"], "make --n_layer, --n_embd,"),
])
def test_mistakes_give_one_line_errors(trained, data_dir, tmp_path, capsys, args, expected):
    argv = [a.format(missing=tmp_path / "none", out=trained[0])
            for a in TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}"] + args]
    status, err = one_line_error(argv, capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_command_line_errors_are_one_line_without_traceback(data_dir, tmp_path):
    """The real command: an unknown flag, and a checkpoint of corrupt bytes (both run at once; the CPU is small)."""
    (tmp_path / "ckpt.pt").write_bytes(b"\x00not a checkpoint" * 10)
    cases = {"unknown flag --bogus": ["--bogus=1"],
             "is not a readable checkpoint": TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
                                                     "--init_from=resume"]}
    procs = {expected: run_train(*argv) for expected, argv in cases.items()}
    for expected, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


@pytest.mark.parametrize("argv,message", [
    (["--n_embd=30", "--n_head=4"], "n_embd 30 is not a multiple of n_head 4"),
    (["--device=cpu", "--attention=flex"], "--attention=flex cannot train on CPU"),
    (["--device=cpu", "--dtype=bfloat16"], "--dtype=bfloat16 autocasts on CUDA only"),
    (["--min_lr=1", "--learning_rate=0.1"], "--min_lr=1.0 is above --learning_rate=0.1"),
    (["--batch_size=0"], "--batch_size=0: must be at least 1"),
])
def test_settings_that_cannot_work_are_refused(argv, message, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        train.main(argv + [f"--data_dir={tmp_path / 'never-prepared'}", f"--out_dir={tmp_path / 'out'}"])
    assert not os.path.exists(tmp_path / "never-prepared") and not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------------------------------- small parts

def test_lr_schedule():
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    lrs = [train.get_lr(i, cfg) for i in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[110] == lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("kind", ["ism", "prefix"])
def test_answer_token_count_agrees_with_the_collated_targets(data_dir, kind):
    split = load_split(data_dir, "train")
    rows = epoch_rows(split, kind, 128, 0, 0)[:12]
    batch = collate(split, rows, 128)
    assert answer_target_count(split, rows) == int((batch["targets"] != -1).sum()) > 0
    padding = batch["doc_ids"] == torch.tensor([len(row) for row in rows])[:, None]
    assert token_count(rows) == int((~padding).sum()) > 0


def test_row_stream_is_the_epochs_in_order_and_restartable(data_dir):
    split = load_split(data_dir, "train")
    stream = RowStream(split, "ism", 128, seed=3)
    taken = [stream.take(7) for _ in range(60)]  # several epochs
    epochs = [epoch_rows(split, "ism", 128, 3, e) for e in range(stream.epoch + 1)]
    flat = [row for e in epochs for row in e]
    assert [row for rows in taken for row in rows] == flat[:7 * 60]
    state = stream.state()
    again = RowStream(split, "ism", 128, seed=3, **state)
    assert again.take(20) == stream.take(20)


# ---------------------------------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention's training path)")
@pytest.mark.parametrize("extra", [[], ["--compile"]])
def test_cuda_run_uses_flex_and_bf16_and_matches_the_cpu_loss(data_dir, tmp_path, capsys, extra):
    argv = [a for a in TINY if a != "--device=cpu"] + extra + [
        f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=40", "--eval_interval=20", "--batch_size=8",
        "--learning_rate=1e-2", "--min_lr=1e-3"]
    train.main(argv)
    log = capsys.readouterr().out
    assert "attention flex" in log and "bf16 autocast" in log and "mfu" in log
    checkpoint = load_checkpoint(str(tmp_path / "ckpt.pt"))
    first_eval = float(log.split("eval iter 0: val answer loss ")[1].split()[0])
    assert checkpoint["best_val_loss"] < 0.6 * first_eval
    # the same weights on the CPU through SDPA in float32 give the held-out loss the GPU measured (flex, bf16)
    cpu_loss = estimate_val_loss(model_from_checkpoint(checkpoint), load_split(data_dir, "val"), "ism", 128, 8, CPU)
    assert cpu_loss == pytest.approx(checkpoint["best_val_loss"], abs=0.03)


# ------------------------------------------------------------------------------------- faults and records

def edited_checkpoint(trained, tmp_path, **changes):
    """A copy of the trained run's folder whose ckpt.pt has some fields changed by hand."""
    out_dir = tmp_path / "edited"
    out_dir.mkdir()
    checkpoint = load_checkpoint(os.path.join(trained[0], "ckpt.pt"))
    for key, value in changes.items():
        checkpoint[key] = value
    torch.save(checkpoint, out_dir / "ckpt.pt")
    return str(out_dir)


@pytest.mark.parametrize("changes, message", [
    ({"iter_num": "40"}, "holds no usable training state (iter_num)"),
    ({"data_state": {"epoch": 0, "row": -5}}, "holds an impossible training state"),
    ({"optimizer": None}, "holds no usable training state (optimizer)"),
])
def test_hand_edited_checkpoints_are_refused_on_resume(trained, data_dir, tmp_path, changes, message):
    out_dir = edited_checkpoint(trained, tmp_path, **changes)
    with pytest.raises(UserError, match=re.escape(message)):
        train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--init_from=resume", "--max_iters=50"])


def test_resume_on_other_data_is_refused(trained, small_data_dir):
    with pytest.raises(UserError, match="was trained on other data than .*: pass the --data_dir it was trained on"):
        train.main(TINY + [f"--data_dir={small_data_dir}", f"--out_dir={trained[0]}", "--init_from=resume",
                           "--max_iters=50", "--batch_size=8"])


def test_a_missing_data_dir_is_an_error_not_a_synthetic_stand_in(tmp_path):
    typo = tmp_path / "data" / "chatz"
    with pytest.raises(UserError, match=f"no data at {typo}: prepare it with python prepare.py --out_dir={typo}"):
        train.main(TINY + [f"--data_dir={typo}", f"--out_dir={tmp_path / 'out'}"])
    assert not typo.exists()


def test_log_jsonl_records_the_run_and_a_resume_appends(small_data_dir, tmp_path):
    common = TINY + [f"--data_dir={small_data_dir}", f"--out_dir={tmp_path}", "--batch_size=2", "--eval_interval=4",
                     "--log_interval=2"]
    train.main(common + ["--max_iters=4"])
    train.main(common + ["--max_iters=8", "--init_from=resume"])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 4, 8]  # the log of an uninterrupted run
    assert [r["iter"] for r in records if "loss" in r] == [2, 4, 6, 8]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in records if "loss" in r)
    (tmp_path / "plain").write_text("")  # the log is readable as a file open() makes is
    assert os.stat(tmp_path / "log.jsonl").st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777


def evals_of(log):
    return [(int(m.group(1)), float(m.group(2)))
            for m in re.finditer(r"eval iter (\d+): val answer loss ([\d.]+)", log)]


@pytest.mark.parametrize("learning_rate", [1e-2, 0.5])  # a good one, and one so high that the loss rises
def test_keep_best_keeps_the_best_weights_beside_the_latest(small_data_dir, tmp_path, capsys, learning_rate):
    train.main(TINY + [f"--data_dir={small_data_dir}", f"--out_dir={tmp_path}", "--batch_size=2", "--max_iters=6",
                       "--eval_interval=2", "--keep_best", f"--learning_rate={learning_rate}",
                       f"--min_lr={learning_rate}"])
    log = capsys.readouterr().out
    assert "note: the held-out loss is measured on" in log  # 4 held-out conversations: a noisy loss, said so
    evals, best, new_bests = evals_of(log), float("inf"), []
    for it, loss in evals:
        if loss < best:
            best = loss
            new_bests.append(it)
    saved = [it for it in new_bests if it > 0]  # iter 0's untrained weights are never saved
    assert os.path.exists(tmp_path / "best.pt") == bool(saved)
    if saved:
        best_ckpt = load_checkpoint(str(tmp_path / "best.pt"))
        assert best_ckpt["iter_num"] == saved[-1] and "optimizer" not in best_ckpt
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 6
    assert ("the held-out loss rose to" in log) == any(loss > 1.02 * min(l for _, l in evals[:k + 1])
                                                       for k, (_, loss) in enumerate(evals))
    if learning_rate == 0.5:
        assert "the held-out loss rose to" in log


def test_ctrl_c_while_importing_prints_no_traceback():
    proc = subprocess.Popen([sys.executable, "train.py", "--help"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # inside `import torch`
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (-signal.SIGINT, 130) and "Traceback" not in err, err


TORCHRUN_WORKER = """
import sys
sys.path.insert(0, {root!r})
from cli import flags
import train
flags.run(lambda: train.main(sys.argv[1:]))
"""


def test_torchrun_ranks_all_exit_when_preparing_the_data_fails(tmp_path):
    (tmp_path / "data").write_text("a file where the data folder would go")  # preparing data/synthetic fails
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER.format(root=ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), *TINY, f"--out_dir={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0  # and it ended: no rank waits for rank 0's data forever
    # Every rank learns the failure and says it in one line; torchrun may stop a rank that has not said it yet
    # once the first one has exited. What follows is torchrun's own report that its workers failed.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= 2, proc.stderr
    assert all(e == "error: cannot create a folder in data/synthetic: Not a directory" for e in errors), errors
    assert 'File "' + str(worker) not in proc.stderr and "train.py" not in proc.stderr


def test_plot_training_reads_the_log(trained, tmp_path):
    from experiments import plot_training
    png = tmp_path / "loss.png"
    try:
        plot_training.main([trained[0], f"--png={png}"])
    except UserError as e:  # the one thing it may lack
        assert str(e) == "plotting needs matplotlib: pip install matplotlib"
    else:
        assert png.stat().st_size > 0
    with pytest.raises(UserError, match="cannot read .*log.jsonl"):
        plot_training.main([str(tmp_path / "nothing")])


@pytest.mark.parametrize("every, says", [(1, "stopping after this step"),
                                         (20, "at the next step that is a multiple of 20")])
def test_a_stop_request_says_when_the_run_will_stop(every, says, capsys):
    """One process looks after every step; several ranks agree only at log steps, and say so."""
    from support.signals import StopOnSignal
    with StopOnSignal(every) as stop:
        stop.handle(signal.SIGTERM, None)
        assert stop.requested
    assert says in capsys.readouterr().err
