"""
The answer loss: cross-entropy on answer targets only, as one training step weighs it and as the held-out loss
measures it. train.py trains with it; eval.py and bench.py measure with the same functions.

Why answer targets only: under ISM and prefix a query token may attend to the tokens after it in its own query, so
predicting its next token would be copying, not learning. Answer tokens see only what came before them under
every mask, so their loss is honest, and it is what a chat model is for. data/batching.py sets the targets: an
answer token (and the answer's closing <|end|>) is the target of the token before it; everything else is -1.
"""
from contextlib import nullcontext

import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel as DDP

from data.batching import NO_TARGET, batches_of, heldout_rows
from mask import ASSISTANT, block_mask, make_mask


def batch_mask(kind, batch, attention):
    """The batch's attention mask: FlexAttention's BlockMask ("flex") or SDPA's dense (B, T, T) bool ("sdpa")."""
    if attention == "flex":
        return block_mask(kind, batch["roles"], batch["doc_ids"])
    return make_mask(kind, batch["roles"], batch["doc_ids"])


def answer_loss_sum(model, batch, kind, attention="sdpa"):
    """Sum (not mean) of the cross-entropy over the batch's answer targets (targets != -1), in float32; the model
    computes logits for those positions only. A sum, so micro-batches and ranks can be weighted by their
    answer-token counts; 0 when there are none."""
    _, loss_sum = model(batch["idx"], batch_mask(kind, batch, attention), positions=batch["positions"],
                        targets=batch["targets"], loss_reduction="sum")
    return loss_sum


def train_step(model, optimizer, batches, kind, answer_tokens, rt, grad_clip=1.0, world_size=1, seeds=None):
    """One optimizer step over this rank's micro-batches. answer_tokens = the step's answer targets over every
    micro-batch of every rank, so the gradient is that of the mean loss over all of them: a micro-batch with
    more answer tokens weighs more, and the average over ranks (DDP's, FSDP's) is undone by the world_size factor.
    Gradients are synchronised on the last micro-batch only. seeds: torch's seed before each micro-batch (its
    dropout). -> this rank's summed answer loss (a tensor: reading it waits for the GPU)."""
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
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def answer_turns(batch):
    """(B, T): where a position's target is an answer token, which answer of its document that is (1 for the first
    answer, 2 for the second, ...); 0 where no loss is taken. Under prefix a document is a conversation up to the
    answer it trains, so its target answer is its last one."""
    roles, docs = batch["roles"], batch["doc_ids"]
    B, T = roles.shape
    answer = roles == ASSISTANT
    starts = answer.clone()  # the first token of each answer: an answer token after a non-answer or a new document
    starts[:, 1:] &= ~answer[:, :-1] | (docs[:, 1:] != docs[:, :-1])
    count = starts.long().cumsum(1)  # answers begun so far in the row
    positions = torch.arange(T, device=roles.device).expand(B, T)
    first = torch.full((B, int(docs.max()) + 1), T - 1, device=roles.device).scatter_reduce(1, docs, positions, "amin")
    before = (count - starts.long()).gather(1, first)  # answers begun in the row before each document
    turn = (count - before.gather(1, docs)) * answer  # the answer each token belongs to, within its document
    targets = torch.zeros_like(turn)
    targets[:, :-1] = turn[:, 1:]  # position t is trained on token t + 1
    return targets * (batch["targets"] != NO_TARGET)


@torch.no_grad()
def answer_loss_by_turn(model, batches, kind, rt):
    """-> {turn: (sum of answer-token losses, number of answer tokens)} over an iterable of collated batches, in
    eval mode, on rt's device (a support.compute.Runtime: device, autocast, attention backend); turn as
    answer_turns. Every answer token is counted once under every mask, so the numbers compare."""
    was_training = model.training
    model.eval()
    sums, counts = {}, {}
    for batch in batches:
        batch = rt.to_device(batch)
        with rt.autocast():
            _, losses = model(batch["idx"], batch_mask(kind, batch, rt.attention), positions=batch["positions"],
                              targets=batch["targets"], loss_reduction="none")
        turns = answer_turns(batch)[batch["targets"] != NO_TARGET]  # in the order of the losses
        for turn in turns.unique().tolist():
            picked = turns == turn
            sums[turn] = sums.get(turn, 0.0) + losses[picked].double().sum().item()
            counts[turn] = counts.get(turn, 0) + int(picked.sum())
    model.train(was_training)
    return {turn: (sums[turn], counts[turn]) for turn in sorted(sums)}


def answer_loss_totals(model, batches, kind, rt):
    """-> (sum of answer-token losses, number of answer tokens) over an iterable of collated batches (see
    answer_loss_by_turn)."""
    by_turn = answer_loss_by_turn(model, batches, kind, rt).values()
    return sum(total for total, _ in by_turn), sum(count for _, count in by_turn)


def estimate_val_loss(model, split, kind, block_size, batch_size, rt, eval_iters=0):
    """Held-out answer loss: the mean cross-entropy over every answer token of the val rows (eval_iters batches,
    0 = the whole split). Every answer token is counted once under every mask, so the numbers compare."""
    rows = heldout_rows(split, kind, block_size, batch_size, eval_iters)
    total, count = answer_loss_totals(model, batches_of(split, rows, block_size, batch_size), kind, rt)
    return total / max(count, 1)
