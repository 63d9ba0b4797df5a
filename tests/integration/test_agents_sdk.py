"""The OpenAI Agents SDK (openai-agents, pinned in requirements-dev.txt) against the dev server:
an ``Agent`` on the SDK's default model, the Responses API, through an ``AsyncOpenAI`` pointed
at the dev server, with one function tool the scripted model calls and then answers from, by
``Runner.run`` and by ``Runner.run_streamed``. Every answer the dev server sent is checked
against openai-python's types (tests/responses_check.py), and what the SDK sent is recorded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from agents import (
    Agent,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from agents.models.multi_provider import MultiProvider
from openai import AsyncOpenAI

from streamgate.deadline import Deadline
from streamgate.providers import Delta, Finish, TextDelta, ToolCallDelta, Usage
from streamgate.validation import CAP_TOOLS, ChatRequest
from tests import responses_check as check
from tests.conftest import running_dev_server
from tests.helpers import ScriptedProvider, make_app, replay
from tests.recording import Recording, recording

pytestmark = pytest.mark.clients

MODEL = "scripted-agent"
ANSWER = "It is sunny in Oslo, 21 °C."


class WeatherModel(ScriptedProvider):
    """Asks for the weather tool, then answers from its output (only if the output came back)."""

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        self.requests.append((request, model))
        outputs = [m.content for m in request.messages if m.role == "tool"]
        if not outputs:
            script: list[Any] = [ToolCallDelta(0, "", "call_weather", "get_weather"),
                                 ToolCallDelta(0, '{"city":'), ToolCallDelta(0, ' "Oslo"}'),
                                 Finish("tool_calls")]
        else:
            text = ANSWER if outputs[-1] == "sunny, 21 °C" else "the tool's output was lost"
            script = [TextDelta(text[:9]), TextDelta(text[9:]), Finish("stop")]
        return replay([*script, Usage(50, 8)], deadline)


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny, 21 °C" if city == "Oslo" else "unknown"


@pytest.fixture
def server() -> Iterator[tuple[str, Recording, WeatherModel]]:
    provider = WeatherModel(capabilities=frozenset({CAP_TOOLS}), models=[MODEL])
    app = recording(make_app(provider))
    with running_dev_server(app) as url:
        yield url, app, provider


def _agent(url: str) -> tuple[Agent[Any], AsyncOpenAI]:
    """An Agent on the SDK's default model (the Responses API), its client our dev server
    (close the client in the event loop that used it)."""
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    set_tracing_disabled(True)
    set_default_openai_client(client, use_for_tracing=False)
    set_default_openai_api("responses")
    return Agent(name="Weather", instructions="Answer with the weather tool.", model=MODEL,
                 tools=[get_weather]), client


def _check_exchanges(app: Recording, provider: WeatherModel, stream: bool) -> None:
    """Two requests, both answered 200 with valid Responses; what the SDK sent."""
    assert [e.status for e in app.exchanges] == [200, 200]
    for exchange in app.exchanges:
        headers, body, raw = exchange.headers, exchange.body, exchange.answer
        # What the SDK sends: no store, reasoning or previous_response_id, an empty include
        assert sorted(body) == sorted(["include", "input", "instructions", "model", "tools",
                                       *(["stream"] if stream else [])])
        assert body["include"] == [] and body["model"] == MODEL
        assert body.get("stream", False) is stream
        assert [(t["type"], t["name"], t["strict"]) for t in body["tools"]] == [
            ("function", "get_weather", True)]
        assert body["instructions"] == "Answer with the weather tool."
        assert headers["user-agent"].startswith("Agents/Python ")
        if stream:
            assert check.check_stream(raw).terminal == "response.completed"
        else:
            check.response(json.loads(raw))
    # The second request sent the whole conversation back (no stored state needed)
    second = app.exchanges[1].body
    assert [i.get("type", "message") for i in second["input"]] == [
        "message", "function_call", "function_call_output"]
    assert second["input"][2] == {"type": "function_call_output", "call_id": "call_weather",
                                  "output": "sunny, 21 °C"}
    assert [m.role for m in provider.requests[1][0].messages] == [
        "system", "user", "assistant", "tool"]


def test_runner_run_calls_the_tool_and_answers(
        server: tuple[str, Recording, WeatherModel]) -> None:
    url, app, provider = server
    agent, client = _agent(url)
    # The model named by a string is the SDK's default: its Responses model
    assert isinstance(MultiProvider().get_model(MODEL), OpenAIResponsesModel)

    async def run() -> Any:
        try:
            return await asyncio.wait_for(Runner.run(agent, "Weather in Oslo?"), 60)
        finally:
            await client.close()

    result = asyncio.run(run())
    assert result.final_output == ANSWER
    first, second = result.raw_responses
    assert first.response_id is not None and first.response_id.startswith("resp_")
    assert (second.usage.input_tokens, second.usage.output_tokens) == (50, 8)
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    _check_exchanges(app, provider, stream=False)


def test_runner_run_streamed_calls_the_tool_and_streams_the_answer(
        server: tuple[str, Recording, WeatherModel]) -> None:
    url, app, provider = server
    agent, client = _agent(url)

    async def run() -> tuple[Any, list[str], list[str]]:
        result = Runner.run_streamed(agent, "Weather in Oslo?")
        deltas: list[str] = []
        items: list[str] = []
        try:
            async for event in result.stream_events():
                if event.type == "raw_response_event" and \
                        event.data.type == "response.output_text.delta":
                    deltas.append(event.data.delta)
                elif event.type == "run_item_stream_event":
                    items.append(event.item.type)
        finally:
            await client.close()
        return result, deltas, items

    result, deltas, items = asyncio.run(asyncio.wait_for(run(), 60))
    assert result.final_output == ANSWER
    assert deltas == [ANSWER[:9], ANSWER[9:]]
    assert items == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    _check_exchanges(app, provider, stream=True)
