"""A request on a kept-alive upstream connection reaches the upstream at once.

http.client writes a request's headers and its body in two writes. Without TCP_NODELAY, on a
connection that has carried a request before, Nagle's algorithm holds the body back until the
upstream acknowledges the headers, and Linux delays that ACK by 40 ms: every request but a
connection's first started 40 ms late (found by bench/bench_lmi.py)."""

from __future__ import annotations

import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from streamgate.deadline import NO_DEADLINE
from streamgate.httpclient import Upstream
from tests.fake_http import start_server


def test_requests_on_a_reused_connection_are_not_held_for_a_delayed_ack() -> None:
    # GIVEN an upstream that notes when each request's body has arrived
    arrived: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - stdlib naming
            self.rfile.read(int(self.headers["content-length"]))
            arrived.append(time.monotonic())
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = start_server(Handler)
    upstream = Upstream(f"http://127.0.0.1:{server.server_port}/v1", 5)
    try:
        # WHEN eight requests go one after another over the one kept-alive connection
        waits = []
        for _ in range(8):
            sent = time.monotonic()
            exchange = upstream.open("POST", "/chat/completions", b'{"model": "m"}',
                                     {"content-type": "application/json"},
                                     until=sent + 5, deadline=NO_DEADLINE)
            waits.append(arrived[-1] - sent)
            assert exchange.body(100, time.monotonic() + 5) == b"{}"
            exchange.finish()
    finally:
        upstream.close()
        server.shutdown()
        server.server_close()
    # THEN each reused connection's request arrived well within the 40 ms a delayed ACK costs
    # (the quickest of seven, so a busy machine's hiccups do not count)
    assert min(waits[1:]) < 0.02, waits
