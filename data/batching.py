"""
Training batches from a prepared split: documents, packed into rows, collated into tensors.
A document is a (start, end, loss_from) triple of indices into the split's flat arrays: under
causal and ism a conversation, one pass training every answer; under prefix each answer needs its
own copy of the history: the conversation up to that answer's end, loss from its first token.
Rows of block_size tokens hold whole documents (doc_ids tell them apart, positions restart at 0).
"""
import bisect

import numpy as np
import torch

from cli.errors import DataError
from mask import ASSISTANT, check_kind

NO_TARGET = -1
PAD_ID = 0  # padding is its own document with no targets: its token id never matters


def documents(split, kind):
    """-> [(start, end, loss_from)] for the mask kind."""
    check_kind(kind)
    offsets = np.asarray(split.offsets)
    if kind != "prefix":
        starts = offsets[:-1].tolist()
        return list(zip(starts, offsets[1:].tolist(), starts))
    # answers: maximal runs of ASSISTANT, never across conversations (none starts with one)
    is_answer = np.asarray(split.roles) == ASSISTANT
    answer_start = np.flatnonzero(is_answer & ~np.r_[False, is_answer[:-1]])
    answer_end = np.flatnonzero(is_answer & ~np.r_[is_answer[1:], False]) + 1
    conv_start = offsets[np.searchsorted(offsets, answer_start, side="right") - 1]
    return list(zip(conv_start.tolist(), answer_end.tolist(), answer_start.tolist()))


def expansion_factor(split):
    """Tokens the prefix mask trains on / tokens in the conversations."""
    return token_count([documents(split, "prefix")]) / max(int(split.offsets[-1]), 1)


def pack(docs, block_size, rng):
    """Shuffle docs by the numpy Generator rng, then best fit: each into the fullest row with room.
    -> rows, each a list of docs."""
    rows, free = [], []  # free: sorted (space left, row index) of rows with room
    for i in rng.permutation(len(docs)):
        doc = docs[i]
        length = doc[1] - doc[0]
        if length > block_size:
            raise DataError(f"a conversation of {length} tokens does not fit block_size="
                            f"{block_size}: prepare the data again with --block_size={block_size}")
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


def answer_target_count(split, rows):
    """The targets collate(split, rows) would train, counted off the roles: cheap, so each rank
    counts a whole step's."""
    return sum(int(np.count_nonzero(split.roles[max(start + 1, loss_from):end] == ASSISTANT))
               for row in rows for start, end, loss_from in row)


def token_count(rows):
    """Non-padding tokens in rows."""
    return sum(end - start for row in rows for start, end, _ in row)


def collate(split, rows, block_size):
    """rows -> dict of [B, block_size] int64 tensors: idx, targets (-1: no loss), positions (from 0
    per doc), roles, doc_ids (0, 1, ...; the padding after the last doc is one more doc, ASSISTANT,
    no targets). A target is the next token where that is ASSISTANT, from loss_from on."""
    fill = {"idx": PAD_ID, "targets": NO_TARGET, "positions": 0, "roles": ASSISTANT, "doc_ids": 0}
    out = {name: np.full((len(rows), block_size), value, np.int64) for name, value in fill.items()}
    for b, row in enumerate(rows):
        t = 0
        for doc_id, (start, end, loss_from) in enumerate(row):
            span = slice(t, t + end - start)
            trained = (split.roles[start + 1:end] == ASSISTANT) & \
                (np.arange(start + 1, end) >= loss_from)
            out["idx"][b, span] = split.ids[start:end]
            out["targets"][b, span][:-1][trained] = split.ids[start + 1:end][trained]
            out["positions"][b, span] = np.arange(end - start)
            out["roles"][b, span] = split.roles[start:end]
            out["doc_ids"][b, span] = doc_id
            t = span.stop
        out["positions"][b, t:] = np.arange(block_size - t)
        out["doc_ids"][b, t:] = len(row)
    return {name: torch.from_numpy(array) for name, array in out.items()}


def epoch_rows(split, kind, block_size, seed, epoch):
    """One epoch's packed rows, the same for the same (seed, epoch): resumable, shardable."""
    return pack(documents(split, kind), block_size, np.random.default_rng((seed, epoch)))


class RowStream:
    """Training rows, epoch after epoch; its position (epoch, row) is checkpointed to resume."""

    def __init__(self, split, kind, block_size, seed, epoch=0, row=0):
        self.split, self.kind, self.block_size, self.seed = split, kind, block_size, seed
        self.epoch, self.row = epoch, row
        self.rows = epoch_rows(split, kind, block_size, seed, epoch)

    def take(self, n):
        """The next n rows (each a list of documents), crossing into new epochs."""
        out = []
        while len(out) < n:
            if self.row >= len(self.rows):
                self.epoch, self.row = self.epoch + 1, 0
                self.rows = epoch_rows(self.split, self.kind, self.block_size, self.seed,
                                       self.epoch)
            part = self.rows[self.row:self.row + n - len(out)]
            out += part
            self.row += len(part)
        return out

    def state(self):
        return {"epoch": self.epoch, "row": self.row}


def rank_rows(rows, batch_size, rank, world_size):
    """This rank's micro-batches of a step's rows, interleaved: 2 ranks x 1 micro-batch train on
    the rows of 1 rank x 2."""
    n_micro = len(rows) // (batch_size * world_size)
    starts = [(k * world_size + rank) * batch_size for k in range(n_micro)]
    return [rows[s:s + batch_size] for s in starts]


def heldout_rows(split, kind, block_size, batch_size, eval_iters=0):
    """Held-out rows, packed alike for every run (seed 0, epoch 0): eval_iters batches (0: all)."""
    rows = epoch_rows(split, kind, block_size, seed=0, epoch=0)
    return rows[:eval_iters * batch_size] if eval_iters else rows


def batches_of(split, rows, block_size, batch_size):
    """rows, collated batch_size at a time (the last batch may be smaller)."""
    for i in range(0, len(rows), batch_size):
        yield collate(split, rows[i:i + batch_size], block_size)
