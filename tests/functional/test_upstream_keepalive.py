"""Kept-alive upstream connections: a request on one reaches the upstream at once, and the idle
ones a burst leaves behind are closed, by age and beyond a cap.

http.client writes a request's headers and its body in two writes. Without TCP_NODELAY, on a
connection that has carried a request before, Nagle's algorithm holds the body back until the
upstream acknowledges the headers, and Linux delays that ACK by 40 ms: every request but a
connection's first started 40 ms late (found by bench/bench_lmi.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any

from streamgate.deadline import NO_DEADLINE
from streamgate.httpclient import Exchange, Upstream
from tests.fake_http import RawPeer, read_request, start_server


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


class _KeepAlive:
    """An upstream that answers every request on a connection with a short keep-alive 200,
    and counts the connections the client has closed (it reads their end)."""

    def __init__(self) -> None:
        self.closed = 0
        self._lock = threading.Lock()
        self.peer = RawPeer(self._serve)

    def _serve(self, sock: socket.socket) -> None:
        while read_request(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        with self._lock:
            self.closed += 1

    def wait_closed(self, n: int, timeout: float = 5) -> int:
        """The count of closed connections once it reaches ``n`` (or after ``timeout``)."""
        end = time.monotonic() + timeout
        while self.closed < n and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.1)  # and no more closes after it
        return self.closed


@contextmanager
def _upstream(**pool: Any) -> Iterator[tuple[_KeepAlive, Upstream]]:
    peer = _KeepAlive()
    upstream = Upstream(peer.peer.url, 5, **pool)
    try:
        yield peer, upstream
    finally:
        upstream.close()
        peer.peer.close()


def _open(upstream: Upstream) -> Exchange:
    return upstream.open("GET", "/models", None, {}, until=time.monotonic() + 5,
                         deadline=NO_DEADLINE)


def _done(exchange: Exchange) -> None:
    assert exchange.body(100, time.monotonic() + 5) == b"ok"
    exchange.finish()


def test_a_burst_leaves_at_most_sixteen_idle_connections_open() -> None:
    with _upstream() as (peer, upstream):
        # GIVEN 24 requests at once, each on a connection of its own
        burst = [_open(upstream) for _ in range(24)]
        assert peer.peer.accepted == 24
        # WHEN they all end and give their connections back
        for exchange in burst:
            _done(exchange)
        # THEN the pool closed the 8 oldest beyond its cap of 16
        assert peer.wait_closed(8) == 8
        # AND the 16 it kept serve the next requests without a new connection
        again = [_open(upstream) for _ in range(16)]
        for exchange in again:
            _done(exchange)
        assert peer.peer.accepted == 24


def test_idle_connections_past_their_age_are_closed_while_one_stays_in_use() -> None:
    with _upstream(max_idle_s=0.5) as (peer, upstream):
        # GIVEN a burst of three that left three idle connections
        burst = [_open(upstream) for _ in range(3)]
        for exchange in burst:
            _done(exchange)
        # WHEN requests keep coming one at a time for a second (each reuses the connection
        # given back last)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            _done(_open(upstream))
            time.sleep(0.05)
        # THEN the two left idle were closed once older than 0.5 s, and the one in use was not
        assert peer.wait_closed(2) == 2
        assert peer.peer.accepted == 3
