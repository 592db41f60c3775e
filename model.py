"""A GPT whose attention takes an explicit mask, and a KV cache for chat. Two families by config:
GPT-2 (learned positions, LayerNorm, tanh GELU, biases; GPT-2's parameter names: its weights load)
and Llama (SmolLM2, Qwen2: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional q/k/v biases,
LoRA adapters), under the same names: c_attn stacks q, k, v and c_fc the SwiGLU's gate and up.

Nothing assumes causality: every forward gets its mask, dense bool (True = may attend; SDPA) or a
FlexAttention BlockMask (CUDA), both from mask.py. Positions are explicit: packed documents restart
at 0, and a chunk on a KVCache continues it (gpt-fast's way): its positions place RoPE and the slots
it writes, and it attends over the first S slots, S its mask's width; the engine feeding the chunks
counts the filled slots, not the model. Imports torch only.
"""
import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

FAMILIES = ("gpt2", "llama")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.cache
def compiled_flex_attention():
    """FlexAttention is fast only compiled (CUDA): compiled on first use, never on a CPU run."""
    return torch.compile(flex_attention, dynamic=False)


@dataclass
class GPTConfig:
    block_size: int = 512  # longest sequence, and the KV cache's capacity
    vocab_size: int = 261  # bytes + 5 special tokens (may be padded: rows no token uses)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # in every Linear and LayerNorm (GPT-2)
    family: str = "gpt2"  # "gpt2" | "llama"; the fields below default to GPT-2's
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0: n_head
    mlp_hidden: int = 0  # MLP width; 0: 4 * n_embd
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # Llama 3's RoPE scaling, as Hugging Face's dict; None: plain RoPE
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # biases on q, k, v even without bias (Qwen2)
    tie_embeddings: bool = True  # lm_head shares the token embedding's weights
    lora_rank: int = 0  # LoRA adapters of this rank on each of lora_targets (Llama family); 0: none
    lora_alpha: float = 0.0  # their output is scaled by lora_alpha / lora_rank; 0: 2 * lora_rank
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
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head "
                             f"{self.n_kv_head}")
        self.lora_targets = tuple(self.lora_targets)
        self.lora_alpha = self.lora_alpha or 2 * self.lora_rank
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if self.lora_rank and (self.family != "llama" or unknown or not self.lora_targets):
            raise ValueError(f"LoRA adapts the Llama family's {', '.join(LORA_TARGETS)}; not "
                             f"{self.family} {', '.join(sorted(unknown)) or 'with no target'}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class KVCache:
    """keys[layer], values[layer]: (batch, n_kv_head, block_size, head_dim), one tensor each (into
    views of one, a compiled step would copy the whole back). Allocated empty: a chunk reads only
    slots written before it or by it (the engine's whole-capacity step zero-fills them first)."""

    def __init__(self, config, batch_size=1, device="cpu", dtype=torch.float32):
        shape = (batch_size, config.n_kv_head, config.block_size, config.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty_like(k) for k in self.keys]

    @property
    def capacity(self):
        return self.keys[0].shape[2]

    @property
    def bytes_per_token(self):
        return 2 * sum(k[:, :, 0].numel() * k.element_size() for k in self.keys)

    def update(self, layer, input_pos, k, v):
        """Write k, v (B, n_kv_head, T, head_dim) at slots input_pos (T,) -> the layer's buffers."""
        self.keys[layer].index_copy_(2, input_pos, k)
        self.values[layer].index_copy_(2, input_pos, v)
        return self.keys[layer], self.values[layer]


class RMSNorm(nn.Module):
    """Llama's norm: divide by the root mean square (no mean, no bias), in float32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


def norm(config):
    if config.family == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(config.n_embd, config.norm_eps)


def rope_angles(positions, config):
    """cos, sin of RoPE's angles at positions (..., T) -> two (..., 1, T, head_dim / 2), float32,
    computed with Hugging Face's operations (the same floats)."""
    dims = torch.arange(0, config.head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / config.rope_theta ** (dims / config.head_dim)
    s = config.rope_scaling
    if s is not None:  # Llama 3: long waves slowed by factor, short ones kept, those between mixed
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        waves = s["original_max_position_embeddings"] / (2 * math.pi / inv_freq)
        smooth = ((waves - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(-3), angles.sin().unsqueeze(-3)


def apply_rope(x, rope):
    """Rotate each pair (i, i + head_dim / 2) of x's head dimensions (Hugging Face's layout)."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def linear(in_features, parts, bias, config):
    """A Linear stacking parts ({"q_proj": size, ...}); a LoRALinear if config adapts one."""
    if config.lora_rank and set(parts) & set(config.lora_targets):
        return LoRALinear(in_features, parts, bias, config)
    return nn.Linear(in_features, sum(parts.values()), bias=bias)


class LoRALinear(nn.Linear):
    """nn.Linear plus PEFT's LoRA on each part in config.lora_targets: part += dropout(x) A^T B^T *
    lora_alpha / lora_rank; lora_A.<part>: (rank, in), lora_B.<part>: (part's out, rank)."""

    def __init__(self, in_features, parts, bias, config):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        ends = itertools.accumulate(parts.values())
        self.spans = {part: (end - size, end) for (part, size), end in zip(parts.items(), ends)}
        self.adapted = [part for part in parts if part in config.lora_targets]
        self.rank, self.scale = config.lora_rank, config.lora_alpha / config.lora_rank
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.Dropout(config.lora_dropout)
        self.reset_adapters()

    def reset_adapters(self):
        """PEFT's start, on the weight's device and in its dtype: A drawn as nn.Linear draws its
        weight, B zero, so that the layer computes its base."""
        for part in self.adapted:
            A = torch.empty(self.rank, self.in_features, device=self.weight.device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            start, end = self.spans[part]
            self.lora_A[part] = nn.Parameter(A.to(self.weight.dtype))
            self.lora_B[part] = nn.Parameter(self.weight.new_zeros(end - start, self.rank))

    def adapter_params(self):
        """-> {name: parameter} of the adapters (lora_A.q_proj, ...)."""
        return dict(itertools.chain(self.lora_A.named_parameters("lora_A"),
                                    self.lora_B.named_parameters("lora_B")))

    def forward(self, x):
        y = super().forward(x)
        h = self.lora_dropout(x)
        for part, A in self.lora_A.items():
            start, end = self.spans[part]
            y[..., start:end] += (h @ A.t() @ self.lora_B[part].t()) * self.scale
        return y


class CausalSelfAttention(nn.Module):  # GPT-2's name; the mask passed in decides what is seen
    def __init__(self, config, layer_index):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim
        q_size, kv_size = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        parts = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
        self.c_attn = linear(config.n_embd, parts, config.bias or config.qkv_bias, config)
        self.c_proj = linear(q_size, {"o_proj": config.n_embd}, config.bias, config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout, self.layer_index = config.dropout, layer_index

    def forward(self, x, mask, positions, rope=None, kv_cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if rope is not None:  # Llama: rotate q and k by their positions before they are cached
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, positions, k, v)
            width = mask.shape[-1]  # the slots the mask covers: the chunk's and all before it
            k, v = k[:, :, :width], v[:, :, :width]
        gqa = self.n_kv_head != self.n_head  # each group of query heads reads one key/value head
        if isinstance(mask, BlockMask):  # Flex has no attention dropout; the residual one applies
            flex = compiled_flex_attention() if q.is_cuda else flex_attention
            y = flex(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            attn_mask = mask.view(-1, 1, *mask.shape[-2:])  # (T, S) or (B, T, S): over heads
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask, p, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2: c_proj(gelu(c_fc(x))). Llama (SwiGLU): c_proj(silu(gate) * up), c_fc = [gate; up]."""

    def __init__(self, config):
        super().__init__()
        self.swiglu, hidden = config.family == "llama", config.mlp_hidden
        parts = {"gate_proj": hidden, "up_proj": hidden} if self.swiglu else {"c_fc": hidden}
        self.c_fc = linear(config.n_embd, parts, config.bias, config)
        self.c_proj = linear(hidden, {"down_proj": config.n_embd}, config.bias, config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * up))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # "gelu_new"


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


class Embedding(nn.Embedding):
    def reset_parameters(self):  # nothing to draw on the meta device (normal_ there loads dynamo)
        if not self.weight.is_meta:
            super().reset_parameters()


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        layers = dict(wte=Embedding(config.vocab_size, config.n_embd))
        if config.family == "gpt2":  # learned positions; Llama rotates q and k instead (RoPE)
            layers["wpe"] = Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **layers, drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]), ln_f=norm(config)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.checkpoint_blocks = False  # activation checkpointing: less memory, one more forward
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        if config.lora_rank:  # only the adapters train
            self.requires_grad_(False)
            for p in self.adapter_params().values():
                p.requires_grad_(True)
        if self.lm_head.weight.is_meta:  # built to receive weights (from_state): nothing to draw
            return
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by depth
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    @classmethod
    def from_state(cls, config, state=None, strict=True):
        """GPT(config) built on the meta device (no time or memory spent on random weights), given
        state's tensors as they are (no copy, no cast); what state lacks (strict=False) or all of it
        (no state: a model to read names and shapes from) stays on the meta device."""
        with torch.device("meta"):
            model = cls(config)
        if state is not None:
            model.load_state_dict(state, strict=strict, assign=True)
            if config.tie_embeddings:  # assign gave lm_head and wte a Parameter each: tie again
                model.transformer.wte.weight = model.lm_head.weight
        return model

    def adapter_params(self):
        """-> {state-dict name: parameter} of every LoRA adapter: what a LoRA run trains, saves."""
        return {f"{name}.{key}": p for name, module in self.named_modules()
                if isinstance(module, LoRALinear) for key, p in module.adapter_params().items()}

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, mask, positions=None, targets=None, kv_cache=None, last_only=False,
                loss_reduction="mean"):
        """idx (B, T); mask (T, S) or (B, T, S) bool (True = may attend) or a BlockMask: these
        tokens' rows over the first S (S = T, or a cache's first S slots, these T written into it);
        positions (T,) or (B, T), default the last T of the S. targets (B, T), -1 where no loss is
        taken -> (logits (N, vocab) of the N targets, their cross-entropy, "mean" or "sum");
        last_only -> ((B, 1, vocab), None); else ((B, T, vocab), None): logits only where read."""
        T, width = idx.shape[1], mask.shape[-1]
        if width > self.config.block_size:
            raise ValueError(f"sequence of {width} tokens exceeds block_size "
                             f"{self.config.block_size}")
        if positions is None:
            positions = torch.arange(width - T, width, device=idx.device)
        x, rope = self.transformer.wte(idx), None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(positions)
        else:
            rope = rope_angles(positions, self.config)  # once per forward, for every layer
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.checkpoint_blocks and self.training:  # recompute all but the input backward
                x = checkpoint(block, x, mask, positions, rope, kv_cache, use_reentrant=False)
            else:
                x = block(x, mask, positions, rope, kv_cache)
        x = self.transformer.ln_f(x)
        if targets is not None:
            trained = targets != -1
            logits = self.lm_head(x[trained])
            loss = F.cross_entropy(logits.float(), targets[trained], reduction=loss_reduction)
            return logits, loss
        return self.lm_head(x[:, -1:] if last_only else x), None

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW over what trains, weight decay on matrices only (never biases or norm gains)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = {"fused": True} if device_type == "cuda" else {}  # fused=False also stops foreach
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fused)

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops=989e12):
        """Model FLOPs utilisation against a peak (default: H100 bf16 dense), PaLM's appendix B: 6N
        per token (N without the position table, a lookup) + 12 L d T for attention."""
        cfg, n_params = self.config, self.num_params()
        if "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
        return flops_per_token * tokens_per_iter / dt / peak_flops


if __name__ == "__main__":  # a module: say what runs it
    print("usage: model.py is imported, not run: train.py trains its GPT, engine.py chats with one "
          "(python engine.py: a random model, cached against uncached)")
