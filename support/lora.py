"""
LoRA adapters around model.py's (which computes them, as GPTConfig's lora_* fields say): adding fresh ones to a
loaded model, folding them into its weights, and reading and writing them in PEFT's format (a folder of
adapter_config.json and adapter_model.safetensors, as peft's save_pretrained writes it and PeftModel.from_pretrained
reads it), so that an adapter trained here runs on transformers' model of the same base under peft, and one
trained with peft runs here. Only what computes the same here is read: anything else in an adapter's config is one
line naming it.
"""
import hashlib
import json
import os
from dataclasses import replace

import torch

from model import GPT, LORA_TARGETS, Linear
from support.checkpoint import atomic
from cli.errors import UserError
from support.weights import lora_names

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# adapter_config.json values that compute something else than plain LoRA here: (key, the value we compute)
PLAIN_LORA = (("peft_type", "LORA"), ("bias", "none"), ("use_dora", False), ("use_rslora", False),
              ("fan_in_fan_out", False), ("modules_to_save", None), ("layers_to_transform", None),
              ("rank_pattern", {}), ("alpha_pattern", {}), ("lora_bias", False), ("layer_replication", None),
              ("trainable_token_indices", None), ("target_parameters", None), ("use_qalora", False))


def with_lora(model, rank, alpha, targets, dropout=0.0):
    """The same model with fresh LoRA adapters (A random from torch's generator, B zero: it computes what model
    does), only the adapters trainable."""
    config = replace(model.config, lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets),
                     lora_dropout=dropout)
    with torch.device("meta"):
        adapted = GPT(config)
    adapted.load_state_dict(model.state_dict(), strict=False, assign=True)
    if config.tie_embeddings:  # assign gave lm_head and wte one Parameter each: tie them again
        adapted.transformer.wte.weight = adapted.lm_head.weight
    for module in adapted.modules():
        if isinstance(module, Linear):  # the adapters, in the base's device and dtype
            module.lora_A.to_empty(device=module.weight.device), module.lora_B.to_empty(device=module.weight.device)
            module.reset_lora()
            module.lora_A.to(module.weight.dtype), module.lora_B.to(module.weight.dtype)
    return freeze_base(adapted).train(model.training)


def freeze_base(model):
    """Only the adapters train."""
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def merged(model):
    """The model without adapters, each folded into its weight (W += B A lora_alpha / lora_rank): what peft's
    merge_and_unload computes, and what a chat runs fastest."""
    state = {name: t for name, t in model.state_dict().items() if ".lora_" not in name}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                weight = state[f"{name}.weight"] = state[f"{name}.weight"].clone()
                for part, A in module.lora_A.items():
                    start, end = module.spans[part]
                    weight[start:end] += module.lora_B[part] @ A * module.lora_scale
    with torch.device("meta"):
        plain = GPT(replace(model.config, lora_rank=0))
    plain.load_state_dict(state, assign=True)
    if plain.config.tie_embeddings:
        plain.transformer.wte.weight = plain.lm_head.weight
    return plain.train(model.training)


def adapter_state(model):
    """The adapters' tensors, by our names."""
    return {name: t for name, t in model.state_dict().items() if ".lora_" in name}


def base_fingerprint(model):
    """sha256 of the weights an adapter sits on (every tensor but the adapters, in float32): a LoRA checkpoint holds
    only its adapters and names its base; this says it is the same base when it is loaded again."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".lora_" not in name:
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ PEFT's format

def write_adapter(state, config, folder, base_name=None):
    """A LoRA model's adapters (state: its state dict, or the adapters' part of it; config: its GPTConfig) as a PEFT
    folder, each file written atomically (a temporary file renamed)."""
    from safetensors.torch import save_file
    c = config
    tensors = {peft: state[name].detach().float().cpu().contiguous() for name, peft in lora_names(c)}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.lora_rank, "lora_alpha": c.lora_alpha,
              "lora_dropout": c.lora_dropout, "target_modules": list(c.lora_targets), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": base_name, "inference_mode": True}
    os.makedirs(folder, exist_ok=True)
    atomic(os.path.join(folder, ADAPTER_WEIGHTS), lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    atomic(os.path.join(folder, ADAPTER_CONFIG), lambda path: write_json(path, config))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def read_adapter(model, folder):
    """model (no adapters) with the PEFT adapter in folder on it, or UserError naming what it cannot compute."""
    config = adapter_config(folder)
    adapted = with_lora(model, config["r"], config["lora_alpha"], config["target_modules"], config["lora_dropout"])
    tensors = adapter_tensors(folder)
    names = lora_names(adapted.config)
    expected = {peft for _, peft in names}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise UserError(f"{folder}: its tensors are not those of LoRA on {', '.join(adapted.config.lora_targets)} "
                        f"of this {adapted.config.n_layer}-layer model ({len(odd)} differ, e.g. {odd[0]})")
    state = {name: tensors[peft] for name, peft in names}
    try:
        adapted.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"{folder}: its tensors do not fit this model ({str(e).splitlines()[-1].strip()[:120]})") \
            from None
    return adapted


def adapter_config(folder):
    """adapter_config.json, checked to be plain LoRA on the projections model.py adapts."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): --adapter takes a folder peft's save_pretrained "
                        "wrote") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    unlike = [key for key, plain in PLAIN_LORA if config.get(key, plain) != plain and config.get(key) is not None]
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or set(targets) - set(LORA_TARGETS):
        unlike.append(f"target_modules {targets!r}")
    if not (isinstance(config.get("r"), int) and config["r"] > 0 and isinstance(config.get("lora_alpha"), (int, float))):
        unlike.append("r or lora_alpha")
    if unlike:
        raise UserError(f"{path}: {', '.join(unlike)} is not plain LoRA on {', '.join(LORA_TARGETS)}, what ismGPT "
                        "computes")
    return {**config, "lora_dropout": float(config.get("lora_dropout") or 0.0)}


def adapter_tensors(folder):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable ({str(e)[:80]})") from None
