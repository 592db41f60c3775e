"""The mask rule against a brute-force oracle written straight from the definitions, plus ISM's properties."""
import random

import pytest
import torch
import torch.nn.functional as F

from mask import ASSISTANT, MASKS, SYSTEM, USER, block_mask, make_mask, segment_info


def oracle(kind, roles, doc_ids=None):
    """allowed(i, j) by plain loops over Python lists, from the definitions in mask.py's docstring, nothing shared."""
    T = len(roles)
    docs = doc_ids if doc_ids is not None else [0] * T

    def doc_span(i):  # [first, last] of the maximal run of equal doc id around i
        first, last = i, i
        while first > 0 and docs[first - 1] == docs[i]:
            first -= 1
        while last < T - 1 and docs[last + 1] == docs[i]:
            last += 1
        return first, last

    def same_segment(i, j):
        lo, hi = min(i, j), max(i, j)
        return all(docs[k] == docs[lo] and roles[k] == roles[lo] for k in range(lo, hi + 1))

    def in_prefix(i):
        first, last = doc_span(i)
        if roles[last] != ASSISTANT:
            return True  # the document ends in a query: all prefix
        answer_start = last
        while answer_start > first and roles[answer_start - 1] == ASSISTANT:
            answer_start -= 1
        return i < answer_start

    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            if doc_span(i) != doc_span(j):
                continue
            if kind == "causal":
                mask[i, j] = j <= i
            elif kind == "ism":
                mask[i, j] = j <= i or (same_segment(i, j) and roles[i] in (SYSTEM, USER))
            else:
                mask[i, j] = j <= i or (in_prefix(i) and in_prefix(j))
    return mask


def random_conversation(rng, with_docs):
    """Random role runs (system or not, runs of equal roles, any order) and, optionally, packed documents."""
    roles, docs = [], []
    for doc in range(rng.randint(1, 3) if with_docs else 1):
        if rng.random() < 0.5:
            roles += [SYSTEM] * rng.randint(1, 3)
        for _ in range(rng.randint(1, 4)):
            roles += [rng.choice([USER, USER, ASSISTANT, SYSTEM])] * rng.randint(1, 4)
        docs += [doc] * (len(roles) - len(docs))
    return roles, (docs if with_docs else None)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("with_docs", [False, True])
def test_make_mask_equals_brute_force(kind, with_docs):
    rng = random.Random(0)
    for _ in range(150):
        roles, docs = random_conversation(rng, with_docs)
        expected = oracle(kind, roles, docs)
        doc_tensor = None if docs is None else torch.tensor(docs)
        assert torch.equal(make_mask(kind, torch.tensor(roles), doc_tensor), expected), (roles, docs)


@pytest.mark.parametrize("kind", MASKS)
def test_batched_mask_equals_per_row(kind):
    rng = random.Random(1)
    rows = [random_conversation(rng, True) for _ in range(4)]
    T = min(len(r) for r, _ in rows)
    roles = torch.tensor([r[:T] for r, _ in rows])
    docs = torch.tensor([d[:T] for _, d in rows])
    batched = make_mask(kind, roles, docs)
    for b in range(4):
        assert torch.equal(batched[b], oracle(kind, roles[b].tolist(), docs[b].tolist()))


@pytest.mark.parametrize("kind", MASKS)
def test_chunk_rows_are_a_slice_of_the_whole(kind):
    rng = random.Random(2)
    for _ in range(50):
        roles = torch.tensor(random_conversation(rng, False)[0])
        start = rng.randrange(len(roles))
        assert torch.equal(make_mask(kind, roles, start=start), make_mask(kind, roles)[start:])


def test_ism_never_sees_a_later_segment():
    rng = random.Random(3)
    for _ in range(200):
        roles, docs = random_conversation(rng, True)
        segment = segment_info(torch.tensor(roles), torch.tensor(docs)).segment
        segment = segment[0]
        mask = make_mask("ism", torch.tensor(roles), torch.tensor(docs))
        later_segment = segment.view(1, -1) > segment.view(-1, 1)  # [i, j]: j's segment comes after i's
        assert not (mask & later_segment).any()


def test_ism_without_queries_is_causal():
    roles = torch.full((9,), ASSISTANT)
    assert torch.equal(make_mask("ism", roles), make_mask("causal", roles))
    assert torch.equal(make_mask("ism", roles), torch.ones(9, 9, dtype=torch.bool).tril())


def test_ism_on_one_turn_is_segment_by_segment():
    # MAS (arXiv 2412.18487): system block bidirectional, user block bidirectional and sees the system, answer
    # causal. Written here as blocks, independently of the rule.
    n_sys, n_user, n_ans = 3, 4, 3
    roles = torch.tensor([SYSTEM] * n_sys + [USER] * n_user + [ASSISTANT] * n_ans)
    T = len(roles)
    expected = torch.ones(T, T, dtype=torch.bool).tril()
    expected[:n_sys, :n_sys] = True
    expected[n_sys:n_sys + n_user, :n_sys + n_user] = True
    assert torch.equal(make_mask("ism", roles), expected)


def test_prefix_of_a_prompt_is_fully_bidirectional():
    roles = torch.tensor([SYSTEM] * 2 + [USER] * 3 + [ASSISTANT] * 2 + [USER] * 3)
    assert make_mask("prefix", roles).all()


def test_every_row_sees_itself():
    # a fully masked row would make SDPA return NaN
    rng = random.Random(4)
    for kind in MASKS:
        for _ in range(50):
            roles, docs = random_conversation(rng, True)
            assert make_mask(kind, torch.tensor(roles), torch.tensor(docs)).diagonal().all()


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown mask"):
        make_mask("bidirectional", torch.tensor([USER, ASSISTANT]))


@pytest.mark.parametrize("kind", MASKS)
def test_block_mask_attends_like_the_dense_mask(kind):
    # BlockMask.to_dense() is block-level, so compare what matters: FlexAttention under the BlockMask against SDPA
    # under the dense mask (Flex's forward runs on CPU). T = 200 spans two 128-token blocks, one partial.
    rng = random.Random(5)
    rows = []
    while len(rows) < 2:
        roles, docs = [], []
        while len(roles) < 200:
            r, d = random_conversation(rng, True)
            roles += r
            docs += [x + (docs[-1] + 1 if docs else 0) for x in d]
        rows.append((roles[:200], docs[:200]))
    roles = torch.tensor([r for r, _ in rows])
    docs = torch.tensor([d for _, d in rows])
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 200, 16) for _ in range(3))
    from torch.nn.attention.flex_attention import flex_attention
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=block_mask(kind, roles, docs))
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=make_mask(kind, roles, docs).unsqueeze(1))
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_mask_py_piped_into_head_ends_quietly():
    """`python mask.py | head -1`: the reader goes away while mask.py is still writing."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "mask.py"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"causal")
    proc.stdout.close()
    assert b"Traceback" not in proc.stderr.read()
    proc.wait(timeout=60)
