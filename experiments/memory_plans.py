"""
What the papers' recipes need per GPU, from the formula every training run prints at its start
(support.compute.memory_plan), at the published shapes of their models (each config.json's fields):

    python experiments/memory_plans.py

No weights are read: the plan depends on the shape, the rows per step and the sharding alone.
"""
import os
import sys

# run as a script, the repository root is not on sys.path: put it first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E402
from model import GPTConfig
from support.compute import memory_plan, parameter_count

LLAMA = dict(family="llama", bias=False)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# recipe: (shape, LoRA rank and targets, rows per GPU, block_size, GPUs sharing the weights,
#          activation checkpointing)
RECIPES = {
    "config/llama32_1b_lora.py (Llama-3.2-1B, 1 GPU)": (
        dict(vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, mlp_hidden=8192,
             tie_embeddings=True), 32, ("q_proj", "v_proj"), 8, 2048, 1, False),
    "config/llama3_8b_fsdp.py (Llama-3-8B, 8 GPUs)": (
        dict(vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, mlp_hidden=14336,
             tie_embeddings=False), 0, (), 1, 4096, 8, True),
    "config/qwen25_lora.py (Qwen2.5-7B, 1 GPU)": (
        dict(vocab_size=152064, n_layer=28, n_head=28, n_kv_head=4, n_embd=3584, mlp_hidden=18944,
             qkv_bias=True, tie_embeddings=False), 32, ALL, 4, 2048, 1, True),
}


def lora_parameters(c, rank, targets):
    """The adapters' parameters: rank x (in + out) for each adapted projection of each layer."""
    h, kv, m = c.n_embd, c.n_kv_head * c.head_dim, c.mlp_hidden
    in_out = {"q_proj": h + h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": h + h,
              "gate_proj": h + m, "up_proj": h + m, "down_proj": m + h}
    return c.n_layer * rank * sum(in_out[t] for t in targets)


def main():
    print("| recipe | parameters (trained) | weights | gradients | AdamW | activations | per GPU |")
    print("|---|---|---|---|---|---|---|")
    for name, (shape, rank, targets, rows, block_size, gpus, checkpointing) in RECIPES.items():
        config = GPTConfig(block_size=block_size, **LLAMA, **shape)
        total = parameter_count(config)
        trained = lora_parameters(config, rank, targets) if rank else total
        plan = memory_plan(config, trained, rows, block_size, gpus, compute_bytes=2,
                           checkpointing=checkpointing)
        gib = {k: f"{v / 2**30:,.1f}" for k, v in plan.items()}
        print(f"| {name}, {rows} rows x {block_size:,} | {total / 1e9:.2f}B "
              f"({trained / 1e6:,.1f}M) | {gib['weights']} GiB | {gib['gradients']} | "
              f"{gib['optimizer']} | {gib['activations']} | {gib['total']} GiB |")


if __name__ == "__main__":
    main()
