"""
The chat engine: one conversation with a model and its KV cache, a turn at a time. sample.py (command line),
serve.py (HTTP), eval.py and bench.py all drive it; none has its own copy of a turn.

A turn (ChatSession.generate) has four phases:
1. make room  if history + prompt + room for an answer would pass block_size, drop the oldest whole turns (the
              system message stays); what is kept is re-prefilled from position 0.
2. prefill    feed the tokens the cache lacks, each under its row of the whole conversation's mask, and keep the
              last token's logits. Under causal and ISM, appending tokens never changes the attention row of an
              earlier token (the mask is globally causal, and a query segment is closed before anything follows
              it), so the cache is reused across turns and a turn prefills only its new tokens: the previous
              answer's <|end|> (sampled, never fed; after a reply cut short, also its last token) and the new
              prompt. Under prefix the prompt joins one bidirectional block with the whole history, so every
              cached row is stale and the history is re-prefilled: that O(history) cost per turn is what ISM
              removes.
3. decode     sample a token, feed it alone on top of the cache, repeat until <|end|> or the token budget. An
              answer token's row is the same under all three masks, everything up to itself: it is in no query
              segment, and being in the last answer, in no prefix.
4. close      whatever stopped the answer (<|end|>, the budget, Ctrl-C, a closed connection), the history gets
              the answer and its <|end|>, so the conversation stays well-formed; the cache holds a prefix of it.

As in gpt-fast, the model-facing step is one small function (feed); a StaticDecoder feeds one answer token reading
no Python value that changes per step, so that torch.compile compiles it once (one CUDA graph on CUDA). The
engine is token-level: text enters as render()'s ids and roles and leaves through TextStream. Each turn's facts are
one Turn record (session.last). The session owns its state: every change to its conversation and its cache is
one of its methods (a turn, reset, set_history for a stateless client's conversation, replace_answer for teacher
forcing). `python engine.py` is a self-check: a random model, three turns per mask, the tokens each turn prefills
and reuses, and the largest logit difference against recomputing without the cache.
"""
import codecs
import copy
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from data.chat import render, render_user, system_of
from mask import ASSISTANT, MASKS, check_kind, make_mask
from model import KVCache
from cli.errors import ModelError, TurnError, UserError

_KEEP = object()  # reset(): keep the current system message
DECODE_MODES = ("eager", "static", "compiled")


# ------------------------------------------------------------------------------------------------------ sampling

@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 = greedy (argmax). top_k (0/None: all) and top_p (None or 1:
    all) restrict the candidates. generator: a CPU torch.Generator (None: torch's global RNG); sampling runs on
    the CPU, so a seed gives the same tokens on any device for the same logits. min_new_tokens: <|end|> cannot be
    chosen before this many answer tokens (benchmarks use it to get answers of a fixed length)."""
    temperature: float = 0.0
    top_k: int = None
    top_p: float = None
    generator: torch.Generator = None
    min_new_tokens: int = 0


def never_sampled(tok, vocab_size):
    """Ids an answer may never contain: every special token but the one that ends an answer (tok.end: <|end|>, or
    ChatML's <|im_end|>), and the embedding rows past the tokenizer's vocabulary (padding, no token of its own)."""
    never = torch.zeros(vocab_size, dtype=torch.bool)
    never[[i for i in tok.special if i != tok.end]] = True
    never[tok.vocab_size:] = True
    return never


def sample_token(logits, sampling, never):
    """logits (V,) -> token id, never one where `never` (V,) is True. In float64: with the best logit shifted to 0,
    any positive temperature, 1e-300 or 1e300, gives -inf or finite values, never nan, and so does any top_p."""
    logits = logits.double().cpu().masked_fill(never, float("-inf"))
    if torch.isnan(logits).any() or torch.isposinf(logits).any() or torch.isneginf(logits).all():
        raise ModelError("the model's logits are not finite (nan or inf): its weights are damaged or its training "
                         "diverged; retrain it or restore its checkpoint")
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    logits = (logits - logits.max()) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # mass before it already reaches p
        probs[order[outside]] = 0.0
    return int(torch.multinomial(probs, 1, generator=sampling.generator))


class TextStream:
    """Token ids in, printable text out. A byte token may be part of a UTF-8 character: its bytes wait until the
    character is complete, so a stream never shows a broken character (invalid bytes become U+FFFD, as in
    tok.decode). The concatenated pieces equal tok.decode(ids)."""

    def __init__(self, tok):
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token):
        return self.decoder.decode(self.tok.token_bytes(token))

    def flush(self):
        return self.decoder.decode(b"", final=True)


# --------------------------------------------------------------------------------------- the model-facing steps

def feed(model, ids, roles, kind, start, cache=None):
    """Feed the conversation's tokens ids[start:] on top of a cache holding its first `start` tokens (no cache:
    start is 0) and return the last token's logits. roles covers at least ids; the chunk's mask rows are its slice
    of the whole conversation's mask, make_mask(kind, roles[:end])[start:end]: one rule for every chunk, a
    prompt of many tokens or one answer token alike. The chunk's positions are start .. end - 1 (GPT.forward's
    default for these mask rows): they place RoPE and the cache slots its keys and values go to."""
    end = len(ids)
    idx = torch.tensor([ids[start:]], device=roles.device)
    logits, _ = model(idx, make_mask(kind, roles[:end], start=start), kv_cache=cache, last_only=True)
    return logits[0, -1]


def static_decoder(decode, model, cache):
    """The StaticDecoder a session's decode mode asks for: None for "eager"; ValueError for an unknown mode, or a
    static step without a cache."""
    if decode not in DECODE_MODES or (decode != "eager" and cache is None):
        raise ValueError(f"decode={decode!r}: choose one of {', '.join(DECODE_MODES)}; a static step needs the cache")
    return StaticDecoder(model, cache, decode == "compiled") if decode != "eager" else None


class StaticDecoder:
    """One answer token fed with nothing read from Python values that change from step to step: the token and its
    position live in two preallocated tensors, and its K/V are written at that position of the preallocated cache.
    On CUDA attention runs over the cache's whole capacity, every slot after the position masked out (an answer
    token's row, the same under every mask), so that the shapes are fixed and torch.compile(mode="reduce-overhead")
    captures the step as one CUDA graph and replays it: no per-kernel launch cost, which bounds the decode of a small
    model on a GPU. On a CPU there is no graph to capture and reading the whole capacity would cost more than it
    saves (SmolLM2's 8,192 slots are 377 MB of keys and values a token), so the step attends over the filled slots
    only, their count a dynamic shape: compiled once, Inductor fuses the small operations between the matmuls.
    compile=False runs the same step eagerly (the tests check it equals feed)."""

    def __init__(self, model, cache, compile=True):
        self.model, self.cache = model, cache
        device = cache.keys[0].device
        self.whole_capacity = device.type == "cuda"
        self.idx = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(cache.capacity, device=device)
        if self.whole_capacity:  # a masked slot is still read, its value times a zero weight: it must be finite
            for buffer in (*cache.keys, *cache.values):
                buffer.zero_()
        self.step = self._step
        if compile:
            if device.type == "cuda":  # buffers a graph replay reads or updates in place: fixed addresses
                for buffer in (*cache.keys, *cache.values, self.idx, self.position):
                    torch._dynamo.mark_static_address(buffer, guard=False)
            self.step = torch.compile(self._step, mode="reduce-overhead" if self.whole_capacity else None,
                                      dynamic=not self.whole_capacity, fullgraph=True)

    def _step(self, idx, position, slots=None):
        """slots: the cache slots attended over, the filled ones (CPU); None: the whole capacity (CUDA)."""
        if slots is None:
            slots = torch.arange(self.cache.capacity, device=position.device)
        mask = (slots <= position).unsqueeze(0)  # (1, slots): this token and every one before it
        return self.model(idx, mask, position, kv_cache=self.cache, last_only=True)[0][0, -1]

    def __call__(self, token, position):
        self.idx.fill_(token)  # in place: no new tensor, no host-to-device copy of a new one
        self.position.fill_(position)
        filled = () if self.whole_capacity else (self.slots[:position + 1],)
        return self.step(self.idx, self.position, *filled).clone()  # a graph replay reuses its output buffer


def reusable_prefix(kind, cached_ids, cached_roles, ids, roles):
    """How many leading cache rows, computed for the conversation cached_ids/cached_roles (all of them fed), are
    still exact for the conversation ids/roles: the tokens whose K/V a session may keep when it moves on to it.
    - causal: a row depends on the tokens up to it, so: the longest common prefix of (id, role) pairs.
    - ism: the same, except that a query token's row depends on its whole query segment, after it too. Where the
      common prefix ends inside a query segment that goes on, differently, in either conversation, every row
      of that segment is stale: cut back to the segment's start.
    - prefix: the prefix is one bidirectional block up to the current answer, so a request that adds a query
      changes every row: nothing is kept.
    The ISM rule reads the cached conversation up to its last fed token; it is exact because a session's cache
    never ends inside a query segment: a prompt is always fed whole, and every cut (a drop, a reset, a replaced
    answer, this rule) lands on a segment boundary or inside an answer."""
    if kind == "prefix":
        return 0
    common = 0
    for cached_id, cached_role, new_id, new_role in zip(cached_ids, cached_roles, ids, roles):
        if (cached_id, cached_role) != (new_id, new_role):
            break
        common += 1
    if kind == "causal" or common == 0 or roles[common - 1] == ASSISTANT:
        return common
    role = roles[common - 1]
    segment_goes_on = any(len(r) > common and r[common] == role for r in (cached_roles, roles))
    if not segment_goes_on:
        return common
    start = common - 1
    while start > 0 and roles[start - 1] == role:
        start -= 1
    return start


# ------------------------------------------------------------------------------------------------- chat session

@dataclass
class Turn:
    """One turn as the session answered it, measured where it happened: sample.py's stats line, serve.py's usage
    and page, eval and bench all read this record (session.last), none measures again.
      prefill_tokens  tokens fed at once before the first sampled token (no cache: the whole context);
      reused_tokens   tokens whose K/V came from the cache (0 under prefix, after a drop, and with no cache);
      stopped         "end" (the model closed its answer), "max_new_tokens", "block_size" (context full) or
                      "interrupted" (Ctrl-C, a consumer that stopped reading);
      token_times     time.perf_counter() at each sampled token, the closing one included."""
    number: int
    user: str
    started: float
    dropped_turns: int = 0
    stopped: str = "max_new_tokens"
    prefill_tokens: int = 0
    reused_tokens: int = 0
    reply: list = field(default_factory=list)  # the answer's token ids, without its closing token
    token_times: list = field(default_factory=list)
    context_tokens: int = 0

    @property
    def generated_tokens(self):
        return len(self.token_times)

    @property
    def ttft_ms(self):
        return round((self.token_times[0] - self.started) * 1e3, 3) if self.token_times else None

    @property
    def decode_tokens_per_s(self):
        """Over the tokens after the first; None when fewer than two."""
        seconds = self.token_times[-1] - self.token_times[0] if self.token_times else 0
        return round((len(self.token_times) - 1) / seconds, 1) if seconds > 0 else None

    def to_json(self, tok):
        return {"turn": self.number, "user": self.user, "reply": tok.decode(self.reply),
                "prefill_tokens": self.prefill_tokens, "reused_tokens": self.reused_tokens,
                "generated_tokens": self.generated_tokens, "ttft_ms": self.ttft_ms,
                "decode_tokens_per_s": self.decode_tokens_per_s, "dropped_turns": self.dropped_turns,
                "stopped": self.stopped, "context_tokens": self.context_tokens}


class ChatSession:
    """One conversation with a model. Read its state, don't write it: every change is one of its methods. messages
    (system first if any; an answer's content is its sampled ids: decoded text need not re-encode to them), ids and
    roles (render(messages), each answer closed, <= block_size), cache and cached (it holds the K/V of ids[:cached];
    the rest is fed next turn), turns (since the last reset), last (the Turn). use_cache=False: the reference path,
    every token recomputes the whole context. decode: "eager", "static" or "compiled" (StaticDecoder, compiled).
    reply_reserve: tokens kept free for the answer when old turns may be dropped (default block_size // 4)."""

    def __init__(self, model, tok, kind, system=None, use_cache=True, reply_reserve=None, decode="eager"):
        check_kind(kind)
        param = next(model.parameters())  # where, and in what dtype, the model runs
        self.model, self.tok, self.kind, self.device = model, tok, kind, param.device
        self.block_size = model.config.block_size
        self.reply_reserve = max(1, self.block_size // 4) if reply_reserve is None else reply_reserve
        self.never = never_sampled(tok, model.config.vocab_size)
        self.cache = KVCache(model.config, 1, self.device, param.dtype) if use_cache else None
        self.static = static_decoder(decode, model, self.cache)
        self.system, self.last, self.cached = None, None, 0
        self.reset(system)

    def reset(self, system=_KEEP):
        """A new conversation, with a new system message if one is given (None or "": none); UserError, changing
        nothing, if it leaves no room for a turn."""
        system = self.system if system is _KEEP else (system or None)
        messages = [{"role": "system", "content": system}] if system else []
        ids, roles = render(messages, self.tok)
        check_room_for_a_turn(len(ids), self.tok, self.reply_reserve, self.block_size)
        self.system, self.messages, self.ids, self.roles, self.turns = system, messages, ids, roles, 0
        self._forget(0)

    def turn(self, user_text, max_new_tokens=256, on_text=None, interruptible=False, **sampling):
        """generate() then consume(): one turn, -> its record as JSON. Sampling keywords as in Sampling."""
        return consume(self, self.generate(user_text, max_new_tokens, Sampling(**sampling)), on_text, interruptible)

    def generate(self, user_text, max_new_tokens=256, sampling=None):
        """Answer one user message: -> an iterator of the sampled token ids, a sampled closing token last. TurnError
        at once, changing nothing, for an empty message or one that cannot fit. Phase 1 runs now (`last` says how
        many turns were dropped); the answer is closed (phase 4) when the iterator ends, is closed or raises."""
        started = time.perf_counter()
        if not user_text.strip():
            raise TurnError("empty message")
        # ChatML's prompt after an answer starts with a newline, so the prompt as the history now ends is as long as
        # it can be: dropping turns may leave a history that ends without an answer, never one that gains one.
        prompt_ids, prompt_roles = self._prompt(user_text)
        dropped = self._make_room(len(prompt_ids), max_new_tokens)  # phase 1
        if dropped:  # the history it follows changed: render it again
            prompt_ids, prompt_roles = self._prompt(user_text)
        budget = min(max_new_tokens, self.block_size - len(self.ids) - len(prompt_ids) - 1)  # room for the close
        self.last = Turn(self.turns + 1, user_text, started, dropped,
                         "max_new_tokens" if budget == max_new_tokens else "block_size")
        return self._answer(user_text, prompt_ids, prompt_roles, budget, sampling or Sampling())

    def set_history(self, messages):
        """Make `messages` (validated; answers as text or token ids) the conversation so far, as a stateless client
        sends it (serve.py), keeping the cached rows still exact for it (an answer's text may not re-encode to the
        sampled ids: then less is kept, never a wrong row). -> the number of cached tokens kept."""
        messages = with_answer_ids(messages, self.tok)
        ids, roles = render(messages, self.tok)
        if len(ids) > self.block_size:
            raise TurnError(f"the conversation is {len(ids)} tokens, more than block_size {self.block_size}")
        kept = self.reusable_rows(ids, roles)
        self._forget(kept)
        self.system, self.messages, self.ids, self.roles = system_of(messages), messages, ids, roles
        return kept

    def replace_answer(self, text):
        """Teacher forcing (eval.py --history=gold): `text` in place of the last answer, whose cached rows are
        forgotten; the next turn feeds the new answer with its prompt."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no answer to replace")
        self.messages[-1] = {"role": "assistant", "content": self.tok.encode(text)}
        answer_start = len(render(self.messages[:-1], self.tok)[0])
        self.ids, self.roles = render(self.messages, self.tok)
        self._forget(answer_start)

    def reusable_rows(self, ids, roles):
        """How many cached rows stay exact if the conversation became ids/roles (reusable_prefix)."""
        return reusable_prefix(self.kind, self.ids[:self.cached], self.roles[:self.cached], ids, roles)

    # ------------------------------------------------------------------------------------------- inside a turn

    def _prompt(self, user_text):
        after_answer = bool(self.messages) and self.messages[-1]["role"] == "assistant"
        return render_user(user_text, self.tok, after_answer=after_answer)

    @torch.no_grad()
    def _answer(self, user_text, prompt_ids, prompt_roles, budget, sampling):
        turn = self.last
        self.messages.append({"role": "user", "content": user_text})
        self.ids, self.roles = self.ids + prompt_ids, self.roles + prompt_roles
        # The roles of the answer-to-be are laid out now, `budget` ASSISTANT tokens after the prompt, so that every
        # token this turn feeds finds its mask row in one roles tensor: make_mask(kind, roles[:end], start=end-1).
        roles = torch.tensor(self.roles + [ASSISTANT] * budget, device=self.device)
        hold_end = self.never.clone()
        hold_end[self.tok.end] = True  # while the answer is shorter than sampling.min_new_tokens
        try:  # from here on, the finally block closes the answer whatever happens
            if self.kind == "prefix":  # the prompt joins the history's bidirectional block: every cached row is stale
                self._forget(0)
            turn.reused_tokens, turn.prefill_tokens = self.cached, len(self.ids) - self.cached
            logits = self._feed(self.ids, roles)  # phase 2
            for step in range(budget):  # phase 3
                token = sample_token(logits, sampling, hold_end if step < sampling.min_new_tokens else self.never)
                turn.token_times.append(time.perf_counter())
                if token == self.tok.end:
                    turn.stopped = "end"
                    yield token
                    return
                turn.reply.append(token)
                yield token
                if step + 1 < budget:  # the last allowed token is never fed: nothing would read its logits
                    logits = self._feed(self.ids + turn.reply, roles)
        except (KeyboardInterrupt, GeneratorExit):
            if turn.stopped != "end":  # a consumer may stop reading at the closing token it was given
                turn.stopped = "interrupted"
            raise
        finally:
            self._close(turn)  # phase 4

    def _feed(self, ids, roles):
        """The logits after ids: what the cache lacks of them is fed on top of it (one answer token by the static
        step, if any); without a cache the whole context is recomputed. The one place the cache grows."""
        if self.cache is None:
            return feed(self.model, ids, roles, self.kind, 0)
        start = self.cached
        if self.static is not None and len(ids) - start == 1 and roles[start] == ASSISTANT:
            logits = self.static(ids[start], start)
        else:
            logits = feed(self.model, ids, roles, self.kind, start, self.cache)
        self.cached = len(ids)
        return logits

    def _forget(self, n):  # keep the cached rows of the first n tokens only; the rest will be fed again
        self.cached = min(self.cached, n)

    def _close(self, turn):
        """Phase 4: the answer, closed by its closing token, joins the history; the next turn feeds ids[cached:]."""
        self.messages.append({"role": "assistant", "content": turn.reply})
        self.ids, self.roles = render(self.messages, self.tok)
        self.turns += 1
        turn.context_tokens = len(self.ids)

    def _make_room(self, prompt_len, max_new_tokens):
        """Phase 1: drop the oldest whole turns until history, prompt and room for an answer fit (-> how many)."""
        need = prompt_len + min(max_new_tokens, self.reply_reserve) + 1  # + the answer's closing token
        if len(self.ids) + need <= self.block_size:
            return 0
        dropped, self.messages = oldest_turns_dropped(self.messages, self.tok, self.block_size, need, prompt_len)
        self.ids, self.roles = render(self.messages, self.tok)
        self._forget(0)  # positions restart at 0: the kept history is re-prefilled
        return dropped


# ------------------------------------------------------------------------------------------ around a session

def check_room_for_a_turn(history_len, tok, reply_reserve, block_size):
    """UserError when a history of history_len tokens (a system message) leaves no room for the shortest message
    and reply_reserve answer tokens, as ChatSession._make_room will need."""
    smallest_prompt = len(render_user("x", tok, after_answer=True)[0])
    if history_len + smallest_prompt + reply_reserve + 1 > block_size:
        raise UserError(f"the system message is {history_len} tokens; with a message and {reply_reserve} tokens kept "
                        f"for the answer it does not fit block_size {block_size}: shorten it")


def with_answer_ids(messages, tok):
    """Copies of messages with every answer's content as token ids (an answer given as text is encoded)."""
    return [dict(m, content=tok.encode(m["content"])) if m["role"] == "assistant" and isinstance(m["content"], str)
            else dict(m) for m in messages]


def oldest_turns_dropped(messages, tok, block_size, need, prompt_len):
    """-> (n, messages without their n oldest user+answer turns) for the smallest n whose rendering leaves `need`
    tokens (a prompt of prompt_len, room for the answer) in block_size; a system message stays. TurnError when
    dropping every turn is not enough."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    for drop in range(1, (len(messages) - head) // 2 + 1):
        kept = messages[:head] + messages[head + 2 * drop:]
        if len(render(kept, tok)[0]) <= block_size - need:
            return drop, kept
    taken = "the system message and chat format" if head else "the chat format"
    raise TurnError(f"message of {prompt_len} tokens does not fit: block_size {block_size}, "
                    f"{len(render(messages[:head], tok)[0])} taken by {taken}, {need - prompt_len} kept for the "
                    "answer; shorten it")


def consume(session, tokens, on_text=None, interruptible=False):
    """Read a generate() iterator to its end, streaming the answer's text to on_text(str) in whole characters.
    -> session.last as JSON (Turn.to_json). KeyboardInterrupt while answering closes the answer, then is re-raised,
    or with interruptible=True ends the turn with stopped="interrupted"."""
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


# -------------------------------------------------------------------------------------- python engine.py

def self_check(turns=("what is 3 + 4 ?", "and times 2 ?", "sort 9 1 5"), seed=0):
    """A random model, three turns per mask: the tokens each turn prefills and reuses, and the largest difference
    between the logits the chat's cache gives and those of a recompute of the whole conversation without one."""
    from data.tokenizer import get_tokenizer
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    tok = get_tokenizer("byte")
    model = GPT(GPTConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64)).eval()
    print("mask    turn  prefilled  reused  largest |cached - recomputed| logit")
    for kind in MASKS:
        session = ChatSession(model, tok, kind)
        for text in turns:
            record = session.turn(text, max_new_tokens=6)
            print(f"{kind:7} {record['turn']:4} {record['prefill_tokens']:10} {record['reused_tokens']:7}  "
                  f"{largest_difference(session):.2e}")


@torch.no_grad()
def largest_difference(session):
    """Feed what the session's cache lacks (the answer's closing token) on a copy of that cache, built turn by turn
    as the chat built it, and compare the logits with one forward over the whole conversation, no cache: they
    depend on every cached row of every layer."""
    roles = torch.tensor(session.roles)
    cached = feed(session.model, session.ids, roles, session.kind, session.cached, copy.deepcopy(session.cache))
    full = feed(session.model, session.ids, roles, session.kind, 0)
    return (cached - full).abs().max().item()


if __name__ == "__main__":
    import inspect
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(f"usage: python engine.py\n{inspect.cleandoc(self_check.__doc__)}")
        sys.exit(0)
    if sys.argv[1:]:
        print(f"error: python engine.py takes no arguments, not {sys.argv[1]!r} (--help says what it does)",
              file=sys.stderr)
        sys.exit(2)
    self_check()
