"""Training at the papers' scale, checked small on the CPU: LoRA through train.py (only the adapters train and are
saved, the base stays as loaded, the adapter in PEFT's format gives our logits under peft, resume is exact), FSDP2
through torchrun with gloo (2 ranks x 1 micro-batch equal 1 process x 2 accumulation steps, and a run goes on
across world sizes: 2 ranks -> 1 process -> 2 ranks), and LoRA under FSDP2."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from peft import PeftModel

import train
from data.prepare import prepare
from mask import USER, make_mask
from support.checkpoint import load_checkpoint
from support.starts import load_chat_model, load_start
from test_llama import llama_folder

transformers.logging.set_verbosity_error()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = "import sys\nsys.path.insert(0, {root!r})\nfrom cli import flags\nimport train\n" \
         "flags.run(lambda: train.main(sys.argv[1:]))\n"
RUN = ["--device=cpu", "--block_size=128", "--batch_size=1", "--eval_interval=100", "--eval_iters=1",
       "--log_interval=1", "--warmup_iters=0", "--learning_rate=3e-3", "--min_lr=3e-3"]
IDS = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small random Llama folder (byte vocabulary), every parameter perturbed."""
    return llama_folder(tmp_path_factory.mktemp("base") / "llama", hidden_size=32, intermediate_size=48)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    prepare(path, block_size=128, n_train=60, n_val=4)
    return path


def logits(model):
    with torch.no_grad():
        return model(IDS, make_mask("causal", torch.full((IDS.shape[1],), USER)))[0][..., :256]


def lora_run(base, data_dir, out_dir, *extra):
    return train.main(RUN + [f"--init_from={base}", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                             "--lora_rank=4", "--lora_targets=q_proj,v_proj,down_proj", *extra])


def test_lora_trains_the_adapters_only_and_peft_reads_them(base, data_dir, tmp_path):
    lora_run(base, data_dir, tmp_path / "lora", "--max_iters=3")
    checkpoint = load_checkpoint(str(tmp_path / "lora" / "ckpt.pt"))
    assert checkpoint["model"] and all(".lora_" in name for name in checkpoint["model"])  # no frozen base in it
    assert checkpoint["base"]["init_from"] == base and checkpoint["model_args"]["lora_rank"] == 4
    assert all(".lora_" in name for name in checkpoint["optimizer"]["state"])  # only the adapters were optimized
    chat = load_chat_model(init_from=str(tmp_path / "lora" / "ckpt.pt"))  # as sample.py, serve.py, eval.py load it
    plain = load_start(base).model
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(chat.model.state_dict()[name], tensor, atol=0, rtol=0)  # the base as loaded
    peft = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                     str(tmp_path / "lora" / "adapter")).eval()
    with torch.no_grad():
        theirs = peft(IDS).logits
    torch.testing.assert_close(logits(chat.model), theirs, atol=1e-4, rtol=0)
    assert (logits(chat.model) - logits(plain)).abs().max() > 1e-4  # it trained


def test_a_lora_run_resumes_exactly(base, data_dir, tmp_path):
    lora_run(base, data_dir, tmp_path / "straight", "--max_iters=4")
    lora_run(base, data_dir, tmp_path / "stopped", "--max_iters=2")
    lora_run(base, data_dir, tmp_path / "stopped", "--max_iters=4", "--init_from=resume")
    straight, resumed = (load_checkpoint(str(tmp_path / run / "ckpt.pt"))["model"] for run in ("straight", "stopped"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=0, rtol=0)


def torchrun(tmp_path, ranks, *args):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           str(worker), *RUN, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_fsdp_ranks_equal_one_process_and_a_run_goes_on_across_world_sizes(base, data_dir, tmp_path):
    common = [f"--init_from={base}", f"--data_dir={data_dir}"]
    train.main(RUN + common + [f"--out_dir={tmp_path / 'one'}", "--max_iters=6", "--gradient_accumulation_steps=2"])
    out = tmp_path / "spread"
    log = torchrun(tmp_path, 2, *common, f"--out_dir={out}", "--max_iters=2", "--fsdp")
    assert "2 ranks (FSDP2), 2 rows" in log
    train.main(RUN + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--init_from=resume",
                      "--gradient_accumulation_steps=2"])
    torchrun(tmp_path, 2, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6", "--init_from=resume",
             "--fsdp")
    one, spread = (load_checkpoint(str(tmp_path / run / "ckpt.pt")) for run in ("one", "spread"))
    assert spread["iter_num"] == one["iter_num"] == 6 and spread["tokens"] == one["tokens"]
    for name, tensor in one["model"].items():
        torch.testing.assert_close(spread["model"][name], tensor, atol=1e-4, rtol=0)
    moved = max((one["model"][n] - w).abs().max().item() for n, w in load_start(base).model.state_dict().items())
    assert moved > 1e-3  # six steps moved the weights: the comparison is not of two untouched copies


def test_lora_under_fsdp_trains_the_adapters(base, data_dir, tmp_path):
    torchrun(tmp_path, 2, f"--init_from={base}", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}",
             "--max_iters=2", "--fsdp", "--lora_rank=4")
    checkpoint = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert checkpoint["iter_num"] == 2 and all(".lora_" in name for name in checkpoint["model"])
    assert any(t.abs().max() > 0 for n, t in checkpoint["model"].items() if ".lora_B." in n)  # B left zero
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(base)  # peft opens it by that
