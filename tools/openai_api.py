"""
OpenAI's Chat Completions on the chat engine: a request's JSON checked into a ChatRequest, answered
by ChatService on the cached conversation whose rows stay exact for the longest part of it.
"""
import functools
import json
import random
import sys
import time
import uuid
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field

import torch

from cli.errors import DataError, ModelError, TurnError
from data.chat import chat_messages, render, render_within, validate
from engine import ChatSession, Sampling, TextStream
from mask import ROLE_LETTERS

MODEL_NAME = "ismgpt"
MAX_STOPS = 4  # as OpenAI


class ApiError(Exception):
    """A request refused, answered as OpenAI does: {"error": {message, type, param, code}}."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


@dataclass
class ChatRequest:
    """A checked request: messages in data.chat's form (the last the user's), rendered up to the
    header that opens the answer, and how to answer."""
    messages: list
    ids: list
    roles: list
    history_len: int  # how many of ids render the history, messages[:-1]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int  # None: drawn from the server's generator
    stop: tuple
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def parse_json(body):
    """Request body bytes -> a dict of Unicode text, or ApiError 400."""
    def no_constant(name):  # Python's json reads NaN and Infinity, which JSON does not have
        raise ValueError(f"{name} is not JSON")
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deeply
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object")
    for name, item in value.items():
        try:  # JSON's "\ud800" alone decodes to a lone surrogate: no answer or log can encode it
            json.dumps([name, item], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f'"{printable(name)}" is not valid Unicode text: it holds a lone '
                                'surrogate (a "\\ud800" escape without its pair)',
                           printable(name)) from None
    return value


def printable(text):
    """text with every character a terminal could act on written as its escape (\\x1b): what a
    client sent is shown in errors and logs, never obeyed."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def option(body, name, kinds, default, check=None, rule=""):
    """body[name] if of the JSON types `kinds` and passing check; default if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds) or \
            (check and not check(value)):
        raise ApiError(400, f'"{name}" must be {rule}', name)
    return value


def parse_request(body, tok, block_size, cfg):
    """A decoded JSON body -> ChatRequest, or ApiError 400 naming the field; cfg (ServeConfig)
    gives the defaults. A client decides its history, so no turn is dropped: a conversation with
    no room for one answer token and <|end|> is refused, before all of it is encoded."""
    try:
        messages = chat_messages(body.get("messages"), "messages")
        validate(messages, "messages", need_answer=False)  # a model may have answered nothing
    except DataError as e:
        raise ApiError(400, str(e), "messages") from None
    if messages[-1]["role"] != "user":
        raise ApiError(400, f"the last message is {messages[-1]['role']!r}: it must be the "
                            "user's, to answer", "messages")
    number, get = (int, float), functools.partial(option, body)
    get("n", (int,), 1, lambda v: v == 1, "1: one answer per request")
    stop = get("stop", (str, list), (), lambda v: v if isinstance(v, str) else 0 < len(v) <=
               MAX_STOPS and all(isinstance(s, str) and s for s in v),
               f"a non-empty string or a list of 1 to {MAX_STOPS} of them")
    options = get("stream_options", (dict,), {}, rule="an object")
    max_tokens = (get("max_completion_tokens", (int,), None, lambda v: v >= 1, "an integer >= 1")
                  or get("max_tokens", (int,), cfg.max_tokens, lambda v: v >= 1, "an integer >= 1"))
    rendered = render_within(messages, tok, block_size - 2)
    if rendered is None or len(rendered[0]) + 2 > block_size:
        needs = "" if rendered is None else f"{len(rendered[0]) + 2} tokens, "
        raise ApiError(400, f"with one answer token and <|end|> the conversation needs {needs}more "
                            f"than block_size {block_size}: shorten it or leave out early turns",
                       "messages", "context_length_exceeded")
    ids, roles = rendered  # begins with the history's rendering: rendering is prefix-stable
    return ChatRequest(
        messages=messages, ids=ids, roles=roles, history_len=len(render(messages[:-1], tok)[0]),
        model=get("model", (str,), MODEL_NAME, rule="a string"),
        stream=get("stream", (bool,), False, rule="true or false"),
        include_usage=option(options, "include_usage", (bool,), False, rule="true or false"),
        max_tokens=max_tokens,
        temperature=get("temperature", number, cfg.temperature, lambda v: 0 <= v <= 2,
                        "between 0 and 2"),
        top_p=get("top_p", number, cfg.top_p, lambda v: 0 < v <= 1, "above 0 and at most 1"),
        top_k=get("top_k", (int,), cfg.top_k, lambda v: v >= 0, "an integer >= 0 (0: all tokens)"),
        seed=get("seed", (int,), None, lambda v: -2**63 <= v < 2**64, "a 64-bit integer"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop))


def cut_at_stop(text, stops):
    """-> (text before the earliest stop string, whether there was one)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def unsure_tail(text, stops):
    """Length of the longest end of text that could begin a stop string: a stream holds it back."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:n])), default=0)


class ChatService:
    """The model and its cached conversations (least recently used first), answering one request at
    a time. cfg (ServeConfig): --sessions, --no_cache, sampling defaults."""

    def __init__(self, model, tok, kind, cfg, log=None, about=None):
        self.model, self.tok, self.kind, self.cfg = model, tok, kind, cfg
        self.about = about or {}  # what /v1/models says of the model beside its mask
        self.block_size = model.config.block_size
        self.sessions = OrderedDict()  # number -> ChatSession
        self.seeds = random.Random()  # for the requests without a seed; seeded by the OS
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def session_for(self, request):
        """The session whose cache keeps the most rows of the request's history (not the longest
        common prefix: an ISM query token's row depends on the rest of its segment too); when
        none keeps any, a new one while under --sessions, else the least recently used."""
        history = request.ids[:request.history_len], request.roles[:request.history_len]
        kept = {number: s.reusable_rows(*history) for number, s in self.sessions.items()}
        best = max(kept, key=kept.get, default=None)
        if best is None or kept[best] == 0:
            if len(self.sessions) < self.cfg.sessions:
                best = len(self.sessions)  # reply_reserve=1 as parse_request checked: no turn drops
                self.sessions[best] = ChatSession(self.model, self.tok, self.kind, reply_reserve=1,
                                                  use_cache=not self.cfg.no_cache)
            else:
                best = next(iter(self.sessions))
        self.sessions.move_to_end(best)
        return self.sessions[best]

    def answer(self, request):
        """Yields ("prefilled", facts) once the first token is sampled, ("text", piece) in whole
        characters (never a stop string or what follows), then ("done", {text, finish_reason,
        usage, ismgpt}). Closing it early stops the generation; the session stays consistent."""
        try:
            session = self.session_for(request)
            session.set_history(request.messages[:-1])  # keeps exactly the rows that stay exact
            seed = request.seed if request.seed is not None else self.seeds.getrandbits(63)
            sampling = Sampling(request.temperature, request.top_k or None, request.top_p,
                                torch.Generator().manual_seed(seed))
            tokens = session.generate(request.messages[-1]["content"], request.max_tokens, sampling)
            yield from self._events(session, request, tokens)
        except TurnError as e:  # what parse_request cannot see and the engine can
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        except ModelError as e:  # the model's own fault (non-finite logits)
            raise ApiError(500, str(e)) from None

    def _events(self, session, request, tokens):
        stream, text, shown, stopped = TextStream(self.tok), "", 0, False
        with closing(tokens):
            for token in tokens:
                if session.last.generated_tokens == 1:
                    yield "prefilled", self.facts(session)
                if token != self.tok.end:
                    text, stopped = cut_at_stop(text + stream.push(token), request.stop)
                if stopped:
                    break  # closing the tokens closes the answer, keeping what was sampled
                sure = len(text) - unsure_tail(text, request.stop)
                if sure > shown:
                    yield "text", text[shown:sure]
                    shown = sure
        if not stopped:
            text, stopped = cut_at_stop(text + stream.flush(), request.stop)
        if len(text) > shown:
            yield "text", text[shown:]
        finish = "stop" if stopped or session.last.stopped == "end" else "length"  # or context
        yield "done", {"text": text, "finish_reason": finish, "usage": self.usage(session, request),
                       "ismgpt": self.facts(session)}

    def usage(self, session, request):
        """OpenAI's usage; completion tokens are those sampled, a final closing token included."""
        completion = session.last.generated_tokens
        return {"prompt_tokens": len(request.ids), "completion_tokens": completion,
                "total_tokens": len(request.ids) + completion,
                "prompt_tokens_details": {"cached_tokens": session.last.reused_tokens}}

    def facts(self, session):
        """What the page shows of a turn: prefill, decode, a role letter per token (the mask)."""
        turn = session.last
        return {"mask": self.kind, "prefill_tokens": turn.prefill_tokens,
                "reused_tokens": turn.reused_tokens, "ttft_ms": turn.ttft_ms,
                "decode_tokens_per_s": turn.decode_tokens_per_s,
                "roles": "".join(ROLE_LETTERS[r] for r in session.roles)}

    def models(self):
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0,
                                            "owned_by": "ismgpt", "mask": self.kind,
                                            "block_size": self.block_size, **self.about}]}


def completion(request, reply):
    """The chat.completion of a whole answer (ChatService.answer's "done" value)."""
    message = {"role": "assistant", "content": reply["text"]}
    return {"id": request.id, "object": "chat.completion", "created": request.created,
            "model": request.model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                                 "finish_reason": reply["finish_reason"]}],
            "usage": reply["usage"], "ismgpt": reply["ismgpt"]}


def chunks(request, event, value):
    """The chat.completion.chunk bodies of one of ChatService.answer's events: the role (with the
    prefill's facts), the content, the finish_reason (with the turn's), the usage if asked for.
    With include_usage every chunk has "usage", null but the last."""
    def chunk(choices, **extra):
        usage = {"usage": None} if request.include_usage else {}
        return {"id": request.id, "object": "chat.completion.chunk", "created": request.created,
                "model": request.model, "choices": choices, **usage, **extra}

    def delta(content, finish_reason=None):
        return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}]
    if event == "prefilled":
        return [chunk(delta({"role": "assistant", "content": ""}), ismgpt=value)]
    if event == "text":
        return [chunk(delta({"content": value}))]
    usage = [chunk([], usage=value["usage"])] if request.include_usage else []
    return [chunk(delta({}, value["finish_reason"]), ismgpt=value["ismgpt"]), *usage]
