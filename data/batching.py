"""
Training batches from a prepared split: documents, packing into rows, and collating rows into tensors.

A document is a (start, end, loss_from) triple of indices into the split's flat arrays:
- causal and ism: one document per conversation, loss_from = start, so one pass trains every answer;
- prefix: triplet expansion, one document per answer: the conversation up to the end of that answer, with loss
  from its first token. Under the prefix mask every earlier token is prefix, so each answer needs its own copy
  of the history; the expansion factor says how many more tokens that costs.
Rows of block_size tokens hold whole documents (never split across rows), told apart by doc_ids, with positions
restarting at 0 per document. Loss targets are the answer tokens of each document from loss_from on.

This module is the one owner of turning a split into batches: training reads a RowStream (an endless stream of
epochs, each packed afresh from (seed, epoch)), split between DDP ranks by rank_rows; the held-out loss reads
heldout_rows; both collate through batches_of / collate.
"""
import bisect

import numpy as np
import torch

from cli.errors import DataError
from mask import ASSISTANT, check_kind

NO_TARGET = -1
PAD_ID = 0  # padding is its own document with no targets, so its token id never matters


def documents(split, kind):
    """-> list of (start, end, loss_from) for the mask kind (see the module docstring)."""
    check_kind(kind)
    offsets = np.asarray(split.offsets)
    if kind != "prefix":
        starts = offsets[:-1].tolist()
        return list(zip(starts, offsets[1:].tolist(), starts))
    # Answers are the maximal runs of ASSISTANT tokens. A run never spans two conversations: each one starts
    # with <|bos|>, which is SYSTEM or USER.
    is_answer = np.asarray(split.roles) == ASSISTANT
    answer_start = np.flatnonzero(is_answer & ~np.r_[False, is_answer[:-1]])
    answer_end = np.flatnonzero(is_answer & ~np.r_[is_answer[1:], False]) + 1
    conv_start = offsets[np.searchsorted(offsets, answer_start, side="right") - 1]
    return list(zip(conv_start.tolist(), answer_end.tolist(), answer_start.tolist()))


def expansion_factor(split):
    """Tokens the prefix mask trains on (one document per answer) / tokens in the conversations."""
    prefix_tokens = sum(end - start for start, end, _ in documents(split, "prefix"))
    return prefix_tokens / max(int(split.offsets[-1]), 1)


def pack(docs, block_size, rng):
    """Shuffle docs with the numpy Generator rng, then put each one into the fullest row it still fits in (best
    fit: rows come out ~99% full where filling one row at a time leaves ~15% padding). A doc never straddles
    rows. -> list of rows, each a list of docs."""
    rows, free = [], []  # free: sorted (space left, row index) of rows that still have room
    for i in rng.permutation(len(docs)):
        doc = docs[i]
        length = doc[1] - doc[0]
        if length > block_size:
            raise DataError(f"a conversation of {length} tokens does not fit block_size={block_size}: "
                            f"prepare the data again with --block_size={block_size}")
        k = bisect.bisect_left(free, (length, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = block_size, len(rows)
            rows.append([])
        rows[r].append(doc)
        if space > length:
            bisect.insort(free, (space - length, r))
    return rows


def _targets(ids, roles, start, end, loss_from):
    """Next-token targets inside one document: only where the next token is ASSISTANT, at or after loss_from."""
    targets = np.full(end - start, NO_TARGET, dtype=np.int64)
    next_pos = np.arange(start + 1, end)
    trained = (roles[start + 1:end] == ASSISTANT) & (next_pos >= loss_from)
    targets[:-1][trained] = ids[start + 1:end][trained]
    return targets


def answer_target_count(split, rows):
    """How many targets collate(split, rows) would train, read off the roles without collating (_targets' rule:
    every ASSISTANT token of a document from max(start + 1, loss_from) on is the target of the token before it).
    Cheap enough that every rank counts a whole step, with no communication."""
    return sum(int(np.count_nonzero(split.roles[max(start + 1, loss_from):end] == ASSISTANT))
               for row in rows for start, end, loss_from in row)


def token_count(rows):
    """Non-padding tokens in rows: what a step actually trains on."""
    return sum(end - start for row in rows for start, end, _ in row)


def collate(split, rows, block_size):
    """rows -> dict of (B, block_size) int64 tensors: idx, targets (-1 = no loss), positions (from 0 per doc),
    roles, doc_ids (0, 1, ... per row; the padding after the last doc is one more doc, ASSISTANT, no targets)."""
    shape = (len(rows), block_size)
    out = {"idx": np.full(shape, PAD_ID, dtype=np.int64), "targets": np.full(shape, NO_TARGET, dtype=np.int64),
           "positions": np.zeros(shape, dtype=np.int64), "roles": np.full(shape, ASSISTANT, dtype=np.int64),
           "doc_ids": np.zeros(shape, dtype=np.int64)}
    for b, row in enumerate(rows):
        t = 0
        for doc_id, (start, end, loss_from) in enumerate(row):
            span = slice(t, t + end - start)
            out["idx"][b, span] = split.ids[start:end]
            out["targets"][b, span] = _targets(split.ids, split.roles, start, end, loss_from)
            out["positions"][b, span] = np.arange(end - start)
            out["roles"][b, span] = split.roles[start:end]
            out["doc_ids"][b, span] = doc_id
            t = span.stop
        out["positions"][b, t:] = np.arange(block_size - t)
        out["doc_ids"][b, t:] = len(row)
    return {name: torch.from_numpy(array) for name, array in out.items()}


def epoch_rows(split, kind, block_size, seed, epoch):
    """The packed rows of one epoch, the same for the same (seed, epoch): train.py indexes into them to resume
    exactly and to shard across DDP ranks."""
    return pack(documents(split, kind), block_size, np.random.default_rng((seed, epoch)))


# ---------------------------------------------------------------------------------- the rows a run reads

class RowStream:
    """The training rows as an endless stream of epochs; epoch e is epoch_rows(split, kind, block_size, seed, e).
    Its position (epoch, row) is saved in checkpoints, so a resumed run reads exactly the rows it would have."""

    def __init__(self, split, kind, block_size, seed, epoch=0, row=0):
        self.split, self.kind, self.block_size, self.seed = split, kind, block_size, seed
        self.epoch, self.row = epoch, row
        self.rows = epoch_rows(split, kind, block_size, seed, epoch)

    def take(self, n):
        """The next n rows (each a list of (start, end, loss_from) documents), crossing into new epochs."""
        out = []
        while len(out) < n:
            if self.row >= len(self.rows):
                self.epoch, self.row = self.epoch + 1, 0
                self.rows = epoch_rows(self.split, self.kind, self.block_size, self.seed, self.epoch)
            part = self.rows[self.row:self.row + n - len(out)]
            out += part
            self.row += len(part)
        return out

    def state(self):
        return {"epoch": self.epoch, "row": self.row}


def rank_rows(rows, batch_size, rank, world_size):
    """This rank's micro-batches (lists of rows) of a step whose rows, all ranks', are `rows`: micro-batch k of
    rank r is rows [(k * world_size + r) * batch_size, ... + batch_size), so 2 ranks x 1 micro-batch train on the
    same rows as 1 rank x 2 micro-batches."""
    n_micro = len(rows) // (batch_size * world_size)
    starts = [(k * world_size + rank) * batch_size for k in range(n_micro)]
    return [rows[s:s + batch_size] for s in starts]


def heldout_rows(split, kind, block_size, batch_size, eval_iters=0):
    """The held-out rows, packed the same way for every run (seed 0, epoch 0): eval_iters batches, 0 = all."""
    rows = epoch_rows(split, kind, block_size, seed=0, epoch=0)
    return rows[:eval_iters * batch_size] if eval_iters else rows


def batches_of(split, rows, block_size, batch_size):
    """rows, collated batch_size at a time (the last batch may be smaller)."""
    for i in range(0, len(rows), batch_size):
        yield collate(split, rows[i:i + batch_size], block_size)
