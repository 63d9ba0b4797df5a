"""HTTP/1.x over a raw socket, for tests that must see exactly the bytes the dev server sends:
no client library that would mend, reject or hide a malformed answer."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

SECURITY_HEADERS = ("x-content-type-options", "content-security-policy", "referrer-policy",
                    "strict-transport-security")


@dataclass
class RawResponse:
    status_line: bytes
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes
    chunked: bool

    def json(self) -> Any:
        return json.loads(self.body)


def port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(url: str, *, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port(url)), timeout=timeout)


class _Reader:
    """Reads no byte past what it is asked for, so pipelined responses stay on the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def line(self) -> bytes:
        line = b""
        while not line.endswith(b"\r\n"):
            got = self.sock.recv(1)
            if not got:
                raise EOFError(f"connection closed mid-line: {line[:200]!r}")
            line += got
        return line[:-2]

    def exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            got = self.sock.recv(n - len(data))
            if not got:
                raise EOFError("connection closed mid-body")
            data += got
        return data

    def rest(self) -> bytes:
        data = b""
        while got := self.sock.recv(65536):
            data += got
        return data


def read_response(sock: socket.socket) -> RawResponse:
    """One response, framed as HTTP/1.1 says: Content-Length, chunked, or up to the close."""
    reader = _Reader(sock)
    status_line = reader.line()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while line := reader.line():
        name, _, value = line.decode("latin-1").partition(":")
        assert name and name == name.strip(), line
        headers[name.lower()] = value.strip()
    status = int(status_line.split()[1])
    chunked = headers.get("transfer-encoding") == "chunked"
    if chunked:
        assert "content-length" not in headers
        body = b""
        while size := int(reader.line(), 16):
            body += reader.exactly(size)
            assert reader.exactly(2) == b"\r\n"
        assert reader.line() == b""
    elif "content-length" in headers:
        body = reader.exactly(int(headers["content-length"]))
    elif status == 204:
        body = b""
    else:
        body = reader.rest()
    return RawResponse(status_line, status, headers, body, chunked)


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed the connection (end of stream or reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def exchange(url: str, request: bytes, *, timeout: float = 10) -> tuple[RawResponse, bool]:
    """Send one raw request; the response, and whether the server then closed the connection
    (looked at only when the response says ``connection: close``; a kept-alive connection
    would stay open until the server's idle timeout)."""
    with connect(url, timeout=timeout) as sock:
        sock.sendall(request)
        response = read_response(sock)
        return response, response.headers.get("connection") == "close" and closed_by_server(sock)


def assert_our_error(response: RawResponse, status: int, code: str) -> dict[str, Any]:
    """Our OpenAI-shaped JSON error with our headers, as every error must be."""
    assert response.status == status, response.status_line
    assert response.headers["content-type"] == "application/json", response.headers
    assert response.headers["x-request-id"]
    for name in SECURITY_HEADERS:
        assert name in response.headers, name
    error = response.json()["error"]
    assert error["code"] == code, error
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


@contextmanager
def trickling(sock: socket.socket, *, every_s: float = 0.1) -> Iterator[None]:
    """While in the block, send one byte every ``every_s``: no single read ever waits long,
    yet a request never completes."""
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(every_s):
            try:
                sock.send(b"x")
            except OSError:
                return

    sender = threading.Thread(target=trickle, name="trickle", daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(5)
