"""Local dev server: each HTTP request becomes a Function URL (payload v2.0) event for the very
handler Lambda runs, and the response is written as it is produced, one chunk per event.

Run with ``python -m streamgate.devserver`` (``make dev``). Not shipped in the Lambda zip.

Its console is for people: one line per request (:class:`ConsoleFormatter`: time, method,
path, status, model, time to first token, tokens, duration, request id) on stdout, and every
other log line as time, level, logger and message. ``--log-format json`` (or
``STREAMGATE_LOG_FORMAT=json``) writes instead what the function writes on Lambda: a JSON
record per request and per log line, and an access line per response on stderr.

What it promises, whatever a client sends or fails to send:

- Every answer is valid HTTP for the client's version. HTTP/1.1 clients get streams in chunked
  encoding; HTTP/1.0 clients get the stream raw, ended by closing the connection. A request
  without a version (HTTP/0.9, ``GET /``) gets a 400 HTTP/1.1 answer and the connection is
  closed: HTTP/0.9 has no status line or header that could carry an error, and nothing we serve
  makes sense without one.
- Every error is our JSON error body with our headers (``x-request-id``, the security headers)
  and gets a request log record, also the errors found before there is an event:
  a request the server cannot read (400, 408, 414, 431, 505; code ``bad_http_request``), the
  server at its stream limit (429) or at its connection limit (503).
- No client holds a thread without limit. The request line and headers must arrive within
  ``header_timeout_s`` (also how long a kept-alive connection may sit idle between requests;
  headers cut off after a whole request line are answered 408); the body, and then the answer,
  within the request's time limit ``timeout_s`` (what the function timeout is on Lambda;
  writing the answer gets a few seconds' grace so the deadline event can still go out). These
  are wall-clock limits (:func:`streamgate.deadline.guard`, and for the head the reader's own
  limit): a socket timeout bounds one ``recv``, not a client that trickles a byte a second. No
  single read or write may stall longer than ``request_timeout_s``. Past ``max_connections``
  open connections, a new one is answered 503 by the accepting thread itself and closed.
- A body over the limit is refused 413 as soon as its size is announced (Content-Length, or
  the chunk size that would pass the limit), without reading it: memory holds one body of at
  most the limit.
- A client that leaves while its request waits for the model frees its place at once: the
  request's :class:`~streamgate.deadline.Deadline` asks the socket whether the client is there.
- A request's log record is written before the end of its answer goes out (the last chunk,
  or a whole body), and closing the server ends the requests still running and waits for
  their threads (``close_timeout_s``): nothing of a closed server still generates, or writes,
  afterwards. ``wait_idle`` waits until no request is being served.

``--workers N`` serves one port from N processes (one interpreter, one GIL each): the first
binds the port and starts N - 1 more, each given the listening socket and the read end of a
pipe whose write end only the first holds; each accepts what it can (the socket is
non-blocking, so a process that loses a connection to another goes back to waiting). A worker
whose pipe ends (the first process has stopped, however) stops too. Each worker has its own
model, limits (``--max-streams``, ``--max-connections`` are per worker) and route state; stored
responses, in memory with one worker, are shared in a SQLite file in a temporary directory
that the first process removes when it stops.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.utils
import io
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from streamgate import cors, telemetry
from streamgate.config import Settings, load_settings, set_trace_id
from streamgate.deadline import Deadline, guard
from streamgate.errors import (
    HTTPProtocolError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    StreamgateError,
)
from streamgate.handler import App, Response
from streamgate.relay import RELAYING, Pending, Relay

logger = logging.getLogger(__name__)

# Bytes of a request we will not use (an over-limit upload, an unreadable request) still read
# and thrown away after answering, so that closing does not reset the connection under our
# answer before the client reads it (past Lambda's own 6 MB cap, so a 10 MB upload still gets
# its 413); for at most _LINGER_S. Larger uploads are cut off.
_DRAIN_LIMIT = 16 * 1024 * 1024
_LINGER_S = 5.0
# Writing the answer may run this long past the request's time limit: the handler stops
# generation at the deadline and its deadline event must still reach the client.
_DEADLINE_GRACE_S = 5.0
# The request line and each header line (the standard library's limits, kept), a chunk-size
# line with its extensions, and the trailer fields after the last chunk.
_MAX_LINE = 65536
_MAX_CHUNK_LINE = 4096
_MAX_TRAILERS = 100
# RFC 9112 §7.1: chunk-size (hex; 16 digits hold any size there is) [BWS] [chunk-ext] CRLF.
# Strict on purpose: int(x, 16) would also take "-1", " 5", "0x10" and "1_0".
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")
_DIGITS = re.compile(r"[0-9]{1,18}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2, what a method may be
# Content types whose bodies a Function URL passes as text rather than base64.
_TEXT_TYPES = ("text/", "application/json", "application/x-www-form-urlencoded")
# CORS as the Function URL answers it in the cloud (streamgate.cors; a test keeps it equal to
# template.yaml's FunctionUrlConfig.Cors). Lambda adds these itself there, so the handler
# never does; the origins are the app's (Settings.cors_origins), which its Origin rule uses.
CORS_ALLOW_METHODS = cors.ALLOW_METHODS
CORS_ALLOW_HEADERS = cors.ALLOW_HEADERS
CORS_EXPOSE_HEADERS = cors.EXPOSE_HEADERS
CORS_MAX_AGE = cors.MAX_AGE

SERVER = "streamgate-dev"
_REASONS = {s.value: s.phrase for s in HTTPStatus} | {499: "Client Closed Request"}
# What the client learns about a request the standard library's parser refused.
_PROTOCOL_MESSAGES = {
    400: "The request line is not valid HTTP/1.1",
    414: f"The request line is longer than {_MAX_LINE} bytes",
    431: f"The request has more than 100 header fields or a header line longer than "
         f"{_MAX_LINE} bytes",
    505: "HTTP version not supported: use HTTP/1.1 (or HTTP/1.0)",
}
_HTTP09 = ("HTTP/0.9 requests (a request line without a version) are not supported: "
           "send 'METHOD /path HTTP/1.1'")
# Control characters as \xNN in the access log (and backslash doubled, so an escape is never
# ambiguous), as CPython 3.12's BaseHTTPRequestHandler.log_message does: a request line is
# client input, and raw ESC sequences would reach whatever terminal shows the log.
_LOG_ESCAPES = str.maketrans({c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
                             | {ord("\\"): "\\\\"})
LOG_FORMATS = ("text", "json")


# The attributes every LogRecord has: the rest are a record's own fields (``extra=``).
_RECORD_FIELDS = {*logging.LogRecord("", 0, "", 0, "", None, None).__dict__, "message",
                  "asctime", "taskName"}


def _ms(value: float) -> str:
    return f"{value:.0f}ms" if value < 1000 else f"{value / 1000:.2f}s"


class ConsoleFormatter(logging.Formatter):
    """``make dev``'s console. A request's record (telemetry's ``"message": "request"``) becomes
    one line: time, method, path, status, then what is known of ``model=``, ``ttft=`` (time to
    first token), ``tokens=`` (prompt+completion), ``duration=`` and ``id=`` (the request id,
    as in ``x-request-id``), and what went wrong or differently (``error=``, ``finish=`` other
    than ``stop``, ``backend=`` a route target, ``fallbacks=``, ``disconnected``)::

        14:02:11 POST /v1/chat/completions 200 model=gemma-3-270m ttft=79ms tokens=29+384 \
duration=6.41s id=fc4db520-c8d3-490e-9bf8-d5af237bccbc

    Any other record is time, level, logger and message, then the fields it carries beside
    them as ``key=value`` (JSON values). Client-supplied text (the path, the model) has its
    control characters escaped, as in the access log."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = record.__dict__
        if record.msg == "request" and "status" in fields and "path" in fields:
            return f"{when} {self.request_line(fields)}"
        line = f"{when} {record.levelname} {record.name}: {record.getMessage()}"
        extra = {k: v for k, v in fields.items() if k not in _RECORD_FIELDS}
        if extra:  # what the JSON record would carry beside its message ("usage not recorded")
            line += " " + " ".join(
                f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    @staticmethod
    def request_line(f: Mapping[str, Any]) -> str:
        def text(value: Any) -> str:
            return str(value).translate(_LOG_ESCAPES)

        parts = [text(f.get("method") or "-"), text(f["path"]), str(f["status"])]
        if f.get("model"):
            parts.append(f"model={text(f['model'])}")
        if f.get("ttft_ms") is not None:
            parts.append(f"ttft={_ms(f['ttft_ms'])}")
        if f.get("prompt_tokens") is not None or f.get("completion_tokens") is not None:
            parts.append(f"tokens={f.get('prompt_tokens') or 0}+{f.get('completion_tokens') or 0}")
        parts.append(f"duration={_ms(f['duration_ms'])}")
        parts.append(f"id={text(f.get('request_id') or '-')}")
        if f.get("error_code") or f.get("error_type"):
            parts.append(f"error={text(f.get('error_code') or f.get('error_type'))}")
        if f.get("finish_reason") not in (None, "stop"):
            parts.append(f"finish={text(f['finish_reason'])}")
        if f.get("backend") and f.get("backend") != f.get("provider"):
            parts.append(f"backend={text(f['backend'])}")
        if f.get("fallbacks"):
            parts.append(f"fallbacks={len(f['fallbacks'])}")
        if f.get("disconnected"):
            parts.append("disconnected")
        return " ".join(parts)



def build_event(
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    source_ip: str = "127.0.0.1",
) -> dict[str, Any]:
    """The Function URL event Lambda would deliver for this HTTP request."""
    url = urlsplit(target)
    content_type = headers.get("content-type", "")
    is_text = not content_type or content_type.startswith(_TEXT_TYPES)
    text: str | None = None
    if body and is_text:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": url.path or "/",
        "rawQueryString": url.query,
        "headers": dict(headers),
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "local",
            "domainName": headers.get("host", "localhost"),
            "domainPrefix": "local",
            "http": {
                "method": method,
                "path": url.path or "/",
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": False,
    }
    if body:
        if text is not None:
            event["body"] = text
        else:
            event["body"] = base64.b64encode(body).decode("ascii")
            event["isBase64Encoded"] = True
    return event


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    """A response's status line and header block: always HTTP/1.1, which RFC 9110 §6.2 says
    to answer any HTTP/1.x (and the version an unreadable request gets)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n",
             f"server: {SERVER}\r\n",
             f"date: {email.utils.formatdate(usegmt=True)}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    lines.append("\r\n")
    return "".join(lines).encode("latin-1", "replace")


class _BodyError(Exception):
    """The request body could not be read: the error to answer, or only to record when the
    connection is already cut (``send`` false)."""

    def __init__(self, error: StreamgateError, *, send: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.send = send


class _Reader(io.RawIOBase):
    """The connection's bytes for ``rfile``. While ``until`` is set (a monotonic instant: the
    request head's wall-clock limit), no read waits past it, nor longer than ``stall_s``: a
    read that would raises :class:`TimeoutError` and leaves the connection whole, so that the
    408 can still be written (the guard, which shuts the socket down, cannot allow that).
    Otherwise each read waits as the socket's own timeout says."""

    def __init__(self, sock: socket.socket, stall_s: float) -> None:
        super().__init__()
        self._sock = sock
        self._stall_s = stall_s
        self.until: float | None = None
        self.received = 0  # bytes, all told
        self.expired = False  # the last TimeoutError was ``until`` (not a stall)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.until is not None:
            left = self.until - time.monotonic()
            wait = min(left, self._stall_s)
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            if wait <= 0 or not poller.poll(wait * 1000):
                self.expired = left <= self._stall_s
                raise TimeoutError("no request data in time")
        n: int = self._sock.recv_into(buffer)
        self.received += n
        return n


class DevServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog: the stdlib's 5 makes a burst of new connections fail to connect.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: App, *, max_streams: int = 32,
                 request_timeout_s: float = 60,
                 header_timeout_s: float = 10, timeout_s: float = 300,
                 max_connections: int = 256, close_timeout_s: float = 10,
                 listen_socket: socket.socket | None = None) -> None:
        """``listen_socket``: serve a socket that another process bound and listens on (a
        worker of ``--workers``) rather than bind ``address``."""
        for name, value in (("max_streams", max_streams), ("request_timeout_s",
                            request_timeout_s), ("header_timeout_s", header_timeout_s),
                            ("timeout_s", timeout_s), ("max_connections", max_connections),
                            ("close_timeout_s", close_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        self._connections_lock = threading.Lock()
        self._handlers: dict[threading.Thread, socket.socket | tuple[bytes, socket.socket]] = {}
        self.app = app
        # How long one read or write may stall (a silent client, or one that does not read
        # our answer), after which the request is answered 408 or the stream closed.
        self.request_timeout_s = request_timeout_s
        # Wall clock for a request's line and headers, and for an idle kept-alive connection.
        self.header_timeout_s = header_timeout_s
        # A request's time limit, as the function timeout is on Lambda: its Deadline.
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        # How long server_close waits for the threads of the connections it ends.
        self.close_timeout_s = close_timeout_s
        # An access line per response (the standard library's); the console turns it off,
        # since each request has its own line there.
        self.access_log = True
        self.slots = threading.BoundedSemaphore(max_streams)
        self._connections = 0
        self.unfinished: list[threading.Thread] = []
        # Requests being served: from their request line to the end of their answer.
        self._serving = 0
        self._served = threading.Condition()
        # Streams from an OpenAI-compatible upstream wait for it in one thread, not in each
        # connection's (relay.py); STREAMGATE_RELAY_LOOP=false keeps them in their own.
        self.relay = Relay() if app.settings.relay_loop else None
        # Last: a bind that fails calls server_close, which reads the attributes above.
        super().__init__(address, _RequestHandler, bind_and_activate=listen_socket is None)
        if listen_socket is not None:
            self.socket.close()
            self.socket = listen_socket
            self.server_address = listen_socket.getsockname()
            host, self.server_port = self.server_address[:2]
            self.server_name = str(host)

    def wait_idle(self, timeout: float) -> bool:
        """Wait, at most ``timeout`` seconds, until no request is being served (an idle
        kept-alive connection is not one); whether that happened. A client that stops reading
        at ``data: [DONE]`` may see its answer end before the request is over and recorded."""
        with self._served:
            return self._served.wait_for(lambda: self._serving == 0, timeout)

    def _request_started(self) -> None:
        with self._served:
            self._serving += 1

    def _request_done(self) -> None:
        with self._served:
            self._serving -= 1
            if not self._serving:
                self._served.notify_all()

    def cors_headers(self, origin: str | None, *, preflight: bool) -> dict[str, str]:
        """What the Function URL adds for an allowed ``Origin``; nothing for others."""
        return cors.cors_headers(self.app.settings.cors_origins, origin, preflight=preflight)

    # -- the connection cap: runs in the accepting thread -------------------------------------

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket],
                        client_address: Any) -> None:
        """A thread for the connection, or, past ``max_connections``, a 503 written right here
        (no thread) and the connection closed."""
        with self._connections_lock:
            admitted = self._connections < self.max_connections
            if admitted:
                self._connections += 1
        if not admitted:
            if isinstance(request, socket.socket):
                self._refuse_connection(request, client_address)
            self.shutdown_request(request)
            return
        # ThreadingMixIn keeps no daemon thread: ours are kept, with their connections, so
        # that server_close can end and wait for them.
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address), daemon=True)
        try:
            with self._connections_lock:
                self._handlers[thread] = request
            thread.start()
        except BaseException:
            self._connection_closed(thread)
            raise

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket],
                               client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed(threading.current_thread())

    def _connection_closed(self, thread: threading.Thread) -> None:
        with self._connections_lock:
            self._connections -= 1
            self._handlers.pop(thread, None)

    def server_close(self) -> None:
        """Stop listening, then end the connections still open and wait for their threads, at
        most ``close_timeout_s``: a stream in flight is cut, and its thread closes the response,
        which stops generation and frees the model. Whoever closes the model after this does
        not free it under a running generation. Threads still running after that (a provider
        that does not stop) are logged and left in ``unfinished``."""
        super().server_close()
        with self._connections_lock:
            handlers = list(self._handlers.items())
        for _, request in handlers:
            sock = request if isinstance(request, socket.socket) else request[1]
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read or write at once
        until = time.monotonic() + self.close_timeout_s
        for thread, _ in handlers:
            thread.join(max(0.0, until - time.monotonic()))
        self.unfinished = [thread for thread, _ in handlers if thread.is_alive()]
        if self.unfinished:
            logger.warning("%d request threads still running %g s after the server closed",
                           len(self.unfinished), self.close_timeout_s)

    def _refuse_connection(self, sock: socket.socket, client_address: Any) -> None:
        """503 with ``Retry-After``, without reading the request: one non-blocking send (a new
        connection's send buffer is empty, so it never waits), then what the client already
        sent is read and dropped so that closing does not reset the connection under it."""
        response = self.app.refuse(ServiceUnavailableError(
            f"The dev server is at its connection limit ({self.max_connections} open "
            "connections); retry shortly", retry_after=1))
        try:
            body = b"".join(response.body)
            headers = {**response.headers, "content-length": str(len(body)),
                       "connection": "close"}
            response.close()  # recorded before the client has the answer (see _write)
            logger.info("%s refused: %d connections open (--max-connections)",
                        client_address[0] if isinstance(client_address, tuple)
                        else client_address, self.max_connections)
            sock.setblocking(False)
            sock.send(_head(response.status, headers) + body)
            for _ in range(16):  # up to 1 MB already in the receive buffer
                if not sock.recv(1 << 16):
                    break
        except OSError:  # the client has gone, or has sent nothing more (BlockingIOError)
            pass
        finally:
            response.close()


class _RequestHandler(BaseHTTPRequestHandler):
    """One connection: requests read within their limits, answered through the handler."""

    server: DevServer
    protocol_version = "HTTP/1.1"
    server_version = SERVER

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout_s)
        self.rfile.close()  # the standard library's: ours bounds a request head's reads
        self._reader = _Reader(self.connection, self.server.request_timeout_s)
        self.rfile = io.BufferedReader(self._reader)
        # Events are small writes that must leave at once: without this, Nagle's algorithm
        # holds the first event until the client ACKs the headers (~40 ms of delayed ACK).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.cors: dict[str, str] = {}  # CORS headers for this request's origin
        self.requestline = ""
        self.http11 = True  # the request is HTTP/1.1 or later (chunked answers are allowed)
        # One wall-clock guard per connection, moved from phase to phase: the first request's
        # head must arrive within the header timeout of the connection being accepted.
        self._guard = guard(self.connection, time.monotonic() + self.server.header_timeout_s)

    def finish(self) -> None:
        try:
            self._linger()
        finally:
            self._guard.cancel()
            super().finish()

    # -- reading a request's head ---------------------------------------------------------------

    def handle_one_request(self) -> None:
        """Read one request's line and headers within the header timeout, then serve it.

        Replaces the standard library's version, which has no wall-clock limit, answers some
        errors without a status line, and sends methods it has no ``do_*`` for to a 501 page:
        here every method reaches the handler, which answers 405 (with ``Allow``) as the
        Function URL does.
        """
        self._counted = False
        # No X-Ray header names a dev server request: never the process's _X_AMZN_TRACE_ID,
        # which a Lambda runtime in the same process (a test's) may have left behind.
        set_trace_id(None, process_wide=False)
        try:
            self._one_request()
        finally:
            if self._counted:
                self.server._request_done()

    def _one_request(self) -> None:
        self.cors = {}
        self.requestline = ""
        self.command = ""
        self.http11 = True
        self.close_connection = True
        # The head's reads end by the header timeout (the reader), the connection itself by
        # then plus the grace to write a 408 (the guard).
        limit = time.monotonic() + self.server.header_timeout_s
        self._reader.until = limit
        self._guard.move(limit + _DEADLINE_GRACE_S)
        received = self._reader.received
        try:
            line = self.rfile.readline(_MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):  # RFC 9112 §2.2: ignore an empty line before one
                line = self.rfile.readline(_MAX_LINE + 1)
        except TimeoutError:
            # Idle keep-alive, or cut off mid-line: nothing to answer (no request line, no
            # telling whether it is HTTP at all).
            if self._reader.received > received:
                self._log_cut("request line")
            return
        except OSError:  # the client reset
            return
        self.raw_requestline = line
        if self._guard.fired or not line:  # closed (the client is done), or cut off
            return
        self._counted = True  # a request: served from here to the end of its answer
        self.server._request_started()
        try:
            if len(line) > _MAX_LINE:
                self._reader.until = None
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            parsed = self.parse_request()
        except TimeoutError:
            # The request line arrived, its headers did not: that much is a request, and
            # it gets its answer.
            self._reader.until = None
            self._refuse(HTTPProtocolError(
                f"The request headers did not arrive within {self.server.header_timeout_s:g} s"
                if self._reader.expired else
                f"No request header data arrived for {self.server.request_timeout_s:g} s",
                status=408))
            return
        except OSError:  # the client reset
            self.close_connection = True
            return
        self._reader.until = None
        if not parsed:
            return
        if self._guard.fired:  # cut off: what was read is not a request, and none can answer
            self.close_connection = True
            self._log_cut("headers")
            return
        self._serve()

    def parse_request(self) -> bool:
        """The standard library's parsing, plus: no HTTP/0.9, a method must be a token, and an
        HTTP/1.0 connection is never kept alive (its answers may end by closing it)."""
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = len(requestline.split())
        if words < 3:
            self.requestline = requestline
            self.send_error(HTTPStatus.BAD_REQUEST, _HTTP09 if words == 2 else None)
            return False
        if not super().parse_request():
            return False
        if not _TOKEN.fullmatch(self.command):
            self.send_error(HTTPStatus.BAD_REQUEST)
            return False
        major, minor = self.request_version[len("HTTP/"):].split(".")
        self.http11 = (int(major), int(minor)) >= (1, 1)
        if not self.http11:
            self.close_connection = True
        return True

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """The standard library's protocol errors as ours: JSON, our headers, a log record."""
        self.log_error("code %d, message %s", code, message or "")
        if message != _HTTP09:
            message = _PROTOCOL_MESSAGES.get(code, "The HTTP request could not be read")
        self._refuse(HTTPProtocolError(message, status=int(code)))

    def handle_expect_100(self) -> bool:
        """``100 Continue``, unless the announced body is over the limit: then the 413 comes
        without the client sending the body first."""
        length = self.headers.get("content-length", "").strip()
        if _DIGITS.fullmatch(length) and int(length) > self.server.app.settings.max_body_bytes:
            return True
        return super().handle_expect_100()

    # -- serving it -----------------------------------------------------------------------------

    def _serve(self) -> None:
        server = self.server
        origin = self.headers.get("origin")
        if self.command == "OPTIONS" and self.headers.get("access-control-request-method"):
            cors = server.cors_headers(origin, preflight=True)
            if cors:  # a preflight the Function URL would answer itself
                cors["x-request-id"] = uuid.uuid4().hex  # as on every answer
                if self._announces_body():
                    self.close_connection = True  # we do not read it
                    cors["connection"] = "close"
                with contextlib.suppress(OSError):
                    self._send_head(204, cors)  # no Content-Length on a 204 (RFC 9110 §8.6)
                return
        self.cors = server.cors_headers(origin, preflight=False)
        if not server.slots.acquire(blocking=False):
            self._refuse(RateLimitError("The dev server is at its concurrency limit",
                                        retry_after=1))
            return
        try:
            self._handle()
        finally:
            server.slots.release()

    def _handle(self) -> None:
        """Body, event, handler, answer: all within the request's time limit."""
        server = self.server
        limit = time.monotonic() + server.timeout_s
        deadline = Deadline(limit, client_gone=self._client_gone)
        # The whole body must arrive within the time limit, however slowly it trickles.
        self._guard.move(limit)
        try:
            body = self._read_body(server.app.settings.max_body_bytes)
        except _BodyError as e:
            self._refuse(e.error, send=e.send and not self._guard.fired)
            return
        except OSError:  # the client reset the connection
            self.close_connection = True
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            event = build_event(self.command, self.path, headers, body,
                                source_ip=self.client_address[0])
        except ValueError:  # urlsplit: e.g. "http://[/" is no URL
            self._refuse(HTTPProtocolError("The request target is not a valid URL"))
            return
        # A client reading one byte a second cannot hold the model past the time limit.
        self._guard.move(limit + _DEADLINE_GRACE_S)
        # The origin of the playground as this client reached it (the Origin rule's "own").
        own_origin = cors.local_origin(headers.get("host")) or ""
        self._write(server.app.handle(event, None, deadline=deadline, own_origin=own_origin))

    def _client_gone(self) -> bool:
        """Whether the client has closed or reset its connection: a peek that never waits.
        (A socket with a timeout waits in ``recv`` even with ``MSG_DONTWAIT``, hence the poll.)
        A client that half-closes its side after the request counts as gone; HTTP clients
        do not do that."""
        sock: socket.socket = self.connection
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if not poller.poll(0):
                return False  # nothing to read: still there
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:  # reset, or the socket is already closed
            return True

    # -- the body -------------------------------------------------------------------------------

    def _announces_body(self) -> bool:
        return bool(self.headers.get("transfer-encoding")) or \
            self.headers.get("content-length", "0").strip() not in ("", "0")

    def _read_body(self, limit: int) -> bytes:
        """The body, or :class:`_BodyError`. A body announced (by its Content-Length or a
        chunk size) to exceed ``limit`` is refused 413 at once without reading it, as the
        Function URL refuses a payload over Lambda's limit before the function runs."""
        try:
            return self._read_framed_body(limit)
        except TimeoutError as e:
            raise _BodyError(HTTPProtocolError(
                f"No request body data arrived for {self.server.request_timeout_s:g} s",
                status=408)) from e
        except _BodyError as e:
            if self._guard.fired:  # the wall-clock limit cut the read: nothing can be sent
                raise _BodyError(HTTPProtocolError(
                    f"The request body did not arrive within the request time limit "
                    f"({self.server.timeout_s:g} s)", status=408), send=False) from e
            raise

    def _read_framed_body(self, limit: int) -> bytes:
        te = self.headers.get_all("transfer-encoding") or []
        cl = self.headers.get_all("content-length") or []
        if te:  # RFC 9112 §6.1, §6.3
            if cl:
                raise self._malformed("A request may not have both Content-Length and "
                                      "Transfer-Encoding")
            if not self.http11:
                raise self._malformed("Transfer-Encoding is not allowed in an HTTP/1.0 "
                                      "request")
            if [c.strip().lower() for v in te for c in str(v).split(",")] != ["chunked"]:
                raise self._malformed("The only Transfer-Encoding the dev server reads is "
                                      "chunked")
            return self._read_chunked(limit)
        if not cl:
            return b""
        values = {v.strip() for h in cl for v in str(h).split(",")}
        value = values.pop() if len(values) == 1 else ""
        if not _DIGITS.fullmatch(value):
            raise self._malformed("Invalid Content-Length")
        if int(value) > limit:
            raise self._too_large(limit)
        return self._read_exact(int(value))

    def _read_chunked(self, limit: int) -> bytes:
        """RFC 9112 §7.1, strictly: hex sizes, CRLF line ends, at most ``limit`` bytes."""
        data = bytearray()
        while True:
            line = self.rfile.readline(_MAX_CHUNK_LINE + 1)
            match = _CHUNK_SIZE.fullmatch(line)
            if match is None:
                if not line.endswith(b"\n") and len(line) <= _MAX_CHUNK_LINE:
                    raise self._ended_early()
                raise self._malformed("Malformed chunk size line in a chunked request body")
            size = int(match[1], 16)
            if size == 0:
                break
            if len(data) + size > limit:
                raise self._too_large(limit)
            data += self._read_exact(size)
            if self._read_exact(2) != b"\r\n":
                raise self._malformed("Chunk data not followed by CRLF in a chunked request "
                                      "body")
        for _ in range(_MAX_TRAILERS + 1):  # trailer fields: read and ignored
            line = self.rfile.readline(_MAX_LINE + 1)
            if line == b"\r\n":
                return bytes(data)
            if not line.endswith(b"\n") and len(line) <= _MAX_LINE:
                raise self._ended_early()
            if not line.endswith(b"\r\n") or len(line) > _MAX_LINE:
                raise self._malformed("Malformed trailer field in a chunked request body")
        raise self._malformed("Too many trailer fields in a chunked request body")

    def _read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n) if n > 0 else b""
        if len(data) < n:
            raise self._ended_early()
        return data

    def _too_large(self, limit: int) -> _BodyError:
        # The handler's own words for a body over the limit (validation.decode_body).
        return _BodyError(PayloadTooLargeError(
            f"Request body exceeds maximum size of {limit} bytes"))

    def _malformed(self, message: str) -> _BodyError:
        return _BodyError(HTTPProtocolError(message))

    def _ended_early(self) -> _BodyError:
        return _BodyError(HTTPProtocolError("The request body ended before its declared "
                                            "length"))

    # -- answering ------------------------------------------------------------------------------

    def _refuse(self, err: StreamgateError, *, send: bool = True) -> None:
        """Answer (or, when the connection is already cut, only record) an error found before
        there is an event; the connection is then closed."""
        self.close_connection = True
        path = ""
        if self.command:  # the error in the words of the path's dialect, and the log record
            with contextlib.suppress(ValueError):
                path = urlsplit(self.path).path
        response = self.server.app.refuse(err, path)
        if self.command:
            response.outcome.method = self.command
        if send:
            self._write(response)
        else:
            self.log_error("%s: %s", err.status, err.message)
            response.close()

    def _write(self, response: Response) -> None:
        """Status and headers, then the body: a stream's events each as its own chunk for
        HTTP/1.1, or raw until the connection closes for HTTP/1.0, sent as they come.

        The response is closed (the request recorded: its log record and metrics) before the
        client can see the end of the answer, so whoever reads an answer to its end finds its
        record already written: a test's own capture holds it, rather than whatever the
        terminal shows after the test."""
        streaming = response.headers.get("content-type") == "text/event-stream"
        chunked = streaming and self.http11
        if streaming and not chunked:
            self.close_connection = True  # the end of the body is the end of the connection
        headers = {**response.headers, **self.cors}
        try:
            if chunked:
                headers["transfer-encoding"] = "chunked"
            elif not streaming:
                body = b"".join(response.body)
                # The handler answers HEAD without GET's body, whose length it does not
                # give: none, rather than a wrong one (RFC 9110 §8.6).
                if self.command != "HEAD":
                    headers["content-length"] = str(len(body))
            if self.close_connection:
                headers["connection"] = "close"
            self._send_head(response.status, headers)
            if not streaming:
                response.close()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return
            self._write_events(response.body, chunked)
            response.close()  # HTTP/1.0: the end is the connection closing, after this
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            # The client went away, stalled, or its time ran out (the guard): stop generating
            # and free the model for the next request.
            self.close_connection = True
        finally:
            response.close()

    def _write_events(self, events: Iterator[bytes], chunked: bool) -> None:
        """A stream's events, each sent as it comes, on a blocking socket: the connection's
        guard alone bounds each write, by the request timeout as a socket timeout would (a
        client that stops reading is cut), and never past the guard's own limit (the time
        limit and its grace). A socket timeout would cost every write a ``poll`` and one
        more GIL hand-off; moving the guard costs attribute writes (and, about once per
        request timeout, a heap push)."""
        sock: socket.socket = self.connection
        g, idle = self._guard, self.server.request_timeout_s
        limit = g.at
        send = sock.sendall
        sock.settimeout(None)
        # A chunked stream may wait for its upstream in the relay's thread (relay.py).
        relay = self.server.relay if chunked else None
        relaying = RELAYING.set(relay)
        try:
            body = iter(events)
            for item in body:
                if item.__class__ is not bytes:  # one of the relay's (empty) markers
                    if relay is not None and item.__class__ is Pending:
                        relay.carry(body, item, sock, max(limit - time.monotonic(), 0.0),
                                    stall=(g, idle))
                    continue
                if item:  # an empty chunk would end the body
                    g.move(min(time.monotonic() + idle, limit))
                    send(b"%x\r\n%s\r\n" % (len(item), item) if chunked else item)
                    g.move(limit)  # waiting for the model is not a stalled write
        finally:
            RELAYING.reset(relaying)
            with contextlib.suppress(OSError):
                sock.settimeout(idle)  # for the next request's head, as before

    def _send_head(self, status: int, headers: Mapping[str, str]) -> None:
        if self.server.access_log:  # the console has the request's own line instead
            self.log_request(status)
        self.wfile.write(_head(status, headers))

    def _linger(self) -> None:
        """Before the connection closes: end our side, then read and drop what the client is
        still sending (see ``_DRAIN_LIMIT``), unless a limit already cut the connection."""
        if self._guard.fired:
            return
        sock: socket.socket = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            self._guard.move(time.monotonic() + _LINGER_S)
            left = _DRAIN_LIMIT
            while left > 0 and (got := sock.recv(min(left, 1 << 16))):
                left -= len(got)
        except OSError:
            pass

    # -- the access log -------------------------------------------------------------------------

    def _log_cut(self, what: str) -> None:
        self.log_error("%s not received within %g s; connection closed", what,
                       self.server.header_timeout_s)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.info("%s %s", self.address_string(), (format % args).translate(_LOG_ESCAPES))


def serve(host: str, port: int, app: App, *, max_streams: int = 32,
          request_timeout_s: float = 60, header_timeout_s: float = 10, timeout_s: float = 300,
          max_connections: int = 256, close_timeout_s: float = 10) -> DevServer:
    """A started server in a background thread; ``shutdown()`` stops it, then
    ``server_close()`` ends its connections and waits for their threads."""
    server = DevServer((host, port), app, max_streams=max_streams,
                       request_timeout_s=request_timeout_s, header_timeout_s=header_timeout_s,
                       timeout_s=timeout_s, max_connections=max_connections,
                       close_timeout_s=close_timeout_s)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="devserver",
                     daemon=True).start()
    return server


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def build_parser() -> argparse.ArgumentParser:
    # The docstring's first paragraph: the promises below it are for readers of the code.
    parser = argparse.ArgumentParser(prog="python -m streamgate.devserver",
                                     description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=_positive(int), default=1,
                        help=f"processes serving the port, at most {MAX_WORKERS} (default 1): "
                             "each has its own interpreter, model and limits; stored responses "
                             "are shared")
    parser.add_argument("--max-streams", type=_positive(int), default=32,
                        help="concurrent requests before answering 429, per worker (default 32)")
    parser.add_argument("--max-connections", type=_positive(int), default=256,
                        help="open connections before answering 503, per worker (default 256)")
    parser.add_argument("--header-timeout", type=_positive(float), default=10,
                        help="seconds for a request's line and headers to arrive, and for an "
                             "idle kept-alive connection (default 10)")
    parser.add_argument("--timeout", type=_positive(float), default=300,
                        help="a request's time limit in seconds, like the function timeout "
                             "on Lambda (default 300)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                        help="text: one readable line per request (the default); json: the "
                             "JSON records the function writes on Lambda (default: "
                             "STREAMGATE_LOG_FORMAT, else text)")
    parser.add_argument("--cors-origins", default=None,
                        help="comma-separated origins browsers may call from, or *; pages "
                             "from any other origin are refused 403 (default: "
                             "STREAMGATE_CORS_ALLOW_ORIGINS, else none, like the template's "
                             "CorsAllowOrigins; the playground's own origin always works)")
    # A worker of --workers: the listening socket and the pipe from the first process.
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parent-fd", type=int, default=None, help=argparse.SUPPRESS)
    # The worker's STREAMGATE_RESPONSES_FILE is the first process's temporary one.
    parser.add_argument("--shared-store", action="store_true", help=argparse.SUPPRESS)
    return parser


# Where the dev server's defaults differ from Lambda's: the embedded model, no EMF metrics
# (they are for CloudWatch; locally they would only bury the request log), the playground on.
DEV_DEFAULTS = {"STREAMGATE_PROVIDER": "local", "STREAMGATE_METRICS": "false",
                "STREAMGATE_PLAYGROUND": "true"}


def dev_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """The command line over the environment over :data:`DEV_DEFAULTS`."""
    overrides: dict[str, Any] = {}
    if args.cors_origins is not None:
        overrides["cors_origins"] = tuple(
            o.strip() for o in args.cors_origins.split(",") if o.strip())
    return load_settings(environ, defaults=DEV_DEFAULTS, **overrides)


def log_format(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """``--log-format`` over ``STREAMGATE_LOG_FORMAT`` over ``text``."""
    chosen = args.log_format or (os.environ if environ is None else environ).get(
        "STREAMGATE_LOG_FORMAT", "").strip().lower() or "text"
    if chosen not in LOG_FORMATS:
        raise ValueError(f"STREAMGATE_LOG_FORMAT must be text or json, got {chosen!r}")
    return chosen


@contextlib.contextmanager
def _console_logging() -> Iterator[None]:
    """Every log line readable while it lasts: the request records, and everything else as one
    line each. Undone at the end, for callers of :func:`main` that go on (tests)."""
    console = ConsoleFormatter()
    handler = logging.StreamHandler()
    handler.setFormatter(console)
    root = logging.getLogger()
    level = root.level
    # Before the Powertools logger exists: building it filters our records out of the root
    # logger's handlers, so that each line is written once.
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    powertools = telemetry.logger().registered_handler
    previous = powertools.formatter
    powertools.setFormatter(console)
    try:
        yield
    finally:
        powertools.setFormatter(previous)
        root.removeHandler(handler)
        root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # what the workers of --workers are started with
    if not 1 <= args.workers <= MAX_WORKERS:
        print(f"streamgate: --workers must be from 1 to {MAX_WORKERS}", file=sys.stderr)
        return 2
    if (args.listen_fd is None) != (args.parent_fd is None):
        print("streamgate: --listen-fd and --parent-fd go together", file=sys.stderr)
        return 2
    try:
        fmt = log_format(args)
    except ValueError as e:
        print(f"streamgate: {e}", file=sys.stderr)
        return 2
    if fmt == "json":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        return _serve(args, fmt)
    with _console_logging():
        return _serve(args, fmt)


def _serve(args: argparse.Namespace, fmt: str) -> int:
    if args.listen_fd is not None:
        return _serve_worker(args, fmt)
    environ = dict(os.environ)
    shared: str | None = None  # the directory of the workers' shared response store
    try:
        if args.workers > 1 and dev_settings(args, environ).responses_store == "memory":
            shared = tempfile.mkdtemp(prefix="streamgate-responses-")
            environ["STREAMGATE_RESPONSES_STORE"] = "sqlite"
            environ["STREAMGATE_RESPONSES_FILE"] = os.path.join(shared, "responses.sqlite3")
        return _serve_first(args, fmt, environ, shared)
    except StreamgateError as e:
        print(f"streamgate: {e.message}", file=sys.stderr)
        return 2
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)


def _serve_first(args: argparse.Namespace, fmt: str, environ: dict[str, str],
                 shared: str | None) -> int:
    """The dev server, or with ``--workers`` the first of its processes, which starts and
    stops the others."""
    app = App(dev_settings(args, environ))
    try:  # before loading the model: a port in use is said at once
        server = DevServer((args.host, args.port), app, max_streams=args.max_streams,
                           header_timeout_s=args.header_timeout,
                           timeout_s=args.timeout, max_connections=args.max_connections)
    except OSError as e:  # the port taken, an address not ours
        print(f"streamgate: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    server.access_log = fmt == "json"
    workers: Workers | None = None
    try:
        # From before the workers start and the banner is out: whoever reads it may stop the
        # server at once, and a first process killed by SIGTERM would leave the shared store.
        with _stopped_by_sigterm(args.workers > 1):
            if args.workers > 1:  # they load their models while this process loads its own
                workers = Workers(server.socket, args, environ, shared)
            served = app.router.kinds()  # load the model (or read the routes) now, not later
            lines = banner(app, served, f"http://{args.host}:{server.server_port}", fmt)
            if workers is not None:
                lines.append(workers.describe(app.settings, shared))
            for line in lines:
                print(line, flush=True)
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if workers is not None:
            workers.stop(server.close_timeout_s + 5)
    return 0


def _serve_worker(args: argparse.Namespace, fmt: str) -> int:
    """One of the processes a first one started (``--listen-fd``, ``--parent-fd``): serves
    until the first process stops."""
    try:  # by hand, these may be anything: a worker is given a listening socket and a pipe
        listen = socket.socket(fileno=args.listen_fd)
        if (not listen.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                or not stat.S_ISFIFO(os.fstat(args.parent_fd).st_mode)):
            raise OSError("not a listening socket and a pipe")
    except OSError as e:
        print(f"streamgate: --listen-fd and --parent-fd are for the processes --workers starts "
              f"({e.strerror or e})", file=sys.stderr)
        return 2
    listen.setblocking(False)  # shared with the other workers: see the module docstring
    try:
        app = App(dev_settings(args))
        server = DevServer((args.host, args.port), app, max_streams=args.max_streams,
                           header_timeout_s=args.header_timeout, timeout_s=args.timeout,
                           max_connections=args.max_connections, listen_socket=listen)
        server.access_log = fmt == "json"
        app.router.kinds()
    except StreamgateError as e:
        listen.close()
        print(f"streamgate worker {os.getpid()}: {e.message}", file=sys.stderr)
        return 2

    orphaned = threading.Event()

    def watch_parent() -> None:
        with contextlib.suppress(OSError):
            os.read(args.parent_fd, 1)  # nothing is ever written: this returns when it ends
        orphaned.set()
        server.shutdown()

    threading.Thread(target=watch_parent, name="devserver-parent", daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal's group
        pass
    finally:
        server.server_close()
        if args.shared_store and orphaned.is_set():
            # The first process may have been killed before it could remove the shared store
            # (the stored prompts): each worker removes it too, only its own files.
            _remove_shared_store(app.settings.responses_file)
    return 0


def _remove_shared_store(path: str) -> None:
    for name in (path, f"{path}-wal", f"{path}-shm", f"{path}-journal"):
        with contextlib.suppress(OSError):
            os.unlink(name)
    with contextlib.suppress(OSError):  # not if anything else is in it
        os.rmdir(os.path.dirname(path))


MAX_WORKERS = 64


class Workers:
    """The processes a ``--workers`` dev server starts besides the first: the same command
    line, given the listening socket and the read end of a pipe only the first process can
    write to (or close, by stopping however it stops)."""

    def __init__(self, listen: socket.socket, args: argparse.Namespace,
                 environ: dict[str, str], shared: str | None = None) -> None:
        listen.setblocking(False)  # shared: see the module docstring
        self._stopping = False
        read_fd, self._write_fd = os.pipe()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**environ, "PYTHONPATH": os.pathsep.join(
            p for p in (package_root, environ.get("PYTHONPATH", "")) if p)}
        command = [sys.executable, "-m", "streamgate.devserver", *args.argv,
                   "--listen-fd", str(listen.fileno()), "--parent-fd", str(read_fd),
                   *(["--shared-store"] if shared is not None else [])]
        self.processes: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(args.workers - 1):
                self.processes.append(subprocess.Popen(
                    command, env=env, stdin=subprocess.DEVNULL,  # their console is ours
                    pass_fds=(listen.fileno(), read_fd)))
        except BaseException:
            self.stop(0)
            raise
        finally:
            os.close(read_fd)
        for process in self.processes:
            threading.Thread(target=self._watch, args=(process,), daemon=True,
                             name=f"devserver-worker-{process.pid}").start()

    def describe(self, settings: Settings, shared: str | None) -> str:
        where = (f"shared in {settings.responses_file}, removed when the server stops"
                 if shared is not None else f"in the {settings.responses_store} store")
        return (f"Workers: {len(self.processes) + 1} processes on this port, each with its own "
                f"model and limits; stored responses {where}")

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        if not self._stopping:
            logger.warning("dev server worker %d exited (code %s); the other workers go on",
                           process.pid, code)

    def stop(self, timeout_s: float) -> None:
        """Close the pipe (every worker stops as the first process would), wait for them at
        most ``timeout_s``, then kill what is left."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.close(self._write_fd)
        until = time.monotonic() + timeout_s
        for process in self.processes:
            try:
                process.wait(max(0.0, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def _stopped_by_sigterm(on: bool) -> Iterator[None]:
    """While it lasts, SIGTERM stops the server as Ctrl-C does (so that a first process stops
    its workers and removes the shared store); only in the main thread, only when ``on``."""
    if not on or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def banner(app: App, served: set[str], base: str, fmt: str) -> list[str]:
    """What the dev server says when it starts: where it serves, from which provider and
    model, where the playground is, and what its console will show. The first line names the
    URL (tools read the port from it)."""
    settings = app.settings
    lines = [f"Streamgate dev server on {base}/v1/chat/completions "
             f"({'routes' if settings.routed else 'provider'} {', '.join(sorted(served))}, "
             f"model {app.default_model()})"]
    try:
        models = app.router.models()
    except StreamgateError:  # an upstream's /models that does not answer yet: asked later
        models = []
    if models:
        lines.append(f"Models: {', '.join(models)} (GET {base}/v1/models)")
    lines.append(f"Playground: {base}/" if settings.playground
                 else "Playground: off (STREAMGATE_PLAYGROUND=true serves it at /)")
    if settings.cors_origins:
        lines.append(f"Browsers may also call from: {', '.join(settings.cors_origins)}")
    lines.append("Log: one line per request: time, method, path, status, model, ttft, "
                 "tokens (prompt+completion), duration, request id; --log-format json for "
                 "Lambda's JSON records" if fmt == "text"
                 else "Log: JSON records, as the function writes them on Lambda")
    return lines


if __name__ == "__main__":
    sys.exit(main())
