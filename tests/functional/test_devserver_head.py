"""HEAD wherever GET works (RFC 9110 §9.3.2; Claude Code sends ``HEAD /`` before every run):
GET's status and headers without a body, through the handler (what the Lambda loop writes) and
the dev server over a raw socket."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from tests.conftest import running_dev_server
from tests.helpers import body_bytes, chat_event, make_app
from tests.raw_http import connect, read_response

GET_PATHS = ["/", "/v1/models", "/health"]


def _handle(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    app = make_app(playground=True)
    response = app.handle(chat_event(None, method=method, path=path))
    raw = body_bytes(response)
    response.close()
    return response.status, response.headers, raw


def _without_id(headers: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if k != "x-request-id"}


@pytest.mark.parametrize("path", GET_PATHS)
def test_head_on_a_path_that_answers_get_is_gets_answer_without_its_body(path: str) -> None:
    # GIVEN the handler, playground on
    # WHEN the same path is asked for with GET and with HEAD
    get_status, get_headers, get_body = _handle("GET", path)
    head_status, head_headers, head_body = _handle("HEAD", path)
    # THEN HEAD gets GET's status and headers, and no body at all
    assert get_status == 200 and get_body
    assert (head_status, _without_id(head_headers)) == (get_status, _without_id(get_headers))
    assert head_body == b""


def test_head_where_only_post_works_is_a_405_without_a_body() -> None:
    status, headers, body = _handle("HEAD", "/v1/chat/completions")
    assert status == 405 and headers["allow"] == "POST"
    assert headers["content-type"] == "application/json" and body == b""


@pytest.mark.parametrize("path", GET_PATHS)
def test_a_405_on_a_get_path_names_head_as_allowed_too(path: str) -> None:
    status, headers, _ = _handle("POST", path)
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_head_of_an_unknown_path_is_a_404_without_a_body() -> None:
    status, _, body = _handle("HEAD", "/nowhere")
    assert status == 404 and body == b""


@pytest.mark.parametrize("path", GET_PATHS)
def test_the_dev_server_answers_head_without_a_body_and_keeps_the_connection(
        path: str) -> None:
    with running_dev_server(make_app(playground=True)) as url, connect(url) as sock:
        # GIVEN a HEAD and then a GET, pipelined on one connection
        sock.sendall(b"HEAD %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
        # WHEN the answers are read: the HEAD's head, then what follows it
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            got = sock.recv(1)
            assert got, head
            head += got
        after = read_response(sock)
    # THEN the HEAD got 200 with GET's headers but no body and no length it could not know
    # (RFC 9110 §8.6), and the very next bytes were the GET's answer
    lines = head.decode("latin-1").split("\r\n")
    fields = {n.lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:])
              if n}
    assert lines[0] == "HTTP/1.1 200 OK"
    assert fields["x-request-id"] and "content-length" not in fields
    assert "transfer-encoding" not in fields and "connection" not in fields
    assert after.status == 200 and after.json()["status"] == "ok"


def test_requests_head_reads_the_dev_servers_answer() -> None:
    with running_dev_server(make_app(playground=True)) as url:
        answers = [requests.head(url + path, timeout=10) for path in GET_PATHS]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.content for a in answers] == [b"", b"", b""]
    assert answers[0].headers["content-type"] == "text/html; charset=utf-8"
