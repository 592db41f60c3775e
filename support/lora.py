"""LoRA adapters (model.py's LoRALinear computes them): fresh, folded into the weights, and in
PEFT's format: one trained here runs under peft on the same base, and one from peft runs here."""
import hashlib
import json
import math
import os
import pathlib
from dataclasses import replace

import torch

from cli.errors import UserError
from model import GPT, LORA_TARGETS, LoRALinear
from support.checkpoint import save_atomically
from support.run_files import planted_link
from support.weights import peft_name

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_CONFIG_BYTES = 2**20  # peft writes a few kB: a link to /dev/zero is never read to its end
OFF, UNSET = (False, None), (None,)
# adapter_config.json keys whose other values peft computes otherwise than plain LoRA, or refuses
# (a null peft_type, bias, pattern): key -> the values that are plain LoRA (absent is plain too).
# pissa*, olora, corda, loftq, lora_ga re-base the weights (W - B A) under the saved A and B;
# aLoRA adapts only the tokens after its invocation tokens; the *_config keys are other variants.
PLAIN_LORA = {"peft_type": ("LORA",), "bias": ("none",), "rank_pattern": ({},),
              "alpha_pattern": ({},), "use_dora": OFF, "use_rslora": OFF, "fan_in_fan_out": OFF,
              "lora_bias": OFF, "use_qalora": OFF, "modules_to_save": UNSET,
              "layers_to_transform": UNSET, "layer_replication": UNSET,
              "trainable_token_indices": UNSET, "target_parameters": UNSET,
              "init_lora_weights": (True, False, None, "gaussian", "eva", "orthogonal", "mica"),
              "alora_invocation_tokens": UNSET, "use_bdlora": UNSET, "arrow_config": UNSET,
              "kasa_config": UNSET, "velora_config": UNSET, "monteclora_config": UNSET}
# its numbers: key -> (peft's default, whether a value is one peft computes with)
NUMBERS = {"r": (8, lambda v: type(v) is int and v > 0),
           "lora_alpha": (8, lambda v: type(v) in (int, float) and 0 < v < math.inf),
           "lora_dropout": (0.0, lambda v: type(v) in (int, float) and 0 <= v < 1)}
PUBLISHED = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # packaged starts: their hub names


def with_lora(model, rank, alpha, targets, dropout=0.0):
    """The model with fresh adapters (B zero), only they trainable; its own are folded in first."""
    if model.adapter_params():
        model = merged(model)
    config = replace(model.config, lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets),
                     lora_dropout=dropout)
    adapted = GPT.from_state(config, model.state_dict(), strict=False)  # the adapters still empty
    for layer in adapted.modules():
        if isinstance(layer, LoRALinear):
            layer.reset_adapters()
    return adapted.train(model.training)


def merged(model):
    """The model with each adapter folded into its weight, as peft's merge_and_unload does."""
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
    """sha256 of every weight: tells that a LoRA checkpoint's start is still what it trained on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def peft_base(init_from):
    """The base an adapter names for peft: a published name, or a local one's absolute path."""
    if init_from in PUBLISHED:
        return PUBLISHED[init_from]
    return os.path.abspath(init_from) if os.path.exists(init_from) else init_from


def write_adapter(state, config, folder, base_name=None):
    """A LoRA model's adapters (from its state dict) as a PEFT folder, each file atomically."""
    from safetensors.torch import save
    tensors = {peft_name(name): state[name].detach().float().cpu().contiguous()
               for name in GPT.from_state(config).adapter_params()}
    settings = dict(peft_type="LORA", task_type="CAUSAL_LM", r=config.lora_rank,
                    lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    target_modules=list(config.lora_targets), bias="none", fan_in_fan_out=False,
                    use_rslora=False, use_dora=False, init_lora_weights=True, modules_to_save=None,
                    layers_to_transform=None, rank_pattern={}, alpha_pattern={},
                    base_model_name_or_path=base_name, inference_mode=True)
    check_adapter_folder(folder)
    for name, data in ((ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"})),
                       (ADAPTER_CONFIG, json.dumps(settings, indent=1).encode())):
        save_atomically(os.path.join(folder, name), lambda tmp: pathlib.Path(tmp).write_bytes(data),
                        "adapter")


def check_adapter_folder(folder):
    """UserError unless folder is absent or a folder, and neither it nor its files are links."""
    for path in (folder, *(os.path.join(folder, f) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))):
        if os.path.islink(path):
            raise planted_link(path, "an adapter")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder: remove it or pick another --out_dir")


def read_adapter(model, folder):
    """model with the PEFT adapter in folder on it (its own adapters folded in first)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    c = adapter_config(folder)
    if model.config.family != "llama":
        raise UserError(f"{folder}: LoRA adapts the Llama family's projections, not "
                        f"{model.config.family}'s: put it on the Llama model it was made for")
    adapted = with_lora(model, c["r"], c["lora_alpha"], c["target_modules"], c["lora_dropout"])
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable ({str(e)[:80]})") from None
    names = {peft_name(n): n for n in adapted.adapter_params()}
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
    """adapter_config.json if plain LoRA on model.py's projections, with peft's default numbers."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise UserError(f"{path} is over 1 MiB, not an adapter_config.json peft wrote")
        config = json.loads(text)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): --adapter takes a folder peft's "
                        "save_pretrained wrote") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    config = {**{key: default for key, (default, _) in NUMBERS.items()}, **config}
    unlike = [f"{key} {config[key]!r:.40}" for key, plain in PLAIN_LORA.items() if key in config
              and not any(type(config[key]) is type(p) and config[key] == p for p in plain)]
    unlike += [f"{key} {config[key]!r:.40}" for key, (_, fits) in NUMBERS.items()
               if not fits(config[key])]
    targets = config.get("target_modules")
    if not (isinstance(targets, list) and targets and all(t in LORA_TARGETS for t in targets)):
        unlike.append(f"target_modules {targets!r:.60}")
    if unlike:
        raise UserError(f"{path}: {', '.join(unlike)}: not plain LoRA on "
                        f"{', '.join(LORA_TARGETS)}, what ismGPT computes")
    return config
