"""The Messages dialect's request, table by table: each field to its neutral twin, each refusal
a 400 naming the field the client sent; and the whole answer joined from a backend's events."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from streamgate.config import load_settings
from streamgate.dialects.anthropic import error_type, joined, parse_request
from streamgate.errors import (
    AuthenticationError,
    PayloadTooLargeError,
    RequestError,
    UpstreamError,
    UpstreamUnavailableError,
)
from streamgate.validation import Image

SETTINGS = load_settings({})
USER = [{"role": "user", "content": "hi"}]
TOOL = {"name": "get_weather", "input_schema": {"type": "object"}}
PNG = base64.b64encode(b"\x89PNG....").decode()


def _parse(headers: dict[str, str] | None = None, **body: Any) -> Any:
    data = {"model": "claude-x", "max_tokens": 100, "messages": USER, **body}
    return parse_request(data, SETTINGS, headers or {})


def test_every_field_reaches_its_neutral_twin() -> None:
    parsed = _parse(
        {"anthropic-beta": "a-1, b-2,a-1"},
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        stop_sequences=["END"], temperature=0.2, top_p=0.9, top_k=5, tools=[TOOL],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 2048}, metadata={"user_id": "u-1"},
        max_tokens=4000)
    chat = parsed.chat
    assert (chat.model, chat.max_tokens, chat.stop, chat.temperature, chat.top_p, chat.top_k,
            chat.user, chat.thinking_budget) == (
        "claude-x", 4000, ("END",), 0.2, 0.9, 5, "u-1", 2048)
    assert (chat.tool_choice, chat.tool_choice_name, chat.parallel_tool_calls) == (
        "function", "get_weather", False)
    assert [m.role for m in chat.messages] == ["system", "user"]
    assert chat.messages[0].cache_point and chat.messages[0].content == "Be brief."
    assert chat.native is not None and chat.native.betas == ("a-1", "b-2")
    assert "metadata" not in chat.native.body and "model" not in chat.native.body


def test_a_user_turn_gives_its_tool_results_first_then_its_text_and_images() -> None:
    chat = _parse(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "and look"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG}},
            {"type": "tool_result", "tool_use_id": "t1", "is_error": True,
             "cache_control": {"type": "ephemeral"},
             "content": [{"type": "text", "text": "down"},
                         {"type": "image", "source": {"type": "url",
                                                      "url": f"data:image/png;base64,{PNG}"}}]}]},
    ]).chat
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "user"]
    assistant, tool, user = chat.messages[1:]
    assert assistant.content == "Checking." and assistant.tool_calls[0].arguments == (
        '{"city":"Oslo"}')
    assert (tool.tool_call_id, tool.content, tool.cache_point) == ("t1", "Error: down", True)
    assert user.content == "and look"
    assert [type(p) for p in user.parts] == [str, Image, Image]
    assert user.at == "messages[2]"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": ""}, "model"),
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "document"}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "https://example.com/a.png"}}]}]},
     "messages[0].content[0].source.url"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x",
                                                  "cache_control": {"type": "forever"}}]}]},
     "messages[0].content[0].cache_control"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type"),
    ({"tools": [{"name": "a b", "input_schema": {"type": "object"}}]}, "tools[0].name"),
    ({"tools": [{**TOOL, "defer_loading": True}]}, "tools[0].defer_loading"),
    ({"tools": [{**TOOL, "allowed_callers": ["x"]}]}, "tools[0].allowed_callers"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "other"}}, "tool_choice.name"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "adaptive", "display": "full"}}, "thinking.display"),
    ({"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}},
     "context_management.edits[0]"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format"),
    ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
    ({"mcp_servers": [{}]}, "mcp_servers"),
    ({"prefill": "x"}, "prefill"),
    ({"metadata": {"user_id": "u", "tier": "x"}}, "metadata.tier"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(body: dict[str, Any],
                                                          param: str) -> None:
    with pytest.raises(RequestError) as info:
        _parse(**body)
    assert info.value.param == param, info.value.message


def test_max_tokens_over_the_cap_is_lowered_and_the_thinking_budget_with_it() -> None:
    chat = _parse(max_tokens=32_000, thinking={"type": "enabled", "budget_tokens": 31_999}).chat
    assert chat.max_tokens == SETTINGS.max_tokens_cap
    assert chat.thinking_budget == SETTINGS.max_tokens_cap - 1
    assert chat.native is not None
    assert chat.native.body["max_tokens"] == SETTINGS.max_tokens_cap
    assert chat.native.body["thinking"]["budget_tokens"] == SETTINGS.max_tokens_cap - 1


def test_a_count_needs_no_max_tokens_and_takes_no_generation_settings() -> None:
    data = {"model": "claude-x", "messages": USER}
    assert parse_request(data, SETTINGS, {}, counting=True).chat.max_tokens is None
    with pytest.raises(RequestError) as info:
        parse_request({**data, "temperature": 0.5}, SETTINGS, {}, counting=True)
    assert info.value.param == "temperature"


@pytest.mark.parametrize(("err", "status", "kind"), [
    (RequestError("x"), 400, "invalid_request_error"),
    (AuthenticationError("x"), 401, "authentication_error"),
    (PayloadTooLargeError("x"), 413, "request_too_large"),
    (UpstreamUnavailableError("x"), 529, "overloaded_error"),
    (UpstreamError("x"), 502, "api_error"),
])
def test_our_errors_take_anthropics_types(err: Any, status: int, kind: str) -> None:
    assert error_type(err) == (status, kind)


def test_a_backends_events_join_into_the_whole_message() -> None:
    message = joined([
        {"type": "ping"},
        {"type": "message_start", "message": {
            "id": "m", "type": "message", "role": "assistant", "model": "c", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": '{"a": '}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": "1}"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 9}},
        {"type": "message_stop"}])
    assert message["content"] == [{"type": "tool_use", "id": "t", "name": "f",
                                   "input": {"a": 1}}]
    assert (message["stop_reason"], message["usage"]) == (
        "tool_use", {"input_tokens": 3, "output_tokens": 9})
    with pytest.raises(UpstreamError):
        joined([{"type": "content_block_delta", "index": 5}])
