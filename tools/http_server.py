"""
serve.py's HTTP side, on Starlette and uvicorn: POST /v1/chat/completions, GET /v1/models and GET /
(tools/chat.html), answered by tools.openai_api.ChatService. uvicorn and h11 do the HTTP (framing,
keep-alive, 100-continue, malformed requests, --connections); ours: the body bound, the Host and
Origin policy, one answer at a time, --timeout for a client to send a request and take a stream.
"""
import asyncio
import ipaddress
import json
import re
import socket
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from pathlib import Path

import anyio
import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from tools.openai_api import ApiError, chunks, completion, parse_json, parse_request, printable

MAX_BODY = 1 << 20  # bytes; a longer request is refused (413), unread when its length says so
# a Host header that names this machine whatever DNS says: no site can take these names
LOOPBACK_HOST = re.compile(r"(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?", re.IGNORECASE)


def check_origin(headers, loopback):
    """ApiError 403 for a request from a web page other than the server's own. On loopback the Host
    must name this machine (any port: ssh -L may forward another), which refuses a page whose name
    was made to resolve here (DNS rebinding); a browser's Origin, when sent, must be the server's.
    No Host (HTTP/1.0): no browser; no Origin: no page of another site (their requests carry it)."""
    host, origin = headers.get("host", ""), headers.get("origin")
    if loopback and host and not LOOPBACK_HOST.fullmatch(host):
        raise ApiError(403, f"Host {host!r} is not a name of this machine (localhost, 127.0.0.1, "
                            "[::1]): a web page elsewhere may not use this API")
    if origin is not None and origin.lower() != f"http://{host}".lower():
        raise ApiError(403, f"Origin {origin!r} is not this server's (http://{host}): a web page "
                            "of another site may not use this API")


async def read_body(request, seconds):
    """The body (h11 checked its framing), or ApiError 413 over MAX_BODY, 408 if not whole within
    `seconds` of the request's head."""
    length = int(request.headers.get("content-length", 0))  # digits: h11 refuses anything else
    if length > MAX_BODY:
        raise ApiError(413, f"the body is {length} bytes, more than {MAX_BODY}")
    body = bytearray()
    with anyio.move_on_after(seconds) as waited:
        async for piece in request.stream():
            body += piece
            if len(body) > MAX_BODY:  # chunked: no length said
                raise ApiError(413, f"the body is more than {MAX_BODY} bytes")
    if waited.cancelled_caught:
        raise ApiError(408, f"the request did not come whole within {seconds:g} s")
    return bytes(body)


def refusal(request, error):
    """An ApiError, or the router's 404 or 405, as OpenAI's error; it closes the connection (a
    body may be left unread)."""
    path, allow = request.url.path, getattr(error, "headers", None) or {}
    if isinstance(error, HTTPException):
        message = (f"{request.method} is not allowed on {path}: use {allow['Allow']}" if allow
                   else f"no such path: {path} (POST /v1/chat/completions, GET /v1/models, GET /)")
        error = ApiError(error.status_code, message)
    request.state.summary = f" ({error.message})"
    return JSONResponse(error.body(), error.status, {"Connection": "close", **allow})


def internal_error(request, log):
    """For an unexpected exception, a bug: its traceback to the log (escaped, line by line), a
    mark on the request's line. -> the error for the client."""
    request.state.summary += " (internal error)"
    log("\n".join(map(printable, traceback.format_exc().splitlines())))
    return ApiError(500, "internal error").body()


class ChatCompletions:
    """POST /v1/chat/completions, an ASGI app: one answer at a time, in arrival order (asyncio.Lock
    is fair), stream included; --queue more wait, then 503. The synchronous engine runs a step at a
    time on its own thread; a client gone, seen between steps, closes the answer: it stops."""

    def __init__(self, service):
        self.service, self.lock, self.held = service, asyncio.Lock(), 0  # answered + waiting
        self.engine = ThreadPoolExecutor(1, "engine")  # one thread: a close waits for a step

    async def __call__(self, scope, receive, send):
        service, request = self.service, Request(scope, receive)
        body = await read_body(request, service.cfg.timeout)
        chat = await anyio.to_thread.run_sync(
            lambda: parse_request(parse_json(body), service.tok, service.block_size, service.cfg))
        if self.held > service.cfg.queue:
            raise ApiError(503, f"busy: one request is being answered and {service.cfg.queue} "
                                "are waiting; retry later")
        self.held += 1
        try:
            async with self.lock:
                await (self.stream if chat.stream else self.whole)(request, chat, send)
        finally:
            self.held -= 1

    async def events(self, request, chat):
        """service.answer(chat)'s events; ClientDisconnect once the client is gone."""
        loop, events = asyncio.get_running_loop(), self.service.answer(chat)
        try:
            while not await request.is_disconnected():
                if (event := await loop.run_in_executor(self.engine, next, events, None)) is None:
                    return
                yield event
            raise ClientDisconnect
        finally:  # whatever happens, closing the answer stops its generation (queued, if cancelled)
            await loop.run_in_executor(self.engine, events.close)

    async def whole(self, request, chat, send):
        async for _, reply in self.events(request, chat):
            pass  # the last event's value is the whole answer
        request.state.summary = tokens_line(reply)
        await JSONResponse(completion(chat, reply))(request.scope, request.receive, send)

    async def stream(self, request, chat, send):
        """Server-sent events (openai_api.chunks), then [DONE]; an error once the 200 is sent is an
        error event before it. A write not taken within --timeout: the client is gone."""
        async def write(data, more=True):
            with anyio.move_on_after(self.service.cfg.timeout) as waited:
                await send({"type": "http.response.body", "body": data, "more_body": more})
            if waited.cancelled_caught:
                raise ClientDisconnect

        def sse(body):
            return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        try:
            async with aclosing(self.events(request, chat)) as events:
                async for event, value in events:
                    for body in chunks(chat, event, value):
                        await write(sse(body))
            request.state.summary = tokens_line(value)
        except ClientDisconnect:
            raise
        except ApiError as e:  # the request could not be answered after all
            request.state.summary = f" ({e.message})"
            await write(sse(e.body()))
        except Exception:
            await write(sse(internal_error(request, self.service.log)))
        await write(b"data: [DONE]\n\n", more=False)


def tokens_line(reply):
    """A request's tokens, for its log line."""
    usage = reply["usage"]
    return (f" prompt {usage['prompt_tokens']} cached "
            f"{usage['prompt_tokens_details']['cached_tokens']} completion "
            f"{usage['completion_tokens']} {reply['finish_reason']}")


class Guard:
    """Around every request: the Host and Origin policy first; once answered, one log line (client,
    method, path, status, what came of it, time), escaped; for a bug, a 500 and its traceback."""

    def __init__(self, app, service, loopback):
        self.app, self.service, self.loopback = app, service, loopback

    async def __call__(self, scope, receive, send):
        request, begun, sent = Request(scope, receive), time.perf_counter(), {}
        request.state.summary = ""

        async def sending(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)
        try:
            check_origin(request.headers, self.loopback)
            await self.app(scope, receive, sending)
        except ApiError as e:  # the policy's
            await refusal(request, e)(scope, receive, sending)
        except ClientDisconnect:  # or took no streamed write in time
            request.state.summary += " (client gone)"
        except Exception:
            error = internal_error(request, self.service.log)
            if not sent:
                await JSONResponse(error, 500)(scope, receive, sending)
        finally:
            self.service.log(printable(
                f"{scope['client'][0]} {scope['method']} {scope['path']} {sent.get('status', '-')}"
                f"{request.state.summary} {(time.perf_counter() - begun) * 1e3:.0f} ms"))


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 on h11, and: a request's head must come within --timeout of the
    connection or of the last answer on it, else the connection is closed; a body cut short by the
    client's end is refused as malformed; h11's refusals are logged and in OpenAI's shape."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self.service = self.config.app.state.service
        self.head_deadline = self.loop.call_later(self.service.cfg.timeout, self.head_too_late)

    def on_response_complete(self):  # the next request on the connection has --timeout too
        super().on_response_complete()
        self.head_deadline.cancel()
        self.head_deadline = self.loop.call_later(self.service.cfg.timeout, self.head_too_late)

    def head_too_late(self):
        if self.conn.their_state is h11.IDLE:  # nothing, or part of a head, came in time
            self.transport.close()

    def eof_received(self):  # uvicorn takes the client as gone: h11 sees a body cut short first
        if self.conn.their_state is h11.SEND_BODY:
            self.conn.receive_data(b"")
            self.handle_events()

    def send_400_response(self, msg):
        error = ApiError(400, f"malformed HTTP request: {sys.exc_info()[1]}")  # h11's words
        self.service.log(printable(f"{self.client[0]} 400 ({error.message})"))
        body = json.dumps(error.body()).encode()
        head = h11.Response(status_code=400, reason=b"Bad Request", headers=[
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("Connection", "close")])
        for event in (head, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class Server(uvicorn.Server):
    """uvicorn serving `service` on a socket bound now (OSError if it cannot be; port 0 picks a
    free port, .address says which); run() serves until Ctrl-C or should_exit. An address beyond
    loopback (127.0.0.0/8, ::1) is warned of on stderr."""

    def __init__(self, service, host="127.0.0.1", port=0):
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen()
        self.address = self.socket.getsockname()[:2]
        loopback = ipaddress.ip_address(self.address[0]).is_loopback  # by address: localhost is too
        if not loopback:
            print(f"warning: listening on {host}:{self.address[1]}, beyond this machine: the API "
                  "has no authentication and is reachable from other machines", file=sys.stderr,
                  flush=True)
        page = (Path(__file__).parent / "chat.html").read_bytes()
        app = Starlette(routes=[Route("/", lambda request: HTMLResponse(page)),
                                Route("/v1/models", lambda request: JSONResponse(service.models())),
                                Route("/v1/chat/completions", ChatCompletions(service),
                                      methods=["POST"])],
                        exception_handlers={ApiError: refusal, HTTPException: refusal},
                        middleware=[Middleware(Guard, service=service, loopback=loopback)])
        app.router.redirect_slashes = False  # /v1/models/ is unknown, as any other path
        app.state.service = service
        super().__init__(uvicorn.Config(
            app, http=Protocol, ws="none", lifespan="off", log_config=None, access_log=False,
            headers=[("Cache-Control", "no-store")],
            limit_concurrency=service.cfg.connections + 1))  # uvicorn counts the asking one too

    def run(self):
        super().run(sockets=[self.socket])
