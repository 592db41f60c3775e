"""OpenAI's Chat Completions on the chat engine, answered on KV caches kept across requests."""
import functools
import json
import random
import sys
import time
import uuid
from contextlib import closing
from types import SimpleNamespace

import torch

from cli.errors import DataError, ModelError, TurnError
from data.chat import chat_messages, render, render_within, validate
from engine import ChatSession, Sampling, TextStream
from mask import ROLE_LETTERS

MODEL_NAME = "ismgpt"
FACTS = ("prefill_tokens", "reused_tokens", "ttft_ms", "decode_tokens_per_s")  # of a turn, shown


class ApiError(Exception):
    """A request refused, answered as OpenAI does: {"error": {message, type, param, code}}."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.status, self.message = status, message
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
    """text with what a terminal could act on escaped (\\x1b): a client's text shown, not obeyed."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def option(body, name, kinds, default, check=None, rule=""):
    """body[name] if of the JSON types `kinds` and passing check; default if absent or null."""
    if (value := body.get(name)) is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds) or \
            (check and not check(value)):
        raise ApiError(400, f'"{name}" must be {rule}', name)
    return value


def parse_request(body, tok, block_size, cfg):
    """A JSON body -> the checked request, or ApiError 400 naming the field; cfg: a ServeConfig.
    The client owns its history: no turn is dropped; too long is refused, not all of it encoded."""
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
    seed = get("seed", (int,), None, lambda v: -2**63 <= v < 2**64, "a 64-bit integer")
    stop = get("stop", (str, list), (), lambda v: v if isinstance(v, str) else 0 < len(v) <= 4
               and all(isinstance(s, str) and s for s in v),  # at most 4: as OpenAI
               "a non-empty string or a list of 1 to 4 of them")
    options = get("stream_options", (dict,), {}, rule="an object")
    max_tokens = (get("max_completion_tokens", (int,), None, lambda v: v >= 1, "an integer >= 1")
                  or get("max_tokens", (int,), cfg.max_tokens, lambda v: v >= 1, "an integer >= 1"))
    rendered = render_within(messages, tok, block_size - 2)  # room for an answer token and <|end|>
    if rendered is None or len(rendered[0]) + 2 > block_size:
        needs = "" if rendered is None else f"{len(rendered[0]) + 2} tokens, "
        raise ApiError(400, f"with one answer token and <|end|> the conversation needs {needs}more "
                            f"than block_size {block_size}: shorten it or leave out early turns",
                       "messages", "context_length_exceeded")
    return SimpleNamespace(  # ids, roles: messages rendered up to the answer's header
        messages=messages, ids=rendered[0], roles=rendered[1],
        history_len=len(render(messages[:-1], tok)[0]),  # ids[:history_len]: prefix-stable
        model=get("model", (str,), MODEL_NAME, rule="a string"),
        stream=get("stream", (bool,), False, rule="true or false"),
        include_usage=option(options, "include_usage", (bool,), False, rule="true or false"),
        max_tokens=max_tokens, id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
        sampling=Sampling(  # its generator seeded by the request, else at random
            get("temperature", number, cfg.temperature, lambda v: 0 <= v <= 2, "between 0 and 2"),
            get("top_k", (int,), cfg.top_k, lambda v: v >= 0, "an integer >= 0 (0: all tokens)"),
            get("top_p", number, cfg.top_p, lambda v: 0 < v <= 1, "above 0 and at most 1"),
            torch.Generator().manual_seed(random.getrandbits(63) if seed is None else seed)),
        stop=(stop,) if isinstance(stop, str) else tuple(stop))


def cut_at_stop(text, stops):
    """-> (text before its first stop string, whether it has one, how much of it no stop begins)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return text[:min(found)], True, min(found)
    unsure = [n for s in stops for n in range(1, min(len(s), len(text) + 1))
              if text.endswith(s[:n])]
    return text, False, len(text) - max(unsure, default=0)


class ChatService:
    """The model and its cached conversations, least recently used first; cfg: a ServeConfig."""

    def __init__(self, model, tok, kind, cfg, log=None, about=None):
        self.model, self.tok, self.kind, self.cfg = model, tok, kind, cfg
        self.block_size = model.config.block_size
        self.models = {"object": "list", "data": [{  # what GET /v1/models answers
            "id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "ismgpt", "mask": kind,
            "block_size": self.block_size, **(about or {})}]}
        self.sessions = {}  # number -> ChatSession, least recently used first
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def session_for(self, request):
        """The session keeping most cached rows of the history (not the longest common prefix: an
        ISM query row depends on its whole segment), else a new one, else the least recent."""
        history = request.ids[:request.history_len], request.roles[:request.history_len]
        kept = {number: s.reusable_rows(*history) for number, s in self.sessions.items()}
        best = max(kept, key=kept.get, default=None)  # the first, least recent, of equals
        if not kept.get(best) and len(self.sessions) < self.cfg.sessions:
            best = len(self.sessions)  # reply_reserve=1 as parse_request checked: no turn drops
            self.sessions[best] = ChatSession(self.model, self.tok, self.kind, reply_reserve=1,
                                              use_cache=not self.cfg.no_cache)
        self.sessions[best] = self.sessions.pop(best)  # now the most recent
        return self.sessions[best]

    def answer(self, request):
        """Yields ("prefilled", facts), ("text", whole characters before any stop string), then
        ("done", {text, finish_reason, usage, ismgpt, summary}). Closing it stops the generation."""
        try:
            session = self.session_for(request)
            session.set_history(request.messages[:-1])  # keeps exactly the rows that stay exact
            tokens = session.generate(request.messages[-1]["content"], request.max_tokens,
                                      request.sampling)
            stream, text, shown, stopped = TextStream(self.tok), "", 0, False
            with closing(tokens):
                for token in tokens:
                    if session.last.generated_tokens == 1:
                        yield "prefilled", self.facts(session)
                    piece = stream.push(token) if token != self.tok.end else ""
                    text, stopped, sure = cut_at_stop(text + piece, request.stop)
                    if stopped:
                        break  # closing the tokens closes the answer, keeping what was sampled
                    if sure > shown:
                        yield "text", text[shown:sure]
                        shown = sure
        except TurnError as e:  # what parse_request cannot see and the engine can
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        except ModelError as e:  # the model's own fault (non-finite logits)
            raise ApiError(500, str(e)) from None
        if not stopped:
            text, stopped, _ = cut_at_stop(text + stream.flush(), request.stop)
        if len(text) > shown:
            yield "text", text[shown:]
        finish = "stop" if stopped or session.last.stopped == "end" else "length"  # or context
        completion = session.last.generated_tokens  # sampled, a final closing token included
        usage = {"prompt_tokens": len(request.ids), "completion_tokens": completion,
                 "total_tokens": len(request.ids) + completion,
                 "prompt_tokens_details": {"cached_tokens": session.last.reused_tokens}}
        yield "done", {"text": text, "finish_reason": finish, "usage": usage,
                       "ismgpt": self.facts(session), "summary": f"prompt {len(request.ids)} "
                       f"cached {session.last.reused_tokens} completion {completion} {finish}"}

    def facts(self, session):
        """What the page shows of a turn: prefill, decode, a role letter per token (the mask)."""
        return {"mask": self.kind, **{name: getattr(session.last, name) for name in FACTS},
                "roles": "".join(ROLE_LETTERS[r] for r in session.roles)}


def completion(request, reply):
    """The chat.completion of a whole answer (ChatService.answer's "done" value)."""
    message = {"role": "assistant", "content": reply["text"]}
    return {"id": request.id, "object": "chat.completion", "created": request.created,
            "model": request.model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                                 "finish_reason": reply["finish_reason"]}],
            "usage": reply["usage"], "ismgpt": reply["ismgpt"]}


def chunks(request, event, value):
    """The chat.completion.chunk bodies of an answer's event; "usage", if asked: null but last."""
    def chunk(delta=None, finish_reason=None, **extra):  # no delta: no choice
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
        usage = {"usage": None} if request.include_usage else {}
        return {"id": request.id, "object": "chat.completion.chunk", "created": request.created,
                "model": request.model, "choices": choices, **usage, **extra}
    if event == "prefilled":
        return [chunk({"role": "assistant", "content": ""}, ismgpt=value)]
    if event == "text":
        return [chunk({"content": value})]
    usage = [chunk(usage=value["usage"])] if request.include_usage else []
    return [chunk({}, value["finish_reason"], ismgpt=value["ismgpt"]), *usage]
