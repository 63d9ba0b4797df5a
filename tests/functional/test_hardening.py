"""Hostile and careless clients against the real dev server: deep JSON, 10 MB bodies, invalid
UTF-8, clients too slow to send or to read, clients that trickle, hoard connections, leave
mid-stream or while queued for the model, or put control characters in the access log. Nothing
may answer 500, hang, or leak threads, sockets or file descriptors."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from streamgate.config import Settings, load_settings
from streamgate.deadline import Deadline
from streamgate.errors import ClientClosedError
from streamgate.handler import App
from streamgate.providers import Delta, Finish, TextDelta, Usage
from streamgate.providers.local import LocalProvider
from streamgate.validation import ChatRequest
from tests.conftest import running_dev_server
from tests.helpers import ScriptedProvider, body_bytes, chat_event, make_app
from tests.raw_http import (
    assert_our_error,
    closed_by_server,
    connect,
    exchange,
    read_response,
    trickling,
)

CHAT = "/v1/chat/completions"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settle(predicate: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_a_400_not_a_crash(depth: int) -> None:
    provider = ScriptedProvider()
    app = make_app(provider, max_body_bytes=1_000_000)
    for raw in ("[" * depth + "]" * depth,
                '{"messages": [{"role": "user", "content": ' + "[" * depth + "]" * depth
                + "}]}"):
        response = app.handle(chat_event(None, raw=raw))
        doc = json.loads(body_bytes(response))
        assert response.status == 400, doc
        assert doc["error"]["type"] == "invalid_request_error"
    assert provider.requests == []


def test_a_10_mb_body_gets_a_413_the_client_can_read() -> None:
    with running_dev_server(make_app()) as url:
        r = requests.post(url + CHAT, data=b'{"prompt": "' + b"x" * 10_000_000 + b'"}',
                          headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_invalid_utf8_in_a_string_and_in_a_key_is_a_400() -> None:
    with running_dev_server(make_app()) as url:
        for body in (b'{"prompt": "caf\xc3"}', b'{"pr\xffompt": "hi"}', b"\xef\xbb\xbf{}"):
            r = requests.post(url + CHAT, data=body, timeout=10,
                              headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["message"] == "Invalid JSON body"


def test_a_client_too_slow_to_send_is_answered_408_and_cut_off_without_blocking_others(
) -> None:
    with running_dev_server(make_app(), request_timeout_s=1) as url, connect(url) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\"")  # and then nothing
        # others are served meanwhile
        assert requests.post(url + CHAT, json={"prompt": "hi"}, timeout=10).ok
        started = time.monotonic()
        # it is told why, and the server hangs up on it
        assert_our_error(read_response(slow), 408, "bad_http_request")
        assert closed_by_server(slow)
        assert time.monotonic() - started < 5


def test_a_client_that_stops_reading_frees_the_model() -> None:
    # A provider that would write ~50 MB; the client reads nothing, so the socket buffers fill
    # and the server's write stalls until the request timeout closes the stream.
    big = "y" * 10_000
    provider = ScriptedProvider([*(TextDelta(big) for _ in range(5_000)), Finish("stop"),
                                 Usage(1, 1)])
    with running_dev_server(make_app(provider), request_timeout_s=1) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            body = b'{"prompt": "hi", "stream": true}'
            stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert provider.closed.wait(30)
    assert not provider.finished.is_set()


def test_clients_leaving_mid_stream_leak_no_threads_sockets_or_fds() -> None:
    provider = ScriptedProvider([TextDelta("x"), *[s for _ in range(100)
                                                   for s in (0.02, TextDelta("y"))],
                                 Finish("stop"), Usage(1, 1)])
    with running_dev_server(make_app(provider)) as url:
        port = int(url.rsplit(":", 1)[1])
        requests.post(url + CHAT, json={"prompt": "warm up"}, timeout=30)
        threads, fds = threading.active_count(), _open_fds()
        body = b'{"prompt": "hi", "stream": true}'
        for _ in range(20):
            provider.closed.clear()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                received = b""
                while b"data: " not in received:
                    received += sock.recv(4096)
            assert provider.closed.wait(10)  # each departure stops its generation
        _settle(lambda: threading.active_count() <= threads and _open_fds() <= fds)
        assert threading.active_count() <= threads
        assert _open_fds() <= fds
        # and the server still answers
        assert requests.post(url + CHAT, json={"prompt": "hi"}, timeout=10).ok


def test_a_client_trickling_its_headers_is_cut_off_at_the_header_timeout() -> None:
    # GIVEN a 1 s header timeout, and reads that may each stall for 30 s
    with running_dev_server(make_app(), header_timeout_s=1, request_timeout_s=30) as url, \
            connect(url, timeout=15) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        # WHEN the header keeps coming, a byte every 0.1 s
        with trickling(sock):
            # THEN once the header timeout has passed the server answers 408 and hangs up
            assert_our_error(read_response(sock), 408, "bad_http_request")
            assert closed_by_server(sock)
            assert 0.5 < time.monotonic() - started < 5


def test_an_idle_kept_alive_connection_is_closed_after_the_header_timeout() -> None:
    with running_dev_server(make_app(), header_timeout_s=1, request_timeout_s=30) as url, \
            connect(url, timeout=15) as sock:
        # GIVEN a connection kept alive after its first request
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = read_response(sock)
        assert response.status == 200 and "connection" not in response.headers
        started = time.monotonic()
        # WHEN no next request comes, THEN the server closes it after the header timeout
        assert closed_by_server(sock)
        assert 0.5 < time.monotonic() - started < 5


def test_three_hundred_trickling_clients_hold_no_more_threads_than_the_connection_cap() -> None:
    # GIVEN a server that allows 20 connections
    with running_dev_server(make_app(), max_connections=20, header_timeout_s=60) as url:
        threads = threading.active_count()
        clients: list[socket.socket] = []
        try:
            # WHEN 300 clients connect one after the other and each starts a request head
            for _ in range(300):
                sock = connect(url)
                clients.append(sock)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            # THEN the 280 past the cap were each answered 503 at once, and closed
            for sock in clients[20:]:
                assert_our_error(read_response(sock), 503, "service_unavailable")
                assert closed_by_server(sock)
            # AND the 20 admitted hold a thread each: no thread was spent on the others
            assert threading.active_count() <= threads + 20 + 1  # + the guards' watchdog
        finally:
            for sock in clients:
                sock.close()
        # AND once the hoarders leave, new clients are served again
        _settle(lambda: requests.get(url + "/health", timeout=10).ok)
        assert requests.get(url + "/health", timeout=10).ok


def test_a_refusal_at_the_connection_cap_says_when_to_retry() -> None:
    with running_dev_server(make_app(), max_connections=1) as url, connect(url) as hoarder:
        hoarder.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(hoarder).status == 200  # admitted: it holds the one connection
        response, closed = exchange(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_our_error(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == "1" and response.headers["connection"] == "close"
    assert closed


def test_control_characters_in_a_request_are_escaped_in_the_access_log(
        caplog: pytest.LogCaptureFixture) -> None:
    with running_dev_server(make_app()) as url:
        # WHEN a request line carries terminal escape sequences (ESC, BEL, C1 CSI)
        response, _ = exchange(url, b"GET /\x1b[2J\x1b]0;owned\x07\x9b1m HTTP/1.1\r\n"
                                    b"Host: x\r\n\r\n")
        _settle(lambda: any("404" in r.getMessage() for r in caplog.records))
    assert response.status == 404
    # THEN the access log shows them escaped, never raw
    lines = [r.getMessage() for r in caplog.records if r.name == "streamgate.devserver"]
    assert any("/\\x1b[2J\\x1b]0;owned\\x07\\x9b1m" in line for line in lines), lines
    assert not any(c in line for line in lines for c in "\x1b\x07\x9b")


class _HeldModel(LocalProvider):
    """The embedded model's real queue (``LocalProvider._acquire``: its lock, queue timeout,
    deadline and client probe); only generation is scripted: it holds the model until told."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(llm=None, settings=settings)
        self.release = threading.Event()
        self.waiting = 0
        self.refused: list[Exception] = []
        self._count = threading.Lock()

    def _acquire(self, deadline: Deadline) -> None:
        with self._count:
            self.waiting += 1
        try:
            super()._acquire(deadline)
        except Exception as e:
            self.refused.append(e)
            raise
        finally:
            with self._count:
                self.waiting -= 1

    def _generate(self, request: ChatRequest, constraint: object) -> Iterator[Delta]:
        yield TextDelta("busy")
        self.release.wait(30)
        yield Finish("stop")
        yield Usage(1, 1)


def test_a_client_that_leaves_while_queued_for_the_model_frees_its_place_at_once() -> None:
    # GIVEN the embedded model's queue (30 s timeout), two stream slots, and one request that
    # holds the model
    provider = _HeldModel(load_settings({}, provider="local", local_queue_timeout_s=30))
    app = App(load_settings({}, provider="local", local_queue_timeout_s=30), provider)
    body = b'{"prompt": "hi"}'
    chat = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    with running_dev_server(app, max_streams=2) as url, requests.post(
            url + CHAT, json={"prompt": "hi", "stream": True}, stream=True, timeout=30) as held:
        assert held.status_code == 200
        # WHEN a second client queues for the model, then disconnects
        with connect(url) as leaver:
            leaver.sendall(chat)
            _settle(lambda: provider.waiting == 1)
            assert provider.waiting == 1
        left = time.monotonic()
        # THEN its place in the queue is given up at once, not after the queue timeout
        _settle(lambda: provider.waiting == 0)
        assert provider.waiting == 0 and time.monotonic() - left < 2
        assert [type(e) for e in provider.refused] == [ClientClosedError]
        # AND its stream slot too: a third request is admitted and queues behind the first
        third: list[requests.Response] = []
        asker = threading.Thread(target=lambda: third.append(
            requests.post(url + CHAT, json={"prompt": "hi"}, timeout=30)))
        asker.start()
        _settle(lambda: provider.waiting == 1)
        assert provider.waiting == 1
        # AND it is served as soon as the first finishes
        provider.release.set()
        released = time.monotonic()
        asker.join(10)
        assert third and third[0].status_code == 200
        assert time.monotonic() - released < 2


def test_a_client_reading_one_byte_at_a_time_cannot_hold_the_model_past_the_time_limit(
) -> None:
    # GIVEN a 1 s request time limit, writes that may each stall for 60 s, and a provider
    # that would write ~100 MB
    big = "y" * 1000
    provider = ScriptedProvider([*(TextDelta(big) for _ in range(100_000)), Finish("stop"),
                                 Usage(1, 1)])
    with running_dev_server(make_app(provider), timeout_s=1, request_timeout_s=60) as url, \
            connect(url, timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = b'{"prompt": "hi", "stream": true}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        started = time.monotonic()
        stop = threading.Event()

        def sip() -> None:  # WHEN the client reads one byte at a time, slowly
            while not stop.wait(0.2):
                try:
                    if not sock.recv(1):
                        return
                except OSError:
                    return

        reader = threading.Thread(target=sip, daemon=True)
        reader.start()
        try:
            # THEN the model is freed shortly after the time limit (its grace for the
            # deadline event), not when a 60 s write timeout runs out
            assert provider.closed.wait(30)
            assert time.monotonic() - started < 15
        finally:
            stop.set()
            reader.join(5)
    assert not provider.finished.is_set()
