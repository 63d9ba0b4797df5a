"""The Responses API (``POST /v1/responses`` and its stored responses), through the handler and
through the dev server with the real ``openai`` SDK. Every streamed event, ``Response`` and
``ResponseItemList`` is validated strictly against openai-python's own types
(tests/responses_check.py); the Lambda loop gives the same bytes as the dev server."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from streamgate.deadline import Deadline
from streamgate.errors import RateLimitError, UpstreamError
from streamgate.handler import App, Response
from streamgate.providers import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from streamgate.validation import CAP_TOOLS, Message, ToolCall
from tests import responses_check as check
from tests.helpers import ScriptedProvider, Step, body_bytes, chat_event, make_app

ROOT = Path(__file__).resolve().parents[2]
PATH = "/v1/responses"
TOOLS = frozenset({CAP_TOOLS})
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}
# Codex's apply_patch, as it sends it: a custom (freeform) tool with a Lark grammar.
APPLY_PATCH = {"type": "custom", "name": "apply_patch",
               "description": "Use the `apply_patch` tool to edit files.",
               "format": {"type": "grammar", "syntax": "lark",
                          "definition": 'start: begin_patch hunk+ end_patch\n'
                                        'begin_patch: "*** Begin Patch" LF\n'}}
PATCH = ("*** Begin Patch\n*** Add File: hello.txt\n+Hello, \"world\" \\ ünïcode\t!\n"
         "*** End Patch\n")


def _post(app: App, body: Any, *, headers: Mapping[str, str] | None = None,
          path: str = PATH, method: str = "POST") -> tuple[Response, bytes]:
    response = app.handle(chat_event(body, path=path, method=method,
                                     headers=dict(headers or {})))
    raw = body_bytes(response)
    response.close()
    return response, raw


def _stream(provider: ScriptedProvider, body: dict[str, Any],
            **settings: Any) -> tuple[check.Stream, ScriptedProvider]:
    response, raw = _post(make_app(provider, **settings),
                          {"model": "scripted-1", "stream": True, **body})
    assert response.status == 200, raw
    assert response.headers["content-type"] == "text/event-stream"
    return check.check_stream(raw), provider


def _document(provider: ScriptedProvider, body: dict[str, Any]) -> dict[str, Any]:
    response, raw = _post(make_app(provider), {"model": "scripted-1", **body})
    assert response.status == 200, raw
    assert response.headers["content-type"] == "application/json"
    doc: dict[str, Any] = json.loads(raw)
    check.response(doc)
    return doc


def _error(raw: bytes) -> dict[str, Any]:
    doc = json.loads(raw)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = doc["error"]
    return error


def _without_ids(doc: Any) -> Any:
    """A document with what differs between two runs of one request (ids, times) blanked."""
    if isinstance(doc, dict):
        return {k: ("*" if k in ("id", "item_id", "created_at", "completed_at")
                    or (k == "call_id" and str(v).startswith("call_")) else _without_ids(v))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [_without_ids(v) for v in doc]
    return doc


# -- streams: every event valid, in order, with one terminal event ---------------------------


def test_text_streams_as_one_message_item_and_completes_with_usage() -> None:
    provider = ScriptedProvider([TextDelta("Hel"), TextDelta(""), TextDelta("lo"),
                                 Finish("stop"), Usage(11, 2, cached_tokens=4)])
    stream, _ = _stream(provider, {"input": "Say hello", "instructions": "Be brief",
                                   "metadata": {"run": "7"}, "user": "u-1"})
    assert stream.types == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    final = stream.final
    assert [d["delta"] for d in stream.of("response.output_text.delta")] == ["Hel", "lo"]
    (item,) = final["output"]
    assert (item["type"], item["role"], item["status"]) == ("message", "assistant", "completed")
    assert item["content"] == [{"type": "output_text", "text": "Hello", "annotations": [],
                                "logprobs": []}]
    assert final["usage"] == {"input_tokens": 11, "output_tokens": 2, "total_tokens": 13,
                              "input_tokens_details": {"cached_tokens": 4,
                                                       "cache_write_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}}
    assert (final["instructions"], final["metadata"], final["user"], final["model"]) == (
        "Be brief", {"run": "7"}, "u-1", "scripted-1")
    assert final["completed_at"] >= final["created_at"] and final["error"] is None
    # The provider got the instructions as a system message first.
    (request, _), = provider.requests
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief"),
                                                               ("user", "Say hello")]


def test_reasoning_streams_as_a_reasoning_item_before_the_message() -> None:
    stream, _ = _stream(ScriptedProvider([
        ReasoningDelta("Think"), ReasoningDelta("ing."), TextDelta("Done."), Finish("stop"),
        Usage(3, 4)]), {"input": "hi", "reasoning": {"effort": "low", "summary": "auto"}})
    reasoning, message = stream.final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Thinking."}]
    assert message["content"][0]["text"] == "Done."
    assert [d["delta"] for d in stream.of("response.reasoning_text.delta")] == ["Think", "ing."]
    assert stream.final["reasoning"] == {"effort": "low", "summary": "auto"}


def test_a_function_call_streams_its_arguments_and_completes_as_an_output_item() -> None:
    stream, provider = _stream(ScriptedProvider([
        ToolCallDelta(0, "", "call_abc", "get_weather"), ToolCallDelta(0, '{"city":'),
        ToolCallDelta(0, ' "Oslo"}'), Finish("tool_calls"), Usage(20, 9)],
        capabilities=TOOLS), {"input": "Weather in Oslo?", "tools": [WEATHER],
                              "tool_choice": "auto"})
    (call,) = stream.final["output"]
    assert {k: call[k] for k in ("type", "call_id", "name", "arguments", "status")} == {
        "type": "function_call", "call_id": "call_abc", "name": "get_weather",
        "arguments": '{"city": "Oslo"}', "status": "completed"}
    assert [d["delta"] for d in stream.of("response.function_call_arguments.delta")] == [
        '{"city":', ' "Oslo"}']
    assert stream.final["tools"] == [WEATHER] and stream.final["tool_choice"] == "auto"
    (request, _), = provider.requests
    assert [(t.name, t.parameters) for t in request.tools] == [
        ("get_weather", WEATHER["parameters"])]


def test_two_parallel_function_calls_are_two_output_items_in_order() -> None:
    stream, _ = _stream(ScriptedProvider([
        TextDelta("Checking both."),
        ToolCallDelta(0, '{"city": "Oslo"}', "call_1", "get_weather"),
        ToolCallDelta(1, '{"city":', "call_2", "get_weather"), ToolCallDelta(1, ' "Rome"}'),
        Finish("tool_calls")], capabilities=TOOLS), {"input": "Oslo and Rome?",
                                                     "tools": [WEATHER]})
    message, first, second = stream.final["output"]
    assert message["type"] == "message"
    assert [(c["call_id"], c["arguments"]) for c in (first, second)] == [
        ("call_1", '{"city": "Oslo"}'), ("call_2", '{"city": "Rome"}')]
    assert stream.final["usage"] is None  # the provider reported none
    assert stream.final["parallel_tool_calls"] is True


def test_parallel_calls_whose_fragments_interleave_still_stream_each_item_whole() -> None:
    # GIVEN a backend that sends the second call's start before the first call's arguments
    stream, _ = _stream(ScriptedProvider([
        ToolCallDelta(0, "", "call_1", "get_weather"),
        ToolCallDelta(1, "", "call_2", "get_weather"),
        ToolCallDelta(0, '{"city": "Oslo"}'), ToolCallDelta(1, '{"city": "Rome"}'),
        Finish("tool_calls")], capabilities=TOOLS), {"input": "Oslo and Rome?",
                                                     "tools": [WEATHER]})
    # THEN each item's events still come between its added and done, and its arguments whole
    assert [(c["call_id"], c["arguments"]) for c in stream.final["output"]] == [
        ("call_1", '{"city": "Oslo"}'), ("call_2", '{"city": "Rome"}')]


def test_custom_tool_calls_round_trip_name_input_and_call_id_exactly() -> None:
    # GIVEN Codex's apply_patch (a custom tool) and a history holding an earlier custom call
    provider = ScriptedProvider([
        ToolCallDelta(0, "", "call_patch_2", "apply_patch"),
        ToolCallDelta(0, json.dumps({"input": PATCH})[:25]),
        ToolCallDelta(0, json.dumps({"input": PATCH})[25:]),
        Finish("tool_calls"), Usage(40, 30)], capabilities=TOOLS)
    history = [
        {"type": "message", "role": "user", "content": [{"type": "input_text",
                                                         "text": "Add hello.txt"}]},
        {"type": "custom_tool_call", "call_id": "call_patch_1", "name": "apply_patch",
         "input": PATCH},
        {"type": "custom_tool_call_output", "call_id": "call_patch_1",
         "output": "Done: A hello.txt"},
        {"type": "message", "role": "user", "content": "Once more"},
    ]
    stream, _ = _stream(provider, {"input": history, "tools": [WEATHER, APPLY_PATCH]})
    # THEN the backend saw a function tool of one string, the earlier call as an assistant
    # tool call with arguments {"input": ...}, and its output as a tool message
    (request, _), = provider.requests
    tool = request.tools[1]
    assert tool.name == "apply_patch" and tool.parameters is not None
    assert tool.parameters["required"] == ["input"]
    assert tool.description is not None and "begin_patch hunk+ end_patch" in tool.description
    assert request.messages[1:3] == (
        Message("assistant", "", tool_calls=(ToolCall("call_patch_1", "apply_patch",
                                                      json.dumps({"input": PATCH},
                                                                 ensure_ascii=False,
                                                                 separators=(",", ":"))),),
                at="input[1]"),
        Message("tool", "Done: A hello.txt", tool_call_id="call_patch_1", at="input[2]"))
    assert json.loads(request.messages[1].tool_calls[0].arguments) == {"input": PATCH}
    # AND the backend's call came back as a custom_tool_call with the input text exactly
    (call,) = stream.final["output"]
    assert {k: call[k] for k in ("type", "call_id", "name", "input")} == {
        "type": "custom_tool_call", "call_id": "call_patch_2", "name": "apply_patch",
        "input": PATCH}
    assert [d["input"] for d in stream.of("response.custom_tool_call_input.done")] == [PATCH]
    assert stream.final["tools"] == [WEATHER, APPLY_PATCH]


def test_a_custom_tool_can_be_named_in_tool_choice() -> None:
    stream, provider = _stream(ScriptedProvider([
        ToolCallDelta(0, '{"input": "x"}', "call_1", "apply_patch"), Finish("tool_calls")],
        capabilities=TOOLS), {"input": "patch it", "tools": [APPLY_PATCH],
                              "tool_choice": {"type": "custom", "name": "apply_patch"}})
    (request, _), = provider.requests
    assert (request.tool_choice, request.tool_choice_name) == ("function", "apply_patch")
    assert stream.final["tool_choice"] == {"type": "custom", "name": "apply_patch"}
    assert stream.final["output"][0]["input"] == "x"


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"),
                                                ("content_filter", "content_filter")])
def test_a_cut_answer_ends_with_response_incomplete_and_its_reason(finish: Any,
                                                                   reason: str) -> None:
    stream, _ = _stream(ScriptedProvider([TextDelta("Once upon"), Finish(finish),
                                          Usage(5, 16)]),
                        {"input": "A story", "max_output_tokens": 16})
    assert stream.terminal == "response.incomplete"
    assert stream.final["incomplete_details"] == {"reason": reason}
    assert stream.final["max_output_tokens"] == 16
    assert stream.final["output"][0]["status"] == "incomplete"
    assert stream.final["completed_at"] is None


def test_the_items_a_cut_answer_was_cut_in_are_incomplete_in_the_stream_and_the_document(
) -> None:
    # GIVEN an answer cut (max_output_tokens) in a call, after a message that was complete
    def script() -> list[Step]:
        return [TextDelta("Let me check."), ToolCallDelta(0, '{"ci', "call_1", "get_weather"),
                Finish("length")]

    body = {"input": "Weather?", "tools": [WEATHER], "max_output_tokens": 8}
    stream, _ = _stream(ScriptedProvider(script(), capabilities=TOOLS), body)
    doc = _document(ScriptedProvider(script(), capabilities=TOOLS), body)
    # THEN the call is incomplete, the message is not, in output_item.done as in both Responses
    done = [d["item"]["status"] for d in stream.of("response.output_item.done")]
    assert done == ["completed", "incomplete"]
    assert [i["status"] for i in stream.final["output"]] == done
    assert _without_ids(doc) == _without_ids(stream.final)


@pytest.mark.parametrize(("error", "code"), [
    (RateLimitError("Slow down", retry_after=3), "rate_limit_exceeded"),
    (UpstreamError("The model went away"), "server_error"),
    (UpstreamError("Prompt is too long", code="context_length_exceeded"),
     "context_length_exceeded"),
    (RuntimeError("a bug, with /var/task/secret.py in it"), "server_error"),
])
def test_a_failure_after_the_first_byte_ends_with_response_failed_and_its_code(
        error: BaseException, code: str) -> None:
    stream, _ = _stream(ScriptedProvider([TextDelta("Partial"), error]), {"input": "hi"})
    assert stream.terminal == "response.failed"
    failed = stream.final["error"]
    assert failed["code"] == code
    assert "secret.py" not in failed["message"] and failed["message"]
    assert stream.final["usage"] is None


@pytest.mark.parametrize("script", [
    [TextDelta("no finish reason")],
    [TextDelta("a"), 0.5],  # cut by the deadline
    [],
], ids=["no-finish", "deadline", "nothing"])
def test_a_stream_never_ends_without_a_terminal_event(script: list[Step]) -> None:
    # GIVEN a backend that ends without a finish reason, or runs past the deadline
    app = make_app(ScriptedProvider(script))
    response = app.handle(chat_event({"input": "hi", "stream": True}, path=PATH),
                          deadline=Deadline.after(0.3))
    raw = body_bytes(response)
    response.close()
    # THEN (once the answer has begun) the stream still ends with exactly one terminal event
    if response.status == 200:
        assert check.check_stream(raw).terminal == "response.failed"
    else:  # nothing came before the failure: a real status
        assert response.status in (502, 504)
        assert _error(raw)["code"]


# -- the same answers as whole documents -----------------------------------------------------


def test_a_request_that_does_not_stream_gets_the_response_the_stream_ends_with() -> None:
    def script() -> list[Step]:
        return [ReasoningDelta("Hmm."), TextDelta("Calling."),
                ToolCallDelta(0, '{"city": "Oslo"}', "call_1", "get_weather"),
                ToolCallDelta(1, '{"input": "*** Begin Patch\\n"}', "call_2", "apply_patch"),
                Finish("tool_calls"), Usage(7, 5)]

    body = {"input": "go", "tools": [WEATHER, APPLY_PATCH]}
    doc = _document(ScriptedProvider(script(), capabilities=TOOLS), body)
    stream, _ = _stream(ScriptedProvider(script(), capabilities=TOOLS), body)
    assert doc["status"] == "completed"
    assert [i["type"] for i in doc["output"]] == ["reasoning", "message", "function_call",
                                                  "custom_tool_call"]
    assert _without_ids(doc) == _without_ids(stream.final)


def test_a_cut_answer_that_does_not_stream_is_an_incomplete_response() -> None:
    doc = _document(ScriptedProvider([TextDelta("Once"), Finish("length")]),
                    {"input": "A story", "max_output_tokens": 1})
    assert (doc["status"], doc["incomplete_details"]) == ("incomplete",
                                                          {"reason": "max_output_tokens"})


# -- errors before the first byte: a status and OpenAI's error body ------------------------

HOSTED = ["web_search", "web_search_preview", "file_search", "code_interpreter",
          "computer_use_preview", "mcp", "image_generation", "local_shell", "shell",
          "apply_patch"]
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    *((f"hosted tool {t}", {"tools": [{"type": t}]}, "tools[0].type") for t in HOSTED),
    ("background", {"background": True}, "background"),
    ("truncation auto", {"truncation": "auto"}, "truncation"),
    ("include logprobs", {"include": ["message.output_text.logprobs"]}, "include[0]"),
    ("include file search", {"include": ["reasoning.encrypted_content",
                                         "file_search_call.results"]}, "include[1]"),
    ("include not a list", {"include": "reasoning.encrypted_content"}, "include"),
    ("unknown parameter", {"frobnicate": 1}, "frobnicate"),
    ("conversation", {"conversation": "conv_1"}, "conversation"),
    ("prompt template", {"prompt": {"id": "pmpt_1"}}, "prompt"),
    ("top_logprobs", {"top_logprobs": 3}, "top_logprobs"),
    ("max_tool_calls", {"max_tool_calls": 2}, "max_tool_calls"),
    ("stream_options without stream", {"stream_options": {}}, "stream_options"),
    ("obfuscation", {"stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options"),
    ("service tier", {"service_tier": "flex"}, "service_tier"),
    ("verbosity", {"text": {"verbosity": "high"}}, "text.verbosity"),
    ("text format type", {"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ("reasoning effort", {"reasoning": {"effort": "max"}}, "reasoning.effort"),
    ("reasoning summary", {"reasoning": {"summary": "short"}}, "reasoning.summary"),
    ("reasoning field", {"reasoning": {"budget": 5}}, "reasoning.budget"),
    ("metadata", {"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ("tool_choice unknown tool", {"tools": [WEATHER], "tool_choice": {
        "type": "function", "name": "nope"}}, "tool_choice"),
    ("tool_choice hosted", {"tools": [WEATHER], "tool_choice": {"type": "web_search"}},
     "tool_choice"),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
    ("function tool without name", {"tools": [{"type": "function"}]}, "tools[0].name"),
    ("custom tool grammar", {"tools": [{"type": "custom", "name": "x",
                                        "format": {"type": "grammar", "syntax": "ebnf",
                                                   "definition": "x"}}]}, "tools[0].format"),
    ("input empty", {"input": " "}, "input"),
    ("input number", {"input": 5}, "input"),
    ("item reference", {"input": [{"type": "item_reference", "id": "msg_1"}]},
     "input[0].type"),
    ("role tool", {"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ("input_file part", {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file_1"}]}]}, "input[0].content[0].type"),
    ("image by file id", {"input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file_1", "detail": "auto"}]}]},
     "input[0].content[0].file_id"),
    ("remote image", {"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/a.png",
         "detail": "auto"}]}]}, "input[0].content[0].image_url"),
    ("call without call_id", {"input": [
        {"role": "user", "content": "x"},
        {"type": "function_call", "name": "get_weather", "arguments": "{}"}]},
     "input[1].call_id"),
    ("call with bad arguments", {"input": [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]},
     "input[0].arguments"),
    ("output without call_id", {"input": [{"type": "function_call_output", "output": "x"}]},
     "input[0].call_id"),
    ("custom call without input", {"input": [
        {"type": "custom_tool_call", "call_id": "c", "name": "apply_patch"}]},
     "input[0].input"),
    ("max_output_tokens over the cap", {"max_output_tokens": 10**6}, "max_output_tokens"),
    ("temperature", {"temperature": 3}, "temperature"),
    ("json_schema on a backend without it", {"text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "object"}}}}, "text.format"),
]


@pytest.mark.parametrize(("body", "param"), [(b, p) for _, b, p in REFUSED],
                         ids=[name for name, _, _ in REFUSED])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(body: dict[str, Any],
                                                           param: str) -> None:
    provider = ScriptedProvider(capabilities=TOOLS)
    response, raw = _post(make_app(provider), {"model": "scripted-1", "input": "hi", **body})
    assert response.status == 400, raw
    error = _error(raw)
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert provider.requests == []


def test_errors_before_the_first_byte_have_their_status_and_openai_body() -> None:
    # 404: an unknown model; 413: a body over the limit; 429: the backend throttles first
    app = make_app(ScriptedProvider(), max_body_bytes=2_000)
    response, raw = _post(app, {"model": "nope", "input": "hi", "stream": True})
    assert response.status == 404 and _error(raw)["code"] == "model_not_found"
    response, raw = _post(app, {"input": "x" * 3_000})
    assert response.status == 413 and _error(raw)["type"] == "invalid_request_error"
    throttled = make_app(ScriptedProvider([RateLimitError("Too many requests",
                                                          retry_after=7)]))
    response, raw = _post(throttled, {"input": "hi", "stream": True})
    assert response.status == 429 and response.headers["retry-after"] == "7"
    assert _error(raw)["code"] == "rate_limit_exceeded"
    response, raw = _post(app, None, method="PUT")
    assert response.status == 405 and response.headers["allow"] == "POST"
    response, raw = _post(app, None, path=PATH + "/resp_1/nothing", method="GET")
    assert response.status == 404


def test_storage_off_refuses_store_and_previous_response_id_with_a_400() -> None:
    provider = ScriptedProvider()
    app = make_app(provider, responses_store="off")
    for body, param in (({"store": True}, "store"),
                        ({"previous_response_id": "resp_1"}, None)):
        response, raw = _post(app, {"input": "hi", **body})
        assert response.status == 400, raw
        error = _error(raw)
        assert error["code"] == "storage_disabled" and error["param"] == param
    # Storage off and nothing asked of it: answered, not stored, and said so when asked
    response, raw = _post(app, {"input": "hi"})
    assert response.status == 200 and "store" not in json.loads(raw)
    response, raw = _post(app, None, path=f"{PATH}/{json.loads(raw)['id']}", method="GET")
    assert response.status == 400 and _error(raw)["code"] == "storage_disabled"
    assert len(provider.requests) == 1
