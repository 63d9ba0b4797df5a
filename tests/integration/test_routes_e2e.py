"""End to end: the dev server with a routes document serving two public models from two
different backends (a fake Bedrock, a scripted OpenAI-compatible upstream), read by the
official openai SDK, which never notices a fallback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from streamgate.config import load_settings
from streamgate.handler import App
from tests.conftest import running_dev_server, sdk_client
from tests.fake_bedrock import FakeBedrock, Reply, text_events
from tests.fake_openai import FakeUpstream, completion_reply, error_reply, text_stream
from tests.fake_openai import Reply as UpstreamReply


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FakeBedrock, FakeUpstream]]:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with FakeBedrock() as bedrock, FakeUpstream() as upstream:
        claude = {"name": "claude-bedrock", "kind": "bedrock", "model": "anthropic.claude-x",
                  "endpoint_url": bedrock.url, "max_attempts": 1}
        llama = {"name": "llama-vllm", "kind": "openai", "base_url": upstream.url,
                 "model": "upstream-model", "max_attempts": 1}
        routes = {"routes": {"claude": [claude, {**llama, "name": "llama-instead"}],
                             "llama": [llama]}}
        app = App(load_settings({}, routes=json.dumps(routes), metrics=False))
        with running_dev_server(app) as url:
            yield url, bedrock, upstream
        app.router.close()


def _client(url: str) -> openai.OpenAI:
    return sdk_client(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))


def test_two_public_models_from_two_backends_in_one_process(
    served: tuple[str, FakeBedrock, FakeUpstream]
) -> None:
    url, bedrock, upstream = served
    bedrock.replies.append(Reply(frames=text_events("From", " Bedrock")))
    upstream.replies.append(UpstreamReply(body=[text_stream("From", " vLLM")]))
    client = _client(url)
    assert [m.id for m in client.models.list()] == ["claude", "llama"]
    answers = {}
    for model in ("claude", "llama"):
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True))
        answers[model] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert {c.model for c in chunks} == {model}
    assert answers == {"claude": "From Bedrock", "llama": "From vLLM"}


def test_a_fallback_the_client_never_notices(
    served: tuple[str, FakeBedrock, FakeUpstream]
) -> None:
    # GIVEN Bedrock throttled, and the route's second target, the upstream, fine
    url, bedrock, upstream = served
    bedrock.replies.append(Reply(429, "ThrottlingException", "Too many tokens"))
    upstream.replies.append(completion_reply("Still answered"))
    # WHEN the SDK asks for claude, THEN it gets an ordinary answer (and could tell who served)
    raw = _client(url).chat.completions.with_raw_response.create(
        model="claude", messages=[{"role": "user", "content": "hi"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "Still answered"
    assert raw.headers["x-streamgate-backend"] == "llama-instead"
    assert len(bedrock.requests) == 1 and len(upstream.chat_requests()) == 1


@pytest.mark.parametrize(("upstream_wait", "shortest"), [("7", "2"), ("1", "1")],
                         ids=["first-target-shortest", "second-target-shortest"])
def test_when_every_target_is_throttled_the_sdk_raises_rate_limit_with_the_shortest_wait(
    served: tuple[str, FakeBedrock, FakeUpstream], upstream_wait: str, shortest: str
) -> None:
    # GIVEN both targets throttled: Bedrock (which we ask to wait 2 s) and the upstream, whose
    # Retry-After is longer in one case and shorter in the other (so neither the first, the
    # last nor the longest wait can pass for the shortest)
    url, bedrock, upstream = served
    bedrock.replies.append(Reply(429, "ThrottlingException", "Too many tokens"))
    upstream.replies.append(error_reply(429, "slow down",
                                        headers={"retry-after": upstream_wait}))
    # WHEN the SDK asks, THEN it raises RateLimitError with the shortest of the two waits
    with _client(url) as client, pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "hi"}])
    headers = caught.value.response.headers
    assert headers["retry-after"] == shortest
    assert headers["retry-after-ms"] == str(int(shortest) * 1000)
    assert len(bedrock.requests) == len(upstream.chat_requests()) == 1
