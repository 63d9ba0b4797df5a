"""Bedrock provider against a fake endpoint speaking the real event-stream framing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamgate.config import load_settings
from streamgate.handler import App
from streamgate.providers.bedrock import BedrockProvider
from tests.fake_bedrock import FakeBedrock, Reply, stream_exception, text_events
from tests.helpers import body_bytes, chat_event, sse_json

MODEL = "us.amazon.nova-lite-v1:0"
JSON = {"accept": "application/json"}


def _app(fake: FakeBedrock, **settings: Any) -> App:
    s = load_settings({}, provider="bedrock", **settings)
    return App(s, BedrockProvider(s, fake.client()))


def test_text_stream_maps_to_openai_chunks_with_usage() -> None:
    with FakeBedrock([Reply(frames=text_events("Hel", "lo", usage=(12, 2)))]) as fake:
        response = _app(fake).handle(chat_event(
            {"messages": [{"role": "user", "content": "hi"}], "stream": True,
             "stream_options": {"include_usage": True}}))
        raw = body_bytes(response)
    chunks = sse_json(raw)
    assert response.status == 200
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": "Hel"}, {"content": "lo"}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 2,
                                   "total_tokens": 14}
    assert raw.endswith(b"data: [DONE]\n\n")


def test_request_mapping_sends_every_field_to_converse() -> None:
    with FakeBedrock([Reply(frames=text_events("ok"))]) as fake:
        _app(fake).handle(chat_event({
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": "No lists."},
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "c"},
                {"role": "user", "content": "d"},
            ],
            "max_completion_tokens": 50, "temperature": 0.3, "top_p": 0.9,
            "stop": ["END"], "user": "user-7"}))
    model, sent = fake.requests[0]
    assert model == MODEL
    assert sent == {
        "system": [{"text": "Be brief."}, {"text": "No lists."}],
        "messages": [{"role": "user", "content": [{"text": "a"}, {"text": "b"}]},
                     {"role": "assistant", "content": [{"text": "c"}]},
                     {"role": "user", "content": [{"text": "d"}]}],
        "inferenceConfig": {"maxTokens": 50, "temperature": 0.3, "topP": 0.9,
                            "stopSequences": ["END"]},
        "requestMetadata": {"user": "user-7"},
    }


def test_guardrail_comes_from_server_configuration() -> None:
    with FakeBedrock([Reply(frames=text_events("ok"))]) as fake:
        _app(fake, bedrock_guardrail_id="gr-1", bedrock_guardrail_version="3").handle(
            chat_event({"prompt": "hi"}))
    assert fake.requests[0][1]["guardrailConfig"] == {
        "guardrailIdentifier": "gr-1", "guardrailVersion": "3", "streamProcessingMode": "async"}


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
     ("model_context_window_exceeded", "length"), ("guardrail_intervened", "content_filter"),
     ("content_filtered", "content_filter")],
)
def test_every_stop_reason_maps_to_an_openai_finish_reason(stop_reason: str, finish: str) -> None:
    with FakeBedrock([Reply(frames=text_events("x", stop=stop_reason))]) as fake:
        doc = json.loads(body_bytes(_app(fake).handle(chat_event({"prompt": "hi"}))))
    assert doc["choices"][0]["finish_reason"] == finish


def test_malformed_stop_reason_is_an_upstream_error_not_a_leaked_value() -> None:
    with FakeBedrock([Reply(frames=text_events("x", stop="malformed_model_output"))]) as fake:
        raw = body_bytes(_app(fake).handle(chat_event({"prompt": "hi", "stream": True})))
    assert sse_json(raw)[-1]["error"]["type"] == "upstream_error"
    assert b"[DONE]" not in raw and b'"finish_reason":"malformed' not in raw


@pytest.mark.parametrize(
    ("status", "error_type", "message", "ours", "code"),
    [
        (403, "AccessDeniedException", "no access", 403, "permission_denied"),
        (404, "ResourceNotFoundException", "no model", 404, "model_not_found"),
        (400, "ValidationException", "bad field", 400, None),
        (400, "ValidationException", "Input is too long for requested model.", 400,
         "context_length_exceeded"),
        (429, "ThrottlingException", "Too many requests", 429, "rate_limit_exceeded"),
        (429, "ModelNotReadyException", "warming up", 429, "rate_limit_exceeded"),
        (408, "ModelTimeoutException", "slow", 504, "upstream_timeout"),
        (424, "ModelErrorException", "boom", 502, "upstream_error"),
        (503, "ServiceUnavailableException", "down", 503, "upstream_unavailable"),
        (500, "InternalServerException", "oops", 502, "upstream_error"),
    ],
)
def test_errors_before_the_first_byte_are_real_statuses(
    status: int, error_type: str, message: str, ours: int, code: str | None
) -> None:
    with FakeBedrock([Reply(status, error_type, message)]) as fake:
        response = _app(fake).handle(chat_event({"prompt": "hi", "stream": True}, headers=JSON))
        body = json.loads(body_bytes(response))
    assert response.status == ours
    assert body["error"]["code"] == code
    assert message in body["error"]["message"]
    if ours == 429:
        assert response.headers["retry-after"] == "2"


def test_throttling_inside_the_first_events_is_still_a_real_429() -> None:
    frames = [text_events()[0], stream_exception("throttlingException", "slow down")]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        response = _app(fake).handle(chat_event({"prompt": "hi", "stream": True}, headers=JSON))
    assert response.status == 429


@pytest.mark.parametrize(
    ("exception", "code"),
    [("throttlingException", "rate_limit_exceeded"),
     ("modelStreamErrorException", "upstream_error"),
     ("validationException", None), ("internalServerException", "upstream_error")],
)
def test_errors_inside_the_stream_are_one_error_event_without_done(
    exception: str, code: str | None
) -> None:
    frames = [*text_events("partial")[:2], stream_exception(exception, "it broke")]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        response = _app(fake).handle(chat_event({"prompt": "hi", "stream": True}))
        raw = body_bytes(response)
    assert response.status == 200
    events = sse_json(raw)
    assert events[0]["choices"][0]["delta"]["content"] == "partial"
    assert events[-1]["error"]["code"] == code and "it broke" in events[-1]["error"]["message"]
    assert b"[DONE]" not in raw


def test_idle_stream_times_out_with_an_error_event() -> None:
    frames: list[bytes | float] = [*text_events("a")[:2], 2.0, *text_events("b")[1:]]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        s = load_settings({}, provider="bedrock")
        app = App(s, BedrockProvider(s, fake.client(read_timeout=0.5)))
        raw = body_bytes(app.handle(chat_event({"prompt": "hi", "stream": True})))
    assert sse_json(raw)[-1]["error"]["code"] == "upstream_timeout"


@pytest.mark.parametrize(
    ("body", "param"),
    [({"prompt": "hi", "temperature": 1.5}, "temperature"),
     ({"prompt": "hi", "seed": 1}, "seed"),
     ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
     ({"prompt": "hi", "model": "anthropic.claude-v9"}, "model")],
)
def test_what_bedrock_cannot_honour_is_refused_before_calling_it(
    body: dict[str, Any], param: str
) -> None:
    with FakeBedrock() as fake:
        response = _app(fake).handle(chat_event(body, headers=JSON))
    assert response.status in (400, 404)
    assert json.loads(body_bytes(response))["error"]["param"] == param
    assert fake.requests == []


def test_allow_list_admits_configured_models() -> None:
    with FakeBedrock([Reply(frames=text_events("ok"))]) as fake:
        app = _app(fake, bedrock_models=("anthropic.claude-3-haiku-20240307-v1:0",))
        response = app.handle(chat_event(
            {"prompt": "hi", "model": "anthropic.claude-3-haiku-20240307-v1:0"}))
    assert response.status == 200
    assert fake.requests[0][0] == "anthropic.claude-3-haiku-20240307-v1:0"
