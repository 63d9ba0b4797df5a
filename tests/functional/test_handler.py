"""The pipeline driven with Function URL events and a scripted provider."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamgate.errors import RateLimitError, UpstreamError
from streamgate.handler import SECURITY_HEADERS, App
from streamgate.providers import Finish, TextDelta, Usage
from tests.helpers import (
    ScriptedProvider,
    body_bytes,
    chat_event,
    load_event,
    make_app,
    sse_data,
    sse_json,
)

SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache",
               "x-accel-buffering": "no"}


class _Context:
    aws_request_id = "req-1"

    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@pytest.mark.parametrize("name", ["function-url-chat-stream.json", "function-url-chat-base64.json"])
def test_stream_event_gives_openai_chunks_then_usage_then_done(name: str) -> None:
    # GIVEN a provider that says "Hello, world!" and a streaming request with include_usage
    app = make_app(ScriptedProvider(models=["gemma-3-270m"]))
    # WHEN the handler runs the event (plain or base64 body)
    response = app.handle(load_event(name))
    raw = body_bytes(response)
    # THEN the status and SSE headers are right and the chunks follow OpenAI's order
    assert response.status == 200
    assert response.headers == {**SSE_HEADERS, **SECURITY_HEADERS,
                                "x-request-id": "6f1c0e5a-0000-4000-8000-000000000001",
                                "x-streamgate-backend": "scripted"}
    chunks = sse_json(raw)
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": "Hello"}, {"content": ","}, {"content": " world"},
        {"content": "!"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 4 + ["stop"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert sse_data(raw)[-1] == "[DONE]"
    assert raw.endswith(b"data: [DONE]\n\n")


def test_each_delta_is_its_own_body_item() -> None:
    response = make_app().handle(chat_event({"prompt": "hi", "stream": True}))
    items = list(response.body)
    assert len(items) == 6  # 4 texts, finish, [DONE]: one write each
    assert all(i.startswith(b"data: ") and i.endswith(b"\n\n") for i in items)


def test_short_form_prompt_streams() -> None:
    provider = ScriptedProvider()
    response = make_app(provider).handle(load_event("function-url-prompt.json"))
    assert response.status == 200
    assert "".join(c["choices"][0]["delta"].get("content", "")
                   for c in sse_json(body_bytes(response))) == "Hello, world!"
    request, model = provider.requests[0]
    assert request.max_tokens == 32 and model == "scripted-1"


def test_non_streaming_request_gets_one_completion_with_usage() -> None:
    response = make_app().handle(chat_event({"prompt": "hi"}))
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    doc = json.loads(body_bytes(response))
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!",
                                            "refusal": None}
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["total_tokens"] == 9


def test_default_max_tokens_is_applied_when_the_request_has_none() -> None:
    provider = ScriptedProvider()
    make_app(provider, default_max_tokens=77).handle(chat_event({"prompt": "hi"}))
    assert provider.requests[0][0].max_tokens == 77


def test_unknown_model_is_404_model_not_found() -> None:
    response = make_app().handle(chat_event({"prompt": "hi", "model": "gpt-9"},
                                            headers={"accept": "application/json"}))
    assert response.status == 404
    assert json.loads(body_bytes(response)) == {"error": {
        "message": "The model `gpt-9` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


@pytest.mark.parametrize(
    ("accept", "stream", "as_sse"),
    [("*/*", True, True), ("text/event-stream", True, True), ("application/json", True, False),
     ("application/json, text/event-stream", True, False), ("*/*", False, False)],
)
def test_pre_stream_errors_are_an_sse_event_only_for_stream_readers(
    accept: str, stream: bool, as_sse: bool
) -> None:
    response = make_app().handle(chat_event({"prompt": "", "stream": stream},
                                            headers={"accept": accept}))
    raw = body_bytes(response)
    assert response.status == 400
    error = {"error": {"message": "Prompt cannot be empty", "type": "invalid_request_error",
                       "param": "prompt", "code": None}}
    if as_sse:
        assert response.headers["content-type"] == "text/event-stream"
        assert sse_json(raw) == [error]
        assert b"[DONE]" not in raw
    else:
        assert response.headers["content-type"] == "application/json"
        assert json.loads(raw) == error


@pytest.mark.parametrize(
    ("event", "status", "message"),
    [
        (chat_event(None), 400, "No JSON body provided"),
        (chat_event(None, raw="{not json"), 400, "Invalid JSON body"),
        (chat_event(None, raw="[]"), 400, "Invalid JSON body"),
        (chat_event(None, raw="x" * 2_000_000), 413,
         "Request body exceeds maximum size of 1048576 bytes"),
        (chat_event({"prompt": "hi"}, path="/v1/completions"), 404,
         "Unknown path '/v1/completions'; try POST /v1/chat/completions"),
        (chat_event({"prompt": "hi"}, method="GET"), 405,
         "Method GET is not allowed on /v1/chat/completions; use POST"),
    ],
    ids=["no-body", "invalid", "not-object", "too-large", "unknown-path", "wrong-method"],
)
def test_http_level_errors_have_status_and_openai_body(
    event: dict[str, Any], status: int, message: str
) -> None:
    response = make_app().handle(event)
    assert response.status == status
    assert json.loads(body_bytes(response))["error"]["message"] == message
    if status == 405:
        assert response.headers["allow"] == "POST"


def test_every_response_carries_security_headers_and_a_request_id() -> None:
    app = make_app()
    answers = [app.handle(chat_event({"prompt": "hi"})),
               app.handle(chat_event(None, raw="{oops")),
               app.handle(chat_event(None, method="GET", path="/nowhere")),
               app.handle(chat_event(None, method="GET", path="/health"))]
    assert [r.status for r in answers] == [200, 400, 404, 200]
    for response in answers:
        assert {k: response.headers[k] for k in SECURITY_HEADERS} == SECURITY_HEADERS
        # the event's request id, which the Function URL also logs
        assert response.headers["x-request-id"] == "6f1c0e5a-0000-4000-8000-000000000001"
    assert answers[0].headers["cache-control"] == "no-store"
    # outside any event context a fresh id is made
    event = chat_event({"prompt": "hi"})
    del event["requestContext"]["requestId"]
    ids = {make_app().handle(event).headers["x-request-id"] for _ in range(2)}
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [({"messages": [{"role": "user", "content": "hi"}] * 4}, "too_many_messages",
      "'messages' exceeds the maximum of 3 messages"),
     ({"messages": [{"role": "user", "content": "x" * 60},
                    {"role": "user", "content": "y" * 41}]}, "input_too_long",
      "The input exceeds the maximum of 100 characters across messages and tools"),
     ({"messages": [{"role": "user", "content": "x"}],
       "tools": [{"type": "function", "function": {"name": "f", "description": "d" * 100}}]},
      "input_too_long",
      "The input exceeds the maximum of 100 characters across messages and tools")],
    ids=["messages", "characters", "tool-definitions"],
)
def test_request_size_caps(body: dict[str, Any], code: str, message: str) -> None:
    provider = ScriptedProvider()
    app = make_app(provider, max_messages=3, max_input_chars=100)
    response = app.handle(chat_event(body, headers={"accept": "application/json"}))
    assert response.status == 400
    assert json.loads(body_bytes(response))["error"] == {
        "message": message, "type": "invalid_request_error", "param": "messages", "code": code}
    assert provider.requests == []


def test_provider_failure_before_first_delta_is_a_real_status_with_retry_after() -> None:
    provider = ScriptedProvider([RateLimitError("slow down", retry_after=7)])
    response = make_app(provider).handle(
        chat_event({"prompt": "hi", "stream": True}, headers={"accept": "application/json"}))
    assert response.status == 429
    assert response.headers["retry-after"] == "7"
    assert json.loads(body_bytes(response))["error"]["type"] == "rate_limit_error"
    assert provider.closed.is_set()


def test_failure_mid_stream_ends_with_one_error_event_and_no_done() -> None:
    provider = ScriptedProvider([TextDelta("partial"), UpstreamError("model crashed")])
    response = make_app(provider).handle(chat_event({"prompt": "hi", "stream": True}))
    raw = body_bytes(response)
    assert response.status == 200
    events = sse_json(raw)
    assert events[0]["choices"][0]["delta"]["content"] == "partial"
    assert events[-1] == {"error": {"message": "model crashed", "type": "upstream_error",
                                    "param": None, "code": "upstream_error"}}
    assert b"[DONE]" not in raw
    assert response.outcome.error is not None and response.outcome.error.status == 502


def test_a_bug_mid_stream_reveals_nothing_internal() -> None:
    provider = ScriptedProvider([TextDelta("x"), KeyError("/var/task/secret/path.py")])
    raw = body_bytes(make_app(provider).handle(chat_event({"prompt": "hi", "stream": True})))
    assert b"/var/task" not in raw
    assert sse_json(raw)[-1]["error"]["code"] == "internal_error"


def test_stream_without_finish_reason_is_reported_as_an_error() -> None:
    provider = ScriptedProvider([TextDelta("x")])
    raw = body_bytes(make_app(provider).handle(chat_event({"prompt": "hi", "stream": True})))
    assert sse_json(raw)[-1]["error"]["code"] == "upstream_error"
    assert b"[DONE]" not in raw


def test_deadline_stops_generation_with_an_explicit_error_event() -> None:
    # GIVEN a slow provider and 0.3 s left before the margin of 0.1 s
    provider = ScriptedProvider([TextDelta("a"), 0.15, TextDelta("b"), 0.3, TextDelta("c"),
                                 Finish("stop")])
    app = make_app(provider, deadline_margin_ms=100)
    # WHEN the stream runs into the deadline
    response = app.handle(chat_event({"prompt": "hi", "stream": True}), _Context(400))
    raw = body_bytes(response)
    # THEN it ends with a deadline error event, no [DONE], and the provider was closed early
    assert sse_json(raw)[-1]["error"]["code"] == "deadline_exceeded"
    assert b"[DONE]" not in raw and b'"c"' not in raw
    assert provider.closed.is_set() and not provider.finished.is_set()


def test_closing_the_body_stops_the_provider() -> None:
    provider = ScriptedProvider([TextDelta("a"), TextDelta("b"), Finish("stop"), Usage(1, 2)])
    response = make_app(provider).handle(chat_event({"prompt": "hi", "stream": True}))
    next(response.body)
    response.close()
    assert provider.closed.is_set() and not provider.finished.is_set()


def test_models_and_health() -> None:
    app: App = make_app()
    models = json.loads(body_bytes(app.handle(chat_event(None, method="GET",
                                                         path="/v1/models"))))
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["scripted-1", "scripted-2"]
    health = app.handle(chat_event(None, method="GET", path="/health"))
    assert health.status == 200 and json.loads(body_bytes(health))["status"] == "ok"
