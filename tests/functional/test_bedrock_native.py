"""Claude on Bedrock, natively: Messages requests for Claude models go to
InvokeModelWithResponseStream with the Anthropic body, against a fake Bedrock speaking the real
event-stream framing (botocore's own parser runs), and Bedrock's events come back one for one.
Read by the official ``anthropic`` SDK, every event and message checked strictly."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
import requests

from streamgate.config import load_settings
from streamgate.handler import App
from streamgate.providers.bedrock import NATIVE_BETAS, BedrockProvider
from tests import anthropic_strict as strict
from tests.conftest import running_dev_server, sdk_client
from tests.fake_bedrock import (
    FakeBedrock,
    Reply,
    chunk,
    claude_end,
    claude_events,
    claude_start,
    claude_text,
    claude_thinking,
    claude_tool,
    stream_exception,
    text_events,
)
from tests.helpers import body_bytes, chat_event

CLAUDE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
NOVA = "us.amazon.nova-lite-v1:0"
LLAMA = "us.meta.llama3-3-70b-instruct-v1:0"
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]
WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
THINKING_ANSWER = [claude_start(12, cache=(100, 8)), {"type": "ping"},
                   *claude_thinking(0, "RXVTaWc=", "The user wants ", "the weather."),
                   *claude_text(1, "Let me check."),
                   *claude_tool(2, "toolu_bdrk_01", "get_weather", '{"city": ', '"Oslo"}'),
                   *claude_end("tool_use", 40)]


def _app(fake: FakeBedrock, **settings: Any) -> App:
    s = load_settings({}, provider="bedrock", metrics=False, bedrock_backoff_s=0.01,
                      bedrock_models=(NOVA, LLAMA), default_model=CLAUDE, **settings)
    return App(s, BedrockProvider(s, fake.client()))


@pytest.fixture
def fake() -> Iterator[FakeBedrock]:
    with FakeBedrock() as fake:
        yield fake


def _client(url: str) -> anthropic.Anthropic:
    return sdk_client(anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0))


def _sent(fake: FakeBedrock, i: int = 0) -> dict[str, Any]:
    model, body = fake.requests[i]
    assert model == CLAUDE and fake.operations[i] == "invoke-with-response-stream"
    return body


def test_claude_events_are_relayed_one_for_one_and_read_by_the_sdk(fake: FakeBedrock) -> None:
    # GIVEN Claude on Bedrock answering with thinking, text and a tool call
    fake.replies += [Reply(frames=[chunk(e) for e in THINKING_ANSWER])] * 2
    app = _app(fake)
    with running_dev_server(app) as url:
        # WHEN a client streams the message
        raw = requests.post(f"{url}/v1/messages", timeout=10, json={
            "model": CLAUDE, "max_tokens": 4000, "messages": USER, "tools": [WEATHER],
            "stream": True}).content
        with _client(url) as client, client.messages.stream(
                model=CLAUDE, max_tokens=4000, messages=USER, tools=[WEATHER]) as stream:
            final = stream.get_final_message()
    # THEN every Anthropic event is relayed as Bedrock sent it (its own metrics aside)
    events = strict.events(raw)
    expected = [e if e["type"] != "message_stop" else {"type": "message_stop"}
                for e in THINKING_ANSWER]
    assert [data for _, data in events] == expected
    # AND the SDK's final message is whole: the signature, the text, the tool input, usage
    thinking, text, tool = final.content
    assert thinking.type == "thinking" and thinking.signature == "RXVTaWc="
    assert thinking.thinking == "The user wants the weather."
    assert text.type == "text" and text.text == "Let me check."
    assert tool.type == "tool_use" and tool.input == {"city": "Oslo"}
    assert (final.id, final.stop_reason, final.usage.output_tokens,
            final.usage.cache_read_input_tokens) == ("msg_bdrk_01", "tool_use", 40, 100)
    strict.message(final.model_dump(mode="json", exclude_unset=True))


def test_the_body_is_anthropics_with_bedrocks_version_and_exactly_the_fields_it_takes(
        fake: FakeBedrock) -> None:
    fake.replies.append(Reply(frames=claude_events("ok")))
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    tools = [{**WEATHER, "eager_input_streaming": True, "cache_control": {"type": "ephemeral"}}]
    response = _app(fake).handle(chat_event({
        "model": CLAUDE, "max_tokens": 2000, "system": system, "messages": USER,
        "tools": tools, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"], "temperature": 0.5, "top_k": 40,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "metadata": {"user_id": "user-7"}, "stream": True}, path="/v1/messages"))
    assert response.status == 200
    strict.events(body_bytes(response))
    # cache_control survives where the client put it; eager_input_streaming is not sent
    assert _sent(fake) == {
        "anthropic_version": "bedrock-2023-05-31", "max_tokens": 2000, "system": system,
        "messages": USER, "tools": [{**WEATHER, "cache_control": {"type": "ephemeral"}}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"], "temperature": 0.5, "top_k": 40,
        "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert json.loads(fake.headers[0]["x-amzn-bedrock-request-metadata"]) == {"user": "user-7"}


def test_only_the_betas_bedrock_accepts_are_forwarded(fake: FakeBedrock) -> None:
    fake.replies += [Reply(frames=claude_events("ok")), Reply(frames=claude_events("ok"))]
    app = _app(fake)
    with running_dev_server(app) as url, _client(url) as client:
        client.beta.messages.create(model=CLAUDE, max_tokens=100, messages=USER, betas=[
            "interleaved-thinking-2025-05-14", "claude-code-20250219",
            "fine-grained-tool-streaming-2025-05-14", "context-1m-2025-08-07"])
        client.messages.create(model=CLAUDE, max_tokens=100, messages=USER)
    assert _sent(fake, 0)["anthropic_beta"] == ["interleaved-thinking-2025-05-14",
                                                "context-1m-2025-08-07"]
    assert set(_sent(fake, 0)["anthropic_beta"]) <= NATIVE_BETAS
    assert "anthropic_beta" not in _sent(fake, 1)


def test_thinking_blocks_with_signatures_go_back_to_bedrock_exactly(fake: FakeBedrock) -> None:
    fake.replies += [Reply(frames=[chunk(e) for e in THINKING_ANSWER]),
                     Reply(frames=claude_events("Sunny."))]
    with running_dev_server(_app(fake)) as url, _client(url) as client:
        first = client.messages.create(model=CLAUDE, max_tokens=4000, messages=USER,
                                       tools=[WEATHER],
                                       thinking={"type": "enabled", "budget_tokens": 2048})
        history = [*USER, {"role": "assistant", "content": first.content},
                   {"role": "user", "content": [{"type": "tool_result",
                                                 "tool_use_id": "toolu_bdrk_01",
                                                 "content": "21 °C"}]}]
        second = client.messages.create(model=CLAUDE, max_tokens=4000, messages=history,
                                        tools=[WEATHER],
                                        thinking={"type": "enabled", "budget_tokens": 2048})
    assert second.content[0].text == "Sunny."  # type: ignore[union-attr]
    sent = _sent(fake, 1)["messages"][1]["content"]
    assert sent[0] == {"type": "thinking", "thinking": "The user wants the weather.",
                       "signature": "RXVTaWc="}
    assert sent[2] == {"type": "tool_use", "id": "toolu_bdrk_01", "name": "get_weather",
                       "input": {"city": "Oslo"}}


def test_a_mid_stream_overloaded_exception_is_an_anthropic_overloaded_error_event(
        fake: FakeBedrock) -> None:
    # GIVEN Claude overloaded after its first words
    frames = [chunk(e) for e in (claude_start(), *claude_text(0, "Sun")[:2])]
    fake.replies.append(Reply(frames=[*frames, stream_exception(
        "overloadedException", "Bedrock is unable to process your request.")]))
    with running_dev_server(_app(fake)) as url, _client(url) as client, \
            client.messages.create(model=CLAUDE, max_tokens=100, messages=USER,
                                   stream=True) as stream:
        seen = []
        # WHEN the SDK reads on THEN it raises with Anthropic's overloaded error
        with pytest.raises(anthropic.APIStatusError) as info:
            for event in stream:
                seen.append(event.type)
    assert seen == ["message_start", "content_block_start", "content_block_delta"]
    assert info.value.body == {"type": "error", "error": {
        "type": "overloaded_error",
        "message": "Amazon Bedrock: Bedrock is unable to process your request."}}
    strict.error(info.value.body)


def test_throttling_before_the_first_byte_is_a_429_the_sdk_raises(fake: FakeBedrock) -> None:
    fake.replies += [Reply(429, "ThrottlingException", "Too many requests")] * 3
    with running_dev_server(_app(fake)) as url, _client(url) as client, \
            pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model=CLAUDE, max_tokens=100, messages=USER, stream=True)
    assert len(fake.requests) == 3  # retried under the shared policy first
    strict.error(info.value.body)
    assert info.value.response.headers["retry-after"] == "2"


def test_overloaded_before_the_first_output_is_retried_not_relayed(fake: FakeBedrock) -> None:
    # GIVEN a first attempt that starts the message, then is overloaded before any content
    fake.replies += [Reply(frames=[chunk(claude_start()), chunk({"type": "ping"}),
                                   stream_exception("overloadedException", "busy")]),
                     Reply(frames=claude_events("Hello"))]
    response = _app(fake).handle(chat_event({"model": CLAUDE, "max_tokens": 100,
                                             "messages": USER, "stream": True},
                                            path="/v1/messages"))
    events = strict.events(body_bytes(response))
    # THEN the client sees one whole answer: the held message_start was never sent
    assert [n for n, _ in events].count("message_start") == 1
    assert len(fake.requests) == 2 and response.outcome.finish_reason == "stop"


def test_an_error_event_inside_a_chunk_maps_to_its_anthropic_type(fake: FakeBedrock) -> None:
    fake.replies.append(Reply(frames=[chunk(e) for e in (
        claude_start(), *claude_text(0, "a")[:2],
        {"type": "error", "error": {"type": "api_error", "message": "Internal"}})]))
    raw = body_bytes(_app(fake).handle(chat_event({
        "model": CLAUDE, "max_tokens": 100, "messages": USER, "stream": True},
        path="/v1/messages")))
    assert strict.events(raw)[-1] == ("error", {"type": "error", "error": {
        "type": "api_error", "message": "Amazon Bedrock: Internal"}})


def test_a_whole_message_is_joined_from_the_stream_and_usage_is_accounted(
        fake: FakeBedrock) -> None:
    fake.replies.append(Reply(frames=[chunk(e) for e in THINKING_ANSWER]))
    response = _app(fake).handle(chat_event({
        "model": CLAUDE, "max_tokens": 4000, "messages": USER, "tools": [WEATHER]},
        path="/v1/messages"))
    message = strict.message(json.loads(body_bytes(response)))
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    usage = response.outcome.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
            usage.cache_write_tokens) == (120, 40, 100, 8)
    assert response.outcome.finish_reason == "tool_calls"


def test_a_field_bedrock_does_not_take_is_a_400_naming_it(fake: FakeBedrock) -> None:
    tool = {**WEATHER, "strict": True}
    response = _app(fake).handle(chat_event({
        "model": CLAUDE, "max_tokens": 100, "messages": USER, "tools": [tool]},
        path="/v1/messages"))
    assert response.status == 400
    body = json.loads(body_bytes(response))
    strict.error(body)
    assert body["error"]["message"] == (
        "'tools[0].strict' is not accepted by Claude on Amazon Bedrock")
    assert fake.requests == []


def test_count_tokens_is_bedrocks_count_of_the_same_body(fake: FakeBedrock) -> None:
    fake.replies += [Reply(json={"inputTokens": 57}), Reply(json={"inputTokens": 9})]
    with running_dev_server(_app(fake)) as url, _client(url) as client:
        native = client.messages.count_tokens(model=CLAUDE, messages=USER, tools=[WEATHER])
        converse = client.messages.count_tokens(model=NOVA, messages=USER)
    assert (native.input_tokens, converse.input_tokens) == (57, 9)
    (_, first), (model, second) = fake.requests
    assert fake.operations == ["count-tokens", "count-tokens"]
    body = json.loads(base64.b64decode(first["input"]["invokeModel"]["body"]))
    assert body == {"anthropic_version": "bedrock-2023-05-31", "messages": USER,
                    "tools": [WEATHER], "max_tokens": 1}
    assert model == NOVA and second["input"]["converse"]["messages"] == [
        {"role": "user", "content": [{"text": USER[0]["content"]}]}]


@pytest.mark.parametrize(("model", "cached"), [(NOVA, True), (LLAMA, False)])
def test_other_models_go_through_converse_with_cache_points_only_where_caching_exists(
        fake: FakeBedrock, model: str, cached: bool) -> None:
    fake.replies.append(Reply(frames=text_events("ok")))
    response = _app(fake).handle(chat_event({
        "model": model, "max_tokens": 100, "stream": True,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]},
        path="/v1/messages"))
    events = strict.events(body_bytes(response))
    assert [n for n, _ in events][:2] == ["message_start", "ping"]
    assert fake.operations == ["converse-stream"]
    sent = fake.requests[0][1]
    point = [{"cachePoint": {"type": "default"}}] if cached else []
    assert sent["system"] == [{"text": "Be brief."}, *point]
    assert sent["messages"] == [{"role": "user", "content": [{"text": "hi"}, *point]}]


def test_top_k_for_a_model_without_it_on_bedrock_is_a_400_naming_it(fake: FakeBedrock) -> None:
    response = _app(fake).handle(chat_event({
        "model": NOVA, "max_tokens": 100, "messages": USER, "top_k": 5}, path="/v1/messages"))
    assert response.status == 400
    assert "'top_k' is supported on Bedrock only for Claude models" in json.loads(
        body_bytes(response))["error"]["message"]
    assert fake.requests == []
