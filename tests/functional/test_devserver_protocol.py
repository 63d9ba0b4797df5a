"""HTTP/1.x as the dev server speaks it, over raw sockets: every answer valid for the client's
version, every error our JSON error with our headers, request bodies framed strictly and never
read past the body limit or the request's time limit."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import running_dev_server
from tests.helpers import make_app
from tests.raw_http import (
    assert_our_error,
    closed_by_server,
    connect,
    exchange,
    read_response,
    trickling,
)

CHAT = b"/v1/chat/completions"
PROMPT = b'{"prompt": "hi"}'
STREAM = b'{"prompt": "hi", "stream": true}'


def _post(body: bytes, *, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    return (b"POST %s %s\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (CHAT, version, len(body), extra, body))


UNREADABLE = [
    pytest.param(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
                 id="request-line-over-64-KiB"),
    pytest.param(b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101))
                 + b"\r\n", 431, id="101-header-fields"),
    pytest.param(b"GET /health HTTP/1.1\r\nX-Long: " + b"y" * 70_000 + b"\r\n\r\n", 431,
                 id="header-line-over-64-KiB"),
    pytest.param(b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505, id="HTTP/2.0"),
    pytest.param(b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 505, id="HTTP/9.9"),
    # HTTP/0.9 has no status line to carry an error: the answer is HTTP/1.1 (see devserver.py).
    pytest.param(b"GET /health\r\n", 400, id="HTTP/0.9"),
    pytest.param(b"GET /health HTTP/1.x\r\nHost: x\r\n\r\n", 400, id="version-not-a-number"),
    pytest.param(b"HELLO\r\n\r\n", 400, id="one-word"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400,
                 id="tls-client-hello"),
    pytest.param(b"GET / / HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="four-words"),
    pytest.param(b"G(T /health HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="method-not-a-token"),
    pytest.param(b"GET http://[/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="target-not-a-url"),
]


@pytest.mark.parametrize(("request_bytes", "status"), UNREADABLE)
def test_a_request_the_server_cannot_read_gets_our_json_error_as_valid_http_1_1(
        request_bytes: bytes, status: int) -> None:
    # GIVEN the dev server
    with running_dev_server(make_app()) as url:
        # WHEN a client sends a request it cannot read
        response, closed = exchange(url, request_bytes)
    # THEN the answer is an HTTP/1.1 response with our JSON error and headers, and the
    # connection is closed after it
    assert_our_error(response, status, "bad_http_request")
    assert response.headers["connection"] == "close"
    assert closed


def test_an_http_1_0_client_gets_its_stream_raw_and_ended_by_closing_the_connection() -> None:
    # GIVEN the dev server
    with running_dev_server(make_app()) as url:
        # WHEN an HTTP/1.0 client asks for a stream (and even offers to keep the connection)
        response, closed = exchange(url, _post(STREAM, version=b"HTTP/1.0",
                                               extra=b"Connection: keep-alive\r\n"))
    # THEN no chunked encoding (HTTP/1.0 has none): the events come raw and the server closes
    # the connection at their end
    assert response.status == 200
    assert "transfer-encoding" not in response.headers
    assert "content-length" not in response.headers
    assert response.headers["connection"] == "close"
    events = [line for line in response.body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]" and len(events) >= 3
    assert closed


def test_an_http_1_0_client_gets_a_json_answer_with_its_length_and_a_close() -> None:
    with running_dev_server(make_app()) as url:
        response, closed = exchange(url, _post(PROMPT, version=b"HTTP/1.0"))
    assert response.status == 200 and not response.chunked
    assert int(response.headers["content-length"]) == len(response.body)
    assert response.json()["object"] == "chat.completion"
    assert response.headers["connection"] == "close" and closed


def test_an_http_1_1_client_gets_a_chunked_stream_and_keeps_its_connection() -> None:
    with running_dev_server(make_app()) as url, connect(url) as sock:
        # WHEN one connection carries a stream and then another request
        sock.sendall(_post(STREAM))
        stream = read_response(sock)
        sock.sendall(_post(PROMPT))
        second = read_response(sock)
    # THEN the stream was chunked, and the connection served the next request
    assert stream.chunked and stream.body.endswith(b"data: [DONE]\n\n")
    assert second.status == 200 and second.json()["object"] == "chat.completion"


def test_a_cors_preflight_answer_has_no_content_length() -> None:
    origin = b"http://localhost:3000"
    with running_dev_server(make_app(cors_origins=(origin.decode(),))) as url, \
            connect(url) as sock:
        sock.sendall(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: %s\r\n"
                     b"Access-Control-Request-Method: POST\r\n\r\n" % origin)
        preflight = read_response(sock)
        sock.sendall(_post(PROMPT))  # the connection is still usable
        after = read_response(sock)
    assert preflight.status == 204 and "content-length" not in preflight.headers  # RFC 9110
    assert after.status == 200


def test_every_cors_preflight_answer_carries_its_own_request_id() -> None:
    origin = b"http://localhost:3000"
    preflight = (b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: %s\r\n"
                 b"Access-Control-Request-Method: POST\r\n\r\n" % origin)
    with running_dev_server(make_app(cors_origins=(origin.decode(),))) as url, \
            connect(url) as sock:
        sock.sendall(preflight)
        first = read_response(sock)
        sock.sendall(preflight)
        second = read_response(sock)
    assert first.status == second.status == 204
    assert first.headers["x-request-id"] and second.headers["x-request-id"]
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize(("header_timeout_s", "request_timeout_s", "message"), [
    (1, 30, "The request headers did not arrive within 1 s"),
    (30, 1, "No request header data arrived for 1 s"),
], ids=["header-timeout", "read-stalled"])
def test_a_request_whose_headers_stop_coming_gets_a_408_and_the_connection_closed(
        header_timeout_s: float, request_timeout_s: float, message: str) -> None:
    # GIVEN the dev server with one of its two limits on a request head at 1 s
    with running_dev_server(make_app(), header_timeout_s=header_timeout_s,
                            request_timeout_s=request_timeout_s) as url, \
            connect(url, timeout=15) as sock:
        # WHEN a request line arrives, then half a header, then nothing
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Half: ")
        started = time.monotonic()
        response = read_response(sock)
        waited = time.monotonic() - started
        closed = closed_by_server(sock)
    # THEN once that limit passes, the client gets our JSON 408 and the connection is closed
    error = assert_our_error(response, 408, "bad_http_request")
    assert error["message"] == message
    assert response.headers["connection"] == "close" and closed
    assert 0.5 < waited < 5


def test_a_request_line_cut_off_by_the_header_timeout_gets_no_answer() -> None:
    # GIVEN a 1 s header timeout
    with running_dev_server(make_app(), header_timeout_s=1, request_timeout_s=30) as url, \
            connect(url, timeout=15) as sock:
        # WHEN only part of a request line arrives
        sock.sendall(b"GET /hea")
        started = time.monotonic()
        # THEN the server closes the connection without a word: that is no request yet
        assert sock.recv(1024) == b""
        assert 0.5 < time.monotonic() - started < 5


def test_an_empty_line_before_a_request_is_ignored() -> None:
    with running_dev_server(make_app()) as url, connect(url) as sock:
        sock.sendall(b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = read_response(sock)
    assert response.status == 200


def _chunked(raw: bytes, *, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n%s\r\n%s" % (CHAT, extra, raw))


@pytest.mark.parametrize("size", [b"7fffffff", b"FFFFFFFFFFFFFFFF"])
def test_a_chunk_announced_over_the_body_limit_is_a_413_before_its_data_is_read(
        size: bytes) -> None:
    # GIVEN a 1000-byte body limit
    with running_dev_server(make_app(max_body_bytes=1000)) as url, \
            connect(url, timeout=5) as sock:
        # WHEN a chunk announces more, and only a little of it is sent
        sock.sendall(_chunked(size + b"\r\n" + b"x" * 100))
        # THEN the 413 comes at once, with our JSON, and the connection is closed
        response = read_response(sock)
        assert_our_error(response, 413, "request_too_large")
        assert response.json()["error"]["message"] == \
            "Request body exceeds maximum size of 1000 bytes"
        assert response.headers["connection"] == "close"
        assert closed_by_server(sock)


def test_chunks_adding_up_past_the_body_limit_are_a_413() -> None:
    chunk = b"190\r\n" + b" " * 400 + b"\r\n"
    with running_dev_server(make_app(max_body_bytes=1000)) as url:
        response, closed = exchange(url, _chunked(chunk * 3 + b"0\r\n\r\n"))
    assert_our_error(response, 413, "request_too_large")
    assert closed


MALFORMED_CHUNKS = [
    pytest.param(b"-1\r\nabc", id="negative"),
    pytest.param(b"zz\r\nabc", id="not-hex"),
    pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="0x-prefix"),
    pytest.param(b" 5\r\nhello\r\n0\r\n\r\n", id="leading-space"),
    pytest.param(b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", id="underscore"),
    pytest.param(b"00000000000000005\r\nhello\r\n0\r\n\r\n", id="17-digits"),
    pytest.param(b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n", id="size-line-over-4-KiB"),
    pytest.param(b"5\nhello\r\n0\r\n\r\n", id="size-line-without-CR"),
    pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="no-CRLF-after-data"),
    pytest.param(b"5\r\nhello\r\n0\r\nX-Trailer: y\n\r\n", id="trailer-without-CR"),
]


@pytest.mark.parametrize("raw", MALFORMED_CHUNKS)
def test_a_malformed_chunked_body_is_a_400_with_our_json(raw: bytes) -> None:
    # GIVEN the dev server; WHEN a chunked body is malformed (and the client waits)
    with running_dev_server(make_app()) as url, connect(url, timeout=5) as sock:
        sock.sendall(_chunked(raw))
        response = read_response(sock)
        # THEN a 400 with our JSON and headers, then the connection is closed
        assert_our_error(response, 400, "bad_http_request")
        assert closed_by_server(sock)


UNTRUSTED_FRAMING = [
    pytest.param(_post(PROMPT, extra=b"Transfer-Encoding: chunked\r\n"), id="length-and-chunked"),
    pytest.param(_chunked(b"0\r\n\r\n").replace(b"chunked", b"gzip, chunked"), id="gzip"),
    pytest.param(_chunked(b"0\r\n\r\n").replace(b"HTTP/1.1", b"HTTP/1.0"), id="chunked-in-1.0"),
    pytest.param(_post(PROMPT).replace(b"Content-Length: 16", b"Content-Length: abc"),
                 id="length-not-a-number"),
    pytest.param(_post(PROMPT).replace(b"Content-Length: 16", b"Content-Length: -16"),
                 id="negative-length"),
    pytest.param(_post(PROMPT, extra=b"Content-Length: 17\r\n"), id="two-lengths"),
]


@pytest.mark.parametrize("request_bytes", UNTRUSTED_FRAMING)
def test_a_body_whose_framing_cannot_be_trusted_is_a_400_with_our_json(
        request_bytes: bytes) -> None:
    with running_dev_server(make_app()) as url:
        response, closed = exchange(url, request_bytes)
    assert_our_error(response, 400, "bad_http_request")
    assert closed


def test_a_chunked_body_with_extensions_and_trailers_is_read_exactly() -> None:
    body = json.dumps({"prompt": "hi"}).encode()
    raw = (b"%x;name=value\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Checksum: 1\r\n\r\n"
           % (5, body[:5], len(body) - 5, body[5:]))
    with running_dev_server(make_app()) as url, connect(url) as sock:
        # WHEN a chunked request with extensions and trailers is followed by another request
        sock.sendall(_chunked(raw) + _post(PROMPT))
        first, second = read_response(sock), read_response(sock)
    # THEN both are answered: the body ended exactly where its framing said
    assert first.status == 200 and second.status == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_trickled_one_byte_at_a_time_is_cut_off_at_the_request_time_limit(
        framing: str, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a 1.5 s request time limit, and reads that may each stall for 30 s
    with running_dev_server(make_app(), timeout_s=1.5, request_timeout_s=30) as url, \
            connect(url, timeout=15) as sock:
        head = (_post(b"x" * 1000)[:-1000] if framing == "content-length"
                else _chunked(b"3e8\r\n"))
        sock.sendall(head)
        started = time.monotonic()
        # WHEN the body keeps trickling, a byte every 0.1 s
        with trickling(sock):
            # THEN the server hangs up near the time limit
            assert closed_by_server(sock)
            assert time.monotonic() - started < 6
            # AND the request is recorded as a 408, though no answer could be sent
            assert _request_records(capsys) == [(408, "bad_http_request")]


def _request_records(capsys: pytest.CaptureFixture[str]) -> list[tuple[int, str | None]]:
    """(status, error code) of the request log records written so far, waiting up to 5 s for
    the first one (the server may write it just after closing the connection)."""
    out, waited = "", time.monotonic() + 5
    while '"message":"request"' not in out and time.monotonic() < waited:
        time.sleep(0.05)
        out += capsys.readouterr().out
    records = [json.loads(line) for line in out.splitlines() if line.startswith('{"level"')]
    return [(r["status"], r["error_code"]) for r in records if r["message"] == "request"]


def test_an_upload_over_the_limit_announced_with_expect_100_continue_gets_413_at_once() -> None:
    with running_dev_server(make_app(max_body_bytes=1000)) as url, \
            connect(url, timeout=5) as sock:
        # WHEN a client announces 10 MB and waits for 100 Continue before sending it
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n")
        # THEN the final answer is the 413, not an invitation to send 10 MB
        response = read_response(sock)
    assert_our_error(response, 413, "request_too_large")
