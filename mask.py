"""
The attention rule of ismGPT: causal, prefix and ISM masks from per-token roles.

A conversation is a run of tokens, each with a role (SYSTEM, USER or ASSISTANT). A *segment* is a maximal
run of equal role inside one document; packed training rows hold several documents (doc_ids) that never see
each other. For a query token at position q and a key token at position kv of the same document:

    causal : kv <= q
    ism    : kv <= q, or q and kv are in the same SYSTEM/USER segment       (Intermittent Semi-working Mask)
    prefix : kv <= q, or both lie in the document's prefix

The prefix is every token before the start of the document's last ASSISTANT segment; a document that ends in
a query (a prompt awaiting its answer) is all prefix.

Each line above is built from small named predicates (b, h, q_idx, kv_idx) -> bool, combined with FlexAttention's
and_masks / or_masks, as attention-gym writes masks. `mask_mod` returns the combined predicate; `make_mask`
evaluates it on a grid (a dense bool tensor, for SDPA, any device) and `block_mask` hands the very same predicate
to FlexAttention's create_block_mask (CUDA). One rule, two backends.

Run `python mask.py` to see the three masks of a small conversation.
"""
from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import and_masks, or_masks

SYSTEM, USER, ASSISTANT = 0, 1, 2
MASKS = ("causal", "prefix", "ism")
ROLE_LETTERS = "SUA"  # role code -> letter, for pictures


def _as_rows(x):
    """(T,) or (B, T) -> (B, T)."""
    return x.unsqueeze(0) if x.dim() == 1 else x


def _starts(x):
    """True where a new run of equal values begins along the last dim."""
    starts = torch.ones_like(x, dtype=torch.bool)
    starts[:, 1:] = x[:, 1:] != x[:, :-1]
    return starts


class Segments(NamedTuple):
    """Per-token facts the predicates read, each (B, T): document index, segment index, whether the token is in a
    query (SYSTEM or USER) segment, and whether it lies in its document's prefix."""
    doc: torch.Tensor
    segment: torch.Tensor
    is_query: torch.Tensor
    in_prefix: torch.Tensor


def segment_info(roles, doc_ids=None):
    """-> Segments of a (B, T) or (T,) roles tensor. Documents are maximal runs of equal doc_id.

    A worked example, two packed documents (S=SYSTEM, U=USER, A=ASSISTANT):

        position   0 1 2 3 4 5 6 7 8 9
        roles      S S U U A A U A U A
        doc_ids    0 0 0 0 0 0 0 0 1 1
        doc        0 0 0 0 0 0 0 0 1 1
        segment    0 0 1 1 2 2 3 4 5 6     a new segment where the role or the document changes
        is_query   T T T T F F T F T F
        in_prefix  T T T T T T T F T F     before the start of its document's last answer
    """
    roles = _as_rows(roles)
    doc_ids = torch.zeros_like(roles) if doc_ids is None else _as_rows(doc_ids)
    new_doc = _starts(doc_ids)
    new_segment = new_doc | _starts(roles)
    doc = new_doc.cumsum(1) - 1  # 0, 1, 2, ... along each row
    segment = new_segment.cumsum(1) - 1
    # The final segment of a document is the largest segment index carrying that document index.
    last_segment_of_doc = torch.zeros_like(segment).scatter_reduce(1, doc, segment, "amax")
    in_final_segment = segment == last_segment_of_doc.gather(1, doc)
    is_query = roles != ASSISTANT
    return Segments(doc, segment, is_query, in_prefix=~(in_final_segment & ~is_query))


# ---------------------------------------------------------------------------------------- the named predicates

def earlier(b, h, q_idx, kv_idx):
    """The key is not after the query (a token sees itself)."""
    return kv_idx <= q_idx


def same_document(doc):
    def same_document(b, h, q_idx, kv_idx):
        """Both tokens in one packed document: documents never see each other."""
        return doc[b, q_idx] == doc[b, kv_idx]
    return same_document


def same_query_segment(segment, is_query):
    def same_query_segment(b, h, q_idx, kv_idx):
        """Both tokens in one SYSTEM or USER segment: a query sees all of itself, before and after."""
        return (segment[b, q_idx] == segment[b, kv_idx]) & is_query[b, q_idx]
    return same_query_segment


def both_in_prefix(in_prefix):
    def both_in_prefix(b, h, q_idx, kv_idx):
        """Both tokens before the document's last answer: the prefix is one bidirectional block."""
        return in_prefix[b, q_idx] & in_prefix[b, kv_idx]
    return both_in_prefix


def check_kind(kind):
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r}: choose one of {', '.join(MASKS)}")


def mask_mod(kind, roles, doc_ids=None):
    """The rule as a FlexAttention mask_mod: allowed(b, h, q_idx, kv_idx) -> bool tensor. The table says what a
    token sees inside its own document; documents are kept apart once, around it."""
    check_kind(kind)
    s = segment_info(roles, doc_ids)
    sees = {
        "causal": earlier,
        "ism": or_masks(earlier, same_query_segment(s.segment, s.is_query)),
        "prefix": or_masks(earlier, both_in_prefix(s.in_prefix)),
    }[kind]
    return and_masks(same_document(s.doc), sees)


# ------------------------------------------------------------------------------------------------- the two forms

def make_mask(kind, roles, doc_ids=None, start=0):
    """Dense boolean mask (True = may attend) for SDPA. roles (T,) -> (T - start, T); roles (B, T) ->
    (B, T - start, T). Rows start.. only: feeding tokens [start, T) on top of a cache of length start uses
    exactly these rows, which equal make_mask(kind, roles)[start:] (the chunk's mask is a slice of the whole)."""
    allowed = mask_mod(kind, roles, doc_ids)
    B, T = _as_rows(roles).shape
    b = torch.arange(B, device=roles.device).view(B, 1, 1)
    q_idx = torch.arange(start, T, device=roles.device).view(1, -1, 1)
    kv_idx = torch.arange(T, device=roles.device).view(1, 1, T)
    mask = allowed(b, 0, q_idx, kv_idx)
    return mask[0] if roles.dim() == 1 else mask


def block_mask(kind, roles, doc_ids=None):
    """The same rule as a FlexAttention BlockMask (B, 1 head broadcast, T, T), on roles' device."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, T = _as_rows(roles).shape
    # On CUDA the construction is compiled: uncompiled, create_block_mask evaluates the predicate on the whole
    # (B, T, T) grid in memory before it finds the blocks.
    return create_block_mask(mask_mod(kind, roles, doc_ids), B, None, T, T, device=roles.device,
                             _compile=roles.is_cuda)


def picture(kind, roles):
    """ASCII picture of a mask: one row per query token, '#' = may attend, '.' = may not."""
    mask = make_mask(kind, roles)
    letters = "".join(ROLE_LETTERS[r] for r in roles.tolist())
    lines = [f"{kind} (S=system U=user A=assistant; row = query token, column = key token)",
             "     " + letters]
    for i, row in enumerate(mask.tolist()):
        lines.append(f"{i:3d} {letters[i]} " + "".join("#" if a else "." for a in row))
    return "\n".join(lines)


def main():
    # system (3 tokens), user (3), answer (2), user (3), answer (2): role codes only, no tokenizer needed
    roles = torch.tensor([SYSTEM] * 3 + [USER] * 3 + [ASSISTANT] * 2 + [USER] * 3 + [ASSISTANT] * 2)
    for kind in MASKS:
        print(picture(kind, roles), end="\n\n")


if __name__ == "__main__":
    import signal
    import sys
    if sys.argv[1:] in (["-h"], ["--help"]):
        print("usage: python mask.py\nDraw the three masks (causal, prefix, ism) of a small conversation: a system "
              "message,\ntwo queries and two answers. Row i is a query token, column j a key token, # where i may "
              "attend to j.")
        sys.exit(0)
    if sys.argv[1:]:
        print(f"error: python mask.py takes no arguments, not {sys.argv[1]!r} (--help says what it does)",
              file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `python mask.py | head` ends quietly, as cat would
    main()
