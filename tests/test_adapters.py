"""PEFT adapters at the edges of a run: out_dir/adapter/ never replaces a folder the run did not
write, never writes through a link, never overwrites the adapter the run started from, is never a
save behind ckpt.pt, and a full disk keeps the previous one; adapters stack (a LoRA checkpoint's own
are folded in first, as peft's merge_and_unload does); and an adapter_config.json that computes
otherwise under peft, or that peft refuses, is one line naming the file and the key."""
import json
import os
import subprocess

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import train
from cli.errors import UserError
from data.prepare import prepare
from mask import USER, make_mask
from support.checkpoint import load_checkpoint
from support.lora import merged, read_adapter, with_lora, write_adapter
from support.starts import load_chat_model, load_start
from support.weights import peft_name
from test_gpt2 import hf_gpt2
from test_llama import llama_folder

transformers.logging.set_verbosity_error()
RUN = ["--device=cpu", "--block_size=128", "--batch_size=1", "--eval_iters=1", "--log_interval=1",
       "--warmup_iters=0", "--learning_rate=3e-3", "--min_lr=3e-3", "--lora_targets=q_proj,v_proj"]
IDS = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small random Llama folder (byte vocabulary), every parameter perturbed."""
    return llama_folder(tmp_path_factory.mktemp("base") / "llama", hidden_size=32,
                        intermediate_size=48)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    prepare(path, block_size=128, n_train=60, n_val=4)
    return path


def lora_run(base, data_dir, out_dir, *extra, rank=4):
    return train.main(RUN + [f"--init_from={base}", f"--data_dir={data_dir}",
                             f"--out_dir={out_dir}", f"--lora_rank={rank}", *extra])


@pytest.fixture(scope="module")
def rank8_run(base, data_dir, tmp_path_factory):
    """A finished rank-8 LoRA run of 2 steps: its out_dir."""
    out = tmp_path_factory.mktemp("rank8")
    lora_run(base, data_dir, out, "--max_iters=2", "--eval_interval=2", rank=8)
    return str(out)


def theirs(base):
    return transformers.AutoModelForCausalLM.from_pretrained(base).eval()


def peft_adapter(base, folder, seed=3, **settings):
    """An adapter made and saved by peft (random B: not the identity) -> its folder, a string."""
    torch.manual_seed(seed)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                           "init_lora_weights": False, "task_type": "CAUSAL_LM", **settings})
    get_peft_model(theirs(base), config).save_pretrained(str(folder))
    return str(folder)


def edited(folder, **changes):
    """folder's adapter_config.json with changes -> folder."""
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **changes}, f)
    return folder


def logits(model):
    with torch.no_grad():
        return model(IDS, make_mask("causal", torch.full((IDS.shape[1],), USER)))[0][..., :256]


def files(folder):
    return {name: open(os.path.join(folder, name), "rb").read()
            for name in sorted(os.listdir(folder))}


def val_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["iter"]: r["val_loss"] for r in map(json.loads, f) if "val_loss" in r}


# ---------------------------------------------------------------- out_dir/adapter/ loses nothing

def test_a_new_lora_run_refuses_to_replace_an_adapter_folder_it_did_not_write(base, data_dir,
                                                                            tmp_path):
    folder = peft_adapter(base, tmp_path / "out" / "adapter")
    before = files(folder)
    with pytest.raises(UserError, match="adapter already holds another run's adapter, and no "
                                        "checkpoint to resume: replace it with --overwrite"):
        lora_run(base, data_dir, tmp_path / "out", "--max_iters=1")
    assert files(folder) == before


def test_a_full_run_refuses_another_runs_adapter_and_with_overwrite_removes_it(base, data_dir,
                                                                               tmp_path):
    """A run that writes no adapter must not leave another run's beside its ckpt.pt as its own."""
    folder = tmp_path / "out" / "adapter"
    peft_adapter(base, folder)
    (folder / "notes.txt").write_text("mine")
    full = RUN + [f"--init_from={base}", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}",
                  "--max_iters=1", "--eval_interval=1"]
    with pytest.raises(UserError, match="adapter already holds another run's adapter"):
        train.main(full)
    train.main(full + ["--overwrite"])
    left = os.listdir(folder)  # the adapter's files went; others (peft's README.md, ours) stay
    assert "notes.txt" in left
    assert not {"adapter_config.json", "adapter_model.safetensors"} & set(left)
    assert (tmp_path / "out" / "ckpt.pt").exists()


def test_a_link_at_the_adapter_folder_or_its_files_is_refused_never_written_through(
        base, data_dir, tmp_path):
    victim = peft_adapter(base, tmp_path / "victim")
    before, out = files(victim), tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "adapter")
    with pytest.raises(UserError, match="adapter is a symbolic link: remove it"):
        lora_run(base, data_dir, out, "--max_iters=1", "--overwrite")  # even where it may replace
    adapted = with_lora(load_start(base).model, 4, 8, ["q_proj", "v_proj"])
    with pytest.raises(UserError, match="adapter is a symbolic link: remove it"):  # planted later
        write_adapter(adapted.state_dict(), adapted.config, str(out / "adapter"))
    os.remove(out / "adapter")
    (out / "adapter").mkdir()
    os.symlink(os.path.join(victim, "adapter_config.json"), out / "adapter" / "adapter_config.json")
    with pytest.raises(UserError, match="adapter_config.json is a symbolic link: remove it"):
        lora_run(base, data_dir, out, "--max_iters=1", "--overwrite")
    assert files(victim) == before and not (out / "ckpt.pt").exists()


def test_an_adapter_path_that_is_a_file_is_one_line_before_training(base, data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter").write_text("notes")
    with pytest.raises(UserError, match="adapter is not a folder: remove it or pick another "
                                        "--out_dir"):
        lora_run(base, data_dir, out, "--max_iters=1", "--overwrite")
    assert not (out / "ckpt.pt").exists() and (out / "adapter").read_text() == "notes"


def test_a_run_on_a_folded_adapter_writes_none_so_never_the_one_it_started_from(
        base, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    start = peft_adapter(base, out / "adapter")  # --adapter=OUT/adapter --out_dir=OUT
    before, steps = files(start), ["--max_iters=1", "--eval_interval=1"]
    lora_run(base, data_dir, out, f"--adapter={start}", *steps)
    # peft would put out_dir/adapter/ on the base without the start: none is written, and it says so
    assert "writes no out_dir/adapter/" in capsys.readouterr().out
    assert files(start) == before
    lora_run(base, data_dir, out, f"--adapter={start}", "--max_iters=2", "--eval_interval=1",
             "--init_from=resume")
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 2 and files(start) == before
    lora_run(base, data_dir, out, f"--adapter={start}", *steps, "--overwrite")  # a new run here
    assert files(start) == before  # replaces the run's files, never the adapter it starts from


def test_a_killed_adapter_writes_leftover_is_cleared_by_the_next_run(base, data_dir, tmp_path):
    out = tmp_path / "out"
    lora_run(base, data_dir, out, "--max_iters=1", "--eval_interval=1")
    (out / "adapter" / ".tmp-abc123").write_bytes(b"\0" * 1000)  # a write killed before its rename
    lora_run(base, data_dir, out, "--max_iters=2", "--eval_interval=1", "--init_from=resume")
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json",
                                                   "adapter_model.safetensors"]


def test_a_kill_during_a_save_never_leaves_the_adapter_behind_ckpt_pt(base, data_dir, tmp_path,
                                                                     monkeypatch):
    out, saves, write = tmp_path / "out", [], train.write_adapter

    def killed_at_the_second(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the process dies here
        return write(*args, **kwargs)

    monkeypatch.setattr(train, "write_adapter", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        lora_run(base, data_dir, out, "--max_iters=2", "--eval_interval=1")
    monkeypatch.undo()
    adapter_is_checkpoint(out, 1)
    lora_run(base, data_dir, out, "--max_iters=2", "--eval_interval=1", "--init_from=resume")
    adapter_is_checkpoint(out, 2)


def adapter_is_checkpoint(out, iter_num):
    checkpoint = load_checkpoint(str(out / "ckpt.pt"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert checkpoint["iter_num"] == iter_num and len(adapter) == len(checkpoint["model"])
    for name, tensor in checkpoint["model"].items():
        torch.testing.assert_close(adapter[peft_name(name)], tensor, atol=0, rtol=0)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=262144", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_full_disk_during_the_adapter_write_is_one_line_and_keeps_the_previous_one(
        base, small_disk):
    adapted = with_lora(load_start(base).model, 4, 8, ["q_proj", "v_proj"])
    folder = str(small_disk / "adapter")
    write_adapter(adapted.state_dict(), adapted.config, folder)
    before = files(folder)
    with open(small_disk / "filler", "wb", buffering=0) as f:  # fill the disk
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    with pytest.raises(UserError, match=r"could not write .*adapter_model.safetensors \(No space "
                                        r"left on device\); the previous adapter, if any, is "
                                        "unchanged"):
        write_adapter({k: v + 1 for k, v in adapted.state_dict().items()}, adapted.config, folder)
    assert files(folder) == before  # and no temporary file left


# ------------------------------------------------------------------------------------- stacking

def test_an_adapter_on_a_lora_checkpoint_sits_on_its_adapters_as_under_peft(base, rank8_run,
                                                                           tmp_path):
    extra = peft_adapter(base, tmp_path / "extra")  # rank 4 on a rank-8 run
    chat = load_chat_model(out_dir=rank8_run, adapter=extra)  # sample.py --out_dir= --adapter=
    run = PeftModel.from_pretrained(theirs(base), os.path.join(rank8_run, "adapter"))
    stacked = PeftModel.from_pretrained(run.merge_and_unload(), extra).eval()
    with torch.no_grad():
        want = stacked(IDS).logits
    torch.testing.assert_close(logits(chat.model), want, atol=1e-4, rtol=0)
    alone = merged(read_adapter(load_start(base).model, extra))
    assert (logits(alone) - want).abs().max() > 1e-3  # the run's adapters count


def test_a_lora_run_from_a_lora_checkpoint_starts_where_it_ended_and_resumes(
        base, data_dir, rank8_run, tmp_path):
    out = str(tmp_path / "stacked")
    lora_run(base, data_dir, out, f"--init_from={rank8_run}", "--max_iters=1", "--eval_interval=1")
    first, done = val_losses(rank8_run), val_losses(out)
    assert abs(done[0] - first[2]) < 1e-5  # its loss at step 0 is the checkpoint's...
    assert abs(first[0] - first[2]) > 1e-4  # ...not the base's
    lora_run(base, data_dir, out, "--max_iters=2", "--eval_interval=1", "--init_from=resume")
    chat = load_chat_model(out_dir=out)
    want = read_adapter(merged(load_start(rank8_run).model), os.path.join(out, "adapter"))
    torch.testing.assert_close(logits(chat.model), logits(want), atol=1e-5, rtol=0)
    checkpoint = torch.load(os.path.join(rank8_run, "ckpt.pt"), weights_only=True)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = checkpoint["model"][name] + 1  # the start's adapters trained on
    changed = tmp_path / "changed"
    changed.mkdir()
    torch.save(checkpoint, changed / "ckpt.pt")
    stacked = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    stacked["base"]["init_from"] = str(changed)
    torch.save(stacked, os.path.join(out, "ckpt.pt"))
    with pytest.raises(UserError, match="its adapters were trained on .*changed since"):
        load_chat_model(out_dir=out)


def test_a_full_run_from_a_lora_checkpoint_trains_every_weight_of_it(base, data_dir, rank8_run,
                                                                     tmp_path):
    out = str(tmp_path / "full")
    train.main(RUN + [f"--init_from={rank8_run}", f"--data_dir={data_dir}", f"--out_dir={out}",
                      "--max_iters=1", "--eval_interval=1"])
    first, done = val_losses(rank8_run), val_losses(out)
    assert abs(done[0] - first[2]) < 1e-5
    checkpoint = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert checkpoint["model_args"]["lora_rank"] == 0
    assert any(".lora_" not in name for name in checkpoint["optimizer"]["state"])  # all of it


def test_a_lora_checkpoint_whose_adapters_do_not_fit_its_model_args_is_one_line(rank8_run,
                                                                               tmp_path):
    checkpoint = torch.load(os.path.join(rank8_run, "ckpt.pt"), weights_only=True)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = checkpoint["model"][name][:4]  # rank 4 where model_args say 8
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="its adapters do not fit its model_args; retrain or "
                                        "restore it"):
        load_start(str(tmp_path / "ckpt.pt"))


# ------------------------------------------------------------------ what peft computes otherwise

@pytest.mark.parametrize("kind", ["pissa", "pissa_niter_2", "olora"])
def test_adapters_that_rebase_the_weights_are_refused(base, tmp_path, kind):
    folder = peft_adapter(base, tmp_path / kind, init_lora_weights=kind)  # A, B of W - B A
    with pytest.raises(UserError, match=f"adapter_config.json: init_lora_weights '{kind}'"):
        read_adapter(load_start(base).model, folder)


def test_an_alora_adapter_is_refused(base, tmp_path):
    # peft adapts only the tokens after the invocation tokens
    folder = peft_adapter(base, tmp_path / "alora", alora_invocation_tokens=[5, 6])
    with pytest.raises(UserError, match="adapter_config.json: alora_invocation_tokens"):
        read_adapter(load_start(base).model, folder)


@pytest.mark.parametrize("kind", [False, "gaussian", "eva", "orthogonal", "mica", None])
def test_initialisations_that_leave_the_weights_alone_give_peft_logits(base, tmp_path, kind):
    folder = edited(peft_adapter(base, tmp_path / "adapter"), init_lora_weights=kind)
    with torch.no_grad():  # peft runs the initialisation, then loads the saved weights
        want = PeftModel.from_pretrained(theirs(base), folder).eval()(IDS).logits
    torch.testing.assert_close(logits(read_adapter(load_start(base).model, folder)), want,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, named", [
    ({"use_bdlora": {"target_modules_bd_a": ["q_proj"]}}, "use_bdlora"),
    ({"kasa_config": {}}, "kasa_config"),
    ({"init_lora_weights": "corda"}, "init_lora_weights 'corda'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights 'loftq'"),
    ({"init_lora_weights": 1}, "init_lora_weights 1"),
    ({"peft_type": None}, "peft_type None"),  # peft refuses these nulls
    ({"bias": None}, "bias None"),
    ({"rank_pattern": None}, "rank_pattern None"),
    ({"lora_dropout": None}, "lora_dropout None"),
    ({"r": True}, "r True"),  # and these values
    ({"lora_alpha": True}, "lora_alpha True"),
    ({"lora_alpha": float("inf")}, "lora_alpha inf"),
    ({"lora_dropout": "abc"}, "lora_dropout 'abc'"),
    ({"lora_dropout": [0.1]}, r"lora_dropout \[0.1\]"),
    ({"lora_dropout": 1.5}, "lora_dropout 1.5"),
    ({"target_modules": [["q_proj"]]}, "target_modules"),
])
def test_what_peft_refuses_or_computes_otherwise_is_one_line(base, tmp_path, change, named):
    folder = edited(peft_adapter(base, tmp_path / "adapter"), **change)
    with pytest.raises(UserError, match=f"adapter_config.json: {named}"):
        read_adapter(load_start(base).model, folder)


def test_an_endless_or_huge_adapter_config_is_refused_unread(base, tmp_path):
    folder = edited(peft_adapter(base, tmp_path / "adapter"), notes=" " * 2**21)
    with pytest.raises(UserError, match="adapter_config.json is over 1 MiB"):
        read_adapter(load_start(base).model, folder)
    os.remove(os.path.join(folder, "adapter_config.json"))
    os.symlink("/dev/zero", os.path.join(folder, "adapter_config.json"))  # never read to its end
    with pytest.raises(UserError, match="adapter_config.json is over 1 MiB"):
        read_adapter(load_start(base).model, folder)


def test_an_adapter_on_a_gpt2_model_is_one_line(base, tmp_path):
    hf_gpt2().save_pretrained(tmp_path / "gpt2")
    folder = peft_adapter(base, tmp_path / "adapter")
    with pytest.raises(UserError, match="adapter: LoRA adapts the Llama family's"):
        load_start(str(tmp_path / "gpt2"), adapter=folder)
