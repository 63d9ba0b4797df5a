"""The dev server over real sockets, with a scripted provider: incremental delivery,
concurrency, disconnects and request-body handling."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from streamgate.deadline import Deadline
from streamgate.devserver import build_event, build_parser, serve
from streamgate.providers import Delta, Finish, TextDelta, Usage
from streamgate.validation import ChatRequest
from tests.conftest import dev_servers as conftest_servers
from tests.conftest import running_dev_server
from tests.helpers import ScriptedProvider, make_app, sse_json

CHAT = "/v1/chat/completions"


def test_events_arrive_while_the_model_is_still_generating() -> None:
    # GIVEN a provider that pauses before its last word
    gate = threading.Event()

    class Gated(ScriptedProvider):
        def stream(self, request: ChatRequest, model: str,
                   deadline: Deadline) -> Iterator[Delta]:
            yield TextDelta("first")
            assert gate.wait(10), "the client never saw the first event"
            yield TextDelta(" second")
            yield Finish("stop")

    with running_dev_server(make_app(Gated())) as url, requests.post(
        url + CHAT, json={"prompt": "hi", "stream": True}, stream=True, timeout=10
    ) as response:
        lines = response.iter_lines()
        # WHEN the client reads the first event
        first = next(line for line in lines if line.startswith(b"data: "))
        # THEN it arrived before the provider was allowed to continue
        assert b'"content":"first"' in first
        gate.set()
        rest = [line for line in lines if line.startswith(b"data: ")]
    assert rest[-1] == b"data: [DONE]"


def test_twenty_concurrent_streams_are_served_at_once() -> None:
    # GIVEN a provider whose streams only proceed once 20 of them are open together
    barrier = threading.Barrier(20, timeout=20)

    class Together(ScriptedProvider):
        def stream(self, request: ChatRequest, model: str,
                   deadline: Deadline) -> Iterator[Delta]:
            yield TextDelta("waiting")
            barrier.wait()
            yield TextDelta(" done")
            yield Finish("stop")

    results: list[str] = []

    def client(url: str) -> None:
        r = requests.post(url + CHAT, json={"prompt": "hi", "stream": True}, timeout=30)
        results.append("".join(c["choices"][0]["delta"].get("content", "")
                               for c in sse_json(r.content)))

    with running_dev_server(make_app(Together())) as url:
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
    # THEN every one of them completed (the barrier would have broken otherwise)
    assert results == ["waiting done"] * 20
    assert not barrier.broken


def test_a_client_that_disconnects_stops_generation_and_frees_its_slot() -> None:
    # GIVEN a server with a single slot and a provider that would talk for a long time
    provider = ScriptedProvider([TextDelta("x"), *[s for _ in range(200)
                                                   for s in (0.05, TextDelta("y"))],
                                 Finish("stop"), Usage(1, 1)])
    with running_dev_server(make_app(provider), max_streams=1) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"prompt": "hi", "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            assert b"200 OK" in sock.recv(4096)
        # WHEN the client has gone, THEN the provider is closed long before it would finish
        assert provider.closed.wait(10)
        assert not provider.finished.is_set()
        # AND the slot is free again for the next client
        provider.script = [TextDelta("ok"), Finish("stop")]
        deadline = time.monotonic() + 10
        while True:
            r = requests.post(url + CHAT, json={"prompt": "hi"}, timeout=10)
            if r.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 200


def test_closing_the_server_ends_the_streams_in_flight_and_waits_for_their_threads() -> None:
    # GIVEN a stream in flight from a provider that would talk for a minute, to a client that
    # keeps its connection open
    provider = ScriptedProvider([TextDelta("x"), *[s for _ in range(1200)
                                                   for s in (0.05, TextDelta("y"))],
                                 Finish("stop")])
    server = serve("127.0.0.1", 0, make_app(provider), close_timeout_s=10)
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
        body = json.dumps({"prompt": "hi", "stream": True}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        assert b"200 OK" in sock.recv(4096)
        # WHEN the server is shut down and closed
        server.shutdown()
        started = time.monotonic()
        server.server_close()
        took = time.monotonic() - started
        # THEN by the time close returns, the stream has been cut, the provider closed (the
        # model freed) and the request's thread has ended
        assert provider.closed.is_set() and not provider.finished.is_set()
        assert server.unfinished == []
        assert took < 5


def test_the_server_is_idle_only_once_its_requests_are_over_and_recorded(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streamgate")

    # GIVEN a provider whose stream takes half a second to close, after its last delta
    class Closing:
        def __init__(self) -> None:
            self._deltas = iter([TextDelta("hi"), Finish("stop")])

        def __iter__(self) -> Iterator[Delta]:
            return self

        def __next__(self) -> Delta:
            return next(self._deltas)

        def close(self) -> None:
            time.sleep(0.5)

    class SlowToClose(ScriptedProvider):
        def stream(self, request: ChatRequest, model: str,
                   deadline: Deadline) -> Iterator[Delta]:
            return Closing()

    with running_dev_server(make_app(SlowToClose())) as url:
        server = next(s for s in conftest_servers() if url.endswith(f":{s.server_port}"))
        assert server.wait_idle(0)  # nothing served yet
        # WHEN a client reads the stream up to [DONE], as the SDKs do, and stops there
        with requests.post(url + CHAT, json={"prompt": "hi", "stream": True}, stream=True,
                           timeout=10) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line == b"data: [DONE]")
            # THEN the request is not over yet: the server is busy until it is recorded
            assert not server.wait_idle(0.1)
            assert not [r for r in caplog.records if r.getMessage() == "request"]
            assert server.wait_idle(5)
            assert [r.status for r in caplog.records  # type: ignore[attr-defined]
                    if r.getMessage() == "request"] == [200]


def test_a_thread_that_outlives_the_close_timeout_is_reported() -> None:
    # GIVEN a provider that blocks for 3 s without yielding (it cannot be stopped sooner)
    started = threading.Event()

    class Stuck(ScriptedProvider):
        def stream(self, request: ChatRequest, model: str,
                   deadline: Deadline) -> Iterator[Delta]:
            started.set()
            time.sleep(3)
            yield TextDelta("late")
            yield Finish("stop")

    server = serve("127.0.0.1", 0, make_app(Stuck()), close_timeout_s=0.5)

    def ask() -> None:
        with contextlib.suppress(requests.RequestException):  # the close cuts it off
            requests.post(f"http://127.0.0.1:{server.server_port}{CHAT}",
                          json={"prompt": "hi"}, timeout=10)

    client = threading.Thread(target=ask)
    client.start()
    assert started.wait(10)
    # WHEN the server is closed with a 0.5 s bound
    server.shutdown()
    began = time.monotonic()
    server.server_close()
    took = time.monotonic() - began
    # THEN close waited the bound, no longer, and names the thread still running
    assert 0.4 < took < 2.5
    assert len(server.unfinished) == 1 and server.unfinished[0].is_alive()
    server.unfinished[0].join(10)
    client.join(10)


def test_over_the_concurrency_limit_is_a_429_with_our_headers_and_a_request_log_record(
        capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a server with one stream slot, held by a stream
    release = threading.Event()

    class Holding(ScriptedProvider):
        def stream(self, request: ChatRequest, model: str,
                   deadline: Deadline) -> Iterator[Delta]:
            yield TextDelta("x")
            release.wait(10)
            yield Finish("stop")

    with running_dev_server(make_app(Holding()), max_streams=1) as url:
        with requests.post(url + CHAT, json={"prompt": "hi", "stream": True}, stream=True,
                           timeout=10) as held:
            assert held.status_code == 200
            capsys.readouterr()
            # WHEN a second request comes
            second = requests.post(url + CHAT, json={"prompt": "hi"}, timeout=10)
            release.set()
        out = capsys.readouterr().out
    # THEN it gets a 429 with Retry-After, and the headers every response carries
    assert second.status_code == 429
    assert second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert second.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" in second.headers
    assert "strict-transport-security" in second.headers
    request_id = second.headers["x-request-id"]
    # AND the request log record of any other response, under that request id
    records = [json.loads(line) for line in out.splitlines() if line.startswith('{"level"')]
    (record,) = [r for r in records if r["message"] == "request" and r["status"] == 429]
    assert record["request_id"] == request_id
    assert (record["method"], record["path"]) == ("POST", CHAT)
    assert record["error_code"] == "rate_limit_exceeded"


def test_the_command_line_sets_each_limit_with_its_documented_default() -> None:
    defaults = build_parser().parse_args([])
    assert (defaults.max_streams, defaults.max_connections, defaults.header_timeout,
            defaults.timeout) == (32, 256, 10, 300)
    chosen = build_parser().parse_args(["--max-streams", "4", "--max-connections", "8",
                                        "--header-timeout", "2.5", "--timeout", "60"])
    assert (chosen.max_streams, chosen.max_connections, chosen.header_timeout,
            chosen.timeout) == (4, 8, 2.5, 60)
    for bad in (["--timeout", "0"], ["--max-connections", "-1"], ["--header-timeout", "inf"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def test_huge_upload_is_a_413_the_client_can_read() -> None:
    with running_dev_server(make_app(max_body_bytes=1000)) as url:
        r = requests.post(url + CHAT, data=b"{" + b" " * 5_000_000 + b"}",
                          headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert r.json()["error"]["message"] == "Request body exceeds maximum size of 1000 bytes"


def test_chunked_upload_is_accepted() -> None:
    def gen() -> Iterator[bytes]:
        yield b'{"prompt": '
        yield b'"hi"}'

    with running_dev_server(make_app()) as url:
        r = requests.post(url + CHAT, data=gen(), headers={"content-type": "application/json"},
                          timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_invalid_utf8_body_is_a_400_invalid_json() -> None:
    with running_dev_server(make_app()) as url:
        r = requests.post(url + CHAT, data=b'{"prompt": "\xff"}',
                          headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"] == "Invalid JSON body"


def test_unknown_path_and_method_get_openai_error_bodies() -> None:
    with running_dev_server(make_app()) as url:
        missing = requests.get(url + "/nope", timeout=10)
        wrong = requests.delete(url + CHAT, timeout=10)
        health = requests.get(url + "/health", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert health.status_code == 200


def test_event_uses_base64_for_binary_bodies_like_function_urls() -> None:
    text = build_event("POST", "/v1/chat/completions?x=1", {"content-type": "application/json"},
                       b'{"a": 1}')
    assert (text["body"], text["isBase64Encoded"], text["rawQueryString"]) == (
        '{"a": 1}', False, "x=1")
    binary = build_event("POST", "/", {"content-type": "application/octet-stream"}, b"\x00\xff")
    assert binary["isBase64Encoded"] is True
    assert base64.b64decode(binary["body"]) == b"\x00\xff"
    assert "body" not in build_event("GET", "/v1/models", {}, b"")


def test_cors_is_answered_as_the_function_url_would() -> None:
    allowed, other = "http://localhost:3000", "https://evil.example"
    with running_dev_server(make_app(cors_origins=(allowed,))) as url:
        preflight = requests.options(f"{url}/v1/chat/completions", timeout=10, headers={
            "origin": allowed, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        answer = requests.post(f"{url}/v1/chat/completions", json={"prompt": "hi"},
                               headers={"origin": allowed}, timeout=10)
        refused = requests.options(f"{url}/v1/chat/completions", timeout=10, headers={
            "origin": other, "access-control-request-method": "POST"})
        plain = requests.post(f"{url}/v1/chat/completions", json={"prompt": "hi"},
                              headers={"origin": other}, timeout=10)
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == allowed
    assert preflight.headers["access-control-allow-methods"] == "POST, GET, DELETE"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == allowed
    assert "x-request-id" in answer.headers["access-control-expose-headers"]
    # an origin not on the list gets no CORS headers, and is refused (the Origin rule)
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    assert plain.status_code == 403 and "access-control-allow-origin" not in plain.headers
    assert plain.json()["error"]["code"] == "origin_not_allowed"


def test_dev_server_cors_matches_the_template() -> None:
    from pathlib import Path

    from streamgate import devserver
    from streamgate.keystore import load_template

    template = load_template(Path(__file__).resolve().parents[2] / "template.yaml")
    cors = template["Resources"]["StreamgateFunction"]["Properties"]["FunctionUrlConfig"][
        "Cors"]["Fn::If"][1]
    assert tuple(cors["AllowMethods"]) == devserver.CORS_ALLOW_METHODS
    assert tuple(cors["AllowHeaders"]) == devserver.CORS_ALLOW_HEADERS
    assert tuple(cors["ExposeHeaders"]) == devserver.CORS_EXPOSE_HEADERS
    assert cors["MaxAge"] == devserver.CORS_MAX_AGE
