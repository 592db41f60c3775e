"""FSDP2 (torch's fully_shard) for train.py --fsdp, and checkpoints that resume on any number of
ranks, sharded or not: the states are saved whole, on the CPU, the optimizer's keyed by name."""
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from cli.errors import UserError
from model import GPT

FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)  # rank 0's, whole


def start_on_rank0(find, rt):
    """find() on rank 0 -> its start record; the others get it without tensors (sent later), its
    model built on the meta device for shard() to fill. A UserError on rank 0 is every rank's."""
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
    """A checkpoint without the weights and the optimizer's state (sent later)."""
    return None if checkpoint is None else \
        {**{k: v for k, v in checkpoint.items() if k != "model"}, "optimizer": {}}


def shard(model, rt):
    """Shard the model block by block (gathered only while it computes) with rank 0's weights.
    With bfloat16 the blocks compute in it, reducing gradients and updating weights in float32."""
    weights = model.to(rt.device).state_dict() if rt.is_master else {}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if rt.dtype == "bfloat16" else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=rt.device)
    set_model_state_dict(model, weights, options=FROM_RANK0)
    return model


def full_state(model, optimizer):
    """-> (the model's state dict, the optimizer's keyed by parameter name), whole; of a LoRA model
    the adapters only. Under FSDP every rank calls it and rank 0 alone gets them, on the CPU."""
    adapters = model.adapter_params()
    if isinstance(model, FSDPModule):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=bool(adapters))
        return (get_model_state_dict(model, options=options),
                get_optimizer_state_dict(model, optimizer, options=options))
    state = model.state_dict()
    state = {name: state[name] for name in adapters} if adapters else state
    return state, renamed(optimizer.state_dict(), parameter_names(model, optimizer))


def parameter_names(model, optimizer):
    """The optimizer's parameters' names, in the order its state dict numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def renamed(optimizer_state, new):
    """An optimizer's state dict with each parameter's key k as new[k] (numbers <-> names)."""
    return {"state": {new[k]: s for k, s in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [new[k] for k in g["params"]]}
                             for g in optimizer_state["param_groups"]]}


def load_optimizer_state(model, optimizer, state):
    """Load full_state's optimizer state (or an older checkpoint's numbered one), sharded or not."""
    if isinstance(model, FSDPModule):
        set_optimizer_state_dict(model, optimizer, state, options=FROM_RANK0)
        return
    if any(isinstance(name, str) for g in state["param_groups"] for name in g["params"]):
        state = renamed(state, {n: i for i, n in enumerate(parameter_names(model, optimizer))})
    optimizer.load_state_dict(state)
