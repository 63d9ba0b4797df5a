"""The relay's own chunked reader, SSE decoder and stream writers against hostile peers: an
upstream that frames its chunked body badly, slowly, endlessly or with bytes after its end
(over TCP and TLS), text cut mid-character or not UTF-8 at all, clients that stop reading or
leave mid-stream (through the dev server and the Lambda loop), and keep-alive reuse after all
of it. Every answer is bounded in time, bad upstream data is an ``upstream_error`` never
relayed, and a stream whose reader has gone frees its upstream connection at once."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamgate.deadline import Deadline
from streamgate.handler import App, Response
from streamgate.providers import Finish, TextDelta, Usage
from streamgate.runtime import run
from tests.conftest import openai_app, running_dev_server
from tests.fake_http import RawPeer, read_request
from tests.fake_openai import chunk, sse, text_stream
from tests.fake_runtime_api import FakeRuntimeAPI, Invoke
from tests.functional.test_upstream_tls import tls_files, trusting  # noqa: F401 - fixtures
from tests.helpers import ScriptedProvider, body_bytes, chat_event, make_app, sse_json
from tests.raw_http import connect, read_response

USER = [{"role": "user", "content": "hi"}]
JSON = {"accept": "application/json"}
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")
def _app(url: str, **settings: Any) -> App:
    return openai_app(url, **{"upstream_max_attempts": 1, **settings})


def _ask(app: App, *, path: str = "/v1/chat/completions", body: dict[str, Any] | None = None,
         json_errors: bool = True, deadline: Deadline | None = None,
         ) -> tuple[Response, bytes, float]:
    started = time.monotonic()
    doc = body or {"model": "upstream-model", "messages": USER, "stream": True}
    response = app.handle(chat_event(doc, path=path, headers=JSON if json_errors else None),
                          deadline=deadline)
    raw = body_bytes(response)
    response.close()
    return response, raw, time.monotonic() - started


def _framed(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _text(raw: bytes) -> str:
    return "".join(d["choices"][0]["delta"].get("content") or ""
                   for d in sse_json(raw) if d.get("choices"))


def _peer(*answers: Callable[[socket.socket], None]) -> RawPeer:
    """A raw upstream answering the requests of each connection with ``answers`` in turn
    (shared across connections), then holding the connection open for at most 5 s."""
    script = list(answers)
    lock = threading.Lock()

    def serve(sock: socket.socket) -> None:
        while True:
            if not read_request(sock):
                return
            with lock:
                answer = script.pop(0) if script else None
            if answer is None:
                return
            answer(sock)

    return RawPeer(serve)


def _hold(sock: socket.socket, seconds: float = 5.0) -> None:
    """Keep the connection open, reading nothing, until the client closes it (bounded)."""
    sock.settimeout(seconds)
    with contextlib.suppress(OSError):
        sock.recv(1, socket.MSG_PEEK)


GOOD = text_stream("Hello", " world")


# -- chunk sizes, size lines, CR, data that never comes ----------------------------------------

def test_a_sixteen_digit_chunk_size_streams_and_a_seventeen_digit_one_is_an_upstream_error(
) -> None:
    # GIVEN an upstream whose first chunk claims 2**64-1 bytes (then sends a whole stream in it
    # and stalls), and one whose size has 17 hex digits
    def huge(sock: socket.socket) -> None:
        sock.sendall(HEAD + b"ffffffffffffffff\r\n" + GOOD)
        _hold(sock)

    def too_long(sock: socket.socket) -> None:
        sock.sendall(HEAD + b"1" * 17 + b"\r\n" + GOOD)
        _hold(sock)

    with _peer(huge) as peer:
        response, raw, waited = _ask(_app(peer.url))
    # THEN the first is relayed whole, its endless chunk not waited for past finish's second
    assert response.status == 200 and _text(raw) == "Hello world"
    assert raw.endswith(b"data: [DONE]\n\n") and waited < 3
    with _peer(too_long) as peer:
        response, raw, waited = _ask(_app(peer.url))
    # and the second is an upstream_error at once, nothing of it relayed
    assert response.status == 502 and json.loads(raw)["error"]["type"] == "upstream_error"
    assert b"Hello" not in raw and waited < 2


@pytest.mark.parametrize("line", [b"5\rdata", b"0x5", b"-1", b"5 5", b"", b"\xff"])
def test_a_malformed_chunk_size_line_is_an_upstream_error(line: bytes) -> None:
    # GIVEN an upstream whose first size line is not hex digits (a bare CR inside, a 0x, ...)
    def answer(sock: socket.socket) -> None:
        sock.sendall(HEAD + line + b"\r\n" + GOOD)
        _hold(sock)

    with _peer(answer) as peer:
        response, raw, waited = _ask(_app(peer.url))
    # THEN upstream_error at once, nothing of the body relayed
    assert response.status == 502 and json.loads(raw)["error"]["type"] == "upstream_error"
    assert b"Hello" not in raw and waited < 2


def test_an_endless_size_line_of_bare_crs_is_cut_at_the_line_bound_not_buffered() -> None:
    # GIVEN an upstream that sends CRs and digits but never a LF, 1 MB of them
    def answer(sock: socket.socket) -> None:
        sock.sendall(HEAD)
        for _ in range(64):
            sock.sendall(b"5\r" * 8192)
        _hold(sock)

    with _peer(answer) as peer:
        response, raw, waited = _ask(_app(peer.url, upstream_first_token_timeout_s=5))
    # THEN upstream_error long before the first-token timeout
    assert response.status == 502 and json.loads(raw)["error"]["type"] == "upstream_error"
    assert waited < 2


def test_a_size_line_trickled_a_byte_at_a_time_does_not_outlast_the_first_token_timeout(
) -> None:
    # GIVEN an upstream that sends a size line's digits one every 0.1 s, never ending it
    def answer(sock: socket.socket) -> None:
        sock.sendall(HEAD)
        for _ in range(50):
            sock.sendall(b"0")
            time.sleep(0.1)

    with _peer(answer) as peer:
        response, raw, waited = _ask(_app(peer.url, upstream_first_token_timeout_s=0.6))
    # THEN the wait ends at the first-token timeout: framing bytes are not output
    assert response.status == 504
    assert json.loads(raw)["error"]["code"] == "upstream_timeout"
    assert 0.5 <= waited < 2


def test_chunk_extensions_trickled_after_the_first_token_do_not_outlast_the_idle_timeout(
) -> None:
    # GIVEN a first token, then one-byte chunks of SSE comment bytes with long extensions
    def answer(sock: socket.socket) -> None:
        sock.sendall(HEAD + _framed(sse(chunk("a", role="assistant"), done=False)))
        for _ in range(50):
            sock.sendall(b"1;" + b"e" * 4000 + b"\r\n:\r\n")
            time.sleep(0.1)

    with _peer(answer) as peer:
        response, raw, waited = _ask(_app(peer.url, upstream_idle_timeout_s=0.6))
    # THEN the idle timeout ends the stream: framing and comments are not output
    assert response.status == 200 and _text(raw) == "a"
    assert sse_json(raw)[-1]["error"]["code"] == "upstream_timeout"
    assert waited < 2.5


def test_a_chunk_whose_data_never_comes_ends_at_the_idle_timeout() -> None:
    # GIVEN a chunk announced at 4 KB of which one event arrives, then nothing
    first = sse(chunk("a", role="assistant"), done=False)

    def answer(sock: socket.socket) -> None:
        sock.sendall(HEAD + b"1000\r\n" + first)
        _hold(sock)

    with _peer(answer) as peer:
        response, raw, waited = _ask(_app(peer.url, upstream_idle_timeout_s=0.5))
    # THEN what came is relayed, and the stream ends with our timeout event in time
    assert response.status == 200 and _text(raw) == "a"
    assert sse_json(raw)[-1]["error"]["code"] == "upstream_timeout"
    assert waited < 2


def test_data_not_followed_by_crlf_is_an_upstream_error_not_relayed() -> None:
    # GIVEN a chunk whose data runs past its size into the next event
    event = sse(chunk("a", role="assistant"), done=False)

    def answer(sock: socket.socket) -> None:
        sock.sendall(HEAD + b"%x\r\n" % (len(event) - 4) + event + b"\r\n" + _framed(GOOD))
        _hold(sock)

    with _peer(answer) as peer:
        response, raw, _ = _ask(_app(peer.url))
    assert response.status == 502 and json.loads(raw)["error"]["type"] == "upstream_error"


# -- the end of the body, trailers, bytes after it, keep-alive ---------------------------------

def test_trailers_that_never_end_do_not_hold_the_answer_and_the_connection_is_not_kept(
) -> None:
    # GIVEN an upstream whose whole stream is followed by the last chunk and then trailer
    # fields, one every 0.05 s, never ending the trailer section
    def endless(sock: socket.socket) -> None:
        sock.sendall(HEAD + _framed(GOOD) + b"0\r\n")
        for n in range(100):
            try:
                sock.sendall(b"x-%d: y\r\n" % n)
            except OSError:
                return
            time.sleep(0.05)

    def good(sock: socket.socket) -> None:
        sock.sendall(HEAD + _framed(GOOD) + b"0\r\n\r\n")

    with _peer(endless, good) as peer:
        app = _app(peer.url)
        first, raw1, waited = _ask(app)
        second, raw2, _ = _ask(app)
        accepted = peer.accepted
    # THEN the answer is whole, within about finish's second; the next request takes a new
    # connection (the one in its trailers is not trusted) and is whole too
    assert first.status == 200 and _text(raw1) == "Hello world" and waited < 2.5
    assert second.status == 200 and _text(raw2) == "Hello world"
    assert accepted == 2


def test_a_flood_of_trailer_fields_is_bounded() -> None:
    # GIVEN a whole error body followed by 1 MB of trailer fields, sent as fast as possible
    body = json.dumps({"error": {"message": "bad model", "type": "invalid_request_error"}})

    def answer(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n" + _framed(body.encode()) + b"0\r\n")
        for _ in range(64):
            sock.sendall(b"x-trailer: " + b"t" * 1000 + b"\r\n" * 1)
            sock.sendall(b"x: y\r\n" * 2000)
        _hold(sock)

    with _peer(answer) as peer:
        response, raw, waited = _ask(_app(peer.url))
    # THEN the answer is still the upstream's status, at once: the trailer bound ends the
    # read (the body it cut off is not trusted, so the status alone speaks)
    assert response.status == 400 and waited < 2
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"


def test_a_last_chunk_that_comes_a_read_after_done_still_lets_the_connection_be_reused(
) -> None:
    # GIVEN an upstream that sends [DONE] in a chunk, and the last chunk 0.3 s later
    def later(sock: socket.socket) -> None:
        sock.sendall(HEAD + _framed(GOOD))
        time.sleep(0.3)
        sock.sendall(b"0\r\n")
        time.sleep(0.1)
        sock.sendall(b"\r\n")

    with _peer(later, later) as peer:
        app = _app(peer.url)
        first, raw1, _ = _ask(app)
        second, raw2, _ = _ask(app)
        accepted = peer.accepted
    # THEN both answers are whole, over one connection
    assert (first.status, _text(raw1)) == (200, "Hello world")
    assert (second.status, _text(raw2)) == (200, "Hello world")
    assert accepted == 1


POISON = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
          % len(text_stream("POISONED")) + text_stream("POISONED"))


@pytest.mark.parametrize("gap", [0.0, 0.2], ids=["same-segment", "later-segment"])
def test_bytes_pipelined_after_the_last_chunk_never_answer_the_next_request(gap: float) -> None:
    # GIVEN an upstream that follows its last chunk with a whole second response, in the same
    # segment or a later one, before the gateway asks anything else
    def poisoner(sock: socket.socket) -> None:
        sock.sendall(HEAD + _framed(GOOD) + b"0\r\n\r\n" + (b"" if gap else POISON))
        if gap:
            time.sleep(gap)
            sock.sendall(POISON)

    def good(sock: socket.socket) -> None:
        sock.sendall(HEAD + _framed(text_stream("fresh")) + b"0\r\n\r\n")

    with _peer(poisoner, good, good) as peer:
        app = _app(peer.url)
        first, raw1, _ = _ask(app)
        time.sleep(gap + 0.1)
        second, raw2, _ = _ask(app)
    # THEN the next request is answered by the upstream's real answer to it, never by the
    # pipelined bytes
    assert (first.status, _text(raw1)) == (200, "Hello world")
    assert second.status == 200 and b"POISONED" not in raw2
    assert _text(raw2) == "fresh"


def test_an_early_last_chunk_before_done_is_an_upstream_error() -> None:
    def answer(sock: socket.socket) -> None:
        sock.sendall(HEAD + _framed(sse(chunk("a", role="assistant"), done=False))
                     + b"0\r\n\r\n")
        _hold(sock)

    with _peer(answer) as peer:
        response, raw, waited = _ask(_app(peer.url))
    assert response.status == 200 and _text(raw) == "a"
    assert sse_json(raw)[-1]["error"]["type"] == "upstream_error" and waited < 2
    assert b"data: [DONE]" not in raw


# -- other bodies: Content-Length, close-delimited, error statuses -----------------------------

def test_an_sse_body_with_a_content_length_is_relayed_and_its_connection_reused() -> None:
    def answer(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"content-length: %d\r\n\r\n" % len(GOOD) + GOOD[:50])
        time.sleep(0.1)
        sock.sendall(GOOD[50:])

    with _peer(answer, answer) as peer:
        app = _app(peer.url)
        first, raw1, _ = _ask(app)
        second, raw2, _ = _ask(app)
        accepted = peer.accepted
    assert (first.status, _text(raw1)) == (200, "Hello world")
    assert (second.status, _text(raw2)) == (200, "Hello world")
    assert accepted == 1


CLOSING = {
    "close-delimited": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                       b"connection: close\r\n\r\n",
    "chunked-and-close": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"connection: close\r\ntransfer-encoding: chunked\r\n\r\n",
    "http10-with-length": b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n"
                          b"content-length: %d\r\n\r\n" % len(GOOD),
}


@pytest.mark.parametrize("head", CLOSING.values(), ids=CLOSING.keys())
def test_an_sse_answer_that_closes_the_connection_is_relayed(head: bytes) -> None:
    # GIVEN an upstream whose answer ends the connection (Connection: close, or HTTP/1.0):
    # ordinary HTTP, what many proxies and small servers send
    def answer(sock: socket.socket) -> None:
        sock.sendall(head + (_framed(GOOD) + b"0\r\n\r\n" if b"chunked" in head else GOOD))
        sock.shutdown(socket.SHUT_WR)
        _hold(sock, 2)

    with _peer(answer) as peer:
        response, raw, waited = _ask(_app(peer.url))
    # THEN the stream is relayed (never a crash, never an internal_error)
    assert (response.status, _text(raw)) == (200, "Hello world")
    assert waited < 2


def test_a_whole_answer_closed_after_its_last_chunk_without_the_final_crlf_is_whole() -> None:
    # GIVEN a sloppy server: a non-streaming answer whose chunked body ends "0\r\n", then
    # the connection closes without the blank line that ends the trailer section
    doc = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                      "model": "upstream-model", "choices": [{
                          "index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "Hello world"}}]})

    def answer(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n" + _framed(doc.encode()) + b"0\r\n")
        sock.shutdown(socket.SHUT_WR)
        _hold(sock, 2)

    with _peer(answer, answer) as peer:
        app = _app(peer.url)
        response, raw, waited = _ask(app, body={"model": "upstream-model", "messages": USER})
        again, raw2, _ = _ask(app, body={"model": "upstream-model", "messages": USER})
        accepted = peer.accepted
    # THEN the body counts as whole, as http.client took it, and the connection is not reused
    assert response.status == 200 and waited < 2
    assert json.loads(raw)["choices"][0]["message"]["content"] == "Hello world"
    assert again.status == 200 and json.loads(raw2)["choices"][0]["message"]["content"] == (
        "Hello world")
    assert accepted == 2


def test_an_error_status_that_closes_the_connection_is_the_upstreams_status() -> None:
    def answer(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                     b"connection: close\r\ncontent-length: 2\r\n\r\n{}")
        sock.shutdown(socket.SHUT_WR)
        _hold(sock, 2)

    with _peer(answer) as peer:
        response, raw, _ = _ask(_app(peer.url))
    assert response.status == 503
    assert json.loads(raw)["error"]["code"] == "upstream_unavailable"


def test_a_chunked_error_body_in_one_byte_chunks_is_read_as_the_upstream_error() -> None:
    # GIVEN a 404 whose JSON body comes one byte per chunk, cut across several writes
    body = json.dumps({"error": {"message": "no such model", "type": "invalid_request_error",
                                 "code": "model_not_found"}}).encode()
    framed = b"".join(_framed(body[i:i + 1]) for i in range(len(body))) + b"0\r\n\r\n"

    def answer(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for i in range(0, len(framed), 7):
            sock.sendall(framed[i:i + 7])
        _hold(sock)

    with _peer(answer) as peer:
        response, raw, waited = _ask(_app(peer.url))
    assert response.status == 404 and waited < 2
    assert json.loads(raw)["error"]["message"] == "Upstream: no such model"


def test_a_chunked_error_body_with_broken_framing_is_still_the_status_never_its_bytes() -> None:
    def answer(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\nzz\r\nSECRET-GARBAGE\r\n")
        _hold(sock)

    with _peer(answer) as peer:
        response, raw, waited = _ask(_app(peer.url))
    assert response.status == 502 and b"SECRET" not in raw and waited < 2


# -- text: UTF-8 across reads, invalid bytes, lone surrogates ----------------------------------

def test_multibyte_text_cut_into_one_byte_chunks_across_reads_arrives_intact() -> None:
    # GIVEN text of 2-, 3- and 4-byte characters, each byte its own chunk, the chunks sent in
    # writes that cut characters (and chunk framing) anywhere
    words = ("héllo ", "世界 ", "🎉🎉", " ß")
    body = text_stream(*words)
    framed = b"".join(_framed(body[i:i + 1]) for i in range(len(body))) + b"0\r\n\r\n"

    def answer(sock: socket.socket) -> None:
        sock.sendall(HEAD)
        for i in range(0, len(framed), 997):
            sock.sendall(framed[i:i + 997])
            time.sleep(0.01)

    with _peer(answer) as peer:
        response, raw, _ = _ask(_app(peer.url))
    # THEN every character comes out whole
    assert (response.status, _text(raw)) == (200, "".join(words))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
def test_lone_surrogates_and_invalid_utf8_from_the_upstream_become_replacement_characters(
    path: str,
) -> None:
    # GIVEN content with a JSON-escaped lone surrogate and raw bytes that are not UTF-8
    good = sse(chunk("", role="assistant"), done=False)
    bad = (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
           b'"choices":[{"index":0,"delta":{"content":"a\\ud800b\\udfffc"},'
           b'"finish_reason":null}]}\n\n'
           b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
           b'"choices":[{"index":0,"delta":{"content":"d\xff\xfee\xe2\x82"},'
           b'"finish_reason":null}]}\n\n')
    rest = sse(chunk(finish="stop"))

    def answer(sock: socket.socket) -> None:
        sock.sendall(HEAD + _framed(good) + _framed(bad[:-70]))
        time.sleep(0.05)
        sock.sendall(_framed(bad[-70:]) + _framed(rest) + b"0\r\n\r\n")

    body: dict[str, Any] = {"model": "upstream-model", "stream": True}
    if path == "/v1/responses":
        body["input"] = "hi"
    else:
        body["messages"] = USER
        body["max_tokens"] = 50
    with _peer(answer) as peer:
        response, raw, _ = _ask(_app(peer.url), path=path, body=body)
    # THEN the answer is valid UTF-8, every bad code point a U+FFFD, and no error
    assert response.status == 200
    text = raw.decode("utf-8")
    assert "a\ufffdb\ufffdc" in text and "d\ufffd\ufffde\ufffd" in text
    assert "upstream_error" not in text and "api_error" not in text


# -- TLS ----------------------------------------------------------------------------------------

@pytest.fixture
def tls_peer(tls_files: tuple[Path, Path, Path]) -> Iterator[tuple[str, list[int]]]:  # noqa: F811
    """An HTTPS upstream on 127.0.0.1 that streams each answer in odd pieces (size lines and
    characters cut, the last chunk a read after [DONE]), keep-alive; yields its URL and the
    count of connections it accepted."""
    _, cert_file, key_file = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    body = text_stream("sé", "cure ", "🎉")
    framed = HEAD + b"".join(_framed(body[i:i + 5]) for i in range(0, len(body), 5))
    accepted: list[int] = []

    def serve(raw: socket.socket) -> None:
        accepted.append(1)
        raw.settimeout(5)
        with context.wrap_socket(raw, server_side=True) as sock:
            while read_request(sock):  # type: ignore[arg-type]
                for i in range(0, len(framed), 333):
                    sock.sendall(framed[i:i + 333])
                time.sleep(0.2)
                sock.sendall(b"0\r\n\r\n")

    with RawPeer(lambda s: serve(s)) as peer:
        yield f"https://127.0.0.1:{peer.port}/v1", accepted


@pytest.mark.usefixtures("trusting")
def test_a_chunked_stream_over_tls_is_unframed_and_its_connection_reused(
    tls_peer: tuple[str, list[int]],
) -> None:
    url, accepted = tls_peer
    app = _app(url)
    first, raw1, _ = _ask(app)
    second, raw2, _ = _ask(app)
    assert (first.status, _text(raw1)) == (200, "sécure 🎉")
    assert (second.status, _text(raw2)) == (200, "sécure 🎉")
    assert len(accepted) == 1


# -- retries -------------------------------------------------------------------------------------

def test_a_503_before_the_first_byte_is_retried_and_a_cut_after_it_is_not() -> None:
    served: list[str] = []

    def busy(sock: socket.socket) -> None:
        served.append("busy")
        body = b'{"error": {"message": "busy"}}'
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                     b"retry-after: 0\r\ntransfer-encoding: chunked\r\n\r\n"
                     + _framed(body) + b"0\r\n\r\n")

    def good(sock: socket.socket) -> None:
        served.append("good")
        sock.sendall(HEAD + _framed(GOOD) + b"0\r\n\r\n")

    def cut(sock: socket.socket) -> None:
        served.append("cut")
        sock.sendall(HEAD + _framed(sse(chunk("par", role="assistant"), done=False)))
        time.sleep(0.1)
        sock.sendall(b"zz\r\n")  # broken framing after the first token

    with _peer(busy, good) as peer:
        response, raw, _ = _ask(_app(peer.url, upstream_max_attempts=3))
        asked = peer.accepted
    # THEN the 503 (its chunked body read whole) is retried, and the retry answers
    assert (response.status, _text(raw)) == (200, "Hello world")
    assert served == ["busy", "good"] and asked >= 1
    served.clear()
    with _peer(cut, good, good) as peer:
        response, raw, _ = _ask(_app(peer.url, upstream_max_attempts=3))
        time.sleep(0.1)
    # and broken framing after the first token ends the stream with upstream_error, never
    # retried once a byte went out
    assert response.status == 200 and _text(raw) == "par"
    assert sse_json(raw)[-1]["error"]["type"] == "upstream_error"
    assert served == ["cut"]


# -- a client that leaves: the upstream connection is closed at once ---------------------------

class _SlowUpstream:
    """A raw upstream streaming one token every 0.05 s for up to 10 s, noting when the
    gateway closed the connection."""

    def __init__(self) -> None:
        self.closed_at: float | None = None
        self.closed = threading.Event()
        self.peer = RawPeer(self._serve)

    def _serve(self, sock: socket.socket) -> None:
        read_request(sock)
        sock.sendall(HEAD + _framed(sse(chunk("", role="assistant"), done=False)))
        for _ in range(200):
            ready, _, _ = select.select([sock], [], [], 0.05)
            if ready and not sock.recv(1):
                break
            try:
                sock.sendall(_framed(sse(chunk("tok "), done=False)))
            except OSError:
                break
        self.closed_at = time.monotonic()
        self.closed.set()


def test_a_runtime_api_that_hangs_up_mid_stream_closes_the_upstream_at_once() -> None:
    # GIVEN a slow streaming upstream, and a Runtime API that resets the response after 3
    # chunks
    slow = _SlowUpstream()
    event = chat_event({"model": "upstream-model", "messages": USER, "stream": True})
    with slow.peer, FakeRuntimeAPI([Invoke(event, response="reset-after-3")]) as api:
        # WHEN the Lambda loop relays it
        started = time.monotonic()
        assert run(_app(slow.peer.url), environ={"AWS_LAMBDA_RUNTIME_API": api.address}) == 0
        ended = time.monotonic()
        # THEN the upstream connection is closed when the loop gives up, not at GC or later
        assert slow.closed.wait(3)
    assert slow.closed_at is not None and slow.closed_at - ended < 1.0
    assert ended - started < 5


def test_a_dev_server_client_that_leaves_mid_stream_closes_the_upstream_at_once() -> None:
    # GIVEN the dev server relaying a slow streaming upstream
    slow = _SlowUpstream()
    with slow.peer, running_dev_server(_app(slow.peer.url)) as url:
        sock = connect(url, timeout=5)
        body = json.dumps({"model": "upstream-model", "messages": USER, "stream": True})
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: "
                     b"application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body.encode()))
        got = b""
        while got.count(b"tok") < 3:
            got += sock.recv(65536)
        # WHEN the client hangs up mid-stream
        left = time.monotonic()
        sock.close()
        # THEN the upstream connection is closed within a moment
        assert slow.closed.wait(3)
    assert slow.closed_at is not None and slow.closed_at - left < 1.5


# -- the dev server's writes -------------------------------------------------------------------

def _request(stream: bool = True, version: str = "HTTP/1.1") -> bytes:
    body = json.dumps({"messages": USER, "stream": stream}).encode()
    return (b"POST /v1/chat/completions %s\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (version.encode(), len(body), body))


def test_a_dev_server_client_that_stops_reading_is_cut_at_the_request_timeout() -> None:
    # GIVEN a model that streams 64 KB deltas without pause, and a client that reads nothing
    big = "x" * 65536
    provider = ScriptedProvider([TextDelta(big)] * 3000 + [Finish("stop"), Usage(1, 1)])
    with running_dev_server(make_app(provider), request_timeout_s=0.5, timeout_s=60) as url:
        sock = connect(url, timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        started = time.monotonic()
        sock.sendall(_request())
        # THEN once the socket buffers are full the write is cut after the request timeout,
        # and the model freed, long before the 60 s time limit
        assert provider.closed.wait(10)
        freed = time.monotonic() - started
        sock.close()
    assert not provider.finished.is_set() and freed < 5


def test_a_dev_server_model_pausing_past_the_request_timeout_is_not_cut() -> None:
    # GIVEN a model that waits longer than the request timeout before, and between, its tokens
    provider = ScriptedProvider([0.5, TextDelta("a"), 0.5, TextDelta("b"), 0.35, TextDelta("c"),
                                 0.3, Finish("stop"), Usage(1, 3)])
    with running_dev_server(make_app(provider), request_timeout_s=0.3, timeout_s=30) as url:
        sock = connect(url, timeout=10)
        sock.sendall(_request())
        response = read_response(sock)
        # THEN the whole answer arrives: only a stalled write is cut
        assert response.status == 200
        assert _text(response.body) == "abc" and response.body.endswith(b"data: [DONE]\n\n")
        # and the connection stays usable for a second request after the stream
        sock.sendall(_request())
        again = read_response(sock)
        sock.close()
    assert again.status == 200 and _text(again.body) == "abc"


def test_a_dev_server_keep_alive_head_after_a_stream_is_still_bounded() -> None:
    # GIVEN a connection that has just received a whole stream
    with running_dev_server(make_app(), request_timeout_s=5, header_timeout_s=0.5) as url:
        sock = connect(url, timeout=5)
        sock.sendall(_request())
        assert read_response(sock).status == 200
        # WHEN the next request's head is trickled a byte every 0.1 s
        started = time.monotonic()
        closed = False
        for byte in _request()[:60]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            ready, _, _ = select.select([sock], [], [], 0.1)
            if ready:
                closed = True
                break
        waited = time.monotonic() - started
        sock.close()
    # THEN the server gives up on it at the header timeout (a 408 or a close)
    assert closed and waited < 2


def test_a_dev_server_http10_client_gets_the_raw_stream_ended_by_the_close() -> None:
    with running_dev_server(make_app(ScriptedProvider([TextDelta("a"), 0.05, TextDelta("b"),
                                                       Finish("stop"), Usage(1, 2)])),
                            request_timeout_s=2) as url:
        sock = connect(url, timeout=5)
        sock.sendall(_request(version="HTTP/1.0"))
        raw = b""
        while got := sock.recv(65536):
            raw += got
        sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
    assert _text(body) == "ab" and body.endswith(b"data: [DONE]\n\n")


def _drain(sock: socket.socket) -> int:
    """Read a chunked answer to its last chunk (or EOF) in large reads; its size."""
    data = bytearray()
    while not data.endswith(b"\r\n0\r\n\r\n"):
        got = sock.recv(1 << 20)
        if not got:
            break
        data += got
    return len(data)


def test_many_dev_server_streams_with_some_stalled_readers_all_end_in_time() -> None:
    # GIVEN 40 concurrent streams of 64 KB deltas (up to 64 MB each, far more than socket
    # buffers hold), 10 of whose clients never read
    big = "z" * 65536
    providers: list[ScriptedProvider] = []
    lock = threading.Lock()

    class _Many(ScriptedProvider):
        def stream(self, request: Any, model: str, deadline: Deadline) -> Iterator[Any]:
            turns = request.max_tokens or 1  # the readers ask for short answers
            p = ScriptedProvider([TextDelta(big)] * turns + [Finish("stop"), Usage(1, 1)])
            with lock:
                providers.append(p)
            return p.stream(request, model, deadline)

    def request(turns: int) -> bytes:
        body = json.dumps({"messages": USER, "stream": True, "max_tokens": turns}).encode()
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: "
                b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    with running_dev_server(make_app(_Many()), request_timeout_s=0.5, timeout_s=30,
                            max_streams=64) as url:
        socks = []
        for _ in range(40):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            s.settimeout(10)
            s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            socks.append(s)
        started = time.monotonic()
        for i, s in enumerate(socks):
            s.sendall(request(16 if i % 4 else 1000))
        sizes: dict[int, int] = {}

        def reader(i: int, s: socket.socket) -> None:
            sizes[i] = _drain(s)

        threads = [threading.Thread(target=reader, args=(i, s), daemon=True)
                   for i, s in enumerate(socks) if i % 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        # WHEN the 10 others stall
        stop = time.monotonic() + 10
        while time.monotonic() < stop and (
                len(providers) < 40 or not all(p.closed.is_set() for p in providers)):
            time.sleep(0.05)
        waited = time.monotonic() - started
        for s in socks:
            s.close()
    # THEN every reading client got its whole stream, every stalled one was cut at the request
    # timeout, and all 40 models are free well within the time limit
    assert len(sizes) == 30 and min(sizes.values()) > 16 * 65536
    assert len(providers) == 40 and all(p.closed.is_set() for p in providers)
    assert sum(not p.finished.is_set() for p in providers) == 10
    assert waited < 8
