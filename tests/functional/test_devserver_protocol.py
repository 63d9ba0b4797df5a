"""HTTP/1.x as the dev server speaks it, over raw sockets: every answer valid for the client's
version, every error our JSON error with our headers."""

from __future__ import annotations

import pytest

from tests.conftest import running_dev_server
from tests.helpers import make_app
from tests.raw_http import (
    assert_our_error,
    connect,
    exchange,
    read_response,
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
    with running_dev_server(make_app(), cors_origins=(origin.decode(),)) as url, \
            connect(url) as sock:
        sock.sendall(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: %s\r\n"
                     b"Access-Control-Request-Method: POST\r\n\r\n" % origin)
        preflight = read_response(sock)
        sock.sendall(_post(PROMPT))  # the connection is still usable
        after = read_response(sock)
    assert preflight.status == 204 and "content-length" not in preflight.headers  # RFC 9110
    assert after.status == 200


def test_an_empty_line_before_a_request_is_ignored() -> None:
    with running_dev_server(make_app()) as url, connect(url) as sock:
        sock.sendall(b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = read_response(sock)
    assert response.status == 200
