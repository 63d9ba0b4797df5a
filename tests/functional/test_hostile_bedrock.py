"""The Bedrock provider against a Bedrock that misbehaves: events that carry no output, a
deadline, an endpoint that refuses or never answers, a connection lost mid-stream, impossible
usage. The fake endpoint speaks the real event-stream framing, so botocore's own parser and
exceptions are what the provider meets."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.handler import App, Response
from streamgate.providers.bedrock import BedrockProvider
from tests.fake_bedrock import FakeBedrock, Reply, event, finish_events, start_event, text_block
from tests.fake_http import RawPeer, read_request
from tests.helpers import body_bytes, chat_event, sse_json

JSON = {"accept": "application/json"}


def _client(url: str, **config: Any) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "bedrock-runtime", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}, **config))


def _app(client: Any, **settings: Any) -> App:
    s = load_settings({}, provider="bedrock", **{"bedrock_backoff_s": 0.01, **settings})
    return App(s, BedrockProvider(s, client))


def _ask(app: App, *, deadline: Deadline | None = None,
         json_errors: bool = False) -> tuple[Response, bytes, float]:
    started = time.monotonic()
    response = app.handle(chat_event({"prompt": "hi", "stream": True},
                                     headers=JSON if json_errors else None), deadline=deadline)
    raw = body_bytes(response)
    response.close()
    return response, raw, time.monotonic() - started


def test_events_without_output_do_not_keep_a_stream_alive() -> None:
    # GIVEN a model that sends one token, then only events that carry no content
    frames: list[bytes | float] = [start_event(), *text_block(0, "a")[:1]]
    frames += [0.1, event("messageStart", {"role": "assistant"})] * 50
    with FakeBedrock([Reply(frames=frames)]) as fake:
        response, raw, waited = _ask(_app(fake.client(), bedrock_idle_timeout_s=0.5))
    # THEN the idle timeout counts from the last output
    assert sse_json(raw)[-1]["error"]["message"] == "Amazon Bedrock sent no output for 0.5 s"
    assert waited < 3


def test_the_deadline_ends_a_bedrock_stream_with_the_deadline_event() -> None:
    frames: list[bytes | float] = [start_event(), *text_block(0, "a")[:1], 5.0,
                                   *text_block(0, "late"), *finish_events()]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        response, raw, waited = _ask(_app(fake.client()), deadline=Deadline.after(0.6))
    assert sse_json(raw)[-1]["error"]["code"] == "deadline_exceeded"
    assert waited < 2.5


def test_an_expired_deadline_never_calls_bedrock() -> None:
    with FakeBedrock([]) as fake:
        response, raw, _ = _ask(_app(fake.client()), deadline=Deadline.after(-1),
                                json_errors=True)
    assert response.status == 504
    assert json.loads(raw)["error"]["code"] == "deadline_exceeded"
    assert fake.requests == []


def test_an_unreachable_endpoint_is_a_502_after_retries() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = _app(_client(f"http://127.0.0.1:{port}"), bedrock_max_attempts=2)
    response, raw, waited = _ask(app, json_errors=True)
    assert response.status == 502
    assert json.loads(raw)["error"]["message"] == "Could not reach Amazon Bedrock"
    assert waited < 3


def test_an_endpoint_that_never_answers_is_a_504_at_the_first_token_timeout() -> None:
    def silent(sock: socket.socket) -> None:
        read_request(sock)
        time.sleep(30)

    with RawPeer(silent) as peer:
        app = _app(_client(f"http://127.0.0.1:{peer.port}", read_timeout=30),
                   bedrock_first_token_timeout_s=0.5, bedrock_max_attempts=1)
        response, raw, waited = _ask(app, json_errors=True)
    assert response.status == 504
    assert json.loads(raw)["error"]["message"] == "Amazon Bedrock sent no output within 0.5 s"
    assert waited < 3


def test_a_connection_lost_mid_stream_is_one_upstream_error_event() -> None:
    # GIVEN an endpoint that sends two events, then drops the connection mid-body
    frames = [start_event(), *text_block(0, "partial")[:1]]

    def cut(sock: socket.socket) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.amazon.eventstream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for frame in frames:
            assert isinstance(frame, bytes)
            sock.sendall(b"%x\r\n%s\r\n" % (len(frame), frame))
        sock.sendall(b"50\r\n" + frames[0][:10])  # half a chunk, then gone
        sock.shutdown(socket.SHUT_RDWR)

    with RawPeer(cut) as peer:
        response, raw, waited = _ask(_app(_client(f"http://127.0.0.1:{peer.port}")))
    # THEN the client has the partial answer and one upstream error event, no [DONE]
    chunks = sse_json(raw)
    assert chunks[0]["choices"][0]["delta"]["content"] == "partial"
    assert chunks[-1]["error"]["type"] == "upstream_error"
    assert chunks[-1]["error"]["message"] == "The connection to Amazon Bedrock broke mid-stream"
    assert b"[DONE]" not in raw
    assert waited < 3


@pytest.mark.parametrize("usage", [
    {"inputTokens": 5, "outputTokens": -1, "totalTokens": 4},
    {"inputTokens": 5, "outputTokens": 9, "totalTokens": 3},
], ids=["negative", "total-below-output"])
def test_impossible_usage_is_an_upstream_error_and_not_charged(usage: dict[str, int]) -> None:
    frames: list[bytes | float] = [start_event(), *text_block(0, "a"),
                                   event("messageStop", {"stopReason": "end_turn"}),
                                   event("metadata", {"usage": usage, "metrics": {}})]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        response, raw, _ = _ask(_app(fake.client()))
    error = sse_json(raw)[-1]["error"]
    assert (error["type"], error["message"]) == ("upstream_error",
                                                 "Amazon Bedrock reported impossible usage")
    assert response.outcome.usage is None
