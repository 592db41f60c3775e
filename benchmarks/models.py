"""The models a bench measures: a random one of the shape flags or a pretrained start, and the peer:
transformers' implementation of the same weights."""
import copy
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch

from benchmarks.common import peak_memory, resident_gib
from model import GPT, GPTConfig
from support.hf import to_transformers
from support.starts import fit_context, load_start

PRETRAINED_CONTEXT = 2048  # a pretrained start's default block_size here: a chat of 1,500+ tokens


def load_pretrained(cfg, device, results):
    """load_start for --init_from, timed, with the process's resident memory before, after and at
    its peak while loading (host memory wherever the model goes: a load reads the file there)."""
    loaded, before, t0 = [], resident_gib(), time.perf_counter()
    peak = peak_memory(lambda: loaded.append(
        load_start(cfg.init_from, cfg.block_size or None, 0.0, device)), "cpu")
    start, model = loaded[0], loaded[0].model
    results["model"] = {"what": start.what, "load_s": time.perf_counter() - t0,
                        "resident_before_gib": before, "peak_gib": peak,
                        "resident_gib": resident_gib(), "parameters": model.num_params(),
                        "config": asdict(model.config)}
    if not cfg.block_size:
        start.model = fit_context(model, min(PRETRAINED_CONTEXT, model.config.block_size))
    return start


def random_model(cfg, vocab_size):
    """A GPT of the shape flags with random weights, seeded by --seed."""
    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd))


def chat_model(cfg, tok, rt, start):
    """The model chat, decode and peers run, in the chat dtype, eval mode."""
    model = copy.deepcopy(start.model) if start else random_model(cfg, tok.vocab_size)
    return model.to(rt.device, getattr(torch, rt.dtype)).eval()


def hf_model(cfg, model, rt):
    """-> (transformers' own implementation of model with the very same weights (GPT2LMHeadModel,
    LlamaForCausalLM, Qwen2ForCausalLM) in our dtype, eval mode, or None; a note saying which)."""
    if not cfg.hf:
        return None, "Hugging Face rows skipped (--hf=false)"
    try:
        import transformers
    except ImportError:
        return None, ("transformers is not installed: no Hugging Face peer rows "
                      "(pip install transformers)")
    transformers.logging.set_verbosity_error()
    hf = to_transformers(model)
    return hf.to(rt.device, getattr(torch, rt.dtype)).eval(), \
        f"transformers {transformers.__version__} {type(hf).__name__}, the same weights"


def hf_generate(hf, ids, n):
    """transformers' generate() of exactly n greedy tokens after ids [1, T] with its own cache
    -> (prefill tokens/s to the first token, decode tokens/s after it, or None for n = 1)."""
    times, t0 = [], time.perf_counter()  # a streamer's put(): the prompt, then each token
    clock = SimpleNamespace(put=lambda _: times.append(time.perf_counter()), end=lambda: None)
    with torch.no_grad():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, use_cache=True, streamer=clock)
    assert len(times) == n + 1  # the prompt, then n tokens
    return ids.shape[1] / (times[1] - t0), (n - 1) / (times[-1] - times[1]) if n > 1 else None
