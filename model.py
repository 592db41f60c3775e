"""
A GPT whose attention takes an explicit mask, plus a KV cache for chat. One GPT class, two families by config:

- GPT-2 (the default, family="gpt2"): learned positions, pre-LayerNorm, the tanh GELU, tied embeddings, biases.
  Parameter names and numerics follow GPT-2 / nanoGPT (transformer.wte, transformer.h.N.attn.c_attn, lm_head, ...),
  so GPT-2 weights load by name and give GPT-2's logits.
- The Llama family (family="llama": Llama, SmolLM2, Qwen2): rotary position embeddings (RoPE) instead of learned
  positions, RMSNorm, a SwiGLU MLP of width mlp_hidden, grouped-query attention (n_kv_head key/value heads shared
  by n_head query heads), optional q/k/v biases (Qwen2), tied or untied lm_head. Same module names: c_attn holds
  q, k and v stacked, c_fc the SwiGLU's gate and up projections stacked.

What differs from nanoGPT:
- There is no built-in causal assumption. Every forward gets the mask to use: a dense boolean tensor
  (True = may attend; SDPA, any device) or a FlexAttention BlockMask (CUDA). mask.py builds both from one rule.
  Both families run the same attention code under the same mask.
- Positions are explicit, so packed documents restart at 0 and a chunk on top of a cache continues from it; RoPE
  rotates each query and key by its own position, GPT-2 looks its position up.
- forward can run on a KVCache, gpt-fast's way: one positions tensor says where each token of the chunk sits; it
  places RoPE (or GPT-2's position lookup) and the slots the chunk's keys and values are written to
  (KVCache.update). The chunk then attends over the first S slots of the cache, S being its mask's width: the mask
  row of a token covers exactly the tokens it may see, filled slots only. The model keeps no count of the filled
  slots: the engine, which feeds the chunks, knows how many.
This file imports torch only.
"""
import functools
import inspect
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.nn.attention.flex_attention import BlockMask, flex_attention


@functools.cache
def compiled_flex_attention():
    """FlexAttention is fast only compiled (CUDA); uncompiled it runs a reference implementation, forward only on
    CPU. Compiled on first use: importing torch.compile's machinery costs seconds that CPU runs never need."""
    return torch.compile(flex_attention, dynamic=False)


FAMILIES = ("gpt2", "llama")
# The projections LoRA may adapt, by the names Hugging Face's Llama and PEFT give them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class GPTConfig:
    block_size: int = 512  # longest sequence, and the KV cache's capacity
    vocab_size: int = 261  # byte tokenizer: 256 bytes + 5 special tokens (may be padded: rows no token uses)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in every Linear and LayerNorm (GPT-2); the Llama family has none
    # The Llama family; the defaults below are GPT-2's, so a GPT-2 config needs none of them.
    family: str = "gpt2"  # "gpt2" | "llama"
    n_kv_head: int = 0  # key/value heads, n_head a multiple of it (grouped-query attention); 0: n_head
    mlp_hidden: int = 0  # MLP width; 0: 4 * n_embd (GPT-2)
    rope_theta: float = 10000.0  # RoPE base (family "llama")
    # Llama 3's RoPE scaling (Hugging Face's rope_type "llama3"), a plain dict so that checkpoints store it as it is:
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    # None: plain RoPE.
    rope_scaling: dict = None
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon
    qkv_bias: bool = False  # biases on the q, k, v projections even without bias (Qwen2)
    tie_embeddings: bool = True  # lm_head shares the token embedding's weights
    # LoRA (Llama family): a low-rank adapter on each projection lora_targets names; 0: none
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_targets: tuple = ("q_proj", "v_proj")
    lora_dropout: float = 0.0  # on the adapters' input only

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r}: choose one of {', '.join(FAMILIES)}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        self.lora_targets = tuple(self.lora_targets)
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if self.lora_rank and (self.family != "llama" or unknown or not self.lora_targets):
            raise ValueError(f"LoRA adapts the Llama family's {', '.join(LORA_TARGETS)}; not {self.family} "
                             f"{', '.join(sorted(unknown)) or 'with no target'}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class KVCache:
    """Keys and values of every layer for the tokens fed so far, preallocated up to block_size: keys[layer] and
    values[layer], each (batch_size, n_kv_head, block_size, head_dim): only the key/value heads, so grouped-query
    attention's saving is the cache's too. One tensor per layer and kind, not views of a larger one, so that a
    compiled step writes into them in place (a write into a view of a graph's input makes the compiler copy the
    whole base back). Allocated empty: a chunk attends only to the slots written before it and by it, so a slot
    never written is never read (engine.StaticDecoder's whole-capacity step on CUDA zero-fills the cache first).

    Memory: 2 (k and v) * n_layer * batch_size * block_size * n_kv_head * head_dim elements, e.g. 2 * 4 * 1 * 512 *
    128 * 4 bytes = 2 MiB for the default model in fp32; bytes_per_token says what one token costs. Writing a chunk
    of T tokens writes T slots per layer (O(T)); forgetting tokens is only a smaller count at the feeder's side.
    """

    def __init__(self, config, batch_size=1, device="cpu", dtype=torch.float32):
        shape = (batch_size, config.n_kv_head, config.block_size, config.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    @property
    def capacity(self):
        return self.keys[0].shape[2]

    @property
    def bytes_per_token(self):
        return 2 * sum(k[:, :, 0].numel() * k.element_size() for k in self.keys)

    def update(self, layer, input_pos, k, v):
        """Write a chunk's k, v (B, n_kv_head, T, head_dim) at slots input_pos (T,) of the layer; -> the layer's
        whole buffers (the caller reads the slots its mask covers)."""
        self.keys[layer].index_copy_(2, input_pos, k)
        self.values[layer].index_copy_(2, input_pos, v)
        return self.keys[layer], self.values[layer]


class RMSNorm(nn.Module):
    """Llama's norm: scale by the root mean square (no mean subtracted, no bias), computed in float32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def norm(config):
    if config.family == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(config.n_embd, config.norm_eps)


def rope_angles(positions, config):
    """cos and sin of RoPE's rotation angles, position * the pair's inverse frequency (rope_frequencies), computed
    in float32 at the explicit positions: (..., T) -> two (..., 1, T, head_dim / 2) tensors that broadcast over
    heads."""
    angles = positions.float().unsqueeze(-1) * rope_frequencies(config, positions.device)
    return angles.cos().unsqueeze(-3), angles.sin().unsqueeze(-3)


def rope_frequencies(config, device):
    """The inverse frequency of each pair i of head dimensions, theta^(-2i/head_dim), Llama 3-scaled when the
    config says so. Written in the operations Hugging Face's Llama uses, so that the angles are the same floats."""
    exponents = torch.arange(0, config.head_dim, 2, device=device, dtype=torch.float32) / config.head_dim
    inv_freq = 1.0 / config.rope_theta ** exponents
    if config.rope_scaling is None:
        return inv_freq
    scaling = config.rope_scaling
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    # Llama 3 stretches the long waves to reach a context factor times longer than the one it was pretrained with:
    # a wave longer than original / low is slowed down by factor, one shorter than original / high kept as it is,
    # and those between blend the two (smooth runs from 0 at the long end to 1 at the short end).
    wavelength = 2 * math.pi / inv_freq
    smooth = ((scaling["original_max_position_embeddings"] / wavelength - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x, rope):
    """Rotate each (first half, second half) pair of x's head dimensions by its angle (the Hugging Face / Llama
    layout: dimension i pairs with i + head_dim / 2)."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Linear(nn.Linear):
    """nn.Linear whose output stacks named parts (c_attn: q_proj, k_proj, v_proj; c_fc: gate_proj, up_proj), with a
    LoRA adapter on each part config.lora_targets names, computed as PEFT does: part += dropout(x) A^T B^T *
    lora_alpha / lora_rank, A (rank, in) random and B (out, rank) zero at first, so that an adapted model starts as
    its base. The adapters are lora_A.<part> and lora_B.<part>."""

    def __init__(self, in_features, parts, bias, config):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        ends = itertools.accumulate(parts.values())
        self.spans = {part: (end - size, end) for (part, size), end in zip(parts.items(), ends)}
        rank = config.lora_rank
        adapted = [part for part in parts if rank and part in config.lora_targets]
        self.lora_A = nn.ParameterDict({part: nn.Parameter(torch.empty(rank, in_features)) for part in adapted})
        self.lora_B = nn.ParameterDict({part: nn.Parameter(torch.empty(parts[part], rank)) for part in adapted})
        self.lora_scale = config.lora_alpha / rank if rank else 0.0
        self.lora_dropout = nn.Dropout(config.lora_dropout)
        self.reset_lora()

    def reset_lora(self):
        for A in self.lora_A.values():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # PEFT's start: nn.Linear's own init for A, B zero
        for B in self.lora_B.values():
            nn.init.zeros_(B)

    def forward(self, x):
        y = super().forward(x)
        if self.lora_A:
            h = self.lora_dropout(x)
            for part, A in self.lora_A.items():
                start, end = self.spans[part]
                y[..., start:end] += (h @ A.t() @ self.lora_B[part].t()) * self.lora_scale
        return y


class CausalSelfAttention(nn.Module):
    # the name is GPT-2's; the mask passed in decides what each token sees

    def __init__(self, config, layer_index):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_size, kv_size = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.c_attn = Linear(config.n_embd, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                             config.bias or config.qkv_bias, config)
        self.c_proj = Linear(q_size, {"o_proj": config.n_embd}, config.bias, config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.layer_index = layer_index

    def forward(self, x, mask, positions, rope=None, kv_cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))  # n_kv_head heads
        if rope is not None:  # Llama family: rotate q and k by their positions before they are cached
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, positions, k, v)
            width = mask.shape[-1]  # the slots the mask covers: the chunk's own and every one before it
            k, v = k[:, :, :width], v[:, :, :width]
        # Grouped-query attention: each group of n_head / n_kv_head query heads reads one key/value head.
        gqa = self.n_kv_head != self.n_head
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, BlockMask):
            flex = compiled_flex_attention() if q.is_cuda else flex_attention
            y = flex(q, k, v, block_mask=mask, enable_gqa=gqa)  # no attention dropout in Flex; residual ones apply
        else:
            attn_mask = mask.view(-1, 1, *mask.shape[-2:])  # (T, S) or (B, T, S) -> broadcast over heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2: c_proj(gelu(c_fc(x))). Llama family (SwiGLU): c_fc holds the gate and up projections stacked,
    c_proj(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.family == "llama"
        fc_parts = {"gate_proj": config.mlp_hidden, "up_proj": config.mlp_hidden} if self.swiglu else \
            {"c_fc": config.mlp_hidden}
        self.c_fc = Linear(config.n_embd, fc_parts, config.bias, config)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU ("gelu_new"); the exact one differs by ~3e-4
        self.c_proj = Linear(config.mlp_hidden, {"down_proj": config.n_embd}, config.bias, config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * up))
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer_index):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x, mask, positions, rope=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), mask, positions, rope, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.family == "gpt2":  # learned positions; the Llama family rotates q and k instead (RoPE)
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **layers,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.checkpoint_blocks = False  # activation checkpointing: less memory for long rows, one more forward
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        if self.lm_head.weight.is_meta:  # built on the meta device to receive loaded weights: nothing to draw
            return
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, mask, positions=None, targets=None, kv_cache=None, last_only=False, loss_reduction="mean"):
        """idx (B, T) token ids. mask: bool (T, S) or (B, T, S), True = may attend, or a BlockMask: the rows of the
        whole sequence's mask for these T tokens, over its first S tokens (S = T without a cache; with one, the
        chunk's keys are written into the cache and the first S slots are attended). positions (T,) or (B, T):
        where each token sits; default the chunk's own place, the last T of the S (0 .. T-1 without a cache).
        targets (B, T): next-token ids, -1 where no loss is taken; logits are then computed only where a loss is:
        (N, vocab) for the N targets, and the loss is their cross-entropy, reduced by loss_reduction ("mean",
        "sum": what a step that weighs micro-batches by their answer tokens adds up). last_only: the last position's
        logits only, (B, 1, vocab), what a chat step reads. Otherwise -> (logits (B, T, vocab), None).
        The output layer is the widest matmul of a small model and its logits the largest activation: computing
        them only where they are read saves time and memory, and changes no value."""
        B, T = idx.shape
        width = mask.shape[-1]
        if width > self.config.block_size:
            raise ValueError(f"sequence of {width} tokens exceeds block_size {self.config.block_size}")
        if positions is None:
            positions = torch.arange(width - T, width, device=idx.device)
        x = self._layers(idx, positions, mask, kv_cache)
        if targets is not None:
            trained = targets != -1
            logits = self.lm_head(x[trained])
            return logits, F.cross_entropy(logits.float(), targets[trained], reduction=loss_reduction)
        return self.lm_head(x[:, -1:] if last_only else x), None

    def _layers(self, idx, positions, mask, kv_cache):
        """The final-norm hidden states (B, T, n_embd)."""
        x = self.transformer.wte(idx)
        rope = None
        if self.config.family == "gpt2":
            x = x + self.transformer.wpe(positions)
        else:
            rope = rope_angles(positions, self.config)  # once per forward, shared by every layer
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.checkpoint_blocks and self.training:  # keep only each block's input; recompute the rest backward
                x = checkpoint(block, x, mask, positions, rope, kv_cache, use_reentrant=False)
            else:
                x = block(x, mask, positions, rope, kv_cache)
        return self.transformer.ln_f(x)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # weight decay on matrices (Linear weights, embeddings) only; never on biases or LayerNorm gains
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if use_fused else {}))

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops=989e12):
        """Model FLOPs utilisation against a peak (default: H100 bf16 dense), PaLM appendix B accounting:
        6N per token for the weights plus 12 * L * d * T for attention (counted as if every key were visible)."""
        cfg = self.config
        n_params = self.num_params()
        if "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()  # a lookup, no multiply-adds (as nanoGPT)
        flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
        return flops_per_token * tokens_per_iter / dt / peak_flops
