"""
The names of a model's weights in every format ismGPT reads or writes, each written once and used both ways
(loading a checkpoint, and handing our weights to transformers' or PEFT's implementation of the same model).

ismGPT's GPT keeps GPT-2's module names for both families (transformer.h.N.attn.c_attn, ...). GPT-2 checkpoints
use them too, but GPT-2's Conv1D layers store their matrices transposed. Hugging Face's Llama and Qwen2 keep q, k
and v apart (self_attn.q_proj, ...) and the SwiGLU's gate and up projections apart, where our c_attn and c_fc stack
them along the output dimension. GGUF files use llama.cpp's names for the Hugging Face modules (blk.N.attn_q).

build() makes the GPT that holds a state dict of our names; a model whose vocabulary is the 256 bytes (random test
models) gets ismGPT's byte tokenizer and chat format, its embedding grown by the five chat tokens, as GPT-2 gets them.
Every loader holds a file to the same rules, written once here: its sizes are positive whole numbers and its RoPE
base and epsilon finite and positive (whole_number, positive_number); each tensor holds floating-point numbers of the
shape the config gives it (checked); every parameter comes from the file and every tensor of the file is used
(build, refuse_unread).
"""
import math
from unittest import mock

import torch

from data.tokenizer import SPECIAL_TOKENS, get_tokenizer
from model import GPT, GPTConfig
from cli.errors import UserError

BYTE_VOCAB, GPT2_VOCAB = 256, 50257  # a GPT-2's vocabulary: our byte tokenizer's bytes, or GPT-2's BPE
VOCAB_MULTIPLE = 64  # an embedding grown by the chat tokens is padded to a multiple of this: faster matmuls

# GPT-2 (transformers' GPT2LMHeadModel): the same names; these matrices are stored (in, out).
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # older GPT-2 files hold the causal mask: not weights

# ours -> Hugging Face Llama / Qwen2. A tuple: its tensors stacked, in this order, along the output dimension.
LLAMA_TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
LLAMA_LAYER = {  # inside transformer.h.N. -> inside model.layers.N.
    "attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.c_attn.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),  # Qwen2
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.c_proj.weight": "mlp.down_proj.weight",
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
}

# Hugging Face's Llama module -> llama.cpp's GGUF tensor (blk.N.<name>.weight)
GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}
GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}


def llama_names(config):
    """-> [(our name, its Hugging Face name or names)] of every tensor a Llama-family GPT of this config holds."""
    names = [(ours, hf) for ours, hf in LLAMA_TOP.items() if ours != "lm_head.weight" or not config.tie_embeddings]
    for i in range(config.n_layer):
        for ours, hf in LLAMA_LAYER.items():
            if ours == "attn.c_attn.bias" and not config.qkv_bias:
                continue
            hf = tuple(f"model.layers.{i}.{h}" for h in hf) if isinstance(hf, tuple) else f"model.layers.{i}.{hf}"
            names.append((f"transformer.h.{i}.{ours}", hf))
    return names


def stacked_sizes(config, name):
    """The output sizes of the tensors a stacked tensor holds (q, k, v or gate, up)."""
    if "c_attn" in name:
        kv = config.n_kv_head * config.head_dim
        return [config.n_head * config.head_dim, kv, kv]
    return [config.mlp_hidden, config.mlp_hidden]


def llama_from_hf(get, config, dtype=torch.float32):
    """Our state dict, in dtype, from Hugging Face Llama / Qwen2 tensors: get(hf_name, shape) -> that tensor as the
    file holds it, which must have that shape (the one the config gives it). Each parameter is allocated once and
    filled part by part (q, k and v one under the other, say), converted as it is copied in: no other copy of the
    model, or of a layer, is ever made. A tied lm_head is the embedding itself."""
    shapes = parameter_shapes(config)
    state = {}
    for ours, hf in llama_names(config):
        state[ours] = torch.empty(shapes[ours], dtype=dtype)
        parts, sizes = (hf, stacked_sizes(config, ours)) if isinstance(hf, tuple) else ((hf,), [shapes[ours][0]])
        for part, rows in zip(parts, state[ours].split(sizes)):
            rows.copy_(get(part, rows.shape))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def parameter_shapes(config):
    """Our name -> the shape GPT(config) gives that parameter (a model on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}


def llama_to_hf(state, config):
    """Hugging Face Llama / Qwen2 tensors from our state dict: the stacked ones split again."""
    out = {}
    for ours, hf in llama_names(config):
        if isinstance(hf, tuple):
            out.update(zip(hf, state[ours].split(stacked_sizes(config, ours))))
        else:
            out[hf] = state[ours]
    return out


def gpt2_from_hf(state):
    """Our state dict from transformers' GPT-2 one (the Conv1D matrices transposed; its causal-mask buffers left
    out)."""
    return {name: (t.t() if name.endswith(GPT2_CONV1D) else t) for name, t in state.items()
            if not name.endswith(GPT2_BUFFERS)}


def gpt2_to_hf(state):
    """transformers' GPT-2 state dict from ours (transposing is its own inverse)."""
    return gpt2_from_hf(state)


def gguf_name(hf_name):
    """Hugging Face's tensor name -> llama.cpp's (model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight)."""
    if hf_name in GGUF_TOP:
        return GGUF_TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_LAYER[module]}.{kind}"


# ---------------------------------------------------------------------------------- a GPT from named tensors

def build(config, state, path="the start"):
    """GPT(config) holding state's tensors as they are (no copy, no cast), in eval mode; UserError when a parameter
    is missing, left over or of another shape. Built on the meta device and then given the tensors: no time or
    memory spent on random weights. An Embedding draws its first weights with normal_, which on the meta device
    imports torch's compiler (a second, most of a cached load): skipped, as nothing is drawn there anyway."""
    with torch.device("meta"), mock.patch.object(torch.nn.Embedding, "reset_parameters", lambda self: None):
        model = GPT(config)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise UserError(f"{path}: its weights do not fit its own config ({str(e).splitlines()[-1].strip()[:120]})") \
            from None
    if config.tie_embeddings:  # assign gave lm_head and wte one Parameter each: tie them again
        model.transformer.wte.weight = model.lm_head.weight
    return model.eval()


def checked(tensor, name, shape, path):
    """tensor, if it holds floating-point numbers (an integer tensor would be quantized weights, or not weights at
    all: cast to float it would compute something else) of the shape the config gives it; else UserError."""
    if not tensor.is_floating_point():
        raise UserError(f"{path}: {name} holds {str(tensor.dtype).removeprefix('torch.')} numbers, not floating-point "
                        "weights (quantized folders are not supported)")
    if tuple(tensor.shape) != tuple(shape):
        raise UserError(f"{path}: {name} has shape {list(tensor.shape)} where the config's sizes make "
                        f"{list(shape)}")
    return tensor


def refuse_unread(unread, path):
    """UserError when a file holds tensors the model did not take: the config describes another model than the
    weights (fewer layers, say), or the weights hold parts (biases, extra norms) this model has no place for."""
    if unread:
        names = sorted(unread)
        raise UserError(f"{path}: {len(names)} tensors have no place in the model its config describes "
                        f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")


def whole_number(value, key, path):
    """value if it is a positive int (not a bool, not a float), else UserError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: {key} is {value!r}, not a positive whole number")
    return value


def positive_number(value, key, path):
    """value as a float if it is a finite number > 0, else UserError naming the key (a NaN or a negative RoPE base
    or epsilon would otherwise surface as NaN logits at the first token)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{path}: {key} is {value!r}, not a finite number above 0")
    return float(value)


def chat_tokenizer(config, state, folder_or_file, vocab_source):
    """-> (config, state, tokenizer): a byte-vocabulary model gets ismGPT's byte tokenizer and the chat tokens;
    any other its own BPE (vocab_source() -> tokenizer), which must fit the embedding."""
    if config.vocab_size == BYTE_VOCAB:
        vocab_size = padded_vocab(BYTE_VOCAB)
        for name in ("transformer.wte.weight", "lm_head.weight"):
            state[name] = with_chat_tokens(state[name], vocab_size)
        if config.tie_embeddings:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        return GPTConfig(**{**vars(config), "vocab_size": vocab_size}), state, get_tokenizer("byte")
    tok = vocab_source()
    if tok.vocab_size > config.vocab_size:
        raise UserError(f"{folder_or_file}: its tokenizer has {tok.vocab_size} tokens, its embedding "
                        f"{config.vocab_size}")
    return config, state, tok


def with_chat_tokens(weight, vocab_size):
    """An embedding (or lm_head) of a byte-vocabulary model grown by ismGPT's chat tokens, each initialised to the
    mean row, and padded to vocab_size rows that no token uses."""
    grown = weight.new_empty(vocab_size, weight.shape[1])
    grown[:weight.shape[0]] = weight
    grown[weight.shape[0]:] = weight.mean(0)
    return grown


def padded_vocab(n):
    return -(-(n + len(SPECIAL_TOKENS)) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def lora_names(config):
    """-> [(our name, PEFT's name)] of every LoRA adapter tensor of a Llama-family GPT of this config: our
    transformer.h.N.attn.c_attn.lora_A.q_proj is PEFT's base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight
    (a stacked Linear has one adapter per part; the part is Hugging Face's module)."""
    names = []
    for i in range(config.n_layer):
        for ours, hf in LLAMA_LAYER.items():
            if not ours.endswith(".weight"):
                continue
            for hf_name in hf if isinstance(hf, tuple) else (hf,):
                hf_module = hf_name.removesuffix(".weight")
                part = hf_module.rsplit(".", 1)[-1]
                if part in config.lora_targets:
                    module = f"transformer.h.{i}.{ours.removesuffix('.weight')}"
                    names += [(f"{module}.{ab}.{part}", f"base_model.model.model.layers.{i}.{hf_module}.{ab}.weight")
                              for ab in ("lora_A", "lora_B")]
    return names
