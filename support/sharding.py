"""
FSDP2 (torch's fully_shard) for train.py --fsdp, and checkpoints that do not depend on how a run was
spread over ranks: the model's and the optimizer's states are saved whole, on the CPU, the
optimizer's keyed by parameter name, so that a run resumes on any number of ranks, sharded or not.
"""
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from cli.errors import UserError
from model import GPT


def start_on_rank0(find, rt):
    """find() -> its start record (model, checkpoint, ...) on rank 0 alone. The other ranks get the
    record without tensors and an empty model of its config, on the meta device, which shard()
    fills with their shards of rank 0's weights. A UserError on rank 0 is every rank's."""
    shared = [None, None, None]  # rank 0's problem, or its model's config and record
    if rt.is_master:
        try:
            start = find()
            sent = replace(start, model=None, checkpoint=tensorless(start.checkpoint))
            shared = [None, start.model.config, sent]
        except UserError as e:
            shared = [str(e), None, None]
    dist.broadcast_object_list(shared, src=0)
    problem, config, sent = shared
    if problem:
        raise UserError(problem)
    return start if rt.is_master else replace(sent, model=GPT.from_state(config))


def tensorless(checkpoint):
    """A checkpoint's training state without the weights and the optimizer's state (sent later)."""
    return None if checkpoint is None else \
        {**{k: v for k, v in checkpoint.items() if k != "model"}, "optimizer": {}}


def shard(model, rt):
    """Shard parameters, gradients and optimizer state over the ranks, block by block (a block's
    gathered only while it computes), the rest as the root, and give every rank its shards of rank
    0's weights (no other rank ever holds them all). With bfloat16 the blocks compute in it and
    reduce gradients in float32; the sharded parameters the optimizer updates stay float32."""
    weights = model.to(rt.device).state_dict() if rt.is_master else {}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if rt.dtype == "bfloat16" else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=rt.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    return model


def full_state(model, optimizer):
    """-> (the model's state dict, the optimizer's keyed by parameter name), whole: of a LoRA model
    the adapters only (its frozen base is not the run's to save). Under FSDP every rank must call it
    (the shards are gathered) and rank 0 alone gets the states, on the CPU."""
    adapters = model.adapter_params()
    if isinstance(model, FSDPModule):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=bool(adapters))
        return (get_model_state_dict(model, options=options),
                get_optimizer_state_dict(model, optimizer, options=options))
    state = model.state_dict()
    state = {name: state[name] for name in adapters} if adapters else state
    numbered, names = optimizer.state_dict(), parameter_names(model, optimizer)
    return state, {"state": {names[i]: s for i, s in numbered["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                    for g in numbered["param_groups"]]}


def parameter_names(model, optimizer):
    """The names of the optimizer's parameters, in the order its state dict numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state(model, optimizer, state):
    """Load an optimizer state full_state saved (or torch's numbered one, as older checkpoints hold
    it) into the optimizer of a model, sharded (then rank 0's state is read) or not."""
    if isinstance(model, FSDPModule):
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, state, options=options)
        return
    groups = state["param_groups"]
    if any(isinstance(name, str) for g in groups for name in g["params"]):
        position = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
        state = {"state": {position[n]: s for n, s in state["state"].items()},
                 "param_groups": [{**g, "params": [position[n] for n in g["params"]]}
                                  for g in groups]}
    optimizer.load_state_dict(state)
