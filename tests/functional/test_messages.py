"""The Anthropic Messages dialect through the dev server, read by the official ``anthropic``
SDK, unmodified; every event and document checked strictly against the SDK's own types."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
import requests

from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.errors import (
    DeadlineExceededError,
    InternalError,
    PermissionDeniedError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from streamgate.handler import App
from streamgate.providers import Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from streamgate.runtime import run
from streamgate.validation import CAP_COUNT_TOKENS, CAP_TOOLS, ChatRequest
from tests import anthropic_strict as strict
from tests.conftest import running_dev_server, sdk_client
from tests.fake_runtime_api import FakeRuntimeAPI
from tests.helpers import ScriptedProvider, Step, body_bytes, chat_event

MODEL = "claude-scripted"
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]
WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
THOUGHT = [ReasoningDelta("The user wants "), ReasoningDelta("the weather."),
           ReasoningDelta("", signature="c2lnbmVk")]
TOOL_CALL = [ToolCallDelta(0, "", id="toolu_01", name="get_weather"),
             ToolCallDelta(0, '{"city": '), ToolCallDelta(0, '"Oslo"}'), Finish("tool_calls"),
             Usage(30, 12, cached_tokens=20, cache_write_tokens=4)]


class CountingProvider(ScriptedProvider):
    """A scripted provider that also counts tokens, as a backend with an exact count does."""

    def count_tokens(self, request: ChatRequest, model: str, deadline: Deadline) -> int:
        self.requests.append((request, model))
        return 7 * len(request.messages)


def _server(script: list[Step] | None = None, **settings: Any) -> tuple[App, ScriptedProvider]:
    provider = CountingProvider(
        script if script is not None else [TextDelta("Sunny"), TextDelta(", 21 °C."),
                                           Finish("stop"), Usage(25, 6)],
        capabilities=frozenset({CAP_TOOLS, CAP_COUNT_TOKENS}), models=[MODEL, "other"])
    app = App(load_settings({}, provider="local", metrics=False, **settings), provider)
    return app, provider


@pytest.fixture
def served() -> Iterator[tuple[str, ScriptedProvider, App]]:
    app, provider = _server()
    with running_dev_server(app) as url:
        yield url, provider, app


def _client(url: str, **kwargs: Any) -> anthropic.Anthropic:
    return sdk_client(anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, **kwargs))


def test_a_streamed_message_is_anthropics_event_sequence_every_event_strict(
        served: tuple[str, ScriptedProvider, App]) -> None:
    url, provider, _ = served
    # GIVEN a backend that answers two pieces of text
    # WHEN the SDK streams a message (its raw events)
    with _client(url) as client, client.messages.create(
            model=MODEL, max_tokens=100, messages=USER, stream=True) as stream:
        raw = list(stream)
    # THEN the events are Anthropic's, in order, and each one is the SDK's own type, strictly
    names = [e.type for e in raw]
    assert names == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]  # the SDK drops the ping
    response = requests.post(f"{url}/v1/messages", timeout=10, json={
        "model": MODEL, "max_tokens": 100, "messages": USER, "stream": True})
    events = strict.events(response.content)
    assert [n for n, _ in events][:2] == ["message_start", "ping"]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": 25, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 0, "output_tokens": 6}
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["request-id"] == response.headers["x-request-id"]
    request, model = provider.requests[0]
    assert model == MODEL and request.messages[0].content == USER[0]["content"]


def test_a_message_that_does_not_stream_is_one_strict_message(
        served: tuple[str, ScriptedProvider, App]) -> None:
    url, _, _ = served
    with _client(url) as client:
        message = client.messages.create(model=MODEL, max_tokens=100, messages=USER)
        raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=100,
                                                       messages=USER)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Sunny, 21 °C."  # type: ignore[union-attr]
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == (
        "end_turn", 25, 6)
    assert message.role == "assistant" and message.model == MODEL
    strict.message(json.loads(raw.http_response.content))
    assert raw.request_id == raw.headers["x-request-id"]


def test_stream_helper_joins_thinking_with_its_signature_text_and_tool_use() -> None:
    # GIVEN a backend that reasons (with a signature), says something, then calls a tool
    app, _ = _server([*THOUGHT, TextDelta("Let me check."), *TOOL_CALL])
    # WHEN the SDK's stream helper reads it to the end
    with running_dev_server(app) as url, _client(url) as client, client.messages.stream(
            model=MODEL, max_tokens=2000, messages=USER, tools=[WEATHER]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    # THEN the final message has the three blocks, the tool input parsed, usage with cache
    assert texts == ["Let me check."]
    thinking, text, tool = final.content
    assert thinking.type == "thinking" and thinking.thinking == "The user wants the weather."
    assert thinking.signature == "c2lnbmVk"
    assert text.type == "text" and text.text == "Let me check."
    assert tool.type == "tool_use" and (tool.id, tool.name, tool.input) == (
        "toolu_01", "get_weather", {"city": "Oslo"})
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens,
            final.usage.cache_creation_input_tokens, final.usage.output_tokens) == (6, 20, 4, 12)
    strict.message(final.model_dump(mode="json", exclude_unset=True))


def test_a_tool_use_round_trip_reaches_the_backend_as_calls_and_results() -> None:
    app, provider = _server([*TOOL_CALL])
    with running_dev_server(app) as url, _client(url) as client:
        # GIVEN the model asked for a tool
        first = client.messages.create(model=MODEL, max_tokens=500, messages=USER,
                                       tools=[WEATHER], tool_choice={"type": "any"})
        call = first.content[0]
        assert call.type == "tool_use"
        # WHEN the client sends the result back (an error, and a second part of text)
        provider.script = [TextDelta("It is sunny."), Finish("stop"), Usage(40, 4)]
        second = client.messages.create(model=MODEL, max_tokens=500, tools=[WEATHER], messages=[
            *USER, {"role": "assistant", "content": first.content},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call.id, "is_error": True,
                 "content": [{"type": "text", "text": "timeout"}]},
                {"type": "text", "text": "Try to answer anyway."}]}])
    # THEN the backend saw the call in the assistant turn, the result as a tool message first
    assert second.content[0].text == "It is sunny."  # type: ignore[union-attr]
    request = provider.requests[1][0]
    assert [m.role for m in request.messages] == ["user", "assistant", "tool", "user"]
    assistant, tool, user = request.messages[1:]
    assert [(c.id, c.name, json.loads(c.arguments)) for c in assistant.tool_calls] == [
        ("toolu_01", "get_weather", {"city": "Oslo"})]
    assert (tool.tool_call_id, tool.content) == ("toolu_01", "Error: timeout")
    assert user.content == "Try to answer anyway."
    assert provider.requests[0][0].tool_choice == "required"


def test_count_tokens_is_the_backends_exact_count_and_a_400_where_there_is_none() -> None:
    app, provider = _server()
    with running_dev_server(app) as url, _client(url) as client:
        counted = client.messages.count_tokens(model=MODEL, messages=USER, system="Be brief.")
        assert counted.input_tokens == 14  # the backend's own figure, two messages
        response = requests.post(f"{url}/v1/messages/count_tokens", timeout=10,
                                 json={"model": MODEL, "messages": USER})
        strict.strict(anthropic.types.MessageTokensCount, response.json())
        assert response.headers["request-id"]
    # a backend that cannot count: a clear 400, never an estimate
    plain = ScriptedProvider(models=[MODEL])
    with running_dev_server(App(load_settings({}, provider="local"), plain)) as url, \
            _client(url) as client, pytest.raises(anthropic.BadRequestError) as info:
        client.messages.count_tokens(model=MODEL, messages=USER)
    assert "Counting tokens is not available" in info.value.message
    strict.error(info.value.body)


@pytest.mark.parametrize(("failure", "status", "kind", "exception"), [
    (RateLimitError("slow down", retry_after=3), 429, "rate_limit_error",
     anthropic.RateLimitError),
    (PermissionDeniedError("no access to the model"), 403, "permission_error",
     anthropic.PermissionDeniedError),
    (UpstreamUnavailableError("busy", retry_after=1), 529, "overloaded_error",
     anthropic.OverloadedError),
    (UpstreamError("the backend failed"), 502, "api_error", anthropic.InternalServerError),
    (InternalError("a bug"), 500, "api_error", anthropic.InternalServerError),
    (UpstreamTimeoutError("no first token"), 504, "timeout_error",
     anthropic.GatewayTimeoutError),
    (DeadlineExceededError("out of time"), 504, "timeout_error",
     anthropic.GatewayTimeoutError),
])
def test_a_failure_before_the_first_byte_raises_the_sdks_own_exception(
        failure: Exception, status: int, kind: str, exception: type[Exception]) -> None:
    # GIVEN a backend that fails before its first delta
    app, _ = _server([failure])
    # WHEN the SDK asks (streamed: the status comes before any event)
    with running_dev_server(app) as url, _client(url) as client, \
            pytest.raises(exception) as info:
        client.messages.create(model=MODEL, max_tokens=10, messages=USER, stream=True)
    # THEN the status and the body are Anthropic's
    err = info.value
    assert isinstance(err, anthropic.APIStatusError)
    assert err.status_code == status
    strict.error(err.body)
    assert err.body["error"]["type"] == kind  # type: ignore[index]
    assert err.response.headers["request-id"]
    if status in (429, 529):
        assert err.response.headers["retry-after"]


@pytest.mark.parametrize(("request_", "status", "exception", "field"), [
    ({"max_tokens": 10, "messages": USER, "top_k": -1}, 400, anthropic.BadRequestError,
     "top_k"),
    ({"messages": USER}, 400, anthropic.BadRequestError, "max_tokens"),
    ({"max_tokens": 10, "messages": USER, "tools": [{"type": "web_search_20250305",
                                                     "name": "web_search"}]},
     400, anthropic.BadRequestError, "tools[0].type"),
    ({"max_tokens": 10, "messages": USER, "context_management": {"edits": [
        {"type": "clear_tool_uses_20250919"}]}},
     400, anthropic.BadRequestError, "context_management.edits[0]"),
    ({"max_tokens": 10, "messages": USER, "tools": [{**WEATHER, "defer_loading": True}]},
     400, anthropic.BadRequestError, "tools[0].defer_loading"),
    ({"max_tokens": 10, "messages": USER, "output_config": {"format": {"type": "json_schema"}}},
     400, anthropic.BadRequestError, "output_config.format"),
    ({"max_tokens": 10, "messages": USER, "model": "claude-unknown"}, 404,
     anthropic.NotFoundError, "claude-unknown"),
    ({"max_tokens": 10, "messages": [{"role": "user", "content": "x" * 3000}]}, 413,
     anthropic.ContentTooLargeError, "maximum size"),
])
def test_a_refused_request_raises_the_sdks_exception_naming_what_is_wrong(
        request_: dict[str, Any], status: int, exception: type[Exception], field: str) -> None:
    app, provider = _server(max_body_bytes=2048)
    with running_dev_server(app) as url, _client(url) as client, \
            pytest.raises(exception) as info:  # the SDK's own request path, any body
        client.post("/v1/messages", body={"model": MODEL, **request_},
                    cast_to=anthropic.types.Message)
    err = info.value
    assert isinstance(err, anthropic.APIStatusError) and err.status_code == status
    strict.error(err.body)
    assert field in err.body["error"]["message"]  # type: ignore[index]
    assert provider.requests == []


def test_an_unknown_key_is_a_401_in_anthropics_shape_from_x_api_key() -> None:
    # GIVEN a server that wants keys; the SDK sends its key in x-api-key
    app, _ = _server(auth="api_key", keys_table="unused")
    with running_dev_server(app) as url, _client(url) as client, \
            pytest.raises(anthropic.AuthenticationError) as info:
        client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    strict.error(info.value.body)
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "Incorrect API key" in info.value.message  # it was read, not found missing


def test_a_failure_after_the_first_byte_is_an_anthropic_error_event() -> None:
    app, _ = _server([TextDelta("Sun"), UpstreamUnavailableError("Overloaded")])
    with running_dev_server(app) as url, _client(url) as client:
        with client.messages.create(model=MODEL, max_tokens=10, messages=USER,
                                    stream=True) as stream:
            seen = []
            with pytest.raises(anthropic.APIStatusError) as info:
                for event in stream:
                    seen.append(event.type)
        raw = requests.post(f"{url}/v1/messages", timeout=10, json={
            "model": MODEL, "max_tokens": 10, "messages": USER, "stream": True}).content
    assert "content_block_delta" in seen
    assert info.value.body == {"type": "error", "error": {"type": "overloaded_error",
                                                          "message": "Overloaded"}}
    events = strict.events(raw)
    assert events[-1] == ("error", info.value.body)


def test_the_beta_path_with_its_query_string_and_betas_is_served(
        served: tuple[str, ScriptedProvider, App]) -> None:
    url, provider, _ = served
    with _client(url) as client:
        # the SDK's beta namespace calls POST /v1/messages?beta=true, as Claude Code does
        message = client.beta.messages.create(
            model=MODEL, max_tokens=10, messages=USER,
            betas=["interleaved-thinking-2025-05-14", "claude-code-20250219"])
    assert message.content[0].text == "Sunny, 21 °C."  # type: ignore[union-attr]
    native = provider.requests[0][0].native
    assert native is not None
    assert native.betas == ("interleaved-thinking-2025-05-14", "claude-code-20250219")


def test_max_tokens_above_the_servers_cap_is_lowered_to_it_with_the_thinking_budget() -> None:
    # GIVEN what Claude Code sends: max_tokens 32,000, thinking up to 31,999, display omitted,
    # effort, a context edit that keeps all thinking; the cap here is 4,096
    app, provider = _server([*THOUGHT, TextDelta("ok"), Finish("stop"), Usage(5, 5)])
    with running_dev_server(app) as url, _client(url) as client, client.messages.stream(
            model=MODEL, max_tokens=32_000, messages=USER,
            thinking={"type": "enabled", "budget_tokens": 31_999, "display": "omitted"},
            extra_body={"output_config": {"effort": "high"}, "context_management": {
                "edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}}) as stream:
        final = stream.get_final_message()
    # THEN the backend is asked for the cap, the budget under it, and the thinking text omitted
    request = provider.requests[0][0]
    assert request.max_tokens == app.settings.max_tokens_cap
    assert request.thinking_budget == app.settings.max_tokens_cap - 1
    assert request.native is not None
    assert request.native.body["thinking"]["budget_tokens"] == app.settings.max_tokens_cap - 1
    assert "context_management" not in request.native.body
    thinking = final.content[0]
    assert thinking.type == "thinking" and (thinking.thinking, thinking.signature) == (
        "", "c2lnbmVk")


def _runtime_loop(app: App, event: dict[str, Any]) -> bytes:
    with FakeRuntimeAPI([event]) as api:
        assert run(app, environ={"AWS_LAMBDA_RUNTIME_API": api.address}) == 0
    (posted,) = api.posted
    first, *rest = [data for _, data in posted.chunks]
    prelude = json.loads(first[:-8])
    assert prelude["statusCode"] == 200
    return b"".join(rest)


def _ids(raw: bytes) -> bytes:
    return re.sub(rb'"msg_[0-9a-f]+"', b'"msg_X"', raw)


def test_the_lambda_loop_and_the_dev_server_send_the_same_bytes() -> None:
    body = {"model": MODEL, "max_tokens": 2000, "messages": USER, "stream": True,
            "tools": [WEATHER]}
    script = [*THOUGHT, TextDelta("Let me check."), *TOOL_CALL]
    app, _ = _server(script)
    lambda_bytes = _runtime_loop(app, chat_event(body, path="/v1/messages"))
    app, _ = _server(script)
    with running_dev_server(app) as url:
        served = requests.post(f"{url}/v1/messages", json=body, timeout=10).content
    assert _ids(lambda_bytes) == _ids(served)
    strict.events(served)
    handled = _server(script)[0].handle(chat_event(body, path="/v1/messages"))
    assert _ids(body_bytes(handled)) == _ids(served)


@pytest.mark.parametrize(("method", "path", "status", "kind", "says"), [
    ("POST", "/v1/messages/batches", 404, "not_found_error",
     "Unknown path '/v1/messages/batches'; try POST /v1/messages"),
    ("GET", "/v1/messages", 405, "invalid_request_error", "use POST"),
    ("GET", "/v1/messages/count_tokens", 405, "invalid_request_error", "use POST"),
])
def test_a_wrong_path_or_method_under_messages_says_so_in_anthropics_shape(
        served: tuple[str, ScriptedProvider, App], method: str, path: str, status: int,
        kind: str, says: str) -> None:
    # Claude Code reads any 404 as "the model does not exist": the message says what is wrong
    url, _, _ = served
    response = requests.request(method, url + path, json={}, timeout=10)
    assert response.status_code == status
    body = response.json()
    strict.error(body)
    assert body["error"]["type"] == kind and says in body["error"]["message"]
    assert response.headers["request-id"]
