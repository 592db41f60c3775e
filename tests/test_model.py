"""The model: GPT-2 layout, no leakage into answer predictions, and the KV cache equal to full recompute, for both
families (GPT-2, and the Llama family: RoPE, grouped-query attention, SwiGLU, q/k/v biases)."""
import pytest
import torch

from mask import ASSISTANT, SYSTEM, USER, make_mask
from model import GPT, GPTConfig, KVCache

CONFIG = GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
LLAMA = GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=4, n_embd=32, bias=False, family="llama",
                  n_kv_head=2, mlp_hidden=48, qkv_bias=True, tie_embeddings=False)
FAMILIES = pytest.mark.parametrize("config", [CONFIG, LLAMA], ids=["gpt2", "llama"])


def tiny_model(seed=0, config=CONFIG):
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():  # bigger random weights than GPT-2's init, so masks make a visible difference
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


# A three-turn conversation as (role, length) segments: system, then user/answer pairs.
SEGMENTS = [(SYSTEM, 4), (USER, 5), (ASSISTANT, 3), (USER, 6), (ASSISTANT, 4), (USER, 3), (ASSISTANT, 5)]


def conversation(seed=0):
    roles = torch.tensor([role for role, n in SEGMENTS for _ in range(n)])
    ids = torch.randint(0, CONFIG.vocab_size, (len(roles),), generator=torch.Generator().manual_seed(seed))
    return ids, roles


def full_logits(model, kind, ids, roles):
    """One forward over the whole sequence under its mask: the reference."""
    with torch.no_grad():
        return model(ids.unsqueeze(0), make_mask(kind, roles))[0][0]


def answer_spans(roles):
    """[(first, end)] of each run of ASSISTANT tokens."""
    spans = []
    for i, role in enumerate(roles):
        if role == ASSISTANT and (i == 0 or roles[i - 1] != ASSISTANT):
            spans.append([i, i + 1])
        elif role == ASSISTANT:
            spans[-1][1] = i + 1
    return spans


def chat_chunks(roles):
    """How a chat session feeds a conversation: each prompt at once (led by the previous answer's closing token,
    which the sampler samples but never feeds), then the answer one token at a time."""
    chunks, start = [], 0
    for first, end in answer_spans(roles):
        chunks.append((start, first))
        chunks += [(i, i + 1) for i in range(first, end - 1)]
        start = end - 1
    return chunks + [(start, len(roles))]


def run_chat(model, kind, ids, roles, reprefill_each_turn):
    """Logits of every position as the chat path computes them. Returns (logits, reference) where the reference
    for each chunk [s, e) is a full forward over tokens [0, e) with no cache at all."""
    cache = KVCache(model.config)
    for buffer in (*cache.keys, *cache.values):  # allocated empty; zeros show which slots a chunk writes
        buffer.zero_()
    got, want = torch.zeros(len(ids), model.config.vocab_size), torch.zeros(len(ids), model.config.vocab_size)
    with torch.no_grad():
        for s, e in chat_chunks(roles.tolist()):
            is_prompt = e - s > 1 or roles[s] != ASSISTANT
            if reprefill_each_turn and is_prompt:
                s = 0  # the cached rows are stale: feed the whole history again, over them
            mask = make_mask(kind, roles[:e], start=s)
            got[s:e] = model(ids[s:e].unsqueeze(0), mask, kv_cache=cache)[0][0]
            want[s:e] = full_logits(model, kind, ids[:e], roles[:e])[s:e]
            assert not cache.keys[0][0, :, e:].any()  # the chunk wrote its own slots, none after them
    return got, want


@FAMILIES
@pytest.mark.parametrize("kind", ["causal", "ism"])
def test_cache_reused_across_turns_equals_one_full_forward(kind, config):
    # The central claim: under causal and ISM no row of the mask ever changes as the conversation grows, so K/V
    # of earlier turns stay valid and the chat can prefill only the new tokens of each turn.
    model = tiny_model(config=config)
    ids, roles = conversation()
    got, _ = run_chat(model, kind, ids, roles, reprefill_each_turn=False)
    torch.testing.assert_close(got, full_logits(model, kind, ids, roles), atol=1e-5, rtol=1e-5)


@FAMILIES
def test_prefix_needs_a_reprefill_each_turn(config):
    # Under prefix the bidirectional block grows every turn, so cached K/V of earlier turns go stale.
    model = tiny_model(config=config)
    ids, roles = conversation()
    stale, reference = run_chat(model, "prefix", ids, roles, reprefill_each_turn=False)
    assert (stale - reference).abs().max() > 1e-2
    fresh, reference = run_chat(model, "prefix", ids, roles, reprefill_each_turn=True)
    torch.testing.assert_close(fresh, reference, atol=1e-5, rtol=1e-5)


@FAMILIES
def test_answer_tokens_may_be_fed_in_chunks_of_any_size(config):
    # Answer rows are causal, so answer tokens can go in any grouping (e.g. a forced prefix, a replayed reply).
    model = tiny_model(1, config)
    ids, roles = conversation(1)
    reference = full_logits(model, "ism", ids, roles)
    cache = KVCache(config)
    with torch.no_grad():
        for s, e in [(0, 9), (9, 10), (10, 12), (12, 19), (19, 21), (21, len(ids))]:
            got = model(ids[s:e].unsqueeze(0), make_mask("ism", roles[:e], start=s), kv_cache=cache)[0][0]
            torch.testing.assert_close(got, reference[s:e], atol=1e-5, rtol=1e-5)


def test_a_query_cut_in_two_is_not_exact():
    # Why the chat prefills a whole query at once: query tokens see later tokens of their own segment, so K/V of a
    # half-fed query would be stale once the rest arrives.
    model = tiny_model(1)
    ids, roles = conversation(1)
    cache = KVCache(CONFIG)
    with torch.no_grad():
        model(ids[:6].unsqueeze(0), make_mask("ism", roles[:6]), kv_cache=cache)  # cuts the user segment 4..8
        got = model(ids[6:9].unsqueeze(0), make_mask("ism", roles[:9], start=6), kv_cache=cache)[0][0]
    assert (got - full_logits(model, "ism", ids, roles)[6:9]).abs().max() > 1e-3


def answer_prediction_positions(roles):
    return [t for t in range(len(roles) - 1) if roles[t + 1] == ASSISTANT]


@pytest.mark.parametrize("kind,segments", [
    ("causal", SEGMENTS),
    ("ism", SEGMENTS),
    ("prefix", [(SYSTEM, 3), (USER, 5), (ASSISTANT, 6)]),  # prefix trains on single-answer samples
])
def test_no_later_token_leaks_into_an_answer_prediction(kind, segments):
    model = tiny_model(2)
    roles = torch.tensor([role for role, n in segments for _ in range(n)])
    ids = torch.randint(0, CONFIG.vocab_size, (len(roles),), generator=torch.Generator().manual_seed(2))
    base = full_logits(model, kind, ids, roles)
    g = torch.Generator().manual_seed(3)
    for t in answer_prediction_positions(roles.tolist()):
        changed = ids.clone()
        changed[t + 1:] = torch.randint(0, CONFIG.vocab_size, (len(ids) - t - 1,), generator=g)
        torch.testing.assert_close(full_logits(model, kind, changed, roles)[t], base[t], atol=1e-6, rtol=0)


def test_the_leakage_check_can_fail():
    # Under prefix a whole multi-turn conversation is one block: earlier answers see later queries.
    model = tiny_model(2)
    ids, roles = conversation()
    t = answer_prediction_positions(roles.tolist())[0]
    changed = ids.clone()
    changed[t + 1:] = (changed[t + 1:] + 1) % CONFIG.vocab_size
    diff = full_logits(model, "prefix", changed, roles)[t] - full_logits(model, "prefix", ids, roles)[t]
    assert diff.abs().max() > 1e-3


@FAMILIES
def test_packed_documents_restart_positions_and_do_not_mix(config):
    model = tiny_model(3, config)
    ids, roles = conversation()
    n = len(ids)
    packed_ids, packed_roles = torch.cat([ids, ids]), torch.cat([roles, roles])
    doc_ids = torch.tensor([0] * n + [1] * n)
    positions = torch.cat([torch.arange(n), torch.arange(n)])
    with torch.no_grad():
        logits = model(packed_ids.unsqueeze(0), make_mask("ism", packed_roles, doc_ids), positions)[0][0]
    alone = full_logits(model, "ism", ids, roles)
    torch.testing.assert_close(logits[:n], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[n:], alone, atol=1e-5, rtol=1e-5)


def test_loss_ignores_targets_of_minus_one():
    model = tiny_model()
    ids, roles = conversation()
    targets = torch.full_like(ids, -1)
    targets[10] = 7
    logits, loss = model(ids.unsqueeze(0), make_mask("ism", roles), targets=targets.unsqueeze(0))
    everywhere = model(ids.unsqueeze(0), make_mask("ism", roles))[0]  # no targets: the logits of every position
    torch.testing.assert_close(logits, everywhere[0, 10:11])  # only where a loss is taken
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(everywhere[0, 10:11], torch.tensor([7])))
    total = model(ids.unsqueeze(0), make_mask("ism", roles), targets=targets.unsqueeze(0), loss_reduction="sum")[1]
    torch.testing.assert_close(total, loss)  # one target: its sum is its mean


def test_cache_overflow_and_size():
    model = tiny_model()
    cache = KVCache(CONFIG)
    ids = torch.zeros(1, CONFIG.block_size, dtype=torch.long)
    roles = torch.full((CONFIG.block_size,), USER)
    with torch.no_grad():
        model(ids, make_mask("ism", roles), kv_cache=cache)
        with pytest.raises(ValueError, match="exceeds block_size"):
            model(ids[:, :1], make_mask("ism", torch.cat([roles, roles[:1]]), start=CONFIG.block_size),
                  kv_cache=cache)
    head_dim = CONFIG.n_embd // CONFIG.n_head
    assert cache.bytes_per_token == 2 * CONFIG.n_layer * CONFIG.n_head * head_dim * 4
    # grouped-query attention: the cache holds the key/value heads only
    assert KVCache(LLAMA).bytes_per_token == 2 * LLAMA.n_layer * LLAMA.n_kv_head * (LLAMA.n_embd // LLAMA.n_head) * 4


def test_state_dict_has_the_gpt2_layout():
    # Names and shapes of GPT-2 as nanoGPT loads it (nn.Linear weights are (out, in); Hugging Face's Conv1D
    # stores the transpose, which from_pretrained-style loaders transpose back).
    cfg = CONFIG
    C, V = cfg.n_embd, cfg.vocab_size
    expected = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (cfg.block_size, C),
                "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,), "lm_head.weight": (V, C)}
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        expected.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "attn.c_attn.weight": (3 * C, C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "mlp.c_fc.weight": (4 * C, C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (C, 4 * C), h + "mlp.c_proj.bias": (C,),
        })
    got = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    assert got == expected
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_the_llama_family_has_its_own_layers_under_the_same_names():
    model = GPT(LLAMA)
    state = model.state_dict()
    head_dim = LLAMA.n_embd // LLAMA.n_head
    assert "transformer.wpe.weight" not in state  # RoPE, no position table
    assert state["transformer.h.0.attn.c_attn.weight"].shape == ((LLAMA.n_head + 2 * LLAMA.n_kv_head) * head_dim,
                                                                 LLAMA.n_embd)
    assert state["transformer.h.0.attn.c_attn.bias"].shape[0] == (LLAMA.n_head + 2 * LLAMA.n_kv_head) * head_dim
    assert "transformer.h.0.attn.c_proj.bias" not in state and "transformer.h.0.ln_1.bias" not in state
    assert state["transformer.h.0.mlp.c_fc.weight"].shape == (2 * LLAMA.mlp_hidden, LLAMA.n_embd)  # gate and up
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied


def test_rope_rotates_by_relative_position():
    # RoPE's defining property: the score of a query at i and a key at j depends on i - j only, so shifting every
    # position of a document by the same amount changes nothing inside it.
    model = tiny_model(4, LLAMA)
    ids, roles = conversation()
    with torch.no_grad():
        at_zero = model(ids.unsqueeze(0), make_mask("ism", roles))[0][0]
        shifted = model(ids.unsqueeze(0), make_mask("ism", roles), torch.arange(len(ids)) + 7)[0][0]
        reversed_positions = model(ids.unsqueeze(0), make_mask("ism", roles), torch.arange(len(ids)).flip(0))[0][0]
    torch.testing.assert_close(shifted, at_zero, atol=1e-4, rtol=1e-4)
    assert (reversed_positions - at_zero).abs().max() > 1e-2  # positions are not ignored
