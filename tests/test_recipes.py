"""The papers' recipes (config/llama32_1b_lora.py, config/llama3_8b_fsdp.py, config/qwen25_lora.py) run as they
are, on tiny random models of the same architecture (Llama 3's RoPE scaling, grouped-query attention, tied or not;
Qwen2's q/k/v biases), on the CPU: only the model, the data, the device and the length are replaced. The 8-GPU
FSDP2 recipe runs on two CPU ranks."""
import os
import subprocess
import sys

import pytest
import torch
import transformers

import train
from data.prepare import prepare
from support.checkpoint import load_checkpoint

transformers.logging.set_verbosity_error()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3 = dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
LLAMA = (transformers.LlamaConfig, transformers.LlamaForCausalLM)
SHAPES = {  # each recipe's architecture, tiny
    "llama32_1b_lora": (*LLAMA, dict(tie_word_embeddings=True, **LLAMA3)),
    "llama3_8b_fsdp": (*LLAMA, dict(tie_word_embeddings=False, **LLAMA3)),
    "qwen25_lora": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
}
WORKER = "import sys\nsys.path.insert(0, {root!r})\nfrom cli import flags\nimport train\n" \
         "flags.run(lambda: train.main(sys.argv[1:]))\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    prepare(path, block_size=128, n_train=80, n_val=4)
    return path


def tiny(recipe, folder):
    config_class, model_class, extra = SHAPES[recipe]
    torch.manual_seed(0)
    model_class(config_class(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             **extra)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("recipe", list(SHAPES))
def test_a_recipe_runs_on_a_tiny_model_of_its_architecture(recipe, data_dir, tmp_path):
    args = [os.path.join(ROOT, "config", f"{recipe}.py"), f"--init_from={tiny(recipe, str(tmp_path / 'model'))}",
            f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--block_size=128",
            "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--log_interval=1"]
    if recipe.endswith("fsdp"):
        (tmp_path / "worker.py").write_text(WORKER.format(root=ROOT))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(tmp_path / "worker.py"), *args], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = proc.stdout
    else:
        train.main(args)
        log = ""
    checkpoint = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert checkpoint["iter_num"] == 2 and checkpoint["mask"] == "ism"
    lora = checkpoint["model_args"]["lora_rank"]
    assert lora == (0 if recipe.endswith("fsdp") else 32) and (tmp_path / "out" / "adapter").exists() == bool(lora)
    assert checkpoint["config"]["activation_checkpointing"] == (recipe != "llama32_1b_lora")
    if log:
        assert "2 ranks (FSDP2)" in log and "memory plan per rank: weights" in log
