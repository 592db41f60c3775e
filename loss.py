"""The answer loss: cross-entropy on answer targets only, for a training step (train.py) and for the
held-out loss (eval.py, bench.py).

Why answers only: under ISM and prefix a query token may see the tokens after it in its own query,
so predicting its next token would be copying. An answer token sees only what came before it under
every mask. data/batching.py sets the targets: -1 everywhere but before an answer token.
"""
from contextlib import nullcontext

import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel as DDP

from data.batching import NO_TARGET, batches_of, heldout_rows
from mask import ASSISTANT, block_mask, make_mask


def batch_mask(kind, batch, attention):
    """Flex's BlockMask ("flex") or SDPA's dense [B, T, T] bool ("sdpa")."""
    if attention == "flex":
        return block_mask(kind, batch["roles"], batch["doc_ids"])
    return make_mask(kind, batch["roles"], batch["doc_ids"])


def _forward(model, batch, kind, attention, reduction):
    return model(batch["idx"], batch_mask(kind, batch, attention), positions=batch["positions"],
                 targets=batch["targets"], loss_reduction=reduction)[1]


def answer_loss_sum(model, batch, kind, attention="sdpa"):
    """Summed float32 cross-entropy over the answer targets (0 when none): a sum, so micro-batches
    and ranks can be weighted by their answer-token counts."""
    return _forward(model, batch, kind, attention, "sum")


def train_step(model, optimizer, batches, kind, answer_tokens, rt, grad_clip=1.0, world_size=1,
               seeds=None):
    """One optimizer step over this rank's micro-batches. answer_tokens counts the step's answer
    targets over all micro-batches and ranks, so the gradient is that of the mean loss over all of
    them (world_size undoes the ranks' averaging). Gradients sync on the last micro-batch only.
    seeds: torch's seed before each micro-batch (dropout). -> this rank's summed loss (a tensor)."""
    total = 0.0
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        if seeds is not None:
            torch.manual_seed(seeds[k])
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last)
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with rt.autocast():
                loss_sum = answer_loss_sum(model, batch, kind, rt.attention)
            (loss_sum * (world_size / max(answer_tokens, 1))).backward()
        total = total + loss_sum.detach()
    if grad_clip > 0:
        trained = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trained, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def answer_turns(batch):
    """-> [B, T]: where a position's target is an answer token, which answer of its document it is
    (1, 2, ...); 0 where no loss is taken. Under prefix a document ends with its trained answer."""
    roles, docs = batch["roles"], batch["doc_ids"]
    answer = roles == ASSISTANT
    starts = answer.clone()  # an answer's first token: after a non-answer or at a new document
    starts[:, 1:] &= ~answer[:, :-1] | (docs[:, 1:] != docs[:, :-1])
    count = starts.long().cumsum(1)  # answers begun so far in the row
    before = torch.zeros_like(count).scatter_reduce(  # answers begun before each document
        1, docs, count - starts.long(), "amin", include_self=False)
    turn = (count - before.gather(1, docs)) * answer
    targets = torch.zeros_like(turn)
    targets[:, :-1] = turn[:, 1:]  # position t is trained on token t + 1
    return targets * (batch["targets"] != NO_TARGET)


@torch.no_grad()
def answer_loss_by_turn(model, batches, kind, rt):
    """-> {turn: (summed loss, answer tokens)} over collated batches, in eval mode on rt's device
    (support.compute.Runtime). Each answer token counts once under every mask, so masks compare."""
    was_training = model.training
    model.eval()
    sums, counts = {}, {}
    for batch in batches:
        batch = rt.to_device(batch)
        with rt.autocast():
            losses = _forward(model, batch, kind, rt.attention, "none")
        turns = answer_turns(batch)[batch["targets"] != NO_TARGET]  # in the order of the losses
        for turn in turns.unique().tolist():
            picked = turns == turn
            sums[turn] = sums.get(turn, 0.0) + losses[picked].double().sum().item()
            counts[turn] = counts.get(turn, 0) + int(picked.sum())
    model.train(was_training)
    return {turn: (sums[turn], counts[turn]) for turn in sorted(sums)}


def answer_loss_totals(model, batches, kind, rt):
    """-> (summed loss, answer tokens) over collated batches."""
    by_turn = answer_loss_by_turn(model, batches, kind, rt).values()
    return sum(total for total, _ in by_turn), sum(count for _, count in by_turn)


def estimate_val_loss(model, split, kind, block_size, batch_size, rt, eval_iters=0):
    """Mean held-out answer loss over eval_iters batches of the val rows (0 = all of them)."""
    rows = heldout_rows(split, kind, block_size, batch_size, eval_iters)
    batches = batches_of(split, rows, block_size, batch_size)
    total, count = answer_loss_totals(model, batches, kind, rt)
    return total / max(count, 1)


if __name__ == "__main__":  # a module: say what runs it
    print("usage: loss.py is imported, not run: train.py's steps and eval.py's held-out loss "
          "use it")
