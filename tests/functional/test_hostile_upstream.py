"""A misbehaving OpenAI-compatible upstream against the openai provider, through App.handle:
absurd Retry-After values, long waits that must not be slept out, keep-alive comments and
endless lines that must not keep a stream alive, trickled bytes that must not outlast a
timeout, messages that quote our key, malformed fields, and kept-alive connections gone stale.
Every answer is bounded in time and honest about whose fault it was."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from streamgate.deadline import Deadline
from streamgate.handler import App, Response
from tests.conftest import openai_app
from tests.fake_http import RawPeer, read_request
from tests.fake_openai import FakeUpstream, Reply, chunk, completion_reply, error_reply, sse
from tests.helpers import body_bytes, chat_event, sse_json

JSON = {"accept": "application/json"}
USER = [{"role": "user", "content": "hi"}]
KEY = "sk-live-0123456789abcdefXYZ"
def _app(url: str, **settings: Any) -> App:
    return openai_app(url, key=KEY, **settings)


def _ask(app: App, *, stream: bool = True, deadline: Deadline | None = None,
         json_errors: bool = False) -> tuple[Response, bytes, float]:
    started = time.monotonic()
    response = app.handle(chat_event({"model": "upstream-model", "messages": USER,
                                      "stream": stream}, headers=JSON if json_errors else None),
                          deadline=deadline)
    raw = body_bytes(response)
    response.close()
    return response, raw, time.monotonic() - started


# -- Retry-After -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "1e400", "Infinity", "99999999999999999999",
                                   "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_an_absurd_retry_after_on_a_429_is_answered_with_a_capped_finite_one(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an upstream that throttles with a Retry-After no header can honestly carry
    with FakeUpstream([error_reply(429, "slow down", headers={"retry-after": value})]) as fake:
        # WHEN a client asks
        response, raw, waited = _ask(_app(fake.url), json_errors=True)
    # THEN it gets a 429 at once with a long but finite wait, and the request is logged
    assert response.status == 429
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"] == "86400"
    assert response.headers["retry-after-ms"] == "86400000"
    assert len(fake.chat_requests()) == 1  # a long wait is not retried
    assert waited < 2
    assert '"status":429' in capsys.readouterr().out


def test_a_503_with_a_long_retry_after_is_answered_at_once_not_slept_out() -> None:
    # GIVEN an upstream that asks for an hour's patience, and three attempts configured
    with FakeUpstream([error_reply(503, "maintenance", headers={"retry-after": "3600"}),
                       completion_reply("never asked")]) as fake:
        response, raw, waited = _ask(_app(fake.url, upstream_max_attempts=3), json_errors=True)
    # THEN the client hears it at once, with the upstream's wait
    assert (response.status, response.headers["retry-after"]) == (503, "3600")
    assert json.loads(raw)["error"]["code"] == "upstream_unavailable"
    assert len(fake.chat_requests()) == 1
    assert waited < 2


def test_a_short_retry_after_is_not_taken_when_it_would_end_past_the_deadline() -> None:
    # GIVEN a short Retry-After (within the backoff cap), but a request with 0.5 s left
    with FakeUpstream([error_reply(503, "busy", headers={"retry-after": "2"}),
                       completion_reply("too late")]) as fake:
        app = _app(fake.url, upstream_backoff_s=1.0)  # cap 8 s: 2 s counts as short
        response, _, waited = _ask(app, deadline=Deadline.after(0.5), json_errors=True)
    # THEN it is not slept out: the 503 is the answer
    assert (response.status, response.headers["retry-after"]) == (503, "2")
    assert len(fake.chat_requests()) == 1
    assert waited < 1.5


def test_a_short_retry_after_is_waited_out_and_retried() -> None:
    with FakeUpstream([error_reply(503, "busy", headers={"retry-after": "0.2"}),
                       completion_reply("fine")]) as fake:
        response, raw, waited = _ask(_app(fake.url, upstream_backoff_s=0.1), stream=False)
    assert response.status == 200
    assert json.loads(raw)["choices"][0]["message"]["content"] == "fine"
    assert len(fake.chat_requests()) == 2
    assert waited >= 0.2


# -- output, not bytes, keeps a stream alive ---------------------------------------------------

def test_keep_alive_comments_after_the_first_token_do_not_keep_a_stream_alive() -> None:
    # GIVEN an upstream that sends one token, then only SSE comments, for a long time
    body: list[bytes | float] = [sse(chunk("a", role="assistant"), done=False)]
    body += [0.1, b": keep-alive\n\n"] * 100
    with FakeUpstream([Reply(body=body)]) as fake:
        response, raw, waited = _ask(_app(fake.url, upstream_idle_timeout_s=0.5))
    # THEN the idle timeout counts from the last token: the stream ends with our error event
    assert response.status == 200
    assert sse_json(raw)[-1]["error"] == {
        "message": "The upstream sent no output for 0.5 s", "type": "upstream_error",
        "param": None, "code": "upstream_timeout"}
    assert waited < 3


def test_comments_do_not_hold_off_the_first_token_timeout() -> None:
    body: list[bytes | float] = [b": thinking\n\n", 0.1] * 100
    with FakeUpstream([Reply(body=body)]) as fake:
        response, raw, waited = _ask(_app(fake.url, upstream_first_token_timeout_s=0.5,
                                          upstream_max_attempts=1), json_errors=True)
    assert response.status == 504
    assert json.loads(raw)["error"]["message"] == "The upstream sent no output within 0.5 s"
    assert waited < 3


def test_the_deadline_ends_a_stream_the_upstream_keeps_alive() -> None:
    # GIVEN generous timeouts, but a request whose deadline comes in 0.8 s
    body: list[bytes | float] = [sse(chunk("a", role="assistant"), done=False)]
    body += [0.1, b": keep-alive\n\n"] * 100
    with FakeUpstream([Reply(body=body)]) as fake:
        response, raw, waited = _ask(_app(fake.url), deadline=Deadline.after(0.8))
    # THEN the stream ends at the deadline with our deadline event
    assert sse_json(raw)[-1]["error"]["code"] == "deadline_exceeded"
    assert response.outcome.error is not None
    assert waited < 3


def test_an_endless_data_line_is_cut_at_the_event_size_limit() -> None:
    # GIVEN an upstream whose second event never ends
    body: list[bytes | float] = [sse(chunk("a", role="assistant"), done=False), b"data: "]
    body += [b"x" * 65536] * 200  # 13 MB, no newline
    with FakeUpstream([Reply(body=body)]) as fake:
        response, raw, waited = _ask(_app(fake.url, upstream_max_event_chars=100_000))
    # THEN it is refused as the upstream's fault once it passes the limit
    error = sse_json(raw)[-1]["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_error")
    assert error["message"] == "The upstream sent an event larger than 100000 characters"
    assert waited < 5


# -- non-streaming answers ---------------------------------------------------------------------

def _trickled(body: bytes, every: float) -> Reply:
    return Reply(200, [piece for b in body for piece in (every, bytes([b]))],
                 {"content-type": "application/json"})


def test_a_whole_answer_trickled_a_byte_at_a_time_times_out_as_a_whole() -> None:
    # GIVEN a non-streaming answer sent one byte every 50 ms (about 15 s in all)
    doc = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "x" * 100}}]})
    with FakeUpstream([_trickled(doc.encode(), 0.05)]) as fake:
        response, raw, waited = _ask(_app(fake.url, upstream_first_token_timeout_s=1.0,
                                          upstream_max_attempts=1), stream=False)
    # THEN the whole-answer timeout holds: 504, not an answer 15 s later
    assert response.status == 504
    assert json.loads(raw)["error"]["code"] == "upstream_timeout"
    assert waited < 4


def test_a_whole_answer_that_stalls_half_way_is_a_504_not_a_502() -> None:
    doc = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "half"}}]})
    stall = Reply(200, [doc[:20].encode(), 5.0, doc[20:].encode()],
                  {"content-type": "application/json"})
    with FakeUpstream([stall]) as fake:
        response, raw, waited = _ask(_app(fake.url, upstream_first_token_timeout_s=0.5,
                                          upstream_max_attempts=1), stream=False)
    assert response.status == 504
    assert json.loads(raw)["error"]["code"] == "upstream_timeout"
    assert waited < 3


def test_a_trickled_status_line_cannot_outlast_the_first_token_timeout() -> None:
    # GIVEN a peer that answers one byte every 100 ms, for 10 s
    def trickle(sock: socket.socket) -> None:
        read_request(sock)
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
            sock.sendall(bytes([byte]))
            time.sleep(0.1)

    with RawPeer(trickle) as peer:
        response, raw, waited = _ask(_app(peer.url, upstream_first_token_timeout_s=0.5,
                                          upstream_max_attempts=1), json_errors=True)
    # THEN the wall-clock limit holds although every recv returned in time
    assert response.status == 504
    assert waited < 3


# -- secrets and malformed fields ----------------------------------------------------------------

@pytest.mark.parametrize("status", [400, 404, 500])
def test_the_gateways_upstream_key_is_never_relayed(status: int) -> None:
    # GIVEN an upstream whose error quotes the request's headers and parts of our key
    message = (f"Bad request: headers were Authorization: Bearer {KEY}; "
               f"key {KEY[:8]}***{KEY[-4:]} or {KEY[3:19]} was refused")
    with FakeUpstream([error_reply(status, message)]) as fake:
        response, raw, _ = _ask(_app(fake.url, upstream_max_attempts=1), json_errors=True)
    text = raw.decode()
    # THEN neither the key nor any long fragment of it reaches our client
    assert KEY not in text and KEY[3:19] not in text and "Bearer" not in text
    assert KEY[8:16] not in text
    assert "[redacted]" in json.loads(raw)["error"]["message"]


def test_an_error_event_mid_stream_never_carries_the_key() -> None:
    body = [sse(chunk("a", role="assistant"),
                json.dumps({"error": {"message": f"auth {KEY} expired"}}), done=False)]
    with FakeUpstream([Reply(body=body)]) as fake:
        _, raw, _ = _ask(_app(fake.url))
    assert KEY not in raw.decode()
    assert sse_json(raw)[-1]["error"]["message"] == "Upstream: auth [redacted] expired"


def test_relayed_upstream_text_is_capped() -> None:
    with FakeUpstream([error_reply(400, "y" * 100_000)]) as fake:
        response, raw, _ = _ask(_app(fake.url), json_errors=True)
    assert response.status == 400
    assert len(json.loads(raw)["error"]["message"]) <= 520


@pytest.mark.parametrize(
    "bad",
    ['{"choices": [], "usage": {"prompt_tokens": 1e400, "completion_tokens": 1}}',
     '{"choices": [], "usage": {"prompt_tokens": -3, "completion_tokens": 1}}',
     '{"choices": [], "usage": {"prompt_tokens": "12", "completion_tokens": 1}}',
     '{"choices": [], "usage": [1, 2]}',
     '{"choices": [{"index": 0, "delta": {}, "finish_reason": ["stop"]}]}',
     '{"choices": [{"index": 0, "delta": {}, "finish_reason": {"why": "stop"}}]}',
     '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "0", "function": {}}]}}]}',
     '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": -1, "function": {}}]}}]}',
     '{"choices": ["not an object"]}'],
    ids=["usage-inf", "usage-negative", "usage-string", "usage-list", "finish-list",
         "finish-object", "tool-index-string", "tool-index-negative", "choice-string"],
)
def test_malformed_upstream_fields_are_upstream_errors_and_not_charged(bad: str) -> None:
    # GIVEN a stream that starts well, then sends a malformed chunk
    body = [sse(chunk("a", role="assistant"), bad, chunk(finish="stop"))]
    with FakeUpstream([Reply(body=body)]) as fake:
        response, raw, _ = _ask(_app(fake.url))
    # THEN the stream ends with the upstream's fault, not ours, and no usage is taken from it
    error = sse_json(raw)[-1]["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_error")
    assert response.outcome.usage is None


def test_a_lone_surrogate_in_upstream_text_becomes_a_replacement_character() -> None:
    body = [sse('{"choices": [{"index": 0, "delta": {"content": "a\\ud800b"}}]}',
                chunk(finish="stop"))]
    with FakeUpstream([Reply(body=body)]) as fake:
        response, raw, _ = _ask(_app(fake.url))
    assert raw.endswith(b"data: [DONE]\n\n")
    assert sse_json(raw)[0]["choices"][0]["delta"]["content"] == "a\ufffdb"


# -- kept-alive connections ----------------------------------------------------------------------

def _answer(sock: socket.socket) -> None:
    doc = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "ok"}}]})
    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(doc), doc.encode()))


def test_a_kept_alive_connection_the_upstream_closed_is_replaced_transparently() -> None:
    # GIVEN an upstream that closes each connection shortly after answering on it (as servers
    # with a short keep-alive timeout do while a Lambda container is frozen)
    def once_then_close(sock: socket.socket) -> None:
        read_request(sock)
        _answer(sock)
        time.sleep(0.1)
        sock.close()

    with RawPeer(once_then_close) as peer:
        app = _app(peer.url)
        first, _, _ = _ask(app, stream=False)
        time.sleep(0.3)
        # WHEN the next request comes
        second, raw, waited = _ask(app, stream=False)
    # THEN it is answered on a new connection, without an error or a wait
    assert (first.status, second.status) == (200, 200)
    assert json.loads(raw)["choices"][0]["message"]["content"] == "ok"
    assert peer.accepted == 2
    assert waited < 2


def test_a_connection_idle_past_the_limit_is_not_reused() -> None:
    # GIVEN an upstream (or a NAT in between) that silently forgets idle connections: a
    # request sent on one is never answered
    def once_then_silence(sock: socket.socket) -> None:
        read_request(sock)
        _answer(sock)
        read_request(sock)
        time.sleep(30)

    with RawPeer(once_then_silence) as peer:
        app = _app(peer.url, upstream_max_idle_s=0.2)
        _ask(app, stream=False)
        time.sleep(0.4)
        response, _, waited = _ask(app, stream=False)
    # THEN the idle connection is dropped, a new one answers at once
    assert response.status == 200
    assert peer.accepted == 2
    assert waited < 2
