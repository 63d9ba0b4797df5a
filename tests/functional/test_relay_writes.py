"""The relay at the floor (issue 25): the Lambda loop writes what one upstream read delivered
as one Runtime API write, each event in it intact, and never holds an event back to wait for
another; every event is still checked (a garbled one ends the stream with upstream_error);
the streamed response's socket has no per-call timeout, yet a Runtime API that stops reading
is still cut at the deadline."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from streamgate.handler import App
from streamgate.runtime import run
from streamgate.runtime_api import RuntimeAPIClient
from tests.conftest import openai_app
from tests.fake_http import RawPeer, read_request
from tests.fake_openai import FakeUpstream, Reply, chunk, sse
from tests.fake_runtime_api import FakeRuntimeAPI, Invoke, Posted
from tests.helpers import chat_event, sse_json

NULS = b"\x00" * 8
USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def _app(fake: FakeUpstream | RawPeer) -> App:
    return openai_app(fake.url, upstream_models=("m=upstream-model",))


def _relay(replies: list[Reply]) -> Posted:
    """One streamed chat request through the Lambda loop, relaying ``replies``."""
    event = chat_event({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "stream": True, "stream_options": {"include_usage": True}})
    with FakeUpstream(replies) as fake, FakeRuntimeAPI([event]) as api:
        assert run(_app(fake), environ={"AWS_LAMBDA_RUNTIME_API": api.address}) == 0
    (posted,) = api.posted
    assert posted.chunks[0][1].endswith(NULS)  # the prelude, a chunk of its own
    return posted


def _events(data: bytes) -> list[bytes]:
    """A write's SSE events, each with its blank line; nothing may be left over."""
    events = [e + b"\n\n" for e in data.split(b"\n\n")[:-1]]
    assert b"".join(events) == data, "a write ends inside an event"
    return events


def test_chunks_one_upstream_read_delivered_leave_in_one_write_each_intact() -> None:
    # GIVEN an upstream that sends five content chunks in one write, then the rest later
    burst = sse(chunk("", role="assistant"), *(chunk(w) for w in ("one", " two", " three",
                                                                  " four", " five")),
                done=False)
    tail = sse(chunk(finish="stop"), chunk(choices=False, usage=USAGE))
    # WHEN the Lambda loop relays it
    posted = _relay([Reply(200, [burst, 0.2, tail])])
    # THEN the five chunks arrive at the Runtime API as one write (one HTTP chunk)...
    writes = [data for _, data in posted.chunks[1:]]
    first = _events(writes[0])
    assert len(first) == 5
    # ... and each is a whole chat.completion.chunk event of its own, as if sent alone
    docs = [json.loads(e.removeprefix(b"data: ")) for e in first]
    assert [d["choices"][0]["delta"] for d in docs] == [
        {"role": "assistant", "content": "one"}, {"content": " two"}, {"content": " three"},
        {"content": " four"}, {"content": " five"}]
    assert {d["id"] for d in docs} == {docs[0]["id"]} and all(d["usage"] is None for d in docs)
    assert all(d["object"] == "chat.completion.chunk" and d["model"] == "m" for d in docs)
    # and the whole stream ends as always, with no trailers
    raw = b"".join(writes)
    assert sse_json(raw)[-1]["usage"] == USAGE and raw.endswith(b"data: [DONE]\n\n")
    assert posted.trailers == {}


def test_events_sent_as_separate_http_chunks_in_one_segment_leave_in_one_write() -> None:
    # GIVEN an upstream (vLLM, llama.cpp server) that frames each event as its own HTTP chunk,
    # four of them sent in one TCP segment, the rest 0.3 s later
    head = [chunk("", role="assistant"), chunk("one"), chunk(" two"), chunk(" three")]
    tail = [chunk(finish="stop"), chunk(choices=False, usage=USAGE)]
    framed = [b"%x\r\n%s\r\n" % (len(e), e) for e in (sse(c, done=False) for c in head)]

    def serve(sock: socket.socket) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n" + b"".join(framed))
        time.sleep(0.3)
        rest = sse(*tail)
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        time.sleep(1)

    event = chat_event({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "stream": True, "stream_options": {"include_usage": True}})
    # WHEN the Lambda loop relays it
    with RawPeer(serve) as peer, FakeRuntimeAPI([event]) as api:
        assert run(_app(peer), environ={"AWS_LAMBDA_RUNTIME_API": api.address}) == 0
    (posted,) = api.posted
    # THEN the three content chunks leave in one Runtime API write (not one write per HTTP
    # chunk), each a whole event, and the answer ends as always
    writes = [data for _, data in posted.chunks[1:]]
    first = [json.loads(e.removeprefix(b"data: ")) for e in _events(writes[0])]
    assert [d["choices"][0]["delta"].get("content") for d in first] == ["one", " two", " three"]
    raw = b"".join(writes)
    assert sse_json(raw)[-1]["usage"] == USAGE and raw.endswith(b"data: [DONE]\n\n")
    assert posted.trailers == {}


def test_a_paced_chunk_is_written_at_once_not_held_for_the_next() -> None:
    # GIVEN an upstream that sends a chunk, then nothing for 0.6 s, then the next
    first = sse(chunk("", role="assistant"), chunk("early"), done=False)
    later = sse(chunk("late"), chunk(finish="stop"), chunk(choices=False, usage=USAGE))
    # WHEN the Lambda loop relays it
    posted = _relay([Reply(200, [first, 0.6, later])])
    # THEN "early" reached the Runtime API in its own write, long before "late" was sent
    writes = posted.chunks[1:]
    (early_at,) = [t for t, data in writes if b'"early"' in data]
    (late_at,) = [t for t, data in writes if b'"late"' in data]
    assert late_at - early_at >= 0.5
    assert [e for t, data in writes if t == early_at for e in _events(data)] == [
        e for e in _events(writes[0][1])]
    assert b'"late"' not in writes[0][1]


def test_a_garbled_event_among_good_ones_in_one_read_ends_in_upstream_error() -> None:
    # GIVEN one upstream write holding good chunks, an event that is not JSON, and more
    read = sse(chunk("", role="assistant"), chunk("good"), chunk(" still good"),
               '{"choices": [{"delta": {"content": "garbled', chunk(" never"),
               chunk(finish="stop"))
    # WHEN the Lambda loop relays it
    posted = _relay([Reply(200, [read])])
    raw = b"".join(data for _, data in posted.chunks[1:])
    docs = sse_json(raw)
    # THEN the good chunks before it are relayed, then one upstream_error event ends it...
    assert [d["choices"][0]["delta"].get("content") for d in docs[:-1]] == [
        "good", " still good"]
    assert docs[-1]["error"]["type"] == "upstream_error"
    # ... nothing of the garbled event or after it reaches the client, and no [DONE]
    assert b"garbled" not in raw and b"never" not in raw and b"[DONE]" not in raw
    # and the trailers say so
    assert posted.trailers["Lambda-Runtime-Function-Error-Type"] == "Function.UpstreamError"
    body = json.loads(base64.b64decode(posted.trailers["Lambda-Runtime-Function-Error-Body"]))
    assert body["errorType"] == "Function.UpstreamError"


def test_a_runtime_api_that_stops_reading_is_cut_without_per_call_timeouts() -> None:
    # GIVEN a Runtime API that reads the prelude, then nothing more (the fake sleeps 8 s)
    with FakeRuntimeAPI([Invoke(chat_event({"prompt": "hi"}), response="stall-after-1")]
                        ) as api:
        client = RuntimeAPIClient(api.address)
        invocation = client.next_invocation()
        timeouts: list[float | None] = []

        def events() -> Iterator[bytes]:
            for _ in range(1000):  # 64 MB: far more than the socket buffers hold
                sock = client._conn.sock if client._conn is not None else None
                timeouts.append(sock.gettimeout() if sock is not None else -1.0)
                yield b"data: " + b"y" * 65536 + b"\n\n"

        # WHEN the response is streamed with 0.5 s to go
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.stream_response(invocation.request_id, {"statusCode": 200}, events(),
                                   lambda: None, timeout=0.5)
        waited = time.monotonic() - started
        client.close()
    # THEN every write went out on a blocking socket (no timeout per call)...
    assert timeouts and set(timeouts) == {None}
    # ... and the guard still cut the stalled write at the deadline, not the fake's 8 s
    assert 0.4 <= waited < 3


def test_the_lambda_loop_relays_a_bursty_upstream_byte_for_byte_as_the_handler_does() -> None:
    # GIVEN an upstream answer sent in bursts of several events (and tool calls, reasoning)
    call: dict[str, Any] = {"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": "f", "arguments": "{\"a\":"}}
    more: dict[str, Any] = {"index": 0, "function": {"arguments": "1}"}}
    burst1 = sse(chunk("", role="assistant"), chunk(reasoning="think"), chunk("Hi"),
                 chunk(" there"), done=False)
    burst2 = sse(chunk(tool_calls=[call]), chunk(tool_calls=[more]),
                 chunk(finish="tool_calls"), chunk(choices=False, usage=USAGE))
    replies = [Reply(200, [burst1, 0.05, burst2]), Reply(200, [burst1, 0.05, burst2])]
    # WHEN the Lambda loop relays it, and the handler alone answers the same request
    event = chat_event({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "stream": True, "stream_options": {"include_usage": True}})
    with FakeUpstream(replies) as fake, FakeRuntimeAPI([event]) as api:
        app = _app(fake)
        assert run(app, environ={"AWS_LAMBDA_RUNTIME_API": api.address}) == 0
        response = app.handle(event)
        direct = b"".join(response.body)
        response.close()
    (posted,) = api.posted
    looped = b"".join(data for _, data in posted.chunks[1:])

    # THEN both give the same events (ids and times aside), every one of them whole
    def same(raw: bytes) -> list[Any]:
        docs = sse_json(raw)
        for d in docs:
            d.pop("id", None)
            d.pop("created", None)
        return docs

    assert same(looped) == same(direct)
    assert [d["choices"][0]["delta"] for d in sse_json(looped) if d.get("choices")][:3] == [
        {"role": "assistant", "reasoning_content": "think"}, {"content": "Hi"},
        {"content": " there"}]
    assert looped.endswith(b"data: [DONE]\n\n") and posted.trailers == {}
