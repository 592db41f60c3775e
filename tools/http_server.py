"""serve.py's HTTP: Starlette on uvicorn, and the body bound, Host and Origin policy, timeouts."""
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
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from tools.openai_api import ApiError, chunks, completion, parse_json, parse_request, printable

MAX_BODY = 1 << 20  # bytes; a longer request is refused (413), unread when its length says so
LOOPBACK_HOST = re.compile(r"(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?", re.IGNORECASE)


def refusal(request, error, log=None):
    """An ApiError, the router's 404 or 405, or a bug (a 500, its traceback logged) as OpenAI's."""
    allow = {}  # and Connection: close, as a body may be left unread
    if isinstance(error, HTTPException):
        path, allow = request.url.path, error.headers or {}
        message = (f"{request.method} is not allowed on {path}: use {allow['Allow']}" if allow
                   else f"no such path: {path} (POST /v1/chat/completions, GET /v1/models, GET /)")
        error = ApiError(error.status_code, message)
    elif not isinstance(error, ApiError):
        log("\n".join(map(printable, traceback.format_exc().splitlines())))
        error = ApiError(500, "internal error")
    request.state.summary += f" ({error.message})"
    return JSONResponse(error.body, error.status, {"Connection": "close", **allow})


class ChatCompletions:
    """POST /v1/chat/completions: one answer at a time in arrival order (anyio's Lock is fair)."""

    def __init__(self, service):
        self.service, self.lock = service, anyio.Lock()
        self.engine = ThreadPoolExecutor(1, "engine")  # one thread: a close waits for a step

    async def __call__(self, scope, receive, send):
        def sse(data, more=True):  # a server-sent event
            return {"type": "http.response.body", "body": b"data: %s\n\n" % data, "more_body": more}
        service, request, body = self.service, Request(scope, receive), bytearray()
        too_long = ApiError(413, f"the body is more than {MAX_BODY} bytes")
        if int(request.headers.get("content-length", 0)) > MAX_BODY:  # digits: h11 refuses others
            raise too_long
        with anyio.move_on_after(service.cfg.timeout) as waited:
            async for piece in request.stream():
                body += piece
                if len(body) > MAX_BODY:  # chunked: no length said
                    raise too_long
        if waited.cancelled_caught:
            raise ApiError(408, f"the request did not come whole within {service.cfg.timeout:g} s")
        chat = await anyio.to_thread.run_sync(
            lambda: parse_request(parse_json(body), service.tok, service.block_size, service.cfg))
        if self.lock.locked() + self.lock.statistics().tasks_waiting > service.cfg.queue:
            raise ApiError(503, f"busy: one request is being answered and {service.cfg.queue} "
                                "are waiting; retry later")
        async with self.lock, aclosing(self.events(request, chat)) as events:
            if not chat.stream:
                async for _, reply in events:
                    pass  # the last event's value is the whole answer
                return await JSONResponse(completion(chat, reply))(scope, receive, send)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            try:  # an error after the 200 is an error event before [DONE]
                async for event, value in events:
                    for body in chunks(chat, event, value):
                        await send(sse(json.dumps(body, ensure_ascii=False).encode()))
            except ClientDisconnect:
                raise
            except Exception as e:  # the request could not be answered after all, or a bug
                await send(sse(refusal(request, e, service.log).body))
            await send(sse(b"[DONE]", more=False))

    async def events(self, request, chat):
        """The answer's events, its tokens on the log line; ClientDisconnect if the client goes."""
        loop, events = asyncio.get_running_loop(), self.service.answer(chat)
        try:
            while not await request.is_disconnected():
                if (event := await loop.run_in_executor(self.engine, next, events, None)) is None:
                    return
                if event[0] == "done":
                    request.state.summary = " " + event[1]["summary"]
                yield event
            raise ClientDisconnect
        finally:  # closing the answer stops its generation (queued, if cancelled)
            await loop.run_in_executor(self.engine, events.close)


def guard(app, service, loopback):
    """Around each request: errors answered, --timeout per write, a log line; no web page but the
    server's own, and on loopback a Host naming this machine (any port: ssh -L), not DNS's."""
    async def guarded(scope, receive, send):
        request, begun, sent = Request(scope, receive), time.perf_counter(), {}
        request.state.summary = ""

        async def sending(message):
            sent.setdefault("status", message.get("status"))
            with anyio.move_on_after(service.cfg.timeout):
                return await send(message)
            raise ClientDisconnect
        try:
            host, origin = request.headers.get("host", ""), request.headers.get("origin")
            if loopback and host and not LOOPBACK_HOST.fullmatch(host):  # none: HTTP/1.0, no page
                raise ApiError(403, f"Host {host!r} is not a name of this machine (localhost, "
                                    "127.0.0.1, [::1]): a web page elsewhere may not use this API")
            if origin is not None and origin.lower() != f"http://{host}".lower():  # none: no page
                raise ApiError(403, f"Origin {origin!r} is not this server's (http://{host}): a "
                                    "web page of another site may not use this API")
            await app(scope, receive, sending)
        except ClientDisconnect:
            request.state.summary += " (client gone)"
        except Exception as e:  # the policy's ApiError, a route's, a bug
            response = refusal(request, e, service.log)
            if not sent:
                await response(scope, receive, sending)
        finally:
            service.log(printable(
                f"{scope['client'][0]} {scope['method']} {scope['path']} {sent.get('status', '-')}"
                f"{request.state.summary} {(time.perf_counter() - begun) * 1e3:.0f} ms"))
    return guarded


class Protocol(H11Protocol):
    """uvicorn's h11, and --timeout for a head, a body cut short malformed, refusals as OpenAI's."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def data_received(self, data):  # uvicorn's ends the deadline here; handle_events, on a head
        self.conn.receive_data(data)
        self.handle_events()

    def eof_received(self):  # uvicorn takes the client as gone: h11 sees a body cut short first
        if self.conn.their_state is h11.SEND_BODY:
            self.data_received(b"")

    def send_400_response(self, msg):
        error = ApiError(400, f"malformed HTTP request: {sys.exc_info()[1]}")  # h11's words
        self.config.app.state.service.log(printable(f"{self.client[0]} 400 ({error.message})"))
        body = json.dumps(error.body).encode()
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        self.transport.close()


class Server(uvicorn.Server):
    """uvicorn serving `service` on a socket bound at once (OSError if it cannot be; .address)."""

    def __init__(self, service, host="127.0.0.1", port=0):
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen()
        self.address = self.socket.getsockname()[:2]
        loopback = ipaddress.ip_address(self.address[0]).is_loopback  # by address: localhost is too
        if not loopback:
            print(f"warning: listening on {host}:{self.address[1]}, beyond this machine: the API "
                  "has no authentication and is reachable from other machines", file=sys.stderr)
        page = (Path(__file__).parent / "chat.html").read_bytes()
        routes = [Route("/", lambda request: HTMLResponse(page)),
                  Route("/v1/models", lambda request: JSONResponse(service.models)),
                  Route("/v1/chat/completions", ChatCompletions(service), methods=["POST"])]
        app = Starlette(routes=routes, exception_handlers={HTTPException: refusal})
        app.add_middleware(guard, service=service, loopback=loopback)
        app.router.redirect_slashes = False  # /v1/models/ is unknown, as any other path
        app.state.service = service
        super().__init__(uvicorn.Config(
            app, http=Protocol, ws="none", lifespan="off", log_config=None, access_log=False,
            headers=[("Cache-Control", "no-store")], timeout_keep_alive=service.cfg.timeout,
            limit_concurrency=service.cfg.connections + 1))  # uvicorn counts the asking one too

    def run(self):
        super().run(sockets=[self.socket])
