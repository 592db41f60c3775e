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


def segment_info(roles, doc_ids=None):
    """Per-token tensors the predicates read, each (B, T): document index, segment index, and whether the token
    lies in its document's prefix. Documents are maximal runs of equal doc_id.

    A worked example, two packed documents (S=SYSTEM, U=USER, A=ASSISTANT):

        position   0 1 2 3 4 5 6 7 8 9
        roles      S S U U A A U A U A
        doc_ids    0 0 0 0 0 0 0 0 1 1
        doc        0 0 0 0 0 0 0 0 1 1
        segment    0 0 1 1 2 2 3 4 5 6     a new segment where the role or the document changes
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
    in_prefix = ~(in_final_segment & (roles == ASSISTANT))
    return doc, segment, in_prefix


# ---------------------------------------------------------------------------------------- the named predicates

def earlier(b, h, q_idx, kv_idx):
    """The key is not after the query (q sees itself)."""
    return kv_idx <= q_idx


def same_document(doc):
    def same_doc(b, h, q_idx, kv_idx):
        return doc[b, q_idx] == doc[b, kv_idx]
    return same_doc


def same_query_segment(segment, roles):
    """Both tokens in one SYSTEM or USER segment: a query sees all of itself, before and after."""
    is_query = roles != ASSISTANT

    def within_query(b, h, q_idx, kv_idx):
        return (segment[b, q_idx] == segment[b, kv_idx]) & is_query[b, q_idx]
    return within_query


def both_in_prefix(in_prefix):
    def within_prefix(b, h, q_idx, kv_idx):
        return in_prefix[b, q_idx] & in_prefix[b, kv_idx]
    return within_prefix


def mask_mod(kind, roles, doc_ids=None):
    """The rule as a FlexAttention mask_mod: allowed(b, h, q_idx, kv_idx) -> bool tensor."""
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r}: choose one of {', '.join(MASKS)}")
    roles = _as_rows(roles)
    doc, segment, in_prefix = segment_info(roles, doc_ids)
    same_doc = same_document(doc)
    if kind == "causal":
        return and_masks(same_doc, earlier)
    if kind == "ism":
        return and_masks(same_doc, or_masks(earlier, same_query_segment(segment, roles)))
    return and_masks(same_doc, or_masks(earlier, both_in_prefix(in_prefix)))


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
    # On CUDA, compiling the block-mask construction cuts it from ~20 ms to ~5 ms per batch (H100, 8 x 512).
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
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `python mask.py | head` ends quietly, as cat would
    main()
