"""
What guards the HTTP server's connections: only this machine's clients and the server's own page
are answered (check_origin), a body is read whole or refused (read_body), a request must come whole
in time (RequestReader), a client gone is told from a half-closed one (end_closed), and a connection
over the limit is refused at once (refuse_busy).
"""
import io
import json
import os
import re
import select
import socket
import time

from tools.openai_api import ApiError

MAX_BODY = 1 << 20  # bytes; a longer request is refused (413) before it is read
# a Host header that names this machine whatever DNS says: no site can take these names
LOOPBACK_HOST = re.compile(r"(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?", re.IGNORECASE)


def check_origin(headers, loopback):
    """ApiError 403 for a request from a web page other than the server's own. On loopback the Host
    must name this machine (any port: ssh -L may forward another), which refuses a page whose name
    was made to resolve here (DNS rebinding); a browser's Origin, when sent, must be the server's
    own. No Host (HTTP/1.0): no browser, which always sends one; no Origin: no page of another site,
    whose fetches and form posts always carry one."""
    host, origin = headers.get("Host", ""), headers.get("Origin")
    if loopback and host and not LOOPBACK_HOST.fullmatch(host):
        raise ApiError(403, f"Host {host!r} is not a name of this machine (localhost, 127.0.0.1, "
                            "[::1]): a web page elsewhere may not use this API")
    if origin is not None and origin.lower() != f"http://{host}".lower():
        raise ApiError(403, f"Origin {origin!r} is not this server's (http://{host}): a web page "
                            "of another site may not use this API")


def read_body(rfile, headers, timeout):
    """The body, exactly its Content-Length bytes, or ApiError: 400 without one length in digits
    (two lengths, or a Transfer-Encoding, which is not read here, leave the end in doubt) or for a
    short body, 413 over MAX_BODY (unread), 408 when the request is not whole within timeout."""
    lengths = headers.get_all("Content-Length") or []
    if "Transfer-Encoding" in headers:
        raise ApiError(400, "Transfer-Encoding is not read here: send the body with one "
                            "Content-Length header")
    if len(lengths) != 1 or not re.fullmatch(r"[0-9]+", lengths[0].strip()):
        raise ApiError(400, "the request needs one Content-Length header, in digits")
    length = int(lengths[0])
    if length > MAX_BODY:  # refused unread
        raise ApiError(413, f"the body is {length} bytes, more than {MAX_BODY}")
    try:
        body = rfile.read(length)
    except TimeoutError:
        raise ApiError(408, f"the request did not come whole within {timeout:g} s") from None
    if len(body) < length:
        raise ApiError(400, f"the body ended after {len(body)} bytes, short of its Content-Length "
                            f"{length}")
    return body


class RequestReader(io.RawIOBase):
    """A connection's reading side that gives the whole request `seconds` from the connection's
    start: each read waits only for what is left, so a client sending a byte now and then cannot
    hold a thread longer; TimeoutError after. The socket keeps its own timeout for the rest."""

    def __init__(self, connection, seconds):
        self.connection, self.seconds = connection, seconds
        self.deadline = time.monotonic() + seconds

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the request did not come whole within {self.seconds:g} s")
        self.connection.settimeout(left)
        try:
            return self.connection.recv_into(buffer)
        finally:
            self.connection.settimeout(self.seconds)


def refuse_busy(connection, connections):
    """Answer a connection over the limit with 503 at once, without reading it (a client that
    cannot take even that is not waited for); the caller closes it."""
    body = json.dumps(ApiError(503, f"busy: {connections} connections are open; retry later")
                      .body()).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    connection.setblocking(False)
    try:
        connection.send(head.encode() + body)
    except OSError:
        pass


def end_closed(connection):
    """Whether the client has closed, or half-closed, its end: its socket reads as readable with
    nothing in it. ConnectionResetError once the client's socket has answered a write with a reset
    (a read says nothing of that, the socket's pending error does)."""
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable or connection.recv(1, socket.MSG_PEEK):
        return False
    error = connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise ConnectionResetError(error, f"the client closed its connection "
                                          f"({os.strerror(error)})")
    return True
