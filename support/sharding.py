"""
FSDP2 (torch's fully_shard) for train.py --fsdp, and checkpoints that do not depend on how a run was spread over
ranks: the model's and the optimizer's state are saved whole, on the CPU, the optimizer's keyed by parameter name,
so that a run resumes on another number of ranks, sharded or not, with the same rows per step.
"""
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from model import GPT
from cli.errors import UserError
from support.lora import freeze_base


def shard(model, rt):
    """Shard the model's parameters, gradients and optimizer state over the ranks, block by block (each block's
    are gathered only while it computes), then the rest (embeddings, final norm, lm_head) as the root, and give
    every rank its shards of rank 0's weights (the other ranks' models may be empty, on the meta device: no rank but
    the first ever holds the whole model). With bfloat16 (CUDA) the blocks compute in bfloat16 and gradients are
    reduced in float32; the sharded parameters, which the optimizer updates, stay float32."""
    weights = model.state_dict() if rt.is_master else {}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if rt.dtype == "bfloat16" else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=rt.device)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def full_state(model, optimizer):
    """-> (the model's state dict, the optimizer's, keyed by parameter name), whole: a LoRA model's adapters only
    (its frozen base is not the run's to save). Under FSDP every rank must call it (the shards are gathered) and
    rank 0 alone gets the states, on the CPU."""
    frozen = any(not p.requires_grad for p in model.parameters())
    if isinstance(model, FSDPModule):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=frozen)
        return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)
    state = {name: t for name, t in model.state_dict().items() if not frozen or ".lora_" in name}
    numbered, names = optimizer.state_dict(), parameter_names(model, optimizer)
    return state, {"state": {names[i]: s for i, s in numbered["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in numbered["param_groups"]]}


def parameter_names(model, optimizer):
    """The names of the optimizer's parameters, in the order torch's optimizer state dict numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state(model, optimizer, state):
    """Load an optimizer state full_state saved (or torch's own numbered form, as older checkpoints hold it) into
    the optimizer of a model, sharded or not (then only rank 0's state is read)."""
    if isinstance(model, FSDPModule):  # rank 0's state, each rank taking its shards
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, state, options=options)
        return
    groups = state["param_groups"]
    if any(isinstance(name, str) for g in groups for name in g["params"]):
        position = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
        state = {"state": {position[n]: s for n, s in state["state"].items()},
                 "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in groups]}
    optimizer.load_state_dict(state)


def start_on_rank0(start, rt):
    """start() -> (model, checkpoint, tokenizer, base) on rank 0 alone; the other ranks get what it found (the
    model's config, the checkpoint without its tensors) and an empty model of that config on the meta device, which
    shard() fills with their shards of rank 0's weights. A UserError on rank 0 is every rank's."""
    found, problem = None, None
    if rt.is_master:
        try:
            model, checkpoint, tokenizer, base = start()
            found = (model.config, tensorless(checkpoint), tokenizer, base)
        except UserError as e:
            problem = str(e)
    shared = [problem, found]
    dist.broadcast_object_list(shared, src=0)
    if shared[0]:
        raise UserError(shared[0])
    if rt.is_master:
        return model, checkpoint, tokenizer, base
    config, checkpoint, tokenizer, base = shared[1]
    with torch.device("meta"):
        model = GPT(config)
    if config.lora_rank:
        freeze_base(model)
    return model, checkpoint, tokenizer, base


def tensorless(checkpoint):
    """A checkpoint's training state without the weights and the optimizer's state (those rank 0 sends in shards)."""
    return None if checkpoint is None else {**{k: v for k, v in checkpoint.items() if k != "model"}, "optimizer": {}}
