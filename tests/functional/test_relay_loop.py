"""Streams under way waiting in one relay thread (streamgate/relay.py): with
AWS_LAMBDA_MAX_CONCURRENCY > 1 the Lambda loop parks an answer relayed from an
OpenAI-compatible upstream in the relay once its first delta is out, and the relay writes what
each upstream read brings. Each stream must come out as it would from its own worker thread,
one stream's stalled reader or upstream must not hold another, every timeout still cuts it,
and its end (a stored response, trailers) is written by its worker.

The hostile-upstream scenarios of test_hostile_relay.py run here a second time, each through
the Lambda loop with two workers and the relay (their ``_ask`` replaced), so every framing,
timeout, TLS and keep-alive case is checked on the relay's non-blocking reads too."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from streamgate import runtime
from streamgate.deadline import Deadline
from streamgate.handler import App
from streamgate.relay import Relay
from streamgate.runtime import run
from tests.conftest import openai_app, running_dev_server
from tests.fake_openai import FakeUpstream, Reply, chunk, sse
from tests.fake_runtime_api import FakeRuntimeAPI, Invoke, Posted
from tests.functional import test_hostile_relay as hostile
from tests.functional.test_hostile_relay import (  # noqa: F401 - run again, through the relay
    test_a_503_before_the_first_byte_is_retried_and_a_cut_after_it_is_not,
    test_a_chunk_whose_data_never_comes_ends_at_the_idle_timeout,
    test_a_chunked_error_body_in_one_byte_chunks_is_read_as_the_upstream_error,
    test_a_chunked_stream_over_tls_is_unframed_and_its_connection_reused,
    test_a_flood_of_trailer_fields_is_bounded,
    test_a_last_chunk_that_comes_a_read_after_done_still_lets_the_connection_be_reused,
    test_a_malformed_chunk_size_line_is_an_upstream_error,
    test_a_sixteen_digit_chunk_size_streams_and_a_seventeen_digit_one_is_an_upstream_error,
    test_a_size_line_trickled_a_byte_at_a_time_does_not_outlast_the_first_token_timeout,
    test_a_whole_answer_closed_after_its_last_chunk_without_the_final_crlf_is_whole,
    test_an_early_last_chunk_before_done_is_an_upstream_error,
    test_an_endless_size_line_of_bare_crs_is_cut_at_the_line_bound_not_buffered,
    test_an_sse_answer_that_closes_the_connection_is_relayed,
    test_an_sse_body_with_a_content_length_is_relayed_and_its_connection_reused,
    test_bytes_pipelined_after_the_last_chunk_never_answer_the_next_request,
    test_chunk_extensions_trickled_after_the_first_token_do_not_outlast_the_idle_timeout,
    test_data_not_followed_by_crlf_is_an_upstream_error_not_relayed,
    test_lone_surrogates_and_invalid_utf8_from_the_upstream_become_replacement_characters,
    test_multibyte_text_cut_into_one_byte_chunks_across_reads_arrives_intact,
    test_trailers_that_never_end_do_not_hold_the_answer_and_the_connection_is_not_kept,
    tls_peer,
)
from tests.functional.test_upstream_tls import tls_files, trusting  # noqa: F401 - fixtures
from tests.helpers import chat_event, sse_json
from tests.raw_http import connect, read_response

NULS = b"\x00" * 8
USER = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


class Carried:
    """How many streams the relay took over (Relay.carry calls), across threads."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


@pytest.fixture(autouse=True)
def carried(monkeypatch: pytest.MonkeyPatch) -> Carried:
    """Every ``_ask`` of the hostile scenarios goes through the Lambda loop and the relay."""
    seen = Carried()
    carry = Relay.carry

    def counting(self: Relay, *args: Any, **kwargs: Any) -> None:
        seen.add()
        carry(self, *args, **kwargs)

    monkeypatch.setattr(Relay, "carry", counting)
    monkeypatch.setattr(hostile, "_ask", _ask_through_the_relay)
    return seen


def _env(api: FakeRuntimeAPI, workers: int = 2) -> dict[str, str]:
    return {"AWS_LAMBDA_RUNTIME_API": api.address, "AWS_LAMBDA_MAX_CONCURRENCY": str(workers)}


def _ask_through_the_relay(
    app: App, *, path: str = "/v1/chat/completions", body: dict[str, Any] | None = None,
    json_errors: bool = True, deadline: Deadline | None = None,
) -> tuple[Any, bytes, float]:
    """test_hostile_relay's ``_ask``, answered by the Lambda loop (two workers, the relay)."""
    assert deadline is None
    doc = body or {"model": "upstream-model", "messages": USER, "stream": True}
    event = chat_event(doc, path=path, headers={"accept": "application/json"}
                       if json_errors else None)
    started = time.monotonic()
    api = _serve(app, [event])
    waited = time.monotonic() - started
    (posted,) = api.posted
    status = json.loads(posted.chunks[0][1].removesuffix(NULS))["statusCode"]
    return SimpleNamespace(status=status), _body(posted), waited


def _serve(app: App, events: list[Any], workers: int = 2, **script: Any) -> FakeRuntimeAPI:
    """``events`` served by the Lambda loop with ``workers`` workers (and the relay)."""
    with FakeRuntimeAPI(events, **script) as api:
        # A poll finding no invocation left is told to stop (410) only once every answer is
        # being posted: a stop earlier could cut the poll about to bring one.
        api.hold_when_empty.clear()
        threading.Thread(target=_release_when_posted, args=(api, len(events)),
                         daemon=True).start()
        assert run(app, environ=_env(api, workers)) == 0
    return api


def _release_when_posted(api: FakeRuntimeAPI, n: int) -> None:
    until = time.monotonic() + 30
    while len(api.posted) < n and time.monotonic() < until:
        time.sleep(0.005)
    api.hold_when_empty.set()


def _body(posted: Posted) -> bytes:
    return b"".join(data for _, data in posted.chunks[1:])


def _paced(words: list[str], gap: float = 0.03) -> Reply:
    parts: list[bytes | float] = [sse(chunk("", role="assistant"), done=False)]
    for word in words:
        parts += [gap, sse(chunk(word), done=False)]
    parts += [gap, sse(chunk(finish="stop"), chunk(choices=False, usage=USAGE))]
    return Reply(200, parts)


def _chat(**extra: Any) -> dict[str, Any]:
    return chat_event({"model": "m", "messages": USER, "stream": True,
                       "stream_options": {"include_usage": True}, **extra})


def _normalised(raw: bytes) -> list[Any]:
    docs = sse_json(raw)
    for doc in docs:
        doc.pop("id", None)
        doc.pop("created", None)
    return docs


def test_streams_under_way_wait_in_the_relay_and_arrive_as_each_worker_would_write_them(
    carried: Carried,
) -> None:
    # GIVEN four streams of twelve words each, 30 ms apart, served by four workers
    words = [f"w{i} " for i in range(12)]
    with FakeUpstream([_paced(words) for _ in range(5)]) as fake:
        app = openai_app(fake.url, upstream_models=("m=upstream-model",))
        started = time.monotonic()
        # WHEN the Lambda loop serves them
        api = _serve(app, [_chat() for _ in range(4)], 4, hold_until_polls=4)
        took = time.monotonic() - started
        # (and the handler alone answers the same request, for reference)
        direct = app.handle(_chat())
        reference = b"".join(direct.body)
        direct.close()
    # THEN the relay carried every one of them, side by side
    assert carried.count == 4
    assert took < 2 * 13 * 0.03 + 1
    for posted in api.posted:
        raw = _body(posted)
        # AND each is what the handler writes for it, byte for byte but for ids and times
        assert _normalised(raw) == _normalised(reference)
        assert raw.endswith(b"data: [DONE]\n\n") and posted.trailers == {}
        # AND incremental: each word in its own write, as it came
        times = [t for t, _ in posted.chunks[1:]]
        assert len(times) >= 12 and times[-1] - times[0] >= 11 * 0.03 * 0.8


def test_a_runtime_api_that_stops_reading_one_stream_holds_neither_the_relay_nor_others(
    monkeypatch: pytest.MonkeyPatch, carried: Carried,
) -> None:
    # GIVEN two answers of 16 MB each (far more than the sockets between hold), one to a
    # Runtime API that stops reading it after the prelude, the other read as it comes
    monkeypatch.setattr(runtime, "_WRITE_GRACE_S", 0.5)
    big = "y" * 16000
    # (the first word, then a pause: both streams are parked in the relay when the rest comes)
    flood: list[bytes | float] = [sse(chunk("", role="assistant"), chunk("y"), done=False),
                                  0.3]
    flood += [sse(*(chunk(big) for _ in range(10)), done=False) for _ in range(100)]
    flood += [sse(chunk(finish="stop"))]
    stalled = Invoke(_chat(), response="stall-after-1")
    with FakeUpstream([Reply(200, flood), Reply(200, flood)]) as fake:
        app = openai_app(fake.url, upstream_models=("m=upstream-model",),
                         deadline_margin_ms=500)
        started = time.monotonic()
        # WHEN two workers serve them
        api = _serve(app, [stalled, _chat()], hold_until_polls=2, deadline_in_ms=4000)
        took = time.monotonic() - started
        second = api.response_of("req-2")
    # THEN the stream read as it came is whole, while the other's writes were stuck
    raw = _body(second)
    assert raw.endswith(b"data: [DONE]\n\n") and second.trailers == {}
    assert "".join(d["choices"][0]["delta"].get("content") or ""
                   for d in sse_json(raw) if d.get("choices")) == "y" + big * 1000
    # AND the stuck one was cut at its deadline (plus the write grace), not the fake's 8 s
    assert carried.count == 2
    assert took < 4.0 + 0.5 + 2.0


def test_an_upstream_that_stops_mid_stream_while_parked_is_cut_at_the_idle_timeout(
    carried: Carried,
) -> None:
    # GIVEN an upstream that sends two words, then nothing for 5 s (its connection open)
    parts: list[bytes | float] = [sse(chunk("", role="assistant"), chunk("one"), done=False),
                                  0.05, sse(chunk(" two"), done=False), 5.0,
                                  sse(chunk(finish="stop"))]
    with FakeUpstream([Reply(200, parts)]) as fake:
        app = openai_app(fake.url, upstream_models=("m=upstream-model",),
                         upstream_idle_timeout_s=0.5)
        started = time.monotonic()
        # WHEN the Lambda loop relays it with a 0.5 s idle timeout
        api = _serve(app, [_chat()])
        took = time.monotonic() - started
    (posted,) = api.posted
    raw = _body(posted)
    # THEN the words came, then a timeout error event and the trailers, at the idle timeout
    assert carried.count == 1
    docs = sse_json(raw)
    assert "".join(d["choices"][0]["delta"].get("content") or ""
                   for d in docs if d.get("choices")) == "one two"
    assert docs[-1]["error"]["code"] == "upstream_timeout"
    assert b"[DONE]" not in raw
    error_type = posted.trailers["Lambda-Runtime-Function-Error-Type"]
    assert error_type == "Function.UpstreamTimeoutError"
    assert json.loads(base64.b64decode(
        posted.trailers["Lambda-Runtime-Function-Error-Body"]))["errorType"] == error_type
    assert took < 3


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
def test_other_dialects_are_relayed_and_end_on_their_worker(path: str, carried: Carried) -> None:
    # GIVEN a paced upstream, asked through the Responses and the Messages API
    body: dict[str, Any] = {"model": "m", "stream": True}
    if path == "/v1/responses":
        body["input"] = "hi"
    else:
        body.update(messages=USER, max_tokens=50)
    with FakeUpstream([_paced(["a", "b", "c"]) for _ in range(2)]) as fake:
        app = openai_app(fake.url, upstream_models=("m=upstream-model",))
        # WHEN the Lambda loop relays it, and the handler alone answers the same request
        api = _serve(app, [chat_event(body, path=path)])
        direct = app.handle(chat_event(body, path=path))
        reference = b"".join(direct.body)
        direct.close()
    (posted,) = api.posted
    raw = _body(posted)
    assert carried.count == 1

    # THEN the same events come in the same order, each whole, with the same text
    def kinds(data: bytes) -> list[str]:
        return [line.split(b": ", 1)[1].decode() for line in data.split(b"\n")
                if line.startswith(b"event: ")]

    assert kinds(raw) == kinds(reference) and kinds(raw)
    assert kinds(raw)[-1] in ("response.completed", "message_stop")
    assert posted.trailers == {}


def test_a_stored_response_relayed_is_stored_by_its_worker_and_can_be_read_back(
    carried: Carried,
) -> None:
    # GIVEN a streamed Responses API answer stored (the default), relayed by the Lambda loop
    body = {"model": "m", "stream": True, "input": "hi"}
    with FakeUpstream([_paced(["x", "y"])]) as fake:
        app = openai_app(fake.url, upstream_models=("m=upstream-model",))
        api = _serve(app, [chat_event(body, path="/v1/responses")])
        (posted,) = api.posted
        completed = [d for d in sse_json(_body(posted)) if d.get("type") == "response.completed"]
        (done,) = completed
        answer_id = done["response"]["id"]
        # WHEN it is read back
        got = app.handle(chat_event(None, method="GET", path=f"/v1/responses/{answer_id}"))
        stored = json.loads(b"".join(got.body))
        got.close()
    # THEN it is there, whole
    assert carried.count == 1
    assert got.status == 200 and stored["status"] == "completed"
    assert stored["output"][0]["content"][0]["text"] == "xy"


# -- the dev server: the same relay, its own bounds ---------------------------------------------

def _post(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n%s" % (len(raw), raw))


def test_a_dev_server_client_that_stops_reading_a_relayed_stream_is_cut_at_the_request_timeout(
    carried: Carried,
) -> None:
    # GIVEN two relayed streams of 16 MB each, one to a client that reads nothing at all
    big = "y" * 16000
    flood: list[bytes | float] = [sse(chunk("", role="assistant"), chunk("y"), done=False),
                                  0.3]
    flood += [sse(*(chunk(big) for _ in range(10)), done=False) for _ in range(100)]
    flood += [sse(chunk(finish="stop"))]
    with FakeUpstream([Reply(200, flood), Reply(200, flood)]) as fake, running_dev_server(
            openai_app(fake.url, upstream_models=("m=upstream-model",)),
            request_timeout_s=0.5, timeout_s=60) as url:
        stalled = connect(url, timeout=5)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader = connect(url, timeout=10)
        started = time.monotonic()
        stalled.sendall(_post({"model": "m", "messages": USER, "stream": True}))
        reader.sendall(_post({"model": "m", "messages": USER, "stream": True}))
        # WHEN the other client reads its answer
        response = read_response(reader)
        read_in = time.monotonic() - started
        # THEN it is whole, and came while the stalled one waited
        assert response.status == 200 and response.body.endswith(b"data: [DONE]\n\n")
        assert "".join(d["choices"][0]["delta"].get("content") or ""
                       for d in sse_json(response.body) if d.get("choices")) == "y" + big * 1000
        # AND the stalled one is cut at the request timeout: its upstream connection freed
        # (the fake sees the hang-up), long before the 60 s time limit
        assert fake.aborted.wait(5)
        freed = time.monotonic() - started
        stalled.close()
        reader.close()
    assert carried.count == 2
    assert read_in < 10 and freed < 6


def test_a_dev_server_model_pausing_past_the_request_timeout_while_relayed_is_not_cut(
    carried: Carried,
) -> None:
    # GIVEN an upstream that pauses longer than the request timeout between its words
    with FakeUpstream([_paced(["a", "b", "c"], gap=0.5)]) as fake, running_dev_server(
            openai_app(fake.url, upstream_models=("m=upstream-model",)),
            request_timeout_s=0.3, timeout_s=30) as url:
        sock = connect(url, timeout=10)
        # WHEN a client asks through the dev server (the stream parked in the relay)
        sock.sendall(_post({"model": "m", "messages": USER, "stream": True}))
        response = read_response(sock)
        sock.close()
    # THEN the whole answer arrives: only a stalled write is cut
    assert carried.count == 1
    assert response.status == 200 and response.body.endswith(b"data: [DONE]\n\n")
    assert "".join(d["choices"][0]["delta"].get("content") or ""
                   for d in sse_json(response.body) if d.get("choices")) == "abc"
