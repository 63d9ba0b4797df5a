"""Local dev server: each HTTP request becomes a Function URL (payload v2.0) event for the very
handler Lambda runs, and the response is written as it is produced, one chunk per event.

Run with ``python -m streamgate.devserver`` (``make dev``). Not shipped in the Lambda zip.
"""

from __future__ import annotations

import argparse
import base64
import logging
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from streamgate import cors
from streamgate.errors import RateLimitError, StreamgateError
from streamgate.handler import App, Response, error_response

logger = logging.getLogger(__name__)

# Bytes of an over-limit upload read and thrown away so the client can read our 413 (past
# Lambda's own 6 MB cap, so a 10 MB upload still gets its answer); larger ones are cut off.
_DRAIN_LIMIT = 16 * 1024 * 1024
# Content types whose bodies a Function URL passes as text rather than base64.
_TEXT_TYPES = ("text/", "application/json", "application/x-www-form-urlencoded")
# CORS as the Function URL answers it in the cloud (streamgate.cors); Lambda adds these itself
# there, so the handler never does for Function URL events.
CORS_ALLOW_METHODS = cors.ALLOW_METHODS
CORS_ALLOW_HEADERS = cors.ALLOW_HEADERS
CORS_EXPOSE_HEADERS = cors.EXPOSE_HEADERS
CORS_MAX_AGE = cors.MAX_AGE


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


class DevServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog: the stdlib's 5 makes a burst of new connections fail to connect.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: App, *, max_streams: int = 32,
                 cors_origins: tuple[str, ...] = (), request_timeout_s: float = 60) -> None:
        super().__init__(address, _RequestHandler)
        self.app = app
        # How long a silent client may hold a thread: reading its request, or not reading
        # our answer (a stalled write), after which the stream is closed and the model freed.
        self.request_timeout_s = request_timeout_s
        self.slots = threading.BoundedSemaphore(max_streams)
        self.cors_origins = cors_origins

    def cors_headers(self, origin: str | None, *, preflight: bool) -> dict[str, str]:
        """What the Function URL adds for an allowed ``Origin``; nothing for others."""
        return cors.cors_headers(self.cors_origins, origin, preflight=preflight)


class _RequestHandler(BaseHTTPRequestHandler):
    server: DevServer
    protocol_version = "HTTP/1.1"
    server_version = "streamgate-dev"
    cors: dict[str, str]  # CORS headers for this request's origin, set before any answer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout_s)
        # Events are small writes that must leave at once: without this, Nagle's algorithm
        # holds the first event until the client ACKs the headers (~40 ms of delayed ACK).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        app = self.server.app
        origin = self.headers.get("origin")
        if self.command == "OPTIONS" and self.headers.get("access-control-request-method"):
            cors = self.server.cors_headers(origin, preflight=True)
            if cors:  # a preflight the Function URL would answer itself
                self.send_response(204)
                for name, value in cors.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()
                return
        self.cors = self.server.cors_headers(origin, preflight=False)
        if not self.server.slots.acquire(blocking=False):
            self.close_connection = True  # the request body is left unread
            err = RateLimitError("The dev server is at its concurrency limit", retry_after=1)
            self._write(error_response(err))
            return
        try:
            body = self._read_body(app.settings.max_body_bytes)
            if body is None:
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            event = build_event(self.command, self.path, headers, body,
                                source_ip=self.client_address[0])
            self._write(app.handle(event, None))
        finally:
            self.server.slots.release()

    # Every method reaches the handler, which answers 405 (with Allow) as the Function URL
    # does; http.server would answer 501 in HTML for a method without a do_* attribute.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def _read_body(self, limit: int) -> bytes | None:
        """At most ``limit + 1`` bytes: enough for the handler to answer 413 on its own."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked(limit)
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        body = self.rfile.read(min(length, limit + 1)) if length > 0 else b""
        if length > limit:
            # Drain what a Lambda payload could hold so the client can read our 413; past that,
            # hang up rather than read an unbounded upload.
            left = length - len(body)
            while 0 < left <= _DRAIN_LIMIT and (got := self.rfile.read(min(left, 1 << 16))):
                left -= len(got)
            self.close_connection = True
        return body

    def _read_chunked(self, limit: int) -> bytes | None:
        data = bytearray()
        while len(data) <= limit:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            except ValueError:
                self.send_error(400, "Malformed chunked body")
                return None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(data)
            data += self.rfile.read(size)
            self.rfile.readline(3)
        self.close_connection = True
        return bytes(data)

    def _write(self, response: Response) -> None:
        """Status and headers, then each body item as its own chunk, flushed as it comes."""
        streaming = response.headers.get("content-type") == "text/event-stream"
        try:
            self.send_response(response.status)
            for name, value in {**response.headers, **self.cors}.items():
                self.send_header(name, value)
            if streaming:
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for item in response.body:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(item), item))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            else:
                body = b"".join(response.body)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
            self.wfile.flush()
        except (ConnectionError, TimeoutError):
            # The client went away: stop generating and free the model for the next request.
            self.close_connection = True
        finally:
            response.close()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.info("%s %s", self.address_string(), format % args)


def serve(host: str, port: int, app: App, *, max_streams: int = 32,
          cors_origins: tuple[str, ...] = (), request_timeout_s: float = 60) -> DevServer:
    """A started server in a background thread; ``shutdown()`` stops it."""
    server = DevServer((host, port), app, max_streams=max_streams, cors_origins=cors_origins,
                       request_timeout_s=request_timeout_s)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="devserver",
                     daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamgate.devserver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-streams", type=int, default=32,
                        help="concurrent requests before answering 429 (default 32)")
    parser.add_argument("--cors-origins", default="",
                        help="comma-separated origins browsers may call from, or * "
                             "(default: none, like the template's CorsAllowOrigins)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        # EMF metrics are for CloudWatch; locally they would only bury the request log.
        app = App.from_env(defaults={"STREAMGATE_PROVIDER": "local", "STREAMGATE_METRICS": "false"})
        provider = app.provider  # load the model now, not on the first request
    except StreamgateError as e:
        print(f"streamgate: {e.message}", file=sys.stderr)
        return 2
    origins = tuple(o.strip() for o in args.cors_origins.split(",") if o.strip())
    server = DevServer((args.host, args.port), app, max_streams=args.max_streams,
                       cors_origins=origins)
    model = app.default_model()
    print(
        f"Streamgate dev server on http://{args.host}:{server.server_port}/v1/chat/completions "
        f"(provider {provider.name}, model {model})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
