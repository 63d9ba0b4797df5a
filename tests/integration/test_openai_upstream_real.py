"""The openai provider against a real OpenAI-compatible server nobody here wrote:
llama-cpp-python's own server (`python -m llama_cpp.server`) serving the embedded Gemma model
on a loopback port, relayed through our dev server and read by the official openai SDK."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import openai
import pytest
import requests
from pydantic import BaseModel

from streamgate.config import load_settings
from streamgate.handler import App
from streamgate.providers import openai as openai_provider
from tests.conftest import running_dev_server, sdk_client
from tests.helpers import sse_json

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m"
QUESTION = [{"role": "user", "content": "Explain how rain forms."}]


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    from streamgate.providers.local import resolve_model_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The 270M model is a base model: the alpaca prompt format gets answers from it, its own
    # Gemma chat template mostly gets an immediate end of turn.
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model",
         str(resolve_model_path(load_settings({}))), "--model_alias", MODEL,
         "--chat_format", "alpaca", "--n_ctx", "2048", "--host", "127.0.0.1",
         "--port", str(port), "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "llama_cpp.server exited"
            try:
                if requests.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "llama_cpp.server did not start in 120 s"
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def relay(llama_server: str) -> Iterator[str]:
    """Our dev server configured by environment-style settings alone."""
    settings = load_settings({"STREAMGATE_PROVIDER": "openai",
                              "STREAMGATE_UPSTREAM_BASE_URL": llama_server})
    provider = openai_provider.create(settings)
    with running_dev_server(App(settings, provider)) as url:
        yield url
    provider.close()


def _client(url: str) -> openai.OpenAI:
    return sdk_client(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))


def test_models_are_the_upstreams(relay: str) -> None:
    with _client(relay) as client:
        assert [m.id for m in client.models.list()] == [MODEL]


def test_streaming_through_the_relay(relay: str) -> None:
    with _client(relay) as client:
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=QUESTION, stream=True, max_tokens=40, temperature=0))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) >= 5
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {MODEL}
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_non_streaming_relays_the_upstreams_usage(relay: str) -> None:
    with _client(relay) as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5 and completion.usage.prompt_tokens > 0
    assert completion.choices[0].message.content


def test_include_usage_relays_exactly_what_the_upstream_reports(
    relay: str, llama_server: str
) -> None:
    body = {"model": MODEL, "messages": QUESTION, "stream": True, "max_tokens": 8,
            "temperature": 0, "stream_options": {"include_usage": True}}
    direct = sse_json(requests.post(f"{llama_server}/chat/completions", json=body,
                                    timeout=60).content)
    with _client(relay) as client:
        chunks = list(client.chat.completions.create(**body))  # type: ignore[call-overload]
    upstream_usage = [c["usage"] for c in direct if c.get("usage")]
    ours = [c.usage for c in chunks if c.usage is not None]
    # Relayed when the upstream sends it, never invented when it does not.
    assert len(ours) == len(upstream_usage)
    if upstream_usage:
        assert ours[0].completion_tokens == upstream_usage[0]["completion_tokens"]


def test_stop_sequences_and_max_tokens_reach_the_upstream(relay: str) -> None:
    with _client(relay) as client:
        stopped = list(client.chat.completions.create(
            model=MODEL, messages=QUESTION, stream=True, max_tokens=60, temperature=0,
            stop=["e"]))
        capped = list(client.chat.completions.create(
            model=MODEL, messages=QUESTION, stream=True, max_tokens=3, temperature=0))
    text = "".join(c.choices[0].delta.content or "" for c in stopped if c.choices)
    assert "e" not in text
    assert stopped[-1].choices[0].finish_reason == "stop"
    assert capped[-1].choices[0].finish_reason == "length"


class Person(BaseModel):
    name: str
    age: int


def test_json_object_is_passed_on_and_honoured_by_the_real_upstream(relay: str) -> None:
    # GIVEN response_format json_object, which llama-cpp-python's server turns into its JSON
    # grammar
    with _client(relay) as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe Oslo as JSON."}],
            response_format={"type": "json_object"}, max_tokens=200, temperature=0)
    # THEN the relayed answer is a JSON object
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still the start of an object
        assert (completion.choices[0].message.content or "").lstrip().startswith("{")


def test_json_schema_is_passed_on_unchanged_and_the_upstreams_refusal_relayed(
    relay: str, llama_server: str
) -> None:
    # llama-cpp-python's server (0.3.36) knows only the types text and json_object: asked
    # directly, it refuses json_schema itself, with an HTTP 500 holding its validation error.
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 20,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "Person", "schema": Person.model_json_schema(), "strict": True}}}
    direct = requests.post(f"{llama_server}/chat/completions", json=body, timeout=60)
    assert direct.status_code == 500
    assert "Input should be 'text' or 'json_object'" in direct.json()["error"]["message"]
    # Through the relay the request is neither rewritten nor stripped of response_format: the
    # SDK's parse helper gets the upstream's refusal, as our 502 with the upstream's words.
    with _client(relay) as client, pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.parse(model=MODEL, messages=QUESTION,  # type: ignore[arg-type]
                                      response_format=Person, max_tokens=20)
    assert info.value.status_code == 502
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "upstream_error"
    assert error["message"].startswith("Upstream: ")
    assert "Input should be 'text' or 'json_object'" in error["message"]
