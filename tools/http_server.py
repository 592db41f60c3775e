"""
serve.py's HTTP side on Starlette and uvicorn (h11: framing, keep-alive, malformed requests,
--connections): POST /v1/chat/completions, GET /v1/models, GET / (tools/chat.html). Ours: the body
bound, the Host and Origin policy, one answer at a time, --timeout for a client to send and to read.
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
# Host names of this machine whatever DNS says: no site can take them
LOOPBACK_HOST = re.compile(r"(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?", re.IGNORECASE)


def check_origin(headers, loopback):
    """ApiError 403 for a request from a web page other than the server's own. On loopback the Host
    must name this machine (any port: ssh -L may forward another) against DNS rebinding; a browser's
    Origin, when sent, must be the server's (no Host: HTTP/1.0, no browser; no Origin: no page)."""
    host, origin = headers.get("host", ""), headers.get("origin")
    if loopback and host and not LOOPBACK_HOST.fullmatch(host):
        raise ApiError(403, f"Host {host!r} is not a name of this machine (localhost, 127.0.0.1, "
                            "[::1]): a web page elsewhere may not use this API")
    if origin is not None and origin.lower() != f"http://{host}".lower():
        raise ApiError(403, f"Origin {origin!r} is not this server's (http://{host}): a web page "
                            "of another site may not use this API")


async def read_body(request, seconds):
    """The body, or ApiError 413 over MAX_BODY, 408 unless whole within `seconds`."""
    too_long = ApiError(413, f"the body is more than {MAX_BODY} bytes")
    if int(request.headers.get("content-length", 0)) > MAX_BODY:  # digits: h11 refuses others
        raise too_long
    body = bytearray()
    with anyio.move_on_after(seconds) as waited:
        async for piece in request.stream():
            body += piece
            if len(body) > MAX_BODY:  # chunked: no length said
                raise too_long
    if waited.cancelled_caught:
        raise ApiError(408, f"the request did not come whole within {seconds:g} s")
    return body


def refusal(request, error):
    """An ApiError, or the router's 404 or 405, as OpenAI's error, marked on the request's log
    line; it closes the connection (a body may be left unread)."""
    path, allow = request.url.path, getattr(error, "headers", None) or {}
    if isinstance(error, HTTPException):
        message = (f"{request.method} is not allowed on {path}: use {allow['Allow']}" if allow
                   else f"no such path: {path} (POST /v1/chat/completions, GET /v1/models, GET /)")
        error = ApiError(error.status_code, message)
    request.state.summary += f" ({error.message})"
    return JSONResponse(error.body(), error.status, {"Connection": "close", **allow})


def internal_error(request, log):
    """A bug: its traceback to the log, escaped, and a mark on the request's line. -> the error."""
    request.state.summary += " (internal error)"
    log("\n".join(map(printable, traceback.format_exc().splitlines())))
    return ApiError(500, "internal error").body()


class ChatCompletions:
    """POST /v1/chat/completions: one answer at a time in arrival order (anyio's Lock is fair), and
    --queue more waiting, then 503. The engine runs a step at a time on its own thread; a client
    gone, seen between steps, closes the answer: it stops."""

    def __init__(self, service):
        self.service, self.lock = service, anyio.Lock()
        self.engine = ThreadPoolExecutor(1, "engine")  # one thread: a close waits for a step

    async def __call__(self, scope, receive, send):
        service, request = self.service, Request(scope, receive)
        body = await read_body(request, service.cfg.timeout)
        chat = await anyio.to_thread.run_sync(
            lambda: parse_request(parse_json(body), service.tok, service.block_size, service.cfg))
        if self.lock.locked() + self.lock.statistics().tasks_waiting > service.cfg.queue:
            raise ApiError(503, f"busy: one request is being answered and {service.cfg.queue} "
                                "are waiting; retry later")
        async with self.lock, aclosing(self.events(request, chat)) as events:
            if chat.stream:
                return await self.stream(request, chat, events, send)
            async for _, reply in events:
                pass  # the last event's value is the whole answer
            await JSONResponse(completion(chat, reply))(scope, receive, send)

    async def events(self, request, chat):
        """The answer's events, its tokens on the log line; ClientDisconnect if the client goes."""
        loop, events = asyncio.get_running_loop(), self.service.answer(chat)
        try:
            while not await request.is_disconnected():
                if (event := await loop.run_in_executor(self.engine, next, events, None)) is None:
                    return
                if event[0] == "done":
                    usage = event[1]["usage"]
                    request.state.summary = (
                        f" prompt {usage['prompt_tokens']} cached "
                        f"{usage['prompt_tokens_details']['cached_tokens']} completion "
                        f"{usage['completion_tokens']} {event[1]['finish_reason']}")
                yield event
            raise ClientDisconnect
        finally:  # closing the answer stops its generation (queued, if cancelled)
            await loop.run_in_executor(self.engine, events.close)

    async def stream(self, request, chat, events, send):
        """Server-sent events, then [DONE]; an error after the 200 is an error event before it."""
        def sse(body):
            data = b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
            return {"type": "http.response.body", "body": data, "more_body": True}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        try:
            async for event, value in events:
                for body in chunks(chat, event, value):
                    await send(sse(body))
        except ClientDisconnect:
            raise
        except ApiError as e:  # the request could not be answered after all
            request.state.summary += f" ({e.message})"
            await send(sse(e.body()))
        except Exception:
            await send(sse(internal_error(request, self.service.log)))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


class Guard:
    """Around every request: the Host and Origin policy; a client gone if it takes no write within
    --timeout; one log line once answered (client, method, path, status, outcome, time), escaped;
    for a bug, a 500 and its traceback."""

    def __init__(self, app, service, loopback):
        self.app, self.service, self.loopback = app, service, loopback

    async def __call__(self, scope, receive, send):
        request, begun, sent = Request(scope, receive), time.perf_counter(), {}
        request.state.summary = ""

        async def sending(message):
            sent.setdefault("status", message.get("status"))
            with anyio.move_on_after(self.service.cfg.timeout) as waited:
                await send(message)
            if waited.cancelled_caught:
                raise ClientDisconnect
        try:
            check_origin(request.headers, self.loopback)
            await self.app(scope, receive, sending)
        except ApiError as e:  # the policy's, a route's
            await refusal(request, e)(scope, receive, sending)
        except ClientDisconnect:
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
    """uvicorn's HTTP/1.1, and: a head not whole within --timeout of the connection or of the last
    answer on it closes the connection (uvicorn's keep-alive deadline, which a byte does not end);
    a body cut short by the client's end is malformed; h11's refusals logged, in OpenAI's shape."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def data_received(self, data):  # uvicorn's ends the deadline here; handle_events, on a head
        self.conn.receive_data(data)
        self.handle_events()

    def eof_received(self):  # uvicorn takes the client as gone: h11 sees a body cut short first
        if self.conn.their_state is h11.SEND_BODY:
            self.conn.receive_data(b"")
            self.handle_events()

    def send_400_response(self, msg):
        error = ApiError(400, f"malformed HTTP request: {sys.exc_info()[1]}")  # h11's words
        self.config.app.state.service.log(printable(f"{self.client[0]} 400 ({error.message})"))
        body = json.dumps(error.body()).encode()
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        self.transport.close()


class Server(uvicorn.Server):
    """uvicorn serving `service` on a socket bound now (OSError if it cannot be; port 0: a free
    one, .address says which) until Ctrl-C or should_exit. Beyond loopback is warned of."""

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
                        exception_handlers={HTTPException: refusal},
                        middleware=[Middleware(Guard, service=service, loopback=loopback)])
        app.router.redirect_slashes = False  # /v1/models/ is unknown, as any other path
        app.state.service = service
        super().__init__(uvicorn.Config(
            app, http=Protocol, ws="none", lifespan="off", log_config=None, access_log=False,
            headers=[("Cache-Control", "no-store")], timeout_keep_alive=service.cfg.timeout,
            limit_concurrency=service.cfg.connections + 1))  # uvicorn counts the asking one too

    def run(self):
        super().run(sockets=[self.socket])
