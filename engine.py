"""The chat engine: one conversation with a model and its KV cache, a turn at a time. sample.py,
serve.py, eval.py and bench.py all drive it. A turn (ChatSession.generate) has four phases:

1. make room  drop the oldest whole turns (not the system message) if history + prompt + room for
              an answer would pass block_size; what is kept is re-prefilled from position 0.
2. prefill    feed the tokens the cache lacks, each under its row of the whole conversation's
              mask. Under causal and ISM appending never changes an earlier row, so a turn feeds
              only the last answer's closing token and the new prompt. Under prefix the prompt
              joins one bidirectional block with the history: every row is stale, re-prefill.
3. decode     sample a token, feed it alone on the cache, until the closing token or the budget.
              An answer token's row is everything up to itself under all three masks.
4. close      whatever stopped it (end, budget, Ctrl-C), the history gets the answer and its
              closing token, so the conversation stays well-formed.

Every change to a session's state is one of its methods; the cache grows in ChatSession._feed.
`python engine.py` checks cached logits against a recompute without the cache.
"""
import codecs
import copy
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from cli.errors import ModelError, TurnError, UserError
from data.chat import render, render_user, system_of
from mask import ASSISTANT, MASKS, check_kind, make_mask
from model import GPT, GPTConfig, KVCache

_KEEP = object()  # reset(): keep the current system message
DECODE_MODES = ("eager", "static", "compiled")


# -------------------------------------------------------------------------------------- sampling

@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = None  # 0 or None: every token
    top_p: float = None  # None or 1: every token
    generator: torch.Generator = None  # on the CPU, where sampling runs: seeded, same on any device
    min_new_tokens: int = 0  # no closing token before this many (benchmarks' fixed-length answers)


def never_sampled(tok, vocab_size):
    """-> [V] bool: every special token but tok.end, and the padding rows past the vocabulary."""
    never = torch.zeros(vocab_size, dtype=torch.bool)
    never[[i for i in tok.special if i != tok.end]] = True
    never[tok.vocab_size:] = True
    return never


def sample_token(logits, sampling, never):
    """logits: [V] -> a token id where never [V] is False. In float64, with the best logit shifted
    to 0, any positive temperature or top_p gives -inf or finite values, never nan."""
    logits = logits.double().cpu().masked_fill(never, float("-inf"))
    if torch.isnan(logits).any() or torch.isposinf(logits).any() or torch.isneginf(logits).all():
        raise ModelError("the model's logits are not finite (nan or inf): its weights are damaged "
                         "or its training diverged; retrain it or restore its checkpoint")
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    logits = (logits - logits.max()) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # mass before reaches p
        probs[order[outside]] = 0.0
    return int(torch.multinomial(probs, 1, generator=sampling.generator))


class TextStream:
    """Token ids in, text out in whole UTF-8 characters (a byte token may be part of one; invalid
    bytes become U+FFFD): the pieces join to tok.decode(ids)."""

    def __init__(self, tok):
        self.tok, self.decoder = tok, codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token):
        return self.decoder.decode(self.tok.token_bytes(token))

    def flush(self):
        return self.decoder.decode(b"", final=True)


# ------------------------------------------------------------------------ the model-facing steps

def feed(model, ids, roles, kind, start, cache=None):
    """Feed ids[start:] on top of a cache holding ids[:start] (no cache: start 0) -> the last
    token's logits [V]. roles: [>= len(ids)]. The chunk's mask is its slice of the whole,
    make_mask(kind, roles[:end])[start:end]; its positions are start .. end - 1."""
    idx = torch.tensor([ids[start:]], device=roles.device)  # idx: [1, T]
    mask = make_mask(kind, roles[:len(ids)], start=start)  # mask: [T, len(ids)]
    return model(idx, mask, kv_cache=cache, last_only=True)[0][0, -1]


class StaticDecoder:
    """One answer token fed with no Python value changing per step: token and position live in
    preallocated tensors, so torch.compile compiles the step once. On CUDA attention spans the
    cache's whole capacity, later slots masked (fixed shapes: one CUDA graph, replayed). On a CPU it
    spans the filled slots, their count the one dynamic shape (reading all would cost more than it
    saves; a fully dynamic graph takes minutes to compile). decode="static" runs it eagerly."""

    def __init__(self, model, cache, decode="compiled"):
        if decode not in ("static", "compiled") or cache is None:
            raise ValueError(f"decode={decode!r}: choose one of {', '.join(DECODE_MODES)}; a "
                             "static step needs the cache")
        self.model, self.cache = model, cache
        device = cache.keys[0].device
        self.whole_capacity = device.type == "cuda"
        self.idx = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(cache.capacity, device=device)
        if self.whole_capacity:  # a masked slot is still read (times a zero weight): keep it finite
            for buffer in (*cache.keys, *cache.values):
                buffer.zero_()
        self.step = self._step
        if decode == "compiled":
            if device.type == "cuda":  # a graph replay reads and updates these in place
                for buffer in (*cache.keys, *cache.values, self.idx, self.position):
                    torch._dynamo.mark_static_address(buffer, guard=False)
            how = {"mode": "reduce-overhead"} if self.whole_capacity else \
                {"options": {"cpp_wrapper": True}}  # a CPU: no Python between the kernels
            self.step = torch.compile(self._step, fullgraph=True, dynamic=False, **how)

    def _step(self, idx, position, slots=None):
        """slots: those attended over, the filled ones (CPU); None: the whole capacity (CUDA)."""
        if slots is None:
            slots = torch.arange(self.cache.capacity, device=position.device)
        mask = (slots <= position).unsqueeze(0)  # [1, slots]: this token and every one before it
        return self.model(idx, mask, position, kv_cache=self.cache, last_only=True)[0][0, -1]

    def __call__(self, token, position):
        self.idx.fill_(token)  # in place: no new tensor to copy to the device
        self.position.fill_(position)
        filled = () if self.whole_capacity else (self.slots[:position + 1],)
        if filled:  # the one shape that changes: compiled once for any length
            torch._dynamo.maybe_mark_dynamic(filled[0], 0)
        return self.step(self.idx, self.position, *filled).clone()  # a replay reuses its output


def check_room(system_len, tok, reply_reserve, block_size):
    """UserError unless a system message of system_len tokens leaves room for a turn."""
    smallest_prompt = len(render_user("x", tok, after_answer=True)[0])
    if system_len + smallest_prompt + reply_reserve + 1 > block_size:
        raise UserError(f"the system message is {system_len} tokens; with a message and "
                        f"{reply_reserve} tokens kept for the answer it does not fit "
                        f"block_size {block_size}: shorten it")


def reusable_prefix(kind, cached_ids, cached_roles, ids, roles):
    """How many leading rows cached for cached_ids/roles (all fed) stay exact for ids/roles.
    - causal: the longest common prefix of (id, role) pairs.
    - ism: the same, but a query token's row depends on its whole segment: where the common prefix
      ends inside a query segment that goes on in either conversation, cut back to its start.
    - prefix: adding a query changes every row: 0.
    Exact because a session's cache never ends inside a query segment (a prompt is fed whole)."""
    if kind == "prefix":
        return 0
    common = 0
    for cached, new in zip(zip(cached_ids, cached_roles), zip(ids, roles)):
        if cached != new:
            break
        common += 1
    role = roles[common - 1] if common else ASSISTANT
    goes_on = any(len(r) > common and r[common] == role for r in (cached_roles, roles))
    if kind == "causal" or role == ASSISTANT or not goes_on:
        return common
    while common > 0 and roles[common - 1] == role:  # back to the query segment's start
        common -= 1
    return common


# ---------------------------------------------------------------------------------- chat session

@dataclass
class Turn:
    """One turn as the session answered it (session.last), as sample, serve, eval and bench report
    it. stopped: "end", "max_new_tokens", "block_size" or "interrupted"."""
    number: int
    user: str
    started: float
    dropped_turns: int = 0
    stopped: str = "max_new_tokens"
    prefill_tokens: int = 0  # fed before the first sampled token
    reused_tokens: int = 0  # K/V taken from the cache
    reply: list = field(default_factory=list)  # the answer's ids, without its closing token
    token_times: list = field(default_factory=list)  # at each sampled token, the closing one too
    context_tokens: int = 0

    @property
    def generated_tokens(self):
        return len(self.token_times)

    @property
    def ttft_ms(self):
        return round((self.token_times[0] - self.started) * 1e3, 3) if self.token_times else None

    @property
    def decode_tokens_per_s(self):  # over the tokens after the first
        seconds = self.token_times[-1] - self.token_times[0] if self.token_times else 0
        return round((len(self.token_times) - 1) / seconds, 1) if seconds > 0 else None

    def to_json(self, tok):
        facts = ("prefill_tokens", "reused_tokens", "generated_tokens", "ttft_ms",
                 "decode_tokens_per_s", "dropped_turns", "stopped", "context_tokens")
        return {"turn": self.number, "user": self.user, "reply": tok.decode(self.reply),
                **{name: getattr(self, name) for name in facts}}


class ChatSession:
    """One conversation; read its state, change it through its methods. messages: system first if
    any, answers as sampled ids; ids, roles = render(messages); the cache holds ids[:cached]'s K/V.
    use_cache=False: the reference path, recomputing the whole context per token. reply_reserve:
    answer tokens kept free when old turns are dropped (default block_size // 4)."""

    def __init__(self, model, tok, kind, system=None, use_cache=True, reply_reserve=None,
                 decode="eager"):
        check_kind(kind)
        param = next(model.parameters())  # where, and in what dtype, the model runs
        self.model, self.tok, self.kind, self.device = model, tok, kind, param.device
        self.block_size = model.config.block_size
        default_reserve = max(1, self.block_size // 4)
        self.reply_reserve = default_reserve if reply_reserve is None else reply_reserve
        self.never = never_sampled(tok, model.config.vocab_size)
        self.cache = KVCache(model.config, 1, self.device, param.dtype) if use_cache else None
        self.static = None if decode == "eager" else StaticDecoder(model, self.cache, decode)
        self.system, self.last, self.cached = None, None, 0
        self.reset(system)

    def reset(self, system=_KEEP):
        """A new conversation (system None or "": none); UserError if no turn would fit."""
        system = self.system if system is _KEEP else (system or None)
        messages = [{"role": "system", "content": system}] if system else []
        ids, roles = render(messages, self.tok)
        check_room(len(ids), self.tok, self.reply_reserve, self.block_size)
        self.system, self.messages, self.turns = system, messages, 0
        self.ids, self.roles = ids, roles
        self._forget(0)

    def turn(self, user_text, max_new_tokens=256, on_text=None, interruptible=False, **sampling):
        """generate() then consume() -> the turn's record as JSON; sampling keywords: Sampling's."""
        tokens = self.generate(user_text, max_new_tokens, Sampling(**sampling))
        return consume(self, tokens, on_text, interruptible)

    def generate(self, user_text, max_new_tokens=256, sampling=None):
        """-> an iterator of the sampled ids, the closing token last. TurnError at once, changing
        nothing, for an empty message or one that cannot fit. Phase 1 runs now; the answer is
        closed (phase 4) when the iterator ends, is closed or raises."""
        started = time.perf_counter()
        if not user_text.strip():
            raise TurnError("empty message")
        # the prompt as the history ends now is the longest it can be (ChatML's starts with "\n")
        prompt_ids, prompt_roles = self._prompt(user_text)
        dropped = self._make_room(len(prompt_ids), max_new_tokens)  # phase 1
        if dropped:
            prompt_ids, prompt_roles = self._prompt(user_text)
        budget = min(max_new_tokens, self.block_size - len(self.ids) - len(prompt_ids) - 1)
        self.last = Turn(self.turns + 1, user_text, started, dropped,
                         "max_new_tokens" if budget == max_new_tokens else "block_size")
        return self._answer(user_text, prompt_ids, prompt_roles, budget, sampling or Sampling())

    def set_history(self, messages):
        """Make validated messages (answers as text or ids) the conversation, as a stateless client
        sends it (serve.py), keeping the cached rows still exact for it. -> cached tokens kept."""
        messages = [dict(m, content=self.tok.encode(m["content"]))  # answers as token ids
                    if m["role"] == "assistant" and isinstance(m["content"], str) else dict(m)
                    for m in messages]
        ids, roles = render(messages, self.tok)
        if len(ids) > self.block_size:
            raise TurnError(f"the conversation is {len(ids)} tokens, more than block_size "
                            f"{self.block_size}")
        self._forget(self.reusable_rows(ids, roles))
        self.system, self.messages, self.ids, self.roles = system_of(messages), messages, ids, roles
        return self.cached

    def replace_answer(self, text):
        """Teacher forcing (eval.py --history=gold): text replaces the last answer's, uncached."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no answer to replace")
        self.messages[-1] = {"role": "assistant", "content": self.tok.encode(text)}
        answer_start = len(render(self.messages[:-1], self.tok)[0])
        self.ids, self.roles = render(self.messages, self.tok)
        self._forget(answer_start)

    def reusable_rows(self, ids, roles):
        """Cached rows that stay exact if the conversation became ids/roles (reusable_prefix)."""
        n = self.cached
        return reusable_prefix(self.kind, self.ids[:n], self.roles[:n], ids, roles)

    def _prompt(self, user_text):
        after_answer = bool(self.messages) and self.messages[-1]["role"] == "assistant"
        return render_user(user_text, self.tok, after_answer=after_answer)

    @torch.no_grad()
    def _answer(self, user_text, prompt_ids, prompt_roles, budget, sampling):
        turn = self.last
        self.messages.append({"role": "user", "content": user_text})
        self.ids, self.roles = self.ids + prompt_ids, self.roles + prompt_roles
        # the answer-to-be's roles are laid out now, so every token fed finds its row in one tensor
        roles = torch.tensor(self.roles + [ASSISTANT] * budget, device=self.device)
        hold_end = self.never.clone()
        hold_end[self.tok.end] = True  # while the answer is shorter than min_new_tokens
        try:  # from here on, the finally block closes the answer whatever happens
            if self.kind == "prefix":  # the prompt joins the history's block: every row is stale
                self._forget(0)
            turn.reused_tokens, turn.prefill_tokens = self.cached, len(self.ids) - self.cached
            logits = self._feed(self.ids, roles)  # phase 2
            for step in range(budget):  # phase 3
                never = hold_end if step < sampling.min_new_tokens else self.never
                token = sample_token(logits, sampling, never)
                turn.token_times.append(time.perf_counter())
                if token == self.tok.end:
                    turn.stopped = "end"
                    yield token
                    return
                turn.reply.append(token)
                yield token
                if step + 1 < budget:  # the last allowed token is never fed: nothing reads it
                    logits = self._feed(self.ids + turn.reply, roles)
        except (KeyboardInterrupt, GeneratorExit):
            if turn.stopped != "end":  # a consumer may stop at the closing token it was given
                turn.stopped = "interrupted"
            raise
        finally:
            self._close(turn)  # phase 4

    def _feed(self, ids, roles):
        """The logits after ids, feeding what the cache lacks (one answer token: the static step, if
        any); without a cache, the whole context. The one place the cache grows."""
        if self.cache is None:
            return feed(self.model, ids, roles, self.kind, 0)
        start = self.cached
        if self.static is not None and len(ids) - start == 1 and roles[start] == ASSISTANT:
            logits = self.static(ids[start], start)
        else:
            logits = feed(self.model, ids, roles, self.kind, start, self.cache)
        self.cached = len(ids)
        return logits

    def _forget(self, n):  # keep the cached rows of the first n tokens only
        self.cached = min(self.cached, n)

    def _close(self, turn):
        """Phase 4: the closed answer joins the history; the next turn feeds ids[cached:]."""
        self.messages.append({"role": "assistant", "content": turn.reply})
        self.ids, self.roles = render(self.messages, self.tok)
        self.turns += 1
        turn.context_tokens = len(self.ids)

    def _make_room(self, prompt_len, max_new_tokens):
        """Phase 1: drop the oldest turns until the prompt and answer fit -> how many."""
        need = prompt_len + min(max_new_tokens, self.reply_reserve) + 1  # + the closing token
        if len(self.ids) + need <= self.block_size:
            return 0
        drop, self.messages = kept_turns(self.messages, self.tok, self.block_size, prompt_len, need)
        self.ids, self.roles = render(self.messages, self.tok)
        self._forget(0)  # positions restart at 0: the kept history is re-prefilled
        return drop


def kept_turns(messages, tok, block_size, prompt_len, need):
    """-> (turns dropped, messages kept): the fewest oldest user+answer turns dropped, the system
    message kept, that leave `need` tokens free; TurnError if dropping all is not enough."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    for drop in range(1, (len(messages) - head) // 2 + 1):
        kept = messages[:head] + messages[head + 2 * drop:]
        if len(render(kept, tok)[0]) <= block_size - need:
            return drop, kept
    taken = "the system message and chat format" if head else "the chat format"
    raise TurnError(f"message of {prompt_len} tokens does not fit: block_size {block_size}, "
                    f"{len(render(messages[:head], tok)[0])} taken by {taken}, "
                    f"{need - prompt_len} kept for the answer; shorten it")


def consume(session, tokens, on_text=None, interruptible=False):
    """Read a generate() iterator to its end, streaming text to on_text(str) -> session.last as
    JSON. Ctrl-C closes the answer, then is re-raised, or with interruptible ends the turn."""
    stream = TextStream(session.tok)
    try:
        with closing(tokens):
            for token in tokens:
                text = stream.push(token) if token != session.tok.end else ""
                if text and on_text is not None:
                    on_text(text)
    except KeyboardInterrupt:
        if not interruptible:
            raise
    rest = stream.flush()
    if rest and on_text is not None:
        on_text(rest)
    return session.last.to_json(session.tok)


# ------------------------------------------------------------------------------ python engine.py

def self_check(turns=("what is 3 + 4 ?", "and times 2 ?", "sort 9 1 5"), seed=0):
    """A random model, three turns per mask: the tokens each turn prefills and reuses, and the
    largest difference between the cached logits and a recompute without the cache."""
    from data.tokenizer import get_tokenizer
    torch.manual_seed(seed)
    tok = get_tokenizer("byte")
    config = GPTConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64)
    model = GPT(config).eval()
    print("mask    turn  prefilled  reused  largest |cached - recomputed| logit")
    for kind in MASKS:
        s = ChatSession(model, tok, kind)
        for text in turns:
            record = s.turn(text, max_new_tokens=6)
            # what the cache lacks (the closing token), fed on a copy of it, against one forward
            # over the whole conversation: these logits depend on every cached row of every layer
            roles = torch.tensor(s.roles)
            with torch.no_grad():
                cached = feed(model, s.ids, roles, kind, s.cached, copy.deepcopy(s.cache))
                full = feed(model, s.ids, roles, kind, 0)
            print(f"{kind:7} {record['turn']:4} {record['prefill_tokens']:10} "
                  f"{record['reused_tokens']:7}  {(cached - full).abs().max().item():.2e}")


if __name__ == "__main__":
    import inspect
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(f"usage: python engine.py\n{inspect.cleandoc(self_check.__doc__)}")
        sys.exit(0)
    if sys.argv[1:]:
        print(f"error: python engine.py takes no arguments, not {sys.argv[1]!r} (--help says "
              "what it does)", file=sys.stderr)
        sys.exit(2)
    self_check()
