"""The attention rule of ismGPT: causal, prefix and ISM masks from per-token roles.

Each token has a role (SYSTEM, USER or ASSISTANT). A *segment* is a maximal run of equal role inside
one document; packed rows hold several documents (doc_ids) that never see each other. Query token q
may see key token kv of its own document when:

    causal : kv <= q
    ism    : kv <= q, or q and kv are in the same SYSTEM/USER segment
    prefix : kv <= q, or both lie in the document's prefix (everything before its last answer;
             a document that ends in a query is all prefix)

The rule is small named predicates (b, h, q_idx, kv_idx) -> bool joined by Flex's or_masks and
and_masks. make_mask evaluates it densely (SDPA, any device); block_mask hands the same predicate to
FlexAttention (CUDA). `python mask.py` draws the three masks.
"""
from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import and_masks, create_block_mask, or_masks

SYSTEM, USER, ASSISTANT = 0, 1, 2
MASKS = ("causal", "prefix", "ism")
ROLE_LETTERS = "SUA"  # role code -> letter, for pictures


def _as_rows(x):  # [T] or [B, T] -> [B, T]
    return x.unsqueeze(0) if x.dim() == 1 else x


def _starts(x):  # x: [B, T] -> True where a new run of equal values begins
    starts = torch.ones_like(x, dtype=torch.bool)
    starts[:, 1:] = x[:, 1:] != x[:, :-1]
    return starts


class Segments(NamedTuple):
    """Per-token facts the predicates read, each [B, T]."""
    doc: torch.Tensor        # document index
    segment: torch.Tensor    # segment index
    is_query: torch.Tensor   # in a SYSTEM or USER segment
    in_prefix: torch.Tensor  # before the start of its document's last answer


def segment_info(roles, doc_ids=None):
    """roles, doc_ids: [T] or [B, T] -> Segments. For example (S, U, A = roles):

        roles      S S U U A A U A | U A
        doc_ids    0 0 0 0 0 0 0 0 | 1 1
        segment    0 0 1 1 2 2 3 4 | 5 6
        is_query   T T T T F F T F | T F
        in_prefix  T T T T T T T F | T F
    """
    roles = _as_rows(roles)
    doc_ids = torch.zeros_like(roles) if doc_ids is None else _as_rows(doc_ids)
    new_doc = _starts(doc_ids)
    doc = new_doc.cumsum(1) - 1
    segment = (new_doc | _starts(roles)).cumsum(1) - 1
    last_segment = torch.zeros_like(segment).scatter_reduce(1, doc, segment, "amax")  # per doc
    in_last = segment == last_segment.gather(1, doc)
    is_query = roles != ASSISTANT
    return Segments(doc, segment, is_query, in_prefix=~(in_last & ~is_query))


# ----------------------------------------------------------------------------------------- the rule

def earlier(b, h, q_idx, kv_idx):  # a token sees itself and what came before
    return kv_idx <= q_idx


def check_kind(kind):
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r}: choose one of {', '.join(MASKS)}")


def mask_mod(kind, roles, doc_ids=None):
    """The rule as a FlexAttention mask_mod: what a token sees inside its own document."""
    check_kind(kind)
    doc, segment, is_query, in_prefix = segment_info(roles, doc_ids)

    def same_document(b, h, q_idx, kv_idx):
        return doc[b, q_idx] == doc[b, kv_idx]

    def same_query_segment(b, h, q_idx, kv_idx):  # a query sees all of itself
        return (segment[b, q_idx] == segment[b, kv_idx]) & is_query[b, q_idx]

    def both_in_prefix(b, h, q_idx, kv_idx):  # the prefix is one bidirectional block
        return in_prefix[b, q_idx] & in_prefix[b, kv_idx]

    sees = {"causal": earlier, "ism": or_masks(earlier, same_query_segment),
            "prefix": or_masks(earlier, both_in_prefix)}[kind]
    return and_masks(same_document, sees)


# ------------------------------------------------------------------------------------ the two forms

def make_mask(kind, roles, doc_ids=None, start=0):
    """Dense bool mask (True = may attend) for SDPA, rows start.. only.
    roles [T] -> [T - start, T]; roles [B, T] -> [B, T - start, T]. A chunk on top of a cache of
    length start uses these rows: make_mask(kind, roles)[start:], a slice of the whole."""
    B, T = _as_rows(roles).shape
    b = torch.arange(B, device=roles.device).view(B, 1, 1)
    q_idx = torch.arange(start, T, device=roles.device).view(1, -1, 1)
    kv_idx = torch.arange(T, device=roles.device).view(1, 1, T)
    mask = mask_mod(kind, roles, doc_ids)(b, 0, q_idx, kv_idx)
    return mask[0] if roles.dim() == 1 else mask


def block_mask(kind, roles, doc_ids=None):
    """The same rule as a FlexAttention BlockMask [B, 1, T, T], on roles' device."""
    B, T = _as_rows(roles).shape
    # compiled on CUDA: uncompiled, it evaluates the whole [B, T, T] grid in memory
    return create_block_mask(mask_mod(kind, roles, doc_ids), B, None, T, T, device=roles.device,
                             _compile=roles.is_cuda)


def picture(kind, roles):
    """ASCII picture: one row per query token, '#' = may attend, '.' = may not."""
    letters = "".join(ROLE_LETTERS[r] for r in roles.tolist())
    lines = [f"{kind} (S=system U=user A=assistant; row = query token, column = key token)",
             "     " + letters]
    for i, row in enumerate(make_mask(kind, roles).tolist()):
        lines.append(f"{i:3d} {letters[i]} " + "".join("#" if a else "." for a in row))
    return "\n".join(lines)


if __name__ == "__main__":
    import signal
    import sys
    if sys.argv[1:] in (["-h"], ["--help"]):
        print("usage: python mask.py\nDraw the three masks (causal, prefix, ism) of a small "
              "conversation: a system message,\ntwo queries and two answers. Row i is a query "
              "token, column j a key token, # where i may attend to j.")
        sys.exit(0)
    if sys.argv[1:]:
        print(f"error: python mask.py takes no arguments, not {sys.argv[1]!r} (--help says what it "
              "does)", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `python mask.py | head` ends quietly
    # system (3 tokens), user (3), answer (2), user (3), answer (2)
    roles = torch.tensor([SYSTEM] * 3 + [USER] * 3 + [ASSISTANT] * 2 + [USER] * 3 + [ASSISTANT] * 2)
    for kind in MASKS:
        print(picture(kind, roles), end="\n\n")
