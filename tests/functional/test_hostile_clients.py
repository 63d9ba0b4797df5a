"""Text that JSON can carry but UTF-8 cannot (a lone surrogate, ``"\\ud800"``), in every field a
client fills, against every provider and through both drivers: always a 400 naming the field,
never a 500, a dropped connection or an exception out of App.handle. And malformed Lambda
events: a 400, not a 500."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from streamgate.config import load_settings
from streamgate.credentials import ApiKey
from streamgate.handler import App
from streamgate.httpclient import Upstream
from streamgate.providers.bedrock import BedrockProvider
from streamgate.providers.local import LocalProvider
from streamgate.providers.openai import OpenAIProvider
from streamgate.runtime import run
from streamgate.validation import CAP_IMAGES, CAP_PENALTIES, CAP_SEED, CAP_TOOLS
from tests.conftest import running_dev_server
from tests.fake_bedrock import FakeBedrock
from tests.fake_openai import FakeUpstream
from tests.fake_runtime_api import FakeRuntimeAPI
from tests.helpers import ScriptedProvider, body_bytes, chat_event, load_event

LONE = "\\ud800"  # as the client's JSON text carries it
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# (raw JSON body with a lone surrogate in one field, the param the 400 must name)
CASES = [
    (f'{{"model": "m{LONE}", "prompt": "hi"}}', "model"),
    (f'{{"prompt": "hi {LONE}"}}', "prompt"),
    (f'{{"messages": [{{"role": "user", "content": "x{LONE}"}}]}}', "messages[0].content"),
    (f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "{LONE}"}}]}}]}}',
     "messages[0].content[0].text"),
    (f'{{"prompt": "hi", "stop": ["ok", "{LONE}"]}}', "stop[1]"),
    (f'{{"prompt": "hi", "user": "{LONE}x"}}', "user"),
    (f'{{"prompt": "hi", "tools": [{{"type": "function", "function": {{"name": "f{LONE}"}}}}]}}',
     "tools[0].function.name"),
    (f'{{"messages": [{{"role": "user", "content": "hi"}}, {{"role": "assistant", '
     f'"tool_calls": [{{"id": "c1", "type": "function", "function": {{"name": "f", '
     f'"arguments": "{{\\"a\\": \\"{LONE}\\"}}"}}}}]}}]}}',
     "messages[1].tool_calls[0].function.arguments"),
    (f'{{"prompt": "hi", "metadata": {{"{LONE}": 1}}}}', "metadata"),
]
IDS = ["model", "prompt", "content", "content-part", "stop", "user", "tool-name",
       "tool-arguments", "object-key"]


class _NoModel:
    """An llm that must never be reached: the refusal comes before any provider work."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the model was called ({name})")


@pytest.fixture(params=["scripted", "local", "openai", "bedrock"])
def app(request: pytest.FixtureRequest) -> Iterator[App]:
    everything = frozenset({CAP_TOOLS, CAP_IMAGES, CAP_PENALTIES, CAP_SEED})
    kind = request.param
    if kind == "scripted":
        s = load_settings({}, provider="local")
        yield App(s, ScriptedProvider(capabilities=everything, models=["m", "scripted-1"]))
    elif kind == "local":
        s = load_settings({}, provider="local")
        yield App(s, LocalProvider(_NoModel(), s))
    elif kind == "openai":
        with FakeUpstream() as fake:
            s = load_settings({}, provider="openai", upstream_base_url=fake.url,
                              upstream_models=("m",))
            provider = OpenAIProvider(s, ApiKey(None, 60), Upstream(fake.url, 5))
            yield App(s, provider)
            provider.close()
            assert fake.chat_requests() == []
    else:
        with FakeBedrock() as fake:
            s = load_settings({}, provider="bedrock", default_model="m")
            yield App(s, BedrockProvider(s, fake.client()))
            assert fake.requests == []


def _lambda(app: App, raw: str) -> tuple[int, dict[str, Any]]:
    response = app.handle(chat_event(None, raw=raw))
    doc = json.loads(body_bytes(response))
    response.close()
    return response.status, doc


def _runtime_loop(app: App, raw: str) -> tuple[int, dict[str, Any]]:
    with FakeRuntimeAPI([chat_event(None, raw=raw)]) as api:
        assert run(app, environ={"AWS_LAMBDA_RUNTIME_API": api.address}) == 0
    (posted,) = api.posted
    first, *rest = [data for _, data in posted.chunks]
    prelude = json.loads(first[:-8])
    return prelude["statusCode"], json.loads(b"".join(rest))


def _dev_server(app: App, raw: str) -> tuple[int, dict[str, Any]]:
    with running_dev_server(app) as url:
        r = requests.post(url + "/v1/chat/completions", data=raw.encode(), timeout=10,
                          headers={"content-type": "application/json"})
    return r.status_code, r.json()


@pytest.mark.parametrize("driver", [_lambda, _runtime_loop, _dev_server],
                         ids=["handler", "lambda-loop", "dev-server"])
@pytest.mark.parametrize(("raw", "param"), CASES, ids=IDS)
def test_a_lone_surrogate_in_any_field_is_a_400_naming_it(
    app: App, driver: Callable[[App, str], tuple[int, dict[str, Any]]], raw: str, param: str
) -> None:
    # GIVEN a body that is valid JSON but holds a lone surrogate in one field
    json.loads(raw)
    # WHEN it reaches the service through a driver
    status, doc = driver(app, raw)
    # THEN it is refused with a 400 naming the field, before any model is called
    assert status == 400, doc
    assert doc["error"]["param"] == param
    assert doc["error"]["type"] == "invalid_request_error"
    assert "not valid Unicode" in doc["error"]["message"]


def test_a_valid_surrogate_pair_is_ordinary_text() -> None:
    provider = ScriptedProvider()
    s = load_settings({}, provider="local")
    response = App(s, provider).handle(chat_event(None, raw='{"prompt": "smile \\ud83d\\ude00"}'))
    assert response.status == 200
    assert provider.requests[0][0].messages[0].content == "smile \U0001f600"


def _malformed(path: str, value: Any) -> dict[str, Any]:
    event = load_event("function-url-chat-stream.json" if path[0] != "rest"
                       else "rest-api-prompt.json")
    node = event
    for key in path[1:-1]:
        node = node[key]
    node[path[-1]] = value
    return event


@pytest.mark.parametrize(("path", "value"), [
    (("url", "requestContext"), "a string"),
    (("url", "requestContext"), ["a", "list"]),
    (("url", "requestContext", "authorizer"), "a string"),
    (("url", "requestContext", "authorizer"), {"iam": "a string"}),
    (("url", "headers"), ["not", "a", "map"]),
    (("url", "headers"), {"x-thing": {"nested": True}}),
    (("url", "rawPath"), {"a": 1}),
    (("url", "requestContext", "http", "method"), None),
    (("url", "body"), {"prompt": "an object, not text"}),
    (("rest", "multiValueHeaders"), ["a", "list"]),
    (("rest", "requestContext"), "a string"),
    (("rest", "requestContext", "identity"), 7),
    (("rest", "httpMethod"), ["POST"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_malformed_lambda_event_is_a_400(path: tuple[str, ...], value: Any) -> None:
    provider = ScriptedProvider(models=["gemma-3-270m"])
    app = App(load_settings({}, provider="local"), provider)
    response = app.handle(_malformed(path, value))
    doc = json.loads(body_bytes(response).removeprefix(b"data: "))
    assert response.status == 400, doc
    assert doc["error"]["type"] == "invalid_request_error"
    assert provider.requests == []


@pytest.mark.parametrize("event", [None, [], "text", 7, {"version": "2.0"}, {}])
def test_anything_that_is_not_an_http_event_is_a_400(event: Any) -> None:
    response = App(load_settings({}, provider="local"), ScriptedProvider()).handle(event)
    assert response.status == 400
