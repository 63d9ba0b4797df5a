"""The document the embedded model continues: tool calls and their results are in it."""

from __future__ import annotations

from streamgate.providers.local import render_prompt
from streamgate.providers.localtools import render_tools
from streamgate.validation import ChatRequest, Message, Tool, ToolCall


def test_earlier_calls_and_their_results_are_lines_of_the_document() -> None:
    # GIVEN a turn that called a tool, and the tool's answer
    messages = (Message("user", "Weather in Paris?"),
                Message("assistant", "", tool_calls=(
                    ToolCall("call_1", "get_weather", '{"city":"Paris"}'),)),
                Message("tool", "Sunny, 21 C", tool_call_id="call_1"))
    # WHEN the prompt is rendered
    document = render_prompt(messages)
    # THEN the model reads the call and what the tool answered, in order, then answers
    call = document.index('Called get_weather with {"city":"Paris"}')
    result = document.index("Result of get_weather: Sunny, 21 C")
    assert document.index("Question: Weather in Paris?") < call < result
    assert document.endswith("Detailed answer:\n\n")


def test_tools_are_named_unless_none_may_be_called() -> None:
    tools = (Tool("get_weather", "The weather in a city.\nMore."), Tool("now"))
    request = ChatRequest(model=None, messages=(Message("user", "hi"),), tools=tools)
    assert render_tools(request) == "Tools: get_weather (The weather in a city.), now\n\n"
    assert render_tools(ChatRequest(model=None, messages=(), tools=tools,
                                    tool_choice="none")) == ""
    assert "Tools: now" in render_prompt(request.messages, "Tools: now\n\n")
