"""Hugging Face starts: a folder as save_pretrained writes it (config.json; model.safetensors, its
shards, or pytorch_model.bin) of LlamaForCausalLM (Llama 3's RoPE scaling too), Qwen2ForCausalLM or
GPT2LMHeadModel, or a GPT-2 name from the Hugging Face cache."""
import contextlib
import json
import os
import socket
import urllib.parse

import torch

from data.tokenizer import get_tokenizer
from model import GPTConfig
from cli.errors import UserError
from support.weights import (BYTE_VOCAB, GPT2_BUFFERS, GPT2_VOCAB, build, chat_tokenizer, checked,
                             gpt2_from_hf, llama_from_hf, llama_to_hf, positive_number,
                             refuse_unread, whole_number, with_chat_tokens)

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
LLAMAS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings")
INDEX = "model.safetensors.index.json"


def from_hugging_face(source, dtype=torch.float32):
    """A GPT-2 name or folder -> (GPT in dtype, tokenizer, what). config.json's model_type picks the
    loader: transformers' GPT-2 one would make a random GPT-2 of a Llama."""
    if source in GPT2_NAMES and not os.path.isdir(source):
        return *from_gpt2(_hf_gpt2(source, dtype)), f"GPT-2 {source} from Hugging Face"
    path = os.path.join(source, "config.json")
    hf = _read_json(path)
    tie = hf.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):  # as transformers: "false" would be true
        raise UserError(f"{path}: tie_word_embeddings is {tie!r}, not true or false")
    kind = hf.get("model_type")
    if kind == "gpt2":
        return *from_gpt2(_gpt2_folder(source, hf, dtype)), f"GPT-2 from {source}"
    if kind not in LLAMAS:
        raise UserError(f"{source}: model_type {kind!r} is not supported (llama, qwen2, gpt2)")
    architectures = hf.get("architectures") or [LLAMAS[kind]]
    if not isinstance(architectures, list) or LLAMAS[kind] not in architectures:
        raise UserError(f"{source}: architectures {architectures}; supported: "
                        f"{', '.join(LLAMAS.values())}, GPT2LMHeadModel")
    tensors = FolderTensors(source)  # read a tensor at a time: one copy of the model in memory
    config = llama_config(hf, path, "lm_head.weight" in tensors.files)
    state = llama_from_hf(tensors.get, config, dtype)
    refuse_unread(tensors.unread, source)

    def tokenizer():
        if not os.path.isfile(os.path.join(source, "tokenizer.json")):
            raise UserError(f"{source} has no tokenizer.json: a vocabulary of {config.vocab_size} "
                            f"tokens needs one (ismGPT's byte tokenizer has {BYTE_VOCAB})")
        return get_tokenizer(source)

    config, state, tok = chat_tokenizer(config, state, source, tokenizer)
    model = build(config, state, source)
    return model, tok, f"{LLAMAS[kind]} from {source} ({model.num_params() / 1e6:.0f}M parameters)"


def llama_config(hf, path, has_lm_head):
    """A Llama / Qwen2 config.json -> GPTConfig (an lm_head found is used, as in transformers)."""
    def size(key, default=None):  # null in config.json is transformers' default too
        return whole_number(default if hf.get(key) is None else hf[key], key, path)

    n_embd, n_head = size("hidden_size"), size("num_attention_heads")
    n_kv_head = size("num_key_value_heads", n_head)
    head_dim = n_embd // n_head if hf.get("head_dim") is None else size("head_dim")
    if head_dim * n_head != n_embd or head_dim % 2:
        raise UserError(f"{path}: hidden_size {n_embd} is not num_attention_heads {n_head} x "
                        f"head_dim {head_dim} with head_dim even")
    if n_head % n_kv_head:
        raise UserError(f"{path}: num_attention_heads {n_head} is not a multiple of "
                        f"num_key_value_heads {n_kv_head}")
    unlike_ours = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": hf.get("model_type") == "llama" and hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "use_sliding_window": hf.get("use_sliding_window", False),
        "layer_types": any(kind != "full_attention" for kind in hf.get("layer_types") or ()),
    }
    if any(unlike_ours.values()):
        raise UserError(f"{path}: {', '.join(k for k, v in unlike_ours.items() if v)} differs from "
                        "ismGPT's Llama (SiLU SwiGLU, full attention, no biases but Qwen2's q/k/v)")
    theta, scaling = rope_settings(hf, path)
    return GPTConfig(
        block_size=size("max_position_embeddings"), vocab_size=size("vocab_size"),
        n_layer=size("num_hidden_layers"), n_head=n_head, n_embd=n_embd, bias=False, family="llama",
        n_kv_head=n_kv_head, mlp_hidden=size("intermediate_size"), rope_theta=theta,
        rope_scaling=scaling, qkv_bias=hf.get("model_type") == "qwen2",
        norm_eps=positive_number(hf.get("rms_norm_eps"), "rms_norm_eps", path),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)) and not has_lm_head)


def rope_settings(hf, path):
    """-> (rope_theta, rope_scaling) as transformers 5 reads them (rope_scaling, else
    rope_parameters, over the top level's keys): plain RoPE or Llama 3's scaling."""
    for key in ("rope_scaling", "rope_parameters"):
        if not isinstance(hf.get(key) or {}, dict):
            raise UserError(f"{path}: {key} is {hf[key]!r}, not an object")
    rope = {"rope_theta": hf.get("rope_theta", 10000.0),
            "partial_rotary_factor": hf.get("partial_rotary_factor", 1),
            **(hf.get("rope_scaling") or hf.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise UserError(f"{path}: rope_scaling {kind!r} is not supported (default and llama3 are)")
    if rope["partial_rotary_factor"] != 1:
        raise UserError(f"{path}: partial_rotary_factor {rope['partial_rotary_factor']}: ismGPT's "
                        "RoPE rotates every dimension of a head")
    theta = positive_number(rope["rope_theta"], "rope_theta", path)
    if kind == "default":
        return theta, None
    scaling = {"rope_type": "llama3", **{k: positive_number(rope.get(k), k, path)
                                         for k in LLAMA3_SCALING}}
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise UserError(f"{path}: rope_scaling's high_freq_factor must be above low_freq_factor")
    return theta, scaling


class FolderTensors:
    """A folder's tensors by name (unread: those not read yet). Each safetensors tensor is mapped on
    its own, gone once copied out: a whole file's map would hold a second copy of the weights."""

    def __init__(self, folder):
        self.folder, self.bin = folder, None
        if any(os.path.exists(os.path.join(folder, n)) for n in (INDEX, "model.safetensors")):
            self.files = _safetensors_files(folder)
        else:
            self.bin = _read_bin(folder)
            self.files = dict.fromkeys(self.bin)
        self.unread = set(self.files)

    def get(self, name, shape):
        """The tensor called name, checked, for the caller to copy."""
        if name not in self.files:
            raise UserError(f"{self.folder}: the weights have no {name}")
        tensor = checked(self.read(name), name, shape, self.folder)
        self.unread.discard(name)
        if self.bin is not None:
            del self.bin[name]  # the caller's copy replaces it
        return tensor

    def read(self, name):
        if self.bin is not None:
            return self.bin[name]
        return _safetensors(self.files[name], lambda f: f.get_tensor(name))


def _safetensors(path, read):
    """read(the open safetensors file), or UserError when it cannot be read."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            return read(f)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable safetensors weights ({str(e)[:80]})") from None


def _safetensors_files(folder):
    """name -> its file: model.safetensors (first, as in transformers), or the index's shards,
    which must be inside the folder and hold what its weight_map says."""
    index, weight_map = os.path.join(folder, INDEX), {}
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: its weight_map (tensor name -> file name) is missing, empty "
                            "or not an object of file names")
    in_shard = {name: os.path.normpath(f) for name, f in weight_map.items()}  # ./a.x is a.x
    shards = sorted(set(in_shard.values())) or ["model.safetensors"]
    outside = [f for f in shards if os.path.isabs(f) or f.split(os.sep)[0] == ".."]
    if outside:
        raise UserError(f"{index}: weight_map names {outside[0]}, a file outside the folder")
    files = {}
    for path in (os.path.join(folder, shard) for shard in shards):
        for name in _safetensors(path, lambda f: list(f.keys())):
            if name in files:
                raise UserError(f"{folder}: {name} is in both {files[name]} and {path}")
            files[name] = path
    wrong = [n for n, shard in in_shard.items() if files.get(n) != os.path.join(folder, shard)]
    if wrong:
        raise UserError(f"{index}: weight_map puts {wrong[0]} in {weight_map[wrong[0]]}, which "
                        "does not hold it")
    return files


def _read_bin(folder):
    """A pytorch_model.bin's tensors by name, loaded weights-only (no pickle code) and mapped."""
    path = os.path.join(folder, "pytorch_model.bin")
    if not os.path.exists(path):
        raise UserError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for truncated, foreign or malicious files
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path} is not a state dict (tensors by name)")
    return state


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise UserError(f"cannot read {path} ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


# ------------------------------------------------------------------------------------------ GPT-2

def _transformers_gpt2(source):
    try:
        import transformers
    except ImportError:
        raise UserError(f"--init_from={source} needs the transformers package: pip install "
                        "transformers") from None
    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel


def _hf_gpt2(name, dtype):
    """transformers' GPT-2 of a hub name, from Hugging Face's cache or downloaded, or UserError."""
    GPT2LMHeadModel = _transformers_gpt2(name)
    with contextlib.suppress(OSError):
        return GPT2LMHeadModel.from_pretrained(name, local_files_only=True, dtype=dtype)
    fetch = (f"where there is network: python -c \"from transformers import GPT2LMHeadModel; "
             f"GPT2LMHeadModel.from_pretrained('{name}').save_pretrained('{name}-local')\", copy "
             f"that folder here and pass --init_from={name}-local; its tokenizer also needs "
             "tiktoken's GPT-2 vocabulary, downloaded once (python -c \"import tiktoken; "
             "tiktoken.get_encoding('gpt2')\", or copy its cache folder, TIKTOKEN_CACHE_DIR)")
    from huggingface_hub import constants
    hub = urllib.parse.urlsplit(constants.ENDPOINT)
    try:  # unreachable, transformers would retry for long
        socket.create_connection((hub.hostname, hub.port or (443 if hub.scheme == "https" else 80)),
                                 timeout=5).close()
    except OSError:
        raise UserError(f"GPT-2 {name} is not in the Hugging Face cache and huggingface.co cannot "
                        f"be reached: download it {fetch}") from None
    try:
        return GPT2LMHeadModel.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise UserError(f"could not download GPT-2 {name} ({str(e).splitlines()[0]}): download "
                        f"it {fetch}") from None


def _gpt2_folder(folder, hf, dtype):
    """transformers' GPT-2 of a folder if every tensor fills a parameter and every parameter comes
    from a tensor: transformers would make up, skip and cast to float what does not."""
    GPT2LMHeadModel = _transformers_gpt2(folder)
    path = os.path.join(folder, "config.json")
    config = GPT2LMHeadModel.config_class.from_dict(hf)  # with transformers' defaults
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        whole_number(getattr(config, key), key, path)
    if config.n_embd % config.n_head:
        raise UserError(f"{path}: n_embd {config.n_embd} is not a multiple of n_head "
                        f"{config.n_head}")
    tensors = FolderTensors(folder)  # unreadable files are refused here, before transformers
    integers = [name for name in tensors.files
                if not name.endswith(GPT2_BUFFERS) and not tensors.read(name).is_floating_point()]
    if integers:
        raise UserError(f"{folder}: {integers[0]} holds integers, not floating-point weights "
                        "(quantized folders are not supported)")
    model, info = GPT2LMHeadModel.from_pretrained(
        folder, config=config, local_files_only=True, dtype=dtype, output_loading_info=True,
        ignore_mismatched_sizes=True)
    shapes = [f"{name} {list(found)} where config.json makes {list(wanted)}"
              for name, found, wanted in sorted(info["mismatched_keys"])]
    unfit = [f"{what} {', '.join(names[:3])}" for what, names in (
        ("missing", sorted(info["missing_keys"])), ("not used", sorted(info["unexpected_keys"])),
        ("of another shape", shapes)) if names]
    if unfit:
        raise UserError(f"{folder}: its weights are not the GPT-2 its config.json describes "
                        f"({'; '.join(unfit)})")
    return model


def from_gpt2(hf_model):
    """A transformers GPT-2 -> (our GPT with its weights, in its dtype, tokenizer)."""
    hf = hf_model.config
    unlike_ours = {
        "activation_function": hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
        "layer_norm_epsilon": hf.layer_norm_epsilon != 1e-5,
        "n_inner": hf.n_inner not in (None, 4 * hf.n_embd),
        "scale_attn_weights": not hf.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hf.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": hf.reorder_and_upcast_attn}
    if any(unlike_ours.values()):
        raise UserError(f"this GPT-2's {', '.join(k for k, v in unlike_ours.items() if v)} differs "
                        "from GPT-2's: it would not compute the same function here")
    tokenizers = {BYTE_VOCAB: "byte", GPT2_VOCAB: "gpt2"}
    if hf.vocab_size not in tokenizers:
        raise UserError(f"a GPT-2 with {hf.vocab_size} tokens: only GPT-2's BPE ({GPT2_VOCAB}) and "
                        f"the byte vocabulary ({BYTE_VOCAB}) have a tokenizer here")
    tok = get_tokenizer(tokenizers[hf.vocab_size])  # first: offline, GPT-2's BPE is a UserError
    tied = hf_model.lm_head.weight is hf_model.transformer.wte.weight  # else the file's own lm_head
    config = GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer,
                       n_head=hf.n_head, n_embd=hf.n_embd, tie_embeddings=tied)
    config, state = with_chat_tokens(config, gpt2_from_hf(hf_model.state_dict()))
    return build(config, state, "the GPT-2 weights"), tok


def to_transformers(model):
    """transformers' model of our GPT's weights (float32, eval), for benchmarks and tests."""
    import transformers
    c, state = model.config, {k: v.float() for k, v in model.state_dict().items()}
    if c.family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, tie_word_embeddings=c.tie_embeddings))
        hf.load_state_dict(gpt2_from_hf(state))  # transposing is its own inverse
        return hf.eval()
    config, model_class = (transformers.Qwen2Config, transformers.Qwen2ForCausalLM) if c.qkv_bias \
        else (transformers.LlamaConfig, transformers.LlamaForCausalLM)
    hf = model_class(config(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                         **(c.rope_scaling or {})}))
    hf.load_state_dict(llama_to_hf(state, c), strict=not c.tie_embeddings)
    return hf.eval()
