"""End to end: dev server with STREAMGATE_PROVIDER=bedrock, boto3 pointed at the fake Bedrock
through AWS_ENDPOINT_URL_BEDROCK_RUNTIME, read by the official openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from streamgate.handler import App
from streamgate.providers.bedrock import BedrockProvider
from tests.conftest import running_dev_server, sdk_client
from tests.fake_bedrock import (
    FakeBedrock,
    Reply,
    finish_events,
    start_event,
    text_block,
    text_events,
    tool_block,
)

MODEL = "us.amazon.nova-lite-v1:0"
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}
TOOL_ANSWER = [start_event(), *text_block(0, "Checking both."),
               *tool_block(1, "tooluse_a", "get_weather", '{"city"', ': "Oslo"}'),
               *tool_block(2, "tooluse_b", "get_weather", '{"city": "Bergen"}'),
               *finish_events("tool_use", usage=(40, 20))]


@pytest.fixture
def bedrock_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeBedrock, str]]:
    with FakeBedrock() as fake:
        for name, value in {"AWS_ENDPOINT_URL_BEDROCK_RUNTIME": fake.url,
                            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_REGION": "us-east-1", "STREAMGATE_PROVIDER": "bedrock",
                            "STREAMGATE_BEDROCK_MAX_ATTEMPTS": "1"}.items():
            monkeypatch.setenv(name, value)
        app = App.from_env(defaults={"STREAMGATE_PROVIDER": "local"})
        provider = app.router.provider
        assert isinstance(provider, BedrockProvider)
        with running_dev_server(app) as url:
            yield fake, url
        provider.client.close()


def _client(url: str) -> openai.OpenAI:
    return sdk_client(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))


def test_sdk_streams_bedrock_text_with_usage(bedrock_server: tuple[FakeBedrock, str]) -> None:
    fake, url = bedrock_server
    fake.replies.append(Reply(frames=text_events("Hello", " there", usage=(9, 2))))
    chunks = list(_client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello there")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 11
    assert fake.requests[0][0] == MODEL


def test_sdk_non_streaming_bedrock(bedrock_server: tuple[FakeBedrock, str]) -> None:
    fake, url = bedrock_server
    fake.replies.append(Reply(frames=text_events("Done.", stop="max_tokens")))
    completion = _client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert completion.choices[0].message.content == "Done."
    assert completion.choices[0].finish_reason == "length"
    assert fake.requests[0][1]["inferenceConfig"] == {"maxTokens": 3}


def test_throttling_raises_rate_limit_error_with_retry_hint(
    bedrock_server: tuple[FakeBedrock, str],
) -> None:
    fake, url = bedrock_server
    fake.replies.append(Reply(429, "ThrottlingException", "Too many tokens"))
    with _client(url) as client, pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    assert info.value.response.headers["retry-after"] == "2"


def test_sdk_accumulates_streamed_tool_calls(bedrock_server: tuple[FakeBedrock, str]) -> None:
    fake, url = bedrock_server
    fake.replies.append(Reply(frames=TOOL_ANSWER))
    # The SDK's own stream helper merges tool-call fragments by index, as agents do.
    with _client(url).chat.completions.stream(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo and Bergen?"}],
            tools=[WEATHER], stream_options={"include_usage": True}) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Checking both."
    assert message.tool_calls is not None
    assert [(c.id, c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
            for c in message.tool_calls] == [
        ("tooluse_a", "get_weather", {"city": "Oslo"}),
        ("tooluse_b", "get_weather", {"city": "Bergen"})]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.total_tokens == 60


def test_sdk_tool_round_trip_non_streaming(bedrock_server: tuple[FakeBedrock, str]) -> None:
    fake, url = bedrock_server
    fake.replies.append(Reply(frames=TOOL_ANSWER))
    fake.replies.append(Reply(frames=text_events("Oslo 4C, Bergen 7C.")))
    client = _client(url)
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo and Bergen?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    calls = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and calls is not None
    # Send the SDK's own message back with one result per call, as an agent loop does.
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": c.id, "content": f"result {i}"}
                 for i, c in enumerate(calls)]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "Oslo 4C, Bergen 7C."
    sent = fake.requests[1][1]["messages"]
    assert [b["toolUse"]["toolUseId"] for b in sent[1]["content"] if "toolUse" in b] == [
        "tooluse_a", "tooluse_b"]
    assert [b["toolResult"]["toolUseId"] for b in sent[2]["content"]] == [
        "tooluse_a", "tooluse_b"]
