"""The names of a model's weights in every format ismGPT reads or writes, each written once and used
both ways, and the rules every loader holds a file to: a loader never accepts a file it would
compute wrongly."""
import math
from dataclasses import replace

import torch

from cli.errors import UserError
from data.tokenizer import SPECIAL_TOKENS, get_tokenizer
from model import GPT

BYTE_VOCAB, GPT2_VOCAB = 256, 50257  # a GPT-2's vocabulary: our bytes, or GPT-2's BPE
VOCAB_MULTIPLE = 64  # an embedding grown by the chat tokens is padded to this: faster matmuls

# GPT-2 (transformers' GPT2LMHeadModel): our names; these matrices are stored (in, out).
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # the causal mask older files hold: not weights

# ours -> Hugging Face Llama / Qwen2; a layer's tensors stacked in this order (output dimension)
LLAMA_TOP = {"transformer.wte.weight": "model.embed_tokens.weight",
             "transformer.ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
LLAMA_LAYER = {  # inside transformer.h.N. -> inside model.layers.N.
    "attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                           "self_attn.v_proj.weight"),
    "attn.c_attn.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                         "self_attn.v_proj.bias"),  # Qwen2
    "attn.c_proj.weight": ("self_attn.o_proj.weight",),
    "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.c_proj.weight": ("mlp.down_proj.weight",),
    "ln_1.weight": ("input_layernorm.weight",),
    "ln_2.weight": ("post_attention_layernorm.weight",),
}

# Hugging Face's Llama module -> llama.cpp's GGUF tensor (blk.N.<name>.weight)
GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def llama_names(config):
    """-> [(our name, its Hugging Face names)] of every tensor of a Llama-family GPT."""
    names = [(ours, (hf,)) for ours, hf in LLAMA_TOP.items()
             if ours != "lm_head.weight" or not config.tie_embeddings]
    for i in range(config.n_layer):
        for ours, hf in LLAMA_LAYER.items():
            if ours != "attn.c_attn.bias" or config.qkv_bias:
                names.append((f"transformer.h.{i}.{ours}",
                              tuple(f"model.layers.{i}.{name}" for name in hf)))
    return names


def hf_parts(config, name, tensor):
    """Our tensor split into its Hugging Face ones: q, k, v or gate, up (views), else itself."""
    if "c_attn" in name:
        kv = config.n_kv_head * config.head_dim
        return tensor.split([config.n_head * config.head_dim, kv, kv])
    return tensor.split(config.mlp_hidden) if "c_fc" in name else (tensor,)


def llama_from_hf(get, config, dtype=torch.float32):
    """Our state dict in dtype from get(hf_name, shape) -> a Llama / Qwen2 file's tensor. Each
    parameter is allocated once and filled part by part: no other copy of the model is made."""
    shapes = {name: t.shape for name, t in GPT.from_state(config).state_dict().items()}
    state = {}
    for ours, hf in llama_names(config):
        state[ours] = torch.empty(shapes[ours], dtype=dtype)
        for name, rows in zip(hf, hf_parts(config, ours, state[ours])):
            rows.copy_(get(name, rows.shape))
    return state


def llama_to_hf(state, config):
    """Hugging Face Llama / Qwen2 tensors from our state dict: the stacked ones split again."""
    return {name: part for ours, hf in llama_names(config)
            for name, part in zip(hf, hf_parts(config, ours, state[ours]))}


def gpt2_from_hf(state):
    """Our state dict from transformers' GPT-2 one (Conv1D matrices transposed; no mask buffers)."""
    return {name: (t.t() if name.endswith(GPT2_CONV1D) else t) for name, t in state.items()
            if not name.endswith(GPT2_BUFFERS)}


def gguf_name(hf_name):
    """Hugging Face's tensor name -> llama.cpp's (blk.3.ffn_up.weight)."""
    if hf_name in GGUF_TOP:
        return GGUF_TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_LAYER[module]}.{kind}"


def peft_name(name):
    """Our adapter's name (h.N.attn.c_attn.lora_A.q_proj) -> PEFT's (self_attn.q_proj.lora_A)."""
    _, _, layer, block, _, ab, part = name.split(".")
    block = {"attn": "self_attn", "mlp": "mlp"}[block]
    return f"base_model.model.model.layers.{layer}.{block}.{part}.{ab}.weight"


# ------------------------------------------------- a loader's rules, and a GPT from named tensors

def build(config, state, path="the start"):
    """GPT.from_state in eval mode; UserError when a parameter is missing, extra or misshapen."""
    if config.tie_embeddings:  # one tensor for both
        state["lm_head.weight"] = state["transformer.wte.weight"]
    try:
        return GPT.from_state(config, state).eval()
    except RuntimeError as e:
        raise UserError(f"{path}: its weights do not fit its own config "
                        f"({str(e).splitlines()[-1].strip()[:120]})") from None


def checked(tensor, name, shape, path):
    """tensor if floating point (integers are quantized weights) and of shape, else UserError."""
    if not tensor.is_floating_point():
        raise UserError(f"{path}: {name} holds {str(tensor.dtype).removeprefix('torch.')} numbers, "
                        "not floating-point weights (quantized folders are not supported)")
    if tuple(tensor.shape) != tuple(shape):
        raise UserError(f"{path}: {name} has shape {list(tensor.shape)} where the config's sizes "
                        f"make {list(shape)}")
    return tensor


def refuse_unread(unread, path):
    """UserError when a file holds tensors the model did not take (its config is another's)."""
    if unread:
        names = sorted(unread)
        raise UserError(f"{path}: {len(names)} tensors have no place in the model its config "
                        f"describes ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")


def whole_number(value, key, path):
    """value if it is a positive int (not a bool or float), else UserError naming the key."""
    if value is None:
        raise UserError(f"{path} lacks {key}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: {key} is {value!r}, not a positive whole number")
    return value


def positive_number(value, key, path):
    """value as a float if finite and > 0 (a NaN RoPE base makes NaN logits), else UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise UserError(f"{path}: {key} is {value!r}, not a finite number above 0")
    return float(value)


def chat_tokenizer(config, state, folder_or_file, vocab_source):
    """-> (config, state, tokenizer): a byte-vocabulary model gets ismGPT's byte tokenizer and the
    chat tokens; any other its own BPE (vocab_source() -> tokenizer), fitting the embedding."""
    if config.vocab_size == BYTE_VOCAB:
        return *with_chat_tokens(config, state), get_tokenizer("byte")
    tok = vocab_source()
    if tok.vocab_size > config.vocab_size:
        raise UserError(f"{folder_or_file}: its tokenizer has {tok.vocab_size} tokens, its "
                        f"embedding {config.vocab_size}")
    return config, state, tok


def with_chat_tokens(config, state):
    """-> (config, state): wte and an own lm_head grown by the chat tokens (mean rows), padded."""
    vocab_size = -(-(config.vocab_size + len(SPECIAL_TOKENS)) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    own_head = () if config.tie_embeddings else ("lm_head.weight",)
    for name in ("transformer.wte.weight", *own_head):
        weight = state[name]
        mean = weight.mean(0, keepdim=True).expand(vocab_size - weight.shape[0], -1)
        state[name] = torch.cat([weight, mean])
    return replace(config, vocab_size=vocab_size), state
