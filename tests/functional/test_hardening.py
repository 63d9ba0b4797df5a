"""Hostile and careless clients against the real dev server: deep JSON, 10 MB bodies, invalid
UTF-8, clients too slow to send or to read, clients that leave mid-stream. Nothing may answer
500, hang, or leak threads, sockets or file descriptors."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
import requests

from streamgate.providers import Finish, TextDelta, Usage
from tests.conftest import running_dev_server
from tests.helpers import ScriptedProvider, body_bytes, chat_event, make_app
from tests.raw_http import assert_our_error, closed_by_server, connect, read_response

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
