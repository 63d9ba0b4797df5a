"""End to end: dev server with STREAMGATE_PROVIDER=bedrock, boto3 pointed at the fake Bedrock
through AWS_ENDPOINT_URL_BEDROCK_RUNTIME, read by the official openai SDK."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from streamgate.handler import App
from streamgate.providers.bedrock import BedrockProvider
from tests.conftest import running_dev_server
from tests.fake_bedrock import FakeBedrock, Reply, text_events

MODEL = "us.amazon.nova-lite-v1:0"


@pytest.fixture
def bedrock_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeBedrock, str]]:
    with FakeBedrock() as fake:
        for name, value in {"AWS_ENDPOINT_URL_BEDROCK_RUNTIME": fake.url,
                            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_REGION": "us-east-1", "STREAMGATE_PROVIDER": "bedrock",
                            "STREAMGATE_BEDROCK_MAX_ATTEMPTS": "1"}.items():
            monkeypatch.setenv(name, value)
        app = App.from_env(defaults={"STREAMGATE_PROVIDER": "local"})
        assert isinstance(app.provider, BedrockProvider)
        with running_dev_server(app) as url:
            yield fake, url
        app.provider.client.close()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


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
    with pytest.raises(openai.RateLimitError) as info:
        _client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    assert info.value.response.headers["retry-after"] == "2"
