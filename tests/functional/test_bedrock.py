"""Bedrock provider against a fake endpoint speaking the real event-stream framing: every
request field, stop reason, stream event and error row of the mapping."""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

import pytest

from streamgate.config import load_settings
from streamgate.handler import App
from streamgate.providers.bedrock import BedrockProvider
from tests.fake_bedrock import (
    FakeBedrock,
    Reply,
    finish_events,
    reasoning_block,
    start_event,
    stream_exception,
    text_block,
    text_events,
    tool_block,
)
from tests.helpers import body_bytes, chat_event, sse_json

MODEL = "us.amazon.nova-lite-v1:0"
JSON = {"accept": "application/json"}
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]
WEATHER: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def _app(fake: FakeBedrock, **settings: Any) -> App:
    s = load_settings({}, provider="bedrock", **{"bedrock_backoff_s": 0.01, **settings})
    return App(s, BedrockProvider(s, fake.client()))


def _stream(fake: FakeBedrock, body: dict[str, Any], **settings: Any) -> list[Any]:
    response = _app(fake, **settings).handle(chat_event({**body, "stream": True}))
    assert response.status == 200
    raw = body_bytes(response)
    assert raw.endswith(b"data: [DONE]\n\n")
    return sse_json(raw)


def _deltas(chunks: list[Any]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


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
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}}
    assert raw.endswith(b"data: [DONE]\n\n")


def test_events_bedrock_sent_together_leave_as_one_write_each_intact() -> None:
    # GIVEN a ConverseStream answer of 300 text events written in one piece (a burst)
    words = [f" w{i}" for i in range(300)]
    frames = text_events(*words, usage=(12, 300))
    with FakeBedrock([Reply(frames=[b"".join(f for f in frames if isinstance(f, bytes))])]
                     ) as fake:
        response = _app(fake).handle(chat_event({"stream": True, "messages": [
            {"role": "user", "content": "hi"}]}))
        items = [item for item in response.body if item]
        response.close()
    # THEN the events the reader had already parsed went on together: fewer body items (one
    # write each) than events, and each event whole and in order, as if each came alone
    events = [e for item in items for e in item.split(b"\n\n") if e]
    docs = [json.loads(e.removeprefix(b"data: ")) for e in events if e != b"data: [DONE]"]
    text = "".join(d["choices"][0]["delta"].get("content") or "" for d in docs if d["choices"])
    assert text == "".join(words)
    assert len(items) < len(events) // 2
    assert any(item.count(b"data: ") >= 2 for item in items)


def test_usage_reports_prompt_cache_reads_and_writes() -> None:
    frames = [start_event(), *text_block(0, "ok"), *finish_events(usage=(5, 2), cache=(100, 20))]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        doc = json.loads(body_bytes(_app(fake).handle(chat_event({"prompt": "hi"}))))
    # prompt_tokens = totalTokens - outputTokens: the cached tokens are prompt tokens too
    assert doc["usage"] == {
        "prompt_tokens": 125, "completion_tokens": 2, "total_tokens": 127,
        "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 20}}


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


@pytest.mark.parametrize("stop_reason", ["malformed_model_output", "malformed_tool_use"])
def test_malformed_stop_reason_is_an_upstream_error_not_a_leaked_value(stop_reason: str) -> None:
    with FakeBedrock([Reply(frames=text_events("x", stop=stop_reason))]) as fake:
        raw = body_bytes(_app(fake).handle(chat_event({"prompt": "hi", "stream": True})))
    assert sse_json(raw)[-1]["error"]["type"] == "upstream_error"
    assert b"[DONE]" not in raw and b'"finish_reason":"malformed' not in raw


@pytest.mark.parametrize(
    ("status", "error_type", "message", "ours", "code"),
    [
        (403, "AccessDeniedException", "no access", 403, "permission_denied"),
        (403, "UnrecognizedClientException", "bad token", 403, "permission_denied"),
        (404, "ResourceNotFoundException", "no model", 404, "model_not_found"),
        (400, "ValidationException", "bad field", 400, None),
        (400, "ValidationException", "Input is too long for requested model.", 400,
         "context_length_exceeded"),
        (429, "ThrottlingException", "Too many requests", 429, "rate_limit_exceeded"),
        (429, "ModelNotReadyException", "warming up", 429, "rate_limit_exceeded"),
        (400, "ServiceQuotaExceededException", "quota", 429, "rate_limit_exceeded"),
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
        response = _app(fake, bedrock_max_attempts=1).handle(
            chat_event({"prompt": "hi", "stream": True}, headers=JSON))
        body = json.loads(body_bytes(response))
    assert response.status == ours
    assert body["error"]["code"] == code
    assert message in body["error"]["message"]
    if ours == 429:
        assert response.headers["retry-after"] == "2"


def test_a_refusal_naming_the_functions_role_and_account_tells_the_client_neither(
        caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN Bedrock refusing the function's role, as AWS words it
    refusal = ("User: arn:aws:sts::123456789012:assumed-role/streamgate-FnRole-AB12/streamgate "
               "is not authorized to perform: bedrock:InvokeModelWithResponseStream on "
               "resource: arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.x")
    with FakeBedrock([Reply(403, "AccessDeniedException", refusal)]) as fake:
        response = _app(fake, bedrock_max_attempts=1).handle(
            chat_event({"prompt": "hi", "stream": True}, headers=JSON))
        body = json.loads(body_bytes(response))
    # THEN the client gets a 403 saying what was refused, without our role or account
    assert response.status == 403 and body["error"]["code"] == "permission_denied"
    message = body["error"]["message"]
    assert "not authorized to perform: bedrock:InvokeModelWithResponseStream" in message
    assert "123456789012" not in message and "FnRole" not in message
    # AND the operator's log has the whole refusal
    assert any("123456789012:assumed-role" in r.getMessage() for r in caplog.records)


def test_throttling_inside_the_first_events_is_still_a_real_429() -> None:
    frames = [text_events()[0], stream_exception("throttlingException", "slow down")]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        response = _app(fake, bedrock_max_attempts=1).handle(
            chat_event({"prompt": "hi", "stream": True}, headers=JSON))
    assert response.status == 429


@pytest.mark.parametrize(
    ("exception", "code"),
    [("throttlingException", "rate_limit_exceeded"),
     ("modelStreamErrorException", "upstream_error"),
     ("validationException", None), ("internalServerException", "upstream_error"),
     ("serviceUnavailableException", "upstream_unavailable")],
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
    assert len(fake.requests) == 1  # never retried once the client has bytes


def test_idle_stream_times_out_with_an_error_event() -> None:
    frames: list[bytes | float] = [*text_events("a")[:2], 2.0, *text_events("b")[1:]]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        app = _app(fake, bedrock_idle_timeout_s=0.3)
        started = time.monotonic()
        raw = body_bytes(app.handle(chat_event({"prompt": "hi", "stream": True})))
        waited = time.monotonic() - started
    error = sse_json(raw)[-1]["error"]
    assert error["code"] == "upstream_timeout"
    assert error["message"] == "Amazon Bedrock sent no output for 0.3 s"
    assert waited < 1.5  # gave up at the idle timeout, not when the upstream resumed


def test_no_first_token_in_time_is_a_real_504_before_the_stream_starts() -> None:
    frames: list[bytes | float] = [start_event(), 2.0, *text_block(0, "late"), *finish_events()]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        response = _app(fake, bedrock_first_token_timeout_s=0.3).handle(
            chat_event({"prompt": "hi", "stream": True}, headers=JSON))
        body = json.loads(body_bytes(response))
    assert response.status == 504
    assert body["error"] == {"message": "Amazon Bedrock sent no output within 0.3 s",
                             "type": "upstream_error", "param": None, "code": "upstream_timeout"}
    assert len(fake.requests) == 1  # a slow model is not retried


def test_first_token_wait_and_idle_wait_are_separate() -> None:
    # A model that thinks for 0.6 s before its first token is fine with a 5 s first-token
    # timeout, even though the idle timeout between later events is only 0.3 s.
    frames: list[bytes | float] = [start_event(), 0.6, *text_block(0, "slow start"),
                                   *finish_events()]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        chunks = _stream(fake, {"prompt": "hi"}, bedrock_first_token_timeout_s=5.0,
                         bedrock_idle_timeout_s=0.3)
    assert _deltas(chunks)[0]["content"] == "slow start"


def test_client_disconnect_closes_the_bedrock_connection() -> None:
    frames: list[bytes | float] = [start_event(), *text_block(0, "a")[:1]]
    frames += [0.05, *text_block(0, "more")[:1]] * 100
    with FakeBedrock([Reply(frames=frames)]) as fake:
        response = _app(fake).handle(chat_event({"prompt": "hi", "stream": True}))
        next(response.body)
        response.close()  # what a driver does when the client goes away
        assert fake.aborted.wait(3.0)


@pytest.mark.parametrize(
    "failures",
    [[Reply(429, "ThrottlingException", "slow down")],
     [Reply(frames=[start_event(), stream_exception("throttlingException", "slow down")])],
     [Reply(503, "ServiceUnavailableException", "busy"),
      Reply(500, "InternalServerException", "oops")]],
    ids=["http-429", "first-event-throttling", "503-then-500"],
)
def test_transient_failures_before_the_first_token_are_retried(failures: list[Reply]) -> None:
    with FakeBedrock([*failures, Reply(frames=text_events("fine"))]) as fake:
        chunks = _stream(fake, {"prompt": "hi"})
    assert _deltas(chunks)[0]["content"] == "fine"
    assert len(fake.requests) == len(failures) + 1
    assert all(sent == fake.requests[0] for sent in fake.requests)


def test_retries_stop_after_the_configured_attempts() -> None:
    replies = [Reply(429, "ThrottlingException", "slow down")] * 3
    with FakeBedrock(replies) as fake:
        response = _app(fake, bedrock_max_attempts=2).handle(chat_event({"prompt": "hi"}))
    assert response.status == 429
    assert len(fake.requests) == 2


def test_errors_that_retrying_cannot_fix_are_not_retried() -> None:
    with FakeBedrock([Reply(400, "ValidationException", "bad"),
                      Reply(frames=text_events("x"))]) as fake:
        assert _app(fake).handle(chat_event({"prompt": "hi"})).status == 400
    assert len(fake.requests) == 1


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


def test_images_tools_and_tool_results_map_to_converse_blocks() -> None:
    png = b"\x89PNG\r\n\x1a\n-pixels-"
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    with FakeBedrock([Reply(frames=text_events("It is 4C and sunny."))]) as fake:
        _app(fake).handle(chat_event({
            "messages": [
                {"role": "system", "content": "Use tools."},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url, "detail": "auto"}},
                    {"type": "text", "text": "Weather where this photo was taken?"}]},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "call_a", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                    {"id": "call_b", "type": "function",
                     "function": {"name": "get_weather", "arguments": ""}}]},
                {"role": "tool", "tool_call_id": "call_a", "content": "4C, sunny"},
                {"role": "tool", "tool_call_id": "call_b", "content": "unknown"},
                {"role": "user", "content": "Thanks. And tomorrow?"},
            ],
            "tools": [WEATHER], "tool_choice": "auto"}))
    sent = fake.requests[0][1]
    assert sent["system"] == [{"text": "Use tools."}]
    assert sent["messages"] == [
        {"role": "user", "content": [
            {"image": {"format": "png", "source": {"bytes": base64.b64encode(png).decode()}}},
            {"text": "Weather where this photo was taken?"}]},
        {"role": "assistant", "content": [
            {"text": "Checking."},
            {"toolUse": {"toolUseId": "call_a", "name": "get_weather", "input": {"city": "Oslo"}}},
            {"toolUse": {"toolUseId": "call_b", "name": "get_weather", "input": {}}}]},
        # tool results are user content, merged with the user turn after them
        {"role": "user", "content": [
            {"toolResult": {"toolUseId": "call_a", "content": [{"text": "4C, sunny"}]}},
            {"toolResult": {"toolUseId": "call_b", "content": [{"text": "unknown"}]}},
            {"text": "Thanks. And tomorrow?"}]},
    ]
    assert sent["toolConfig"] == {
        "tools": [{"toolSpec": {"name": "get_weather",
                                "description": "Current weather for a city",
                                "inputSchema": {"json": WEATHER["function"]["parameters"]}}}],
        "toolChoice": {"auto": {}}}


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [(None, {}), ("auto", {"toolChoice": {"auto": {}}}),
     ("required", {"toolChoice": {"any": {}}}),
     ({"type": "function", "function": {"name": "get_weather"}},
      {"toolChoice": {"tool": {"name": "get_weather"}}})],
)
def test_tool_choice_maps_to_converse(tool_choice: Any, expected: dict[str, Any]) -> None:
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    body = {"messages": USER, "tools": [strict]}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    with FakeBedrock([Reply(frames=text_events("ok"))]) as fake:
        _app(fake).handle(chat_event(body))
    config = fake.requests[0][1]["toolConfig"]
    assert config == {"tools": [{"toolSpec": {
        "name": "get_weather", "description": "Current weather for a city",
        "inputSchema": {"json": WEATHER["function"]["parameters"]}, "strict": True}}], **expected}


def test_tool_choice_none_sends_no_tools() -> None:
    with FakeBedrock([Reply(frames=text_events("ok"))]) as fake:
        _app(fake).handle(chat_event({"messages": USER, "tools": [WEATHER],
                                      "tool_choice": "none"}))
    assert "toolConfig" not in fake.requests[0][1]


HISTORY = [*USER,
           {"role": "assistant", "content": None, "tool_calls": [{
               "id": "call_a", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
           {"role": "tool", "tool_call_id": "call_a", "content": "4C"}]


@pytest.mark.parametrize(
    "extra",
    [{}, {"tools": [WEATHER], "tool_choice": "none"}],
    ids=["tools-omitted", "tool-choice-none"],
)
def test_tool_config_is_kept_whenever_history_holds_tool_use(extra: dict[str, Any]) -> None:
    # Converse rejects toolUse/toolResult blocks without a toolConfig.
    with FakeBedrock([Reply(frames=text_events("It is 4C."))]) as fake:
        response = _app(fake).handle(chat_event({"messages": HISTORY, **extra}))
    assert response.status == 200
    config = fake.requests[0][1]["toolConfig"]
    assert [t["toolSpec"]["name"] for t in config["tools"]] == ["get_weather"]
    assert "toolChoice" not in config
    if not extra:  # a tool known only from history gets an open schema
        assert config["tools"][0]["toolSpec"]["inputSchema"] == {
            "json": {"type": "object", "properties": {}}}


def test_tool_names_and_ids_are_sanitised_for_bedrock_and_mapped_back() -> None:
    name, call_id = "weather.lookup/v2", "call 1|" + "x" * 70
    tool = {"type": "function", "function": {"name": name}}
    history = [*USER,
               {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function",
                                                     "function": {"name": name,
                                                                  "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": call_id, "content": "4C"}]
    with FakeBedrock([Reply(frames=text_events("ok"))]) as fake:
        _app(fake).handle(chat_event({"messages": history, "tools": [tool],
                                      "tool_choice": {"type": "function",
                                                      "function": {"name": name}}}))
        sent = fake.requests[0][1]
        safe_name = sent["toolConfig"]["tools"][0]["toolSpec"]["name"]
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", safe_name)
        assert sent["toolConfig"]["toolChoice"] == {"tool": {"name": safe_name}}
        use = sent["messages"][1]["content"][0]["toolUse"]
        result = sent["messages"][2]["content"][0]["toolResult"]
        assert use["name"] == safe_name
        assert re.fullmatch(r"[a-zA-Z0-9_.:-]{1,64}", use["toolUseId"])
        assert result["toolUseId"] == use["toolUseId"]

        # The model answers with the sanitised name; the client sees the name it declared.
        fake.replies.append(Reply(frames=[start_event(),
                                          *tool_block(0, "tooluse_9", safe_name, "{}"),
                                          *finish_events("tool_use")]))
        chunks = _stream(fake, {"messages": USER, "tools": [tool]})
    assert _deltas(chunks)[0]["tool_calls"][0]["function"]["name"] == name


def test_tool_calls_after_text_stream_with_dense_indexes() -> None:
    frames = [start_event(), *text_block(0, "Let me check."),
              *tool_block(1, "tooluse_a", "get_weather", '{"city":', ' "Oslo"}'),
              *tool_block(2, "tooluse_b", "get_weather", '{"city": "Bergen"}'),
              *finish_events("tool_use")]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        chunks = _stream(fake, {"messages": USER, "tools": [WEATHER]})
    assert _deltas(chunks) == [
        {"role": "assistant", "content": "Let me check."},
        {"tool_calls": [{"index": 0, "id": "tooluse_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]},
        {"tool_calls": [{"index": 1, "id": "tooluse_b", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Bergen"}'}}]},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_reasoning_streams_as_reasoning_content_and_tool_calls_start_at_zero() -> None:
    frames = [start_event(), *reasoning_block(0, "The user wants ", "weather."),
              *tool_block(1, "tooluse_a", "get_weather", '{"city": "Oslo"}'),
              *finish_events("tool_use")]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        chunks = _stream(fake, {"messages": USER, "tools": [WEATHER]})
    deltas = _deltas(chunks)
    assert deltas[:2] == [{"role": "assistant", "reasoning_content": "The user wants "},
                          {"reasoning_content": "weather."}]
    assert deltas[2]["tool_calls"][0]["index"] == 0
    assert not any("content" in d for d in deltas)  # reasoning never leaks into content


def test_a_tool_call_without_arguments_still_carries_a_json_object() -> None:
    frames = [start_event(), *tool_block(0, "tooluse_a", "get_weather"),
              *finish_events("tool_use")]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        chunks = _stream(fake, {"messages": USER, "tools": [WEATHER]})
    assert _deltas(chunks)[1] == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}


def test_non_streaming_aggregates_reasoning_text_and_tool_calls() -> None:
    frames = [start_event(), *reasoning_block(0, "Need ", "weather."),
              *text_block(1, "Checking."),
              *tool_block(2, "tooluse_a", "get_weather", '{"city":', ' "Oslo"}'),
              *finish_events("tool_use", usage=(30, 12))]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        doc = json.loads(body_bytes(_app(fake).handle(
            chat_event({"messages": USER, "tools": [WEATHER]}))))
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"] == {
        "role": "assistant", "content": "Checking.", "refusal": None,
        "reasoning_content": "Need weather.",
        "tool_calls": [{"id": "tooluse_a", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    assert doc["choices"][0]["finish_reason"] == "tool_calls"
    assert doc["usage"]["total_tokens"] == 42


def test_tool_input_for_a_call_that_never_began_is_an_upstream_error() -> None:
    frames = [start_event(), *text_block(0, "hi"),
              *tool_block(1, "tooluse_a", "get_weather", "{}")[1:], *finish_events("tool_use")]
    with FakeBedrock([Reply(frames=frames)]) as fake:
        raw = body_bytes(_app(fake).handle(chat_event({"prompt": "hi", "stream": True})))
    assert sse_json(raw)[-1]["error"]["code"] == "upstream_error"
    assert b"[DONE]" not in raw


@pytest.mark.parametrize(
    ("body", "param"),
    [({"messages": USER, "tools": [WEATHER], "parallel_tool_calls": False},
      "parallel_tool_calls"),
     ({"messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
      "messages[0].content[0].image_url.url")],
)
def test_bedrock_refuses_what_it_cannot_honour_for_tools_and_images(
    body: dict[str, Any], param: str
) -> None:
    with FakeBedrock() as fake:
        response = _app(fake).handle(chat_event(body, headers=JSON))
    assert response.status == 400
    assert json.loads(body_bytes(response))["error"]["param"] == param
    assert fake.requests == []
