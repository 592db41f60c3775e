"""
Hugging Face starts: a folder as save_pretrained writes it or as models are published (config.json, and
model.safetensors, its shards listed by model.safetensors.index.json, or pytorch_model.bin) of LlamaForCausalLM
(SmolLM2, Llama 2, Llama 3.x with its RoPE scaling), Qwen2ForCausalLM (Qwen2, Qwen2.5) or GPT2LMHeadModel, or a GPT-2
name from the Hugging Face cache. The folder's config.json says which architecture it is (model_type), and only that
architecture's loader reads it: transformers' GPT-2 loader would take a Llama config and return a random GPT-2.

A Llama-family folder is read one tensor at a time into a model built on the meta device, each tensor converted to
the dtype the model will run in as it is read: a load holds about one copy of the model in that dtype. Every tensor
of the files must find its place in the model config.json describes, and every parameter must come from the files.
Anything that would compute something else here (another architecture, another RoPE scaling, sliding windows, biases
in other places, integer tensors) is one line naming what is supported, never a model that silently differs.
"""
import json
import os
import socket
import urllib.parse

import torch

from data.tokenizer import get_tokenizer
from model import GPTConfig
from cli.errors import UserError
from support.weights import (BYTE_VOCAB, GPT2_BUFFERS, GPT2_VOCAB, build, chat_tokenizer, checked, gpt2_from_hf,
                             gpt2_to_hf, llama_from_hf, llama_to_hf, padded_vocab, positive_number, refuse_unread,
                             whole_number, with_chat_tokens)

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
LLAMA_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def from_hugging_face(source, dtype=torch.float32):
    """A GPT-2 name or a Hugging Face folder -> (GPT in dtype, tokenizer, what). The folder's config.json decides
    which loader reads it: transformers' GPT-2 loader would take a Llama config and return a random GPT-2."""
    if source in GPT2_NAMES and not os.path.isdir(source):
        model, tok = from_gpt2(_hf_gpt2(source, dtype))
        return model, tok, f"GPT-2 {source} from Hugging Face"
    hf = _read_json(os.path.join(source, "config.json"))
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        model, tok = from_gpt2(_gpt2_folder(source, hf, dtype))
        return model, tok, f"GPT-2 from {source}"
    if model_type in LLAMA_ARCHITECTURES:
        architectures = hf.get("architectures") or [LLAMA_ARCHITECTURES[model_type]]
        if not isinstance(architectures, list) or LLAMA_ARCHITECTURES[model_type] not in architectures:
            raise UserError(f"{source}: architectures {architectures}; supported: "
                            f"{', '.join(LLAMA_ARCHITECTURES.values())}, GPT2LMHeadModel")
        model, tok = from_llama_folder(source, hf, dtype)
        return model, tok, f"{LLAMA_ARCHITECTURES[model_type]} from {source} ({model.num_params() / 1e6:.0f}M " \
                           "parameters)"
    raise UserError(f"{source}: model_type {model_type!r} is not supported (llama, qwen2, gpt2)")


# ------------------------------------------------------------------------------------------- the Llama family

def llama_config(hf, path, has_lm_head):
    """A Hugging Face LlamaConfig / Qwen2Config (its config.json as a dict, read from path) -> GPTConfig, or
    UserError naming what would compute differently here. has_lm_head: the weights hold their own lm_head.weight,
    which transformers then uses even where tie_word_embeddings says the embedding is shared."""
    def size(key, default=None):  # null in config.json is transformers' default too
        value = default if hf.get(key) is None else hf[key]
        if value is None:
            raise UserError(f"{path} lacks {key}")
        return whole_number(value, key, path)

    n_embd, n_head = size("hidden_size"), size("num_attention_heads")
    n_kv_head = size("num_key_value_heads", n_head)
    head_dim = n_embd // n_head if hf.get("head_dim") is None else size("head_dim")
    if head_dim * n_head != n_embd or head_dim % 2:
        raise UserError(f"{path}: hidden_size {n_embd} is not num_attention_heads {n_head} x head_dim {head_dim} "
                        "with head_dim even: ismGPT's attention and RoPE need it to be")
    if n_head % n_kv_head:
        raise UserError(f"{path}: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_kv_head}")
    unlike_ours = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": hf.get("model_type") == "llama" and hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "use_sliding_window": hf.get("use_sliding_window", False),
        "layer_types": any(kind != "full_attention" for kind in hf.get("layer_types") or ()),
    }
    if any(unlike_ours.values()):
        raise UserError(f"{path}: {', '.join(k for k, v in unlike_ours.items() if v)} differs from what ismGPT's "
                        "Llama family computes (SiLU SwiGLU, RoPE, full attention, no biases but Qwen2's q/k/v)")
    theta, scaling = rope_settings(hf, path)
    return GPTConfig(block_size=size("max_position_embeddings"), vocab_size=size("vocab_size"),
                     n_layer=size("num_hidden_layers"), n_head=n_head, n_embd=n_embd, bias=False, family="llama",
                     n_kv_head=n_kv_head, mlp_hidden=size("intermediate_size"), rope_theta=theta, rope_scaling=scaling,
                     norm_eps=positive_number(hf.get("rms_norm_eps"), "rms_norm_eps", path),
                     qkv_bias=hf.get("model_type") == "qwen2",
                     tie_embeddings=bool(hf.get("tie_word_embeddings", False)) and not has_lm_head)


def rope_settings(hf, path):
    """-> (rope_theta, GPTConfig's rope_scaling) from a config.json in either spelling: published files keep
    rope_theta and rope_scaling at the top level, transformers 5 writes rope_parameters (rope_type, rope_theta and
    the scaling's fields in one dict). Plain RoPE and Llama 3's scaling compute as here; any other is refused."""
    rope = {"rope_theta": hf.get("rope_theta", 10000.0), "partial_rotary_factor": hf.get("partial_rotary_factor", 1)}
    for key in ("rope_scaling", "rope_parameters"):
        if not isinstance(hf.get(key) or {}, dict):
            raise UserError(f"{path}: {key} is {hf[key]!r}, not an object")
        rope.update(hf.get(key) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise UserError(f"{path}: rope_scaling {kind!r} is not supported (plain RoPE and Llama 3's llama3 are)")
    if rope["partial_rotary_factor"] != 1:
        raise UserError(f"{path}: partial_rotary_factor {rope['partial_rotary_factor']}: ismGPT's RoPE rotates every "
                        "dimension of a head")
    theta = positive_number(rope["rope_theta"], "rope_theta", path)
    if kind == "default":
        return theta, None
    scaling = {"rope_type": "llama3", **{key: positive_number(rope.get(key), key, path) for key in LLAMA3_SCALING}}
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise UserError(f"{path}: rope_scaling's high_freq_factor must be above its low_freq_factor")
    return theta, scaling


def from_llama_folder(folder, hf, dtype=torch.float32):
    """A Hugging Face Llama / Qwen2 folder -> (GPT in dtype, tokenizer)."""
    tensors = FolderTensors(folder)
    config = llama_config(hf, os.path.join(folder, "config.json"), "lm_head.weight" in tensors.files)
    state = llama_from_hf(tensors.get, config, dtype)
    refuse_unread(tensors.unread, folder)
    config, state, tok = chat_tokenizer(config, state, folder, lambda: _folder_tokenizer(folder, config))
    return build(config, state, folder), tok


def _folder_tokenizer(folder, config):
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise UserError(f"{folder} has no tokenizer.json: a vocabulary of {config.vocab_size} tokens needs one (only "
                        f"a model of the {BYTE_VOCAB} byte values gets ismGPT's byte tokenizer)")
    return get_tokenizer(folder)


class FolderTensors:
    """The tensors of a folder's weights (model.safetensors, the shards model.safetensors.index.json lists, or
    pytorch_model.bin), each a view of its file's memory map, read one at a time; unread: the names not read yet.
    Each safetensors tensor is read through a map of its own, gone once the tensor is copied out: the pages of a
    mapped file count in the process's memory as long as anything of it is mapped, so one map over a whole file
    would hold a second copy of the weights by the end. A pytorch_model.bin is mapped as a whole (torch.load's
    mmap): its pages stay in memory until the last of its tensors is dropped, up to two copies at the peak."""

    def __init__(self, folder):
        self.folder = folder
        if _has_safetensors(folder):
            self.files, self.bin = _safetensors_files(folder), None
        else:
            self.bin = _read_bin(folder)
            self.files = dict.fromkeys(self.bin)
        self.unread = set(self.files)

    def get(self, name, shape):
        """The tensor called name, of that shape (UserError when it is missing, not floating point or of another
        shape), for the caller to copy out."""
        if name not in self.files:
            raise UserError(f"{self.folder}: the weights have no {name}")
        tensor = checked(self.read(name), name, shape, self.folder)
        self.unread.discard(name)
        if self.bin is not None:
            del self.bin[name]  # the caller's copy replaces it
        return tensor

    def read(self, name):
        """The tensor as the file stores it: a view of the file's mapping, whose data is read only when used."""
        if self.bin is not None:
            return self.bin[name]
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(self.files[name], "pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{self.files[name]}: unreadable safetensors weights ({str(e)[:80]})") from None


def _has_safetensors(folder):
    return any(os.path.exists(os.path.join(folder, name)) for name in ("model.safetensors.index.json",
                                                                        "model.safetensors"))


def _safetensors_files(folder):
    """name -> the safetensors file holding it, from the files' own headers. The files are model.safetensors, or
    the shards model.safetensors.index.json names, which must be inside the folder and hold what its weight_map
    says they hold."""
    index = os.path.join(folder, "model.safetensors.index.json")
    weight_map = _read_json(index).get("weight_map") if os.path.exists(index) else {}
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()) or \
            os.path.exists(index) and not weight_map:
        raise UserError(f"{index}: its weight_map (tensor name -> file name) is missing, empty or not an object of "
                        "file names")
    shards = sorted(set(weight_map.values())) or ["model.safetensors"]
    outside = [f for f in shards if os.path.isabs(f) or os.path.normpath(f).split(os.sep)[0] == ".."]
    if outside:
        raise UserError(f"{index}: weight_map names {outside[0]}, a file outside the folder")
    files = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        for name in _safetensors_names(path):
            if name in files:
                raise UserError(f"{folder}: {name} is in both {files[name]} and {path}")
            files[name] = path
    misplaced = [name for name, shard in weight_map.items() if files.get(name) != os.path.join(folder, shard)]
    if misplaced:
        raise UserError(f"{index}: weight_map puts {misplaced[0]} in {weight_map[misplaced[0]]}, which does not "
                        "hold it")
    return files


def _safetensors_names(path):
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable safetensors weights ({str(e)[:80]})") from None


def _read_bin(folder):
    """A pytorch_model.bin's tensors by name, loaded weights-only (a pickle can never run code) and memory-mapped."""
    path = os.path.join(folder, "pytorch_model.bin")
    if not os.path.exists(path):
        raise UserError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin, as save_pretrained "
                        "writes them)")
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
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: brackets nested too deep to parse
        raise UserError(f"cannot read {path} ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


# ---------------------------------------------------------------------------------------------------------- GPT-2

def _transformers_gpt2(source):
    """transformers' GPT2LMHeadModel class, or UserError naming the package to install."""
    try:
        import transformers
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError(f"--init_from={source} needs the transformers package: pip install transformers") from None
    transformers.logging.set_verbosity_error()
    return GPT2LMHeadModel


def _hf_gpt2(name, dtype):
    """transformers' GPT2LMHeadModel of a hub name, from the Hugging Face cache or downloaded; UserError, one line,
    when it cannot be had."""
    GPT2LMHeadModel = _transformers_gpt2(name)
    try:
        return GPT2LMHeadModel.from_pretrained(name, local_files_only=True, dtype=dtype)
    except OSError:
        pass
    fetch = (f"where there is network: python -c \"from transformers import GPT2LMHeadModel; "
             f"GPT2LMHeadModel.from_pretrained('{name}').save_pretrained('{name}-local')\", copy that folder "
             f"here and pass --init_from={name}-local; its tokenizer also needs tiktoken's GPT-2 vocabulary, "
             "downloaded once (python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\", or copy tiktoken's "
             "cache folder, TIKTOKEN_CACHE_DIR)")
    if not _hub_reachable():
        raise UserError(f"GPT-2 {name} is not in the Hugging Face cache and huggingface.co cannot be reached: "
                        f"download it {fetch}")
    try:
        return GPT2LMHeadModel.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise UserError(f"could not download GPT-2 {name} ({str(e).splitlines()[0]}): download it {fetch}") from None


def _gpt2_folder(folder, hf, dtype):
    """transformers' GPT2LMHeadModel of a folder, in dtype, refused unless every tensor of its files filled a
    parameter and every parameter came from them: by itself transformers fills a missing parameter with random
    numbers, skips a tensor it has no place for, and casts integers to float."""
    GPT2LMHeadModel = _transformers_gpt2(folder)
    path = os.path.join(folder, "config.json")
    config = GPT2LMHeadModel.config_class.from_dict(hf)  # transformers' defaults for what config.json leaves out
    sizes = {key: whole_number(getattr(config, key), key, path)
             for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
    if sizes["n_embd"] % sizes["n_head"]:
        raise UserError(f"{path}: n_embd {sizes['n_embd']} is not a multiple of n_head {sizes['n_head']}")
    tensors = FolderTensors(folder)  # unreadable files are refused here, before transformers reads them
    integers = [name for name in tensors.files
                if not name.endswith(GPT2_BUFFERS) and not tensors.read(name).is_floating_point()]
    if integers:
        raise UserError(f"{folder}: {integers[0]} holds integers, not floating-point weights (quantized folders "
                        "are not supported)")
    model, info = GPT2LMHeadModel.from_pretrained(folder, config=config, local_files_only=True, dtype=dtype,
                                                  output_loading_info=True, ignore_mismatched_sizes=True)
    shapes = [f"{name} {list(found)} where config.json makes {list(wanted)}"
              for name, found, wanted in sorted(info["mismatched_keys"])]
    unfit = [f"{what} {', '.join(names[:3])}" for what, names in (
        ("missing", sorted(info["missing_keys"])), ("not used", sorted(info["unexpected_keys"])),
        ("of another shape", shapes)) if names]
    if unfit:
        raise UserError(f"{folder}: its weights are not the GPT-2 its config.json describes ({'; '.join(unfit)})")
    return model


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
    """Our GPT with every weight of a transformers GPT2LMHeadModel, by name (GPT-2's Conv1D layers store their
    weights transposed), as nanoGPT's from_pretrained does, in the model's dtype. The embedding (and lm_head, when
    the model has one of its own) grows by the chat's special tokens, initialised to the mean row, and is padded to
    a multiple of VOCAB_MULTIPLE rows that no token uses. -> (GPT, tokenizer)."""
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
    tied = hf_model.lm_head.weight is hf_model.transformer.wte.weight  # transformers unties it for a file's own
    config = GPTConfig(block_size=hf.n_positions, vocab_size=padded_vocab(hf.vocab_size), n_layer=hf.n_layer,
                       n_head=hf.n_head, n_embd=hf.n_embd, tie_embeddings=tied)
    state = gpt2_from_hf(hf_model.state_dict())
    for name in ("lm_head.weight",) if tied else ("lm_head.weight", "transformer.wte.weight"):
        state[name] = with_chat_tokens(state[name], config.vocab_size)
    if tied:
        state["transformer.wte.weight"] = state["lm_head.weight"]
    return build(config, state, "the GPT-2 weights"), tok


# ------------------------------------------------------------------------------------- ours, in transformers

def to_transformers(model):
    """transformers' own implementation of our GPT with the very same weights (GPT2LMHeadModel, LlamaForCausalLM,
    or Qwen2ForCausalLM when q/k/v have biases), in float32, eval mode: the peer that benchmarks and tests compare
    with. The weight names come from support/weights.py, read the other way."""
    import transformers
    c, state = model.config, {k: v.float() for k, v in model.state_dict().items()}
    if c.family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            tie_word_embeddings=c.tie_embeddings))
        hf.load_state_dict(gpt2_to_hf(state))
        return hf.eval()
    config, architecture = (transformers.Qwen2Config, transformers.Qwen2ForCausalLM) if c.qkv_bias else \
        (transformers.LlamaConfig, transformers.LlamaForCausalLM)
    hf = architecture(config(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}))
    hf.load_state_dict(llama_to_hf(state, c), strict=not c.tie_embeddings)
    return hf.eval()
