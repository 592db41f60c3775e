"""
The HTTP side of the server: a ThreadingHTTPServer whose handler routes POST /v1/chat/completions
(a whole answer, or server-sent events), GET /v1/models and GET / (the chat page, tools/chat.html)
to tools.openai_api.ChatService, each request passing tools/http_guards.py's checks first.
"""
import io
import ipaddress
import json
import os
import sys
import threading
import time
import traceback
import uuid
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tools.http_guards import RequestReader, check_origin, end_closed, read_body, refuse_busy
from tools.openai_api import (ApiError, chunk, completion, delta, parse_json, parse_request,
                              printable)

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class Handler(BaseHTTPRequestHandler):
    """One HTTP request. Every response closes its connection: a stream ends where it does."""
    protocol_version = "HTTP/1.1"  # answers Expect: 100-continue (curl's larger bodies)
    client_gone = (ConnectionError, TimeoutError)  # a failed write, or --timeout spent waiting
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
            check_origin(self.headers, self.server.loopback)
            if methods is None:
                raise ApiError(404, f"no such path: {path} (POST /v1/chat/completions, GET "
                                    "/v1/models, GET /)")
            if self.command not in methods:
                raise ApiError(405, f"{self.command} is not allowed on {path}: use "
                                    f"{', '.join(methods)}")
            getattr(self, methods[self.command])()
        except ApiError as e:
            self.summary = f" ({e.message})"
            self.send_json(e.status, e.body(), allow=", ".join(methods) if e.status == 405 else "")

    def internal_error(self):
        """An unexpected exception, a bug and not the request's fault: its traceback goes to the
        log (escaped, line by line), the request's line says so. -> the error for the client."""
        self.summary += " (internal error)"
        self.server.service.log("\n".join(map(printable, traceback.format_exc().splitlines())))
        return ApiError(500, "internal error").body()

    def setup(self):
        """The whole request must come within --timeout of the connection (RequestReader), and
        every write waits at most --timeout, so that a client sending nothing, or too little, or a
        byte now and then, or not reading its stream, does not hold a thread longer. Generating
        never touches the socket, so it is not limited."""
        self.timeout = self.server.service.cfg.timeout  # setup() puts it on the socket
        super().setup()
        self.rfile.close()  # replaced by a file whose reads end at the request's deadline
        self.rfile = io.BufferedReader(RequestReader(self.connection, self.timeout))

    def log_request(self, code="-", size="-"):
        """Silences http.server's own line: do_request logs one, with the token counts."""

    def log_message(self, format, *args):
        """http.server's own lines (a malformed request line, a timeout), escaped alike."""
        self.log_line(format % args)

    def log_line(self, text):
        """One line of the log, from the client's address on, with what the client sent escaped."""
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

    def chat_completions(self):
        service = self.server.service
        body = parse_json(read_body(self.rfile, self.headers, self.timeout))
        request = parse_request(body, service.tok, service.block_size, service.cfg)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        with service.line:
            if request.stream:
                self.stream_reply(request, response_id, created)
            else:
                self.whole_reply(request, response_id, created)

    def whole_reply(self, request, response_id, created):
        """The answer as one chat.completion once complete. A client gone meanwhile should stop the
        generation, but a closed connection reads the same as a half-closed one (`nc -N`), whose
        client still waits: only a write tells them apart. So once the client's end reads as
        closed, an interim "100 Continue" is written, which HTTP/1.1 clients read past (RFC 9110,
        15.2): a half-closed client takes it and gets its answer; a closed socket answers with a
        reset, which the next look raises (ConnectionResetError), and the generation stops.
        HTTP/1.0 has no interim responses: there a closed end is taken for a half-close."""
        probed = self.request_version != "HTTP/1.1"
        with closing(self.server.service.answer(request)) as events:
            for event, value in events:
                if event == "done":
                    self.send_json(200, completion(request, value, response_id, created))
                    self.summary = tokens_line(value)
                elif end_closed(self.connection) and not probed:
                    self.send_response_only(100)
                    self.end_headers()
                    probed = True

    def stream_reply(self, request, response_id, created):
        """Server-sent events: the role (with the first token and the prefill's facts), the
        content, the finish_reason with the turn's facts, the usage when asked for, and [DONE]. A
        failed write (the client gone) leaves the loop, and closing the answer stops the
        generation. An internal error, once the 200 is sent, is an error event before [DONE]."""
        self.send_head(200, "text/event-stream")

        def send(choices, **extra):
            self.send_event(chunk(request, response_id, created, choices, **extra))
        try:
            with closing(self.server.service.answer(request)) as events:
                for event, value in events:
                    if event == "prefilled":
                        send(delta({"role": "assistant", "content": ""}), ismgpt=value)
                    elif event == "text":
                        send(delta({"content": value}))
                    else:
                        send(delta({}, value["finish_reason"]), ismgpt=value["ismgpt"])
                        if request.include_usage:
                            send([], usage=value["usage"])
                        self.summary = tokens_line(value)
        except self.client_gone:
            raise  # nobody to tell: do_request logs it
        except ApiError as e:  # the request could not be answered after all: its error, as an event
            self.summary = f" ({e.message})"
            self.send_event(e.body())
        except Exception:
            self.send_event(self.internal_error())
        self.wfile.write(b"data: [DONE]\n\n")


def tokens_line(reply):
    """A request's tokens, for its log line."""
    usage = reply["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return (f" prompt {usage['prompt_tokens']} cached {cached} completion "
            f"{usage['completion_tokens']} {reply['finish_reason']}")


class Server(ThreadingHTTPServer):
    """A thread per connection, up to --connections at once (reading, waiting or answered): one
    more is answered 503 at once and closed, never given a thread."""

    def process_request(self, request, client_address):
        if not self.open_connections.acquire(blocking=False):
            refuse_busy(request, self.service.cfg.connections)
            self.service.log(printable(f"{client_address[0]} refused: "
                                       f"{self.service.cfg.connections} connections are open"))
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.open_connections.release()


def make_server(service, host="127.0.0.1", port=0):
    """A Server answering with `service`; port 0 picks a free port (server.server_address says
    which). Run it with serve_forever(), stop it with shutdown(). An address beyond loopback
    (127.0.0.0/8, ::1) is warned of on stderr."""
    server = Server((host, port), Handler)
    server.service = service
    server.open_connections = threading.BoundedSemaphore(service.cfg.connections)
    with open(PAGE, "rb") as f:
        server.page = f.read()
    address = ipaddress.ip_address(server.server_address[0])
    server.loopback = address.is_loopback  # by address: localhost is too
    if not server.loopback:
        print(f"warning: listening on {host}:{server.server_address[1]}, beyond this machine: the "
              "API has no authentication and is reachable from other machines", file=sys.stderr,
              flush=True)
    return server
