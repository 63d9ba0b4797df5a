"""Tool calls on the embedded model (providers/localtools.py): a grammar-forced call under
``required`` or a named tool, text under ``auto``, through the dev server and the SDK, in both
API dialects."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import sdk_client

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _client(base_url: str) -> openai.OpenAI:
    return sdk_client(
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused-locally", max_retries=0))


def test_required_makes_one_call_to_a_listed_tool_with_arguments_of_its_schema(
        model_server: str) -> None:
    # GIVEN two tools and tool_choice "required"
    with _client(model_server) as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, NOW], tool_choice="required",
            max_tokens=60)
    # THEN the answer is one call, finish reason tool_calls, arguments valid for that tool
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
        assert len(arguments["city"]) <= 40
    else:
        assert call.function.name == "now" and arguments == {}


def test_a_named_tool_is_the_one_called_and_streams_as_one_fragment(model_server: str) -> None:
    with _client(model_server) as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, NOW],
            tool_choice={"type": "function", "function": {"name": "now"}}, max_tokens=40,
            stream=True)
        chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0
    assert calls[0].function is not None and calls[0].function.name == "now"
    assert json.loads(calls[0].function.arguments or "") == {}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


def test_auto_answers_in_text_and_a_tool_result_reaches_the_model(model_server: str) -> None:
    # GIVEN a conversation where the model called a tool and the tool answered
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    with _client(model_server) as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=history, tools=[WEATHER], max_tokens=30,
            extra_body={"min_tokens": 0})
    # THEN it answers in text (a model may always choose not to call a tool)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.choices[0].message.tool_calls is None
    assert (completion.choices[0].message.content or "").strip()


def test_a_codex_style_custom_tool_comes_back_as_a_custom_call(model_server: str) -> None:
    # The grammar forces a call, but its input is free text: a 270M base model, sampling with
    # a fresh seed each time, now and then writes to the token limit without closing it. Such
    # an answer must be honest (incomplete, and no half call in its output); one of a few
    # asks must come back whole.
    whole = []
    with _client(model_server) as client:
        for _ in range(3):
            response = client.responses.create(
                model=MODEL, input="Fix the typo in README.md",
                tools=[{"type": "custom", "name": "apply_patch", "description": "Apply a patch",
                        "format": {"type": "text"}}],
                tool_choice="required", max_output_tokens=100, store=False)
            if response.status == "completed":
                whole.append(response)
                break
            assert response.status == "incomplete", response
            assert response.incomplete_details is not None
            assert response.incomplete_details.reason == "max_output_tokens"
            assert response.output == []
    assert whole, "three answers in a row were cut at the token limit"
    (item,) = whole[0].output
    assert item.type == "custom_tool_call" and item.name == "apply_patch"
    assert isinstance(item.input, str) and item.call_id.startswith("call_")


def test_strict_tool_the_grammar_cannot_enforce_and_min_tokens_are_refused(
        model_server: str) -> None:
    strict = {"type": "function", "function": {
        "name": "pick", "strict": True, "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "minimum": 3}},
            "required": ["n"], "additionalProperties": False}}}
    with _client(model_server) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=ASK, tools=[strict],
                                           tool_choice="required", max_tokens=20)
        assert refused.value.body["param"] == "tools"  # type: ignore[index]
        assert "minimum" in refused.value.body["message"]  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as floor:
            client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=20,
                                           extra_body={"min_tokens": 5})
        assert floor.value.body["param"] == "min_tokens"  # type: ignore[index]
