"""
LoRA adapters on a loaded model (model.py's LoRALinear computes them): fresh ones, folded into the
weights, and in PEFT's format (adapter_config.json + adapter_model.safetensors, as save_pretrained
writes them and PeftModel.from_pretrained reads them), so that an adapter trained here runs under
peft on transformers' model of the same base, and one trained with peft runs here. Anything that
would compute otherwise here is refused in one line naming it.
"""
import hashlib
import json
import os
from dataclasses import replace

import torch

from cli.errors import UserError
from model import GPT, LORA_TARGETS, LoRALinear
from support.checkpoint import atomic
from support.weights import peft_name

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# adapter_config.json values that compute something else than plain LoRA: (key, the one we compute)
PLAIN_LORA = (("peft_type", "LORA"), ("bias", "none"), ("use_dora", False), ("use_rslora", False),
              ("fan_in_fan_out", False), ("modules_to_save", None), ("layers_to_transform", None),
              ("rank_pattern", {}), ("alpha_pattern", {}), ("lora_bias", False),
              ("layer_replication", None), ("trainable_token_indices", None),
              ("target_parameters", None), ("use_qalora", False))


def with_lora(model, rank, alpha, targets, dropout=0.0):
    """The same model with fresh adapters (A from torch's generator, B zero: it computes what model
    does), only they trainable. alpha 0: GPTConfig's default."""
    config = replace(model.config, lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets),
                     lora_dropout=dropout)
    adapted = GPT.from_state(config, model.state_dict(), strict=False)  # the adapters still empty
    for layer in adapted.modules():
        if isinstance(layer, LoRALinear):
            layer.reset_adapters()
    return adapted.train(model.training)


def merged(model):
    """The model without adapters, each folded into its weight (W += B A lora_alpha / lora_rank):
    what peft's merge_and_unload computes, and what a chat runs fastest."""
    adapters = model.adapter_params()
    state = {name: t for name, t in model.state_dict().items() if name not in adapters}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoRALinear):
                weight = state[f"{name}.weight"] = state[f"{name}.weight"].clone()
                for part, A in layer.lora_A.items():
                    start, end = layer.spans[part]
                    weight[start:end] += layer.lora_B[part] @ A * layer.scale
    return GPT.from_state(replace(model.config, lora_rank=0), state).train(model.training)


def base_fingerprint(model):
    """sha256 of the weights the adapters sit on (all but the adapters, in float32): a LoRA
    checkpoint holds its adapters only and names its base; this tells the same base again."""
    adapters, digest = model.adapter_params(), hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name not in adapters:
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ PEFT's format

PUBLISHED = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # packaged starts: their hub names


def peft_base(init_from):
    """The base an adapter names for peft (base_model_name_or_path): a packaged model's published
    name, a folder's or file's absolute path (peft's convention for a local base), else as given."""
    if init_from in PUBLISHED:
        return PUBLISHED[init_from]
    return os.path.abspath(init_from) if os.path.exists(init_from) else init_from


def write_adapter(state, config, folder, base_name=None):
    """A LoRA model's adapters (state: its state dict, or the adapters' part; config: its GPTConfig)
    as a PEFT folder naming base_name (peft_base of the start), each file written atomically."""
    from safetensors.torch import save_file
    tensors = {peft_name(name): state[name].detach().float().cpu().contiguous()
               for name in GPT.from_state(config).adapter_params()}
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.lora_rank,
                "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                "target_modules": list(config.lora_targets), "bias": "none",
                "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
                "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
                "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_name,
                "inference_mode": True}
    os.makedirs(folder, exist_ok=True)
    atomic(os.path.join(folder, ADAPTER_WEIGHTS),
           lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    atomic(os.path.join(folder, ADAPTER_CONFIG), lambda path: write_json(path, settings))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def read_adapter(model, folder):
    """model (no adapters) with the PEFT adapter in folder on it; UserError for what it cannot
    compute."""
    c = adapter_config(folder)
    adapted = with_lora(model, c["r"], c["lora_alpha"], c["target_modules"], c["lora_dropout"])
    tensors, names = adapter_tensors(folder), {peft_name(n): n for n in adapted.adapter_params()}
    if set(tensors) != set(names):
        odd = sorted(set(tensors) ^ set(names))
        raise UserError(f"{folder}: its tensors are not those of LoRA on "
                        f"{', '.join(adapted.config.lora_targets)} of this "
                        f"{adapted.config.n_layer}-layer model ({len(odd)} differ, e.g. {odd[0]})")
    try:
        adapted.load_state_dict({names[peft]: t for peft, t in tensors.items()}, strict=False)
    except RuntimeError as e:
        raise UserError(f"{folder}: its tensors do not fit this model "
                        f"({str(e).splitlines()[-1].strip()[:120]})") from None
    return adapted


def adapter_config(folder):
    """adapter_config.json, checked to be plain LoRA on the projections model.py adapts."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): --adapter takes a folder peft's "
                        "save_pretrained wrote") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    unlike = [key for key, plain in PLAIN_LORA
              if config.get(key, plain) != plain and config.get(key) is not None]
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or set(targets) - set(LORA_TARGETS):
        unlike.append(f"target_modules {targets!r}")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(rank, int) and rank > 0 and isinstance(alpha, (int, float)) and alpha > 0):
        unlike.append("r or lora_alpha")
    if unlike:
        raise UserError(f"{path}: {', '.join(unlike)} is not plain LoRA on "
                        f"{', '.join(LORA_TARGETS)}, what ismGPT computes")
    return {**config, "lora_dropout": float(config.get("lora_dropout") or 0.0)}


def adapter_tensors(folder):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable ({str(e)[:80]})") from None
