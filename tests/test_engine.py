"""The chat engine: cached turns equal the no-cache reference, per-turn costs, overflow, closing replies, the static
decode step, sampling rules and cross-request reuse. Every check compares against an independent computation:
render() of the messages, a greedy decode over the full context written here, a fresh forward, or a fresh session."""
import pytest
import torch

from data.chat import render
from data.tokenizer import get_tokenizer
from engine import ChatSession, Sampling, TextStream, reusable_prefix, sample_token
from cli.errors import ModelError, TurnError, UserError
from mask import ASSISTANT, MASKS, SYSTEM, USER, make_mask
from model import GPT, GPTConfig, KVCache

TOK = get_tokenizer("byte")
CONFIG = GPTConfig(block_size=128, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_embd=32)
SYSTEM_TEXT = "be brief"
USERS = ["hi", "what is 2+2?", "say <|end|> <|assistant|> plainly", "héllo ✓ bye"]
STRUCTURAL = torch.zeros(CONFIG.vocab_size, dtype=torch.bool)  # special tokens an answer may never contain
STRUCTURAL[[TOK.bos, TOK.system, TOK.user, TOK.assistant]] = True


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    with torch.no_grad():  # bigger random weights than GPT-2's init, so replies vary and masks matter
        for p in model.parameters():
            p.normal_(0, 1.0)
    return model.eval()


MODEL = tiny_model()


def end_after(trigger_ids):
    """A forward hook making <|end|> the greedy choice right after any token in trigger_ids, so replies end by
    themselves (random weights rarely sample <|end|>). It depends only on the last input token, so the cached and
    the no-cache path see the same change."""
    def hook(module, args, output):
        logits, loss = output
        if int(args[0][0, -1]) in trigger_ids:
            logits = logits.clone()
            logits[0, -1, TOK.end] = 1e4
        return logits, loss
    return hook


def reference_reply(model, kind, messages, user_text, max_new_tokens, block_size=CONFIG.block_size):
    """Greedy answer to user_text after messages, recomputing the whole context for every token (positions from 0).
    Returns (reply ids, step logits)."""
    ids, roles = render(messages + [{"role": "user", "content": user_text}], TOK)
    budget = min(max_new_tokens, block_size - len(ids) - 1)
    reply, steps = [], []
    with torch.no_grad():
        for _ in range(budget):
            logits = model(torch.tensor([ids]), make_mask(kind, torch.tensor(roles)))[0][0, -1]
            steps.append(logits)
            token = int(torch.argmax(logits.masked_fill(STRUCTURAL, float("-inf"))))
            if token == TOK.end:
                break
            reply.append(token)
            ids, roles = ids + [token], roles + [ASSISTANT]
    return reply, steps


def kv(cache):
    """A copy of every layer's keys and values: (n_layer, 2, batch, heads, capacity, head_dim)."""
    return torch.stack([torch.stack(pair) for pair in zip(cache.keys, cache.values)])


def transcript(session):
    """The session's messages with answers as text: [{"role", "content"}]."""
    return [dict(m, content=TOK.decode(m["content"])) if m["role"] == "assistant" else dict(m)
            for m in session.messages]


def assert_cache_is_exact(session):
    """The cache equals a fresh forward over the ids it claims to hold (positions from 0, the full mask)."""
    n = session.cached
    assert session.ids[:n] == render(session.messages, TOK)[0][:n]
    if n == 0:
        return
    fresh = KVCache(CONFIG)
    with torch.no_grad():
        session.model(torch.tensor([session.ids[:n]]), make_mask(session.kind, torch.tensor(session.roles[:n])),
                      kv_cache=fresh)
    torch.testing.assert_close(kv(session.cache)[..., :n, :], kv(fresh)[..., :n, :], atol=1e-4, rtol=1e-4)


def assert_well_formed(session):
    assert (session.ids, session.roles) == render(session.messages, TOK)
    assert len(session.ids) <= CONFIG.block_size
    assert session.ids[-1] == TOK.end and session.roles[-1] == ASSISTANT


def record_step_logits(model):
    """Last-position logits of every forward: the logits each sampled token was drawn from."""
    steps = []
    handle = model.register_forward_hook(lambda m, args, out: steps.append(out[0][0, -1].clone()))
    return steps, handle


# --------------------------------------------------------------------------------------------- session (library)

@pytest.mark.parametrize("ends", [False, True], ids=["cut", "ends"])
@pytest.mark.parametrize("kind", MASKS)
def test_cached_transcript_equals_no_cache_and_full_recompute(kind, ends):
    hook = MODEL.register_forward_hook(end_after({167, 197})) if ends else None
    try:
        results, logits = {}, {}
        for use_cache in (True, False):
            session = ChatSession(MODEL, TOK, kind, system=SYSTEM_TEXT, use_cache=use_cache)
            steps, handle = record_step_logits(MODEL)
            try:
                results[use_cache] = [session.turn(u, max_new_tokens=9) for u in USERS]
            finally:
                handle.remove()
            logits[use_cache] = torch.stack(steps)
            replies = [m["content"] for m in session.messages if m["role"] == "assistant"]
            # each answer is the greedy decode of the full context, given the history the session kept
            for k, user in enumerate(USERS):
                want, _ = reference_reply(MODEL, kind, session.messages[:1 + 2 * k], user, 9)
                assert replies[k] == want
        cached, reference = results[True], results[False]
        assert [r["reply"] for r in cached] == [r["reply"] for r in reference]
        assert [r["stopped"] for r in cached] == [r["stopped"] for r in reference]
        assert [r["generated_tokens"] for r in cached] == [r["generated_tokens"] for r in reference]
        torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)
        stops = {r["stopped"] for r in cached}
        assert stops == ({"end", "max_new_tokens"} if ends else {"max_new_tokens"}), stops
        assert len({r["reply"] for r in cached}) > 1  # the model is not degenerate
    finally:
        if hook is not None:
            hook.remove()


@pytest.mark.parametrize("kind", MASKS)
def test_prefilled_and_reused_tokens_per_turn(kind):
    hook = MODEL.register_forward_hook(end_after({167, 197}))
    try:
        session, last = ChatSession(MODEL, TOK, kind, system=SYSTEM_TEXT), None
        for user in USERS:
            before = [dict(m) for m in session.messages]
            history = len(render(before, TOK)[0])
            with_prompt = len(render(before + [{"role": "user", "content": user}], TOK)[0])
            result = session.turn(user, max_new_tokens=7)
            if kind == "prefix" or last is None:
                assert result["reused_tokens"] == 0
                assert result["prefill_tokens"] == with_prompt  # the whole history, every turn
            else:
                # never fed: the previous answer's <|end|>, and its last token when it was cut by max_new_tokens
                unfed = 1 if last["stopped"] == "end" else 2
                assert result["reused_tokens"] == history - unfed
                assert result["prefill_tokens"] == with_prompt - history + unfed
            assert result["dropped_turns"] == 0
            assert result["generated_tokens"] == len(session.messages[-1]["content"]) + (result["stopped"] == "end")
            assert result["context_tokens"] == len(session.ids)
            assert result["ttft_ms"] > 0 and (result["decode_tokens_per_s"] or 0) > 0 or result["generated_tokens"] < 2
            assert_well_formed(session)
            assert_cache_is_exact(session)
            last = result
    finally:
        hook.remove()


def test_prefix_cache_could_not_be_reused():
    # Why prefix re-prefills: the K/V an ISM-style reuse would keep differ from the recomputed ones.
    session = ChatSession(MODEL, TOK, "prefix")
    session.turn(USERS[0], 5)
    stale = kv(session.cache)[..., :session.cached, :].clone()
    session.turn(USERS[1], 5)
    assert (kv(session.cache)[..., :stale.shape[-2], :] - stale).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["ism", "prefix"])
def test_overflow_drops_oldest_turns_and_keeps_the_system_message(kind):
    session = ChatSession(MODEL, TOK, kind, system=SYSTEM_TEXT)
    users = [f"question number {i} with some padding" for i in range(6)]
    dropped_total = 0
    for user in users:
        before = [dict(m) for m in session.messages]
        result = session.turn(user, max_new_tokens=20)
        assert session.messages[0] == {"role": "system", "content": SYSTEM_TEXT}
        kept = session.messages[:-2]
        if result["dropped_turns"]:
            assert result["reused_tokens"] == 0
            assert result["prefill_tokens"] == len(render(kept + [session.messages[-2]], TOK)[0])
            # the oldest whole turns went, nothing else
            assert kept == before[:1] + before[1 + 2 * result["dropped_turns"]:]
            need = len(render([{"role": "user", "content": user}], TOK)[0]) - 1 + min(20, session.reply_reserve) + 1
            assert len(render(kept, TOK)[0]) + need <= CONFIG.block_size
        # the reply equals a fresh greedy decode on the kept history, positions from 0
        want, _ = reference_reply(MODEL, kind, kept, user, 20)
        assert session.messages[-1]["content"] == want
        assert_well_formed(session)
        assert_cache_is_exact(session)
        dropped_total += result["dropped_turns"]
    assert dropped_total >= 2


def test_answer_stops_at_block_size_and_next_turn_drops():
    session = ChatSession(MODEL, TOK, "ism")
    result = session.turn("go on forever", max_new_tokens=10_000)
    assert result["stopped"] == "block_size"
    assert len(session.ids) == CONFIG.block_size  # the reply filled the context, closing <|end|> included
    assert_well_formed(session)
    result = session.turn("and again", max_new_tokens=8)
    assert result["dropped_turns"] == 1 and result["reused_tokens"] == 0
    want, _ = reference_reply(MODEL, "ism", [], "and again", 8)
    assert session.messages[-1]["content"] == want


def test_message_too_long_is_refused_and_changes_nothing():
    session = ChatSession(MODEL, TOK, "ism", system=SYSTEM_TEXT)
    session.turn(USERS[0], 6)
    state = (list(session.ids), [dict(m) for m in session.messages], session.cached, session.turns)
    with pytest.raises(TurnError, match="does not fit"):
        session.turn("x" * 200, 6)
    assert (session.ids, session.messages, session.cached, session.turns) == state
    session.turn(USERS[1], 6)
    want, _ = reference_reply(MODEL, "ism", state[1], USERS[1], 6)
    assert session.messages[-1]["content"] == want
    assert_cache_is_exact(session)


def test_system_message_too_long_is_refused():
    with pytest.raises(UserError, match="system message"):
        ChatSession(MODEL, TOK, "ism", system="s" * 200)
    # one that leaves room for a message but not for the answer the session keeps room for: refused at once,
    # not on every message after
    reserve = CONFIG.block_size // 4
    # <|bos|> <|system|> text <|end|>, then a 4-token prompt, the reserve and the answer's <|end|>: one byte too many
    system = "s" * (CONFIG.block_size - 3 - 4 - reserve - 1 + 1)
    with pytest.raises(UserError, match=f"with a message and {reserve} tokens kept for the answer"):
        ChatSession(MODEL, TOK, "ism", system=system)
    session = ChatSession(MODEL, TOK, "ism", system=system[:-1])
    assert session.turn("x", max_new_tokens=reserve)["stopped"] in ("end", "max_new_tokens")


def test_reset_starts_a_new_conversation():
    session = ChatSession(MODEL, TOK, "ism", system=SYSTEM_TEXT)
    first = session.turn(USERS[0], 8)
    session.turn(USERS[1], 8)
    session.reset()
    assert session.messages == [{"role": "system", "content": SYSTEM_TEXT}] and session.cached == 0
    assert session.ids == render(session.messages, TOK)[0] and session.turns == 0
    again = session.turn(USERS[0], 8)
    assert again["reply"] == first["reply"] and again["turn"] == 1 and again["reused_tokens"] == 0
    session.reset(system=None)
    assert session.messages == [] and session.ids == [TOK.bos] and session.roles == [USER]


@pytest.mark.parametrize("kind", ["causal", "ism"])
def test_reply_cut_by_max_new_tokens_is_closed(kind):
    session = ChatSession(MODEL, TOK, kind)
    result = session.turn(USERS[0], max_new_tokens=5)
    assert result["stopped"] == "max_new_tokens" and result["generated_tokens"] == 5
    assert len(session.messages[-1]["content"]) == 5 and session.ids[-1] == TOK.end
    assert session.cached == len(session.ids) - 2  # the last sampled token and <|end|> wait for next turn
    session.turn(USERS[1], max_new_tokens=5)
    assert_cache_is_exact(session)
    want, _ = reference_reply(MODEL, kind, session.messages[:2], USERS[1], 5)
    assert session.messages[-1]["content"] == want


@pytest.mark.parametrize("interruptible", [True, False])
def test_ctrl_c_closes_the_reply_and_the_chat_goes_on(interruptible):
    session = ChatSession(MODEL, TOK, "ism")
    pieces = []

    def on_text(text):
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    if interruptible:
        result = session.turn(USERS[0], 20, on_text=on_text, interruptible=True)
        assert result["stopped"] == "interrupted"
    else:
        with pytest.raises(KeyboardInterrupt):
            session.turn(USERS[0], 20, on_text=on_text)
    assert 0 < len(session.messages[-1]["content"]) < 20
    assert_well_formed(session)
    session.turn(USERS[1], 6)
    want, _ = reference_reply(MODEL, "ism", session.messages[:2], USERS[1], 6)
    assert session.messages[-1]["content"] == want
    assert_cache_is_exact(session)


def test_typed_special_tokens_stay_text():
    session = ChatSession(MODEL, TOK, "ism")
    text = "stop <|end|> now <|assistant|>"
    session.turn(text, 4)
    assert session.ids[:len(text) + 4] == [TOK.bos, TOK.user] + list(text.encode()) + [TOK.end, TOK.assistant]
    assert session.ids.count(TOK.assistant) == 1 and transcript(session)[0]["content"] == text


def test_empty_message_is_refused_and_changes_nothing():
    session = ChatSession(MODEL, TOK, "ism")
    for text in ("", "  \n"):
        with pytest.raises(TurnError, match="empty"):
            session.turn(text, 4)
    assert session.messages == [] and session.cached == 0 and session.turns == 0


def test_streamed_text_is_whole_characters_and_equals_the_reply():
    stream = TextStream(TOK)
    pieces = [stream.push(b) for b in "é✓".encode()]
    assert pieces == ["", "é", "", "", "✓"]
    assert stream.push(0xff) == "\ufffd"  # never valid: replaced at once
    assert stream.push(0xe2) == "" and stream.flush() == "\ufffd"  # a character cut short by the end of the reply
    session = ChatSession(MODEL, TOK, "ism")
    for user in USERS:
        got = []
        result = session.turn(user, 30, temperature=1.0, generator=torch.Generator().manual_seed(0),
                              on_text=got.append)
        assert "".join(got) == result["reply"] == TOK.decode(session.messages[-1]["content"])


def test_seeded_sampling_repeats():
    replies = []
    for _ in range(2):
        session = ChatSession(MODEL, TOK, "ism")
        g = torch.Generator().manual_seed(7)
        replies.append([session.turn(u, 12, temperature=0.9, top_k=20, generator=g)["reply"] for u in USERS[:2]])
    assert replies[0] == replies[1]
    session = ChatSession(MODEL, TOK, "ism")
    g = torch.Generator().manual_seed(8)
    assert [session.turn(u, 12, temperature=0.9, top_k=20, generator=g)["reply"] for u in USERS[:2]] != replies[0]


# ---------------------------------------------------------------------------------------------- the static step

@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("width", ["filled", "capacity"])
def test_static_decode_step_equals_the_eager_step(kind, width):
    """The static step (K/V written at a position tensor; attention over the filled slots as on a CPU, or over the
    whole capacity with the rest masked out as on CUDA) against the eager one: the same greedy transcript and the
    same logits at every step, over turns that reuse the cache."""
    steps, transcripts = {}, {}
    for decode in ("eager", "static"):
        session = ChatSession(MODEL, TOK, kind, system=SYSTEM_TEXT, decode=decode)
        logits, handle = [], None
        if decode == "static":  # record the static step's logits where it returns them
            step = session.static.step
            session.static.step = lambda *args: logits.append(step(*args)) or logits[-1]
            if width == "capacity":  # what it does on CUDA, where unfilled slots are zeros (they are read)
                session.static.whole_capacity = True
                for buffer in (*session.cache.keys, *session.cache.values):
                    buffer.zero_()
        else:
            handle = MODEL.register_forward_hook(lambda m, args, out: logits.append(out[0][0, -1].clone())
                                                 if args[0].shape[1] == 1 else None)
        transcripts[decode] = [session.turn(u, max_new_tokens=9)["reply"] for u in USERS]
        if handle is not None:
            handle.remove()
        steps[decode] = torch.stack(logits)
        assert_cache_is_exact(session)
    assert transcripts["static"] == transcripts["eager"]
    torch.testing.assert_close(steps["static"], steps["eager"], atol=1e-4, rtol=1e-4)


def test_unfilled_cache_slots_are_never_read_on_a_cpu():
    """The cache is allocated empty (its memory taken only as it fills): filled with NaN, it must give the
    transcript of a cache filled with zeros, eager and static step alike."""
    replies = {}
    for fill in (0.0, float("nan")):
        for decode in ("eager", "static"):
            session = ChatSession(MODEL, TOK, "ism", decode=decode)
            for buffer in (*session.cache.keys, *session.cache.values):
                buffer.fill_(fill)
            replies[fill, decode] = [session.turn(u, max_new_tokens=9)["reply"] for u in USERS[:2]]
    assert len(set(map(tuple, replies.values()))) == 1


def test_static_step_captures_as_one_graph():
    """torch.compile(fullgraph=True) traces the whole step (no graph break, nothing read from Python values that
    change per step; the count of filled slots a dynamic shape) and gives the eager transcript. The aot_eager
    backend checks the capture without Inductor's code generation (~25 s on a CPU); the CUDA-graph version runs in
    test_gpu.py."""
    eager = ChatSession(MODEL, TOK, "ism")
    want = [eager.turn(u, max_new_tokens=9)["reply"] for u in USERS[:2]]
    session = ChatSession(MODEL, TOK, "ism", decode="static")
    session.static.step = torch.compile(session.static._step, backend="aot_eager", dynamic=True, fullgraph=True)
    assert [session.turn(u, max_new_tokens=9)["reply"] for u in USERS[:2]] == want
    assert_cache_is_exact(session)


def test_an_answer_tokens_row_is_everything_before_it_under_every_mask():
    """What the static step assumes instead of building the row from roles."""
    roles = torch.tensor([SYSTEM] * 3 + [USER] * 4 + [ASSISTANT] * 3 + [USER] * 2 + [ASSISTANT] * 5)
    for kind in MASKS:
        mask = make_mask(kind, roles)
        for i in range(12, len(roles)):  # tokens of the answer being decoded
            assert mask[i].tolist() == [j <= i for j in range(len(roles))]


# -------------------------------------------------------------------------------------------------------- sampling

def test_answers_never_hold_structural_tokens_or_padding():
    torch.manual_seed(0)
    padded = GPTConfig(block_size=64, vocab_size=TOK.vocab_size + 11, n_layer=1, n_head=2, n_embd=16)
    model = GPT(padded).eval()
    forbidden = [TOK.bos, TOK.system, TOK.user, TOK.assistant] + list(range(TOK.vocab_size, padded.vocab_size))

    def favour_forbidden(module, args, output):  # what a barely trained model might prefer
        logits, loss = output
        logits = logits.clone()
        logits[..., forbidden] += 50.0
        return logits, loss

    handle = model.register_forward_hook(favour_forbidden)
    try:
        session = ChatSession(model, TOK, "ism")
        for temperature in (0.0, 1.0):
            session.turn("hi", max_new_tokens=20, temperature=temperature, generator=torch.Generator().manual_seed(1))
            assert not set(session.messages[-1]["content"]) & set(forbidden)
    finally:
        handle.remove()


def test_sampling_rules_against_a_direct_count():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, 5.0])
    never = torch.tensor([False] * 5 + [True])
    assert sample_token(logits, Sampling(), never) == 0  # greedy, the banned best left out
    draws = lambda s: {sample_token(logits, s, never) for _ in range(300)}  # noqa: E731
    g = torch.Generator().manual_seed(0)
    assert draws(Sampling(temperature=1.0, top_k=2, generator=g)) == {0, 1}
    # probabilities of 0..4 at temperature 1: .64 .24 .09 .03 .01; the top 0.8 of the mass is tokens 0 and 1
    assert draws(Sampling(temperature=1.0, top_p=0.8, generator=g)) == {0, 1}
    assert draws(Sampling(temperature=1.0, top_p=0.5, generator=g)) == {0}
    assert draws(Sampling(temperature=1e-40, generator=g)) == {0}  # a tiny temperature is greedy, not an error
    assert len(draws(Sampling(temperature=1.0, generator=g))) == 5


def test_min_new_tokens_holds_back_the_end():
    hook = MODEL.register_forward_hook(end_after(set(range(TOK.vocab_size))))  # <|end|> would always win
    try:
        session = ChatSession(MODEL, TOK, "ism")
        assert session.turn("hi", max_new_tokens=9)["generated_tokens"] == 1
        result = session.turn("hi", max_new_tokens=9, min_new_tokens=5)
        assert result["generated_tokens"] == 6 and result["stopped"] == "end"
    finally:
        hook.remove()


# ---------------------------------------------------------------------------------------- cross-request reuse

def reuse_model():
    """Weights large enough that every change of context shows in the K/V, small enough that attention does not
    saturate (a one-hot softmax hides changes)."""
    torch.manual_seed(1)
    model = GPT(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def kv_of(model, kind, ids, roles):
    """Every layer's K/V of every token of a conversation, from one fresh forward: (n_layer, 2, heads, T, dim)."""
    cache = KVCache(model.config)
    with torch.no_grad():
        model(torch.tensor([ids]), make_mask(kind, torch.tensor(roles)), kv_cache=cache)
    return kv(cache)[:, :, 0, :, :len(ids)]


def exact_rows(model, kind, a, b):
    """How many leading tokens have the same K/V in conversation a as in conversation b, by computing both."""
    kv_a, kv_b = kv_of(model, kind, *a), kv_of(model, kind, *b)
    n = 0
    while n < min(len(a[0]), len(b[0])) and torch.allclose(kv_a[..., n, :], kv_b[..., n, :], atol=1e-6, rtol=0):
        n += 1
    return n


def conversation(*messages):
    return render([{"role": role, "content": text} for role, text in messages], TOK)


VARIANTS = {  # a cached conversation, and requests that continue or change it
    "cached": conversation(("system", "be brief"), ("user", "my pin is 4821"), ("assistant", "ok"),
                           ("user", "what is my pin?"), ("assistant", "4821")),
    "next turn": conversation(("system", "be brief"), ("user", "my pin is 4821"), ("assistant", "ok"),
                              ("user", "what is my pin?"), ("assistant", "4821"), ("user", "thanks")),
    "other answer": conversation(("system", "be brief"), ("user", "my pin is 4821"), ("assistant", "ok"),
                                 ("user", "what is my pin?"), ("assistant", "4822")),
    "longer query": conversation(("system", "be brief"), ("user", "my pin is 4821"), ("assistant", "ok"),
                                 ("user", "what is my pin? and my name?")),
    "other query": conversation(("system", "be brief"), ("user", "my pin is 4822"), ("assistant", "ok")),
    "other system": conversation(("system", "be kind"), ("user", "my pin is 4821")),
}


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "cached"])
@pytest.mark.parametrize("kind", MASKS)
def test_reusable_prefix_keeps_exactly_the_rows_that_stay_exact(kind, variant):
    cached, new = VARIANTS["cached"], VARIANTS[variant]
    keep = reusable_prefix(kind, *cached, *new)
    truth = exact_rows(reuse_model(), kind, cached, new)
    assert keep <= truth  # never a stale row
    if kind != "prefix":
        assert keep == truth  # and nothing exact is thrown away
    if kind == "ism" and variant == "longer query":  # the common prefix ends inside a query that goes on
        common = next(i for i, (x, y) in enumerate(zip(cached[0], new[0])) if x != y)
        assert keep < common


@pytest.mark.parametrize("kind", MASKS)
def test_set_history_continues_a_cached_session_exactly(kind):
    session = ChatSession(MODEL, TOK, kind, system=SYSTEM_TEXT)
    for user in USERS[:2]:
        session.turn(user, max_new_tokens=6)
    history = transcript(session) + [{"role": "user", "content": USERS[2]}, {"role": "assistant", "content": "ok"}]
    kept = session.set_history(history)
    assert (kept > 0) == (kind != "prefix")
    assert transcript(session) == history  # answers kept as token ids, given back as text
    assert_cache_is_exact(session)
    result = session.turn(USERS[3], max_new_tokens=6)
    assert result["reused_tokens"] == (kept if kind != "prefix" else 0)
    fresh = ChatSession(MODEL, TOK, kind, system=SYSTEM_TEXT, use_cache=False)
    fresh.set_history(history)
    assert fresh.turn(USERS[3], max_new_tokens=6)["reply"] == result["reply"]
    assert_well_formed(session)


@pytest.mark.parametrize("temperature, top_p", [(1e-300, None), (1e-46, None), (1e39, None), (1e300, 1e-300),
                                                (0.8, 1e-300)])
def test_extreme_but_finite_sampling_settings_give_a_token(temperature, top_p):
    # float32 would underflow to nan here (the logit shift divided by 1e-46) or keep no candidate (top_p 1e-300)
    logits = torch.tensor([1.0, 3.0, 2.0, -5.0])
    never = torch.tensor([False, False, False, True])
    token = sample_token(logits, Sampling(temperature, top_p=top_p, generator=torch.Generator().manual_seed(0)),
                         never)
    assert token in (0, 1, 2)
    if temperature < 1:  # a vanishing temperature, or a vanishing nucleus at a usual one, keeps the best token only
        assert token == 1


def test_non_finite_logits_are_one_line_naming_the_model():
    never = torch.zeros(3, dtype=torch.bool)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ModelError, match="logits are not finite.*retrain it or restore its checkpoint"):
            sample_token(torch.tensor([0.0, bad, 1.0]), Sampling(0.7), never)
    assert sample_token(torch.tensor([0.0, float("-inf"), 1.0]), Sampling(0.0), never) == 2  # -inf is a mask


def test_the_engine_self_check_reports_exact_reuse(capsys):
    import engine
    engine.self_check()
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["causal"] * 3 + ["prefix"] * 3 + ["ism"] * 3
    assert all(float(r[4]) < 1e-4 for r in rows)
    assert all(int(r[3]) > 0 for r in rows if r[0] != "prefix" and r[1] != "1")  # later turns reuse the cache
    assert all(int(r[3]) == 0 for r in rows if r[0] == "prefix")


def test_logits_that_leave_nothing_to_sample_are_a_model_error():
    never = torch.tensor([True, False, False])
    with pytest.raises(ModelError):
        sample_token(torch.tensor([0.0, float("-inf"), float("-inf")]), Sampling(0.0), never)
