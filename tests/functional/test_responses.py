"""The Responses API (``POST /v1/responses`` and its stored responses), through the handler and
through the dev server with the real ``openai`` SDK. Every streamed event, ``Response`` and
``ResponseItemList`` is validated strictly against openai-python's own types
(tests/responses_check.py); the Lambda loop gives the same bytes as the dev server."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel

from streamgate.auth import Gate
from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.errors import RateLimitError, UpstreamError
from streamgate.handler import App, Response
from streamgate.keystore import KeyStore, table_definition
from streamgate.providers import (
    Delta,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from streamgate.runtime import run
from streamgate.validation import (
    CAP_IMAGES,
    CAP_JSON_SCHEMA,
    CAP_TOOLS,
    ChatRequest,
    Message,
    ResponseFormat,
    ToolCall,
)
from tests import responses_check as check
from tests.conftest import running_dev_server
from tests.fake_runtime_api import FakeRuntimeAPI
from tests.helpers import ScriptedProvider, Step, body_bytes, chat_event, make_app, replay

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
          path: str = PATH, method: str = "POST", query: str = "") -> tuple[Response, bytes]:
    event = chat_event(body, path=path, method=method, headers=dict(headers or {}))
    event["rawQueryString"] = query
    response = app.handle(event)
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


def test_every_kind_of_input_item_is_listed_as_openai_python_types_say() -> None:
    # GIVEN a stored response whose input holds every kind of item we take
    items: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief"},
        {"role": "developer", "content": [{"type": "input_text", "text": "Use tools"}]},
        {"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=",
             "detail": "auto"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "A picture."}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": PATCH},
        {"type": "custom_tool_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "Done"}]},
        {"role": "assistant", "content": "Patched."},
        {"role": "user", "content": "Thanks"},
    ]
    app = make_app(ScriptedProvider(capabilities=frozenset({CAP_TOOLS, CAP_IMAGES})))
    response, raw = _post(app, {"input": items, "tools": [WEATHER, APPLY_PATCH]})
    assert response.status == 200, raw
    # WHEN its input items are listed
    response, raw = _post(app, None, path=f"{PATH}/{json.loads(raw)['id']}/input_items",
                          method="GET", query="order=asc&limit=100")
    # THEN each is valid as openai-python's ResponseItem (an id, and a status on calls and
    # their outputs), in the order sent
    listed = json.loads(raw)
    check.item_list(listed)
    assert [(i["type"], i.get("role")) for i in listed["data"]] == [
        (i.get("type", "message"), i.get("role")) for i in items]
    assert [i["status"] for i in listed["data"] if "call" in i["type"]] == ["completed"] * 4


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


def test_codex_client_metadata_is_accepted_and_changes_nothing() -> None:
    # GIVEN Codex's client_metadata (ids about the client, as strings), as Codex 0.171 sends it
    metadata = {"session_id": "01a23b34", "turn_id": "01a23b35",
                "x-codex-turn-metadata": json.dumps({"sandbox": "none", "window_number": 0})}
    provider = ScriptedProvider()
    response, raw = _post(make_app(provider), {"input": "hi", "client_metadata": metadata})
    # THEN it is answered as without it, and client_metadata is not echoed
    assert response.status == 200, raw
    doc = check.response(json.loads(raw))
    assert doc.output_text == "Hello, world!" and "client_metadata" not in json.loads(raw)
    # AND anything but an object of strings is a 400 naming it
    response, raw = _post(make_app(provider), {"input": "hi", "client_metadata": {"n": 1}})
    assert response.status == 400 and _error(raw)["param"] == "client_metadata"


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


# -- the openai SDK against the dev server ---------------------------------------------------


class Turns(ScriptedProvider):
    """Answers each request with the next of its scripts (a conversation's turns)."""

    def __init__(self, *scripts: list[Step],
                 capabilities: frozenset[str] = TOOLS) -> None:
        super().__init__([], capabilities=capabilities)
        self.scripts = list(scripts)

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        self.requests.append((request, model))
        return replay(self.scripts.pop(0), deadline)


@contextmanager
def _sdk(provider: ScriptedProvider, **settings: Any) -> Iterator[tuple[openai.OpenAI, str]]:
    """The dev server on ``provider`` and an SDK client of it (no retries, bounded waits)."""
    with running_dev_server(make_app(provider, **settings)) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                          timeout=30) as client:
        yield client, url


def _sdk_events(events: Iterable[Any]) -> check.Stream:
    """The events the SDK parsed, checked as they came over the wire (the keys it got)."""
    return check.check_events([(e.type, e.to_dict(mode="json", exclude_unset=True))
                               for e in events])


def _wire(model: BaseModel) -> dict[str, Any]:
    doc: dict[str, Any] = model.to_dict(mode="json", exclude_unset=True)  # type: ignore[attr-defined]
    return doc


def test_sdk_create_streams_typed_events_and_returns_a_response_when_not_streaming() -> None:
    with _sdk(ScriptedProvider()) as (client, _):
        # WHEN the SDK streams
        stream = _sdk_events(client.responses.create(model="scripted-1", input="hi",
                                                     stream=True))
        # THEN it parsed every event into its own types, ending with response.completed
        assert stream.terminal == "response.completed"
        assert "".join(d["delta"] for d in stream.of("response.output_text.delta")) == (
            "Hello, world!")
        # AND without a stream it gets one Response, valid and with its output_text
        response = client.responses.create(model="scripted-1", input="hi")
        check.response(_wire(response))
        assert response.output_text == "Hello, world!"
        assert response.usage is not None and response.usage.total_tokens == 9


def test_sdk_stream_helper_gives_deltas_and_the_final_response() -> None:
    with _sdk(ScriptedProvider()) as (client, _), client.responses.stream(
            model="scripted-1", input="hi", instructions="Be kind") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["Hello", ",", " world", "!"]
    assert final.output_text == "Hello, world!" and final.status == "completed"


class Person(BaseModel):
    name: str
    age: int


def test_sdk_parse_returns_the_pydantic_object_from_a_json_schema_answer() -> None:
    provider = ScriptedProvider([TextDelta('{"name": "Ada'), TextDelta(' Lovelace", "age": 36}'),
                                 Finish("stop"), Usage(30, 12)],
                                capabilities=frozenset({CAP_JSON_SCHEMA}))
    with _sdk(provider) as (client, _):
        parsed = client.responses.parse(model="scripted-1", input="Who wrote the first program?",
                                        text_format=Person)
    assert parsed.output_parsed == Person(name="Ada Lovelace", age=36)
    # The backend got the SDK's strict schema as the response format
    (request, _), = provider.requests
    assert request.response_format == ResponseFormat(
        "json_schema", name="Person", schema=to_strict_json_schema(Person), strict=True)
    assert parsed.text is not None and parsed.text.format.type == "json_schema"


def _weather_turns() -> Turns:
    return Turns([ToolCallDelta(0, "", "call_w1", "get_weather"),
                  ToolCallDelta(0, '{"city": "Oslo"}'), Finish("tool_calls"), Usage(20, 8)],
                 [TextDelta("Sunny, 21 °C."), Finish("stop"), Usage(40, 5)])


WEATHER_HISTORY = (Message("user", "Weather in Oslo?", at="input[0]"),
                   Message("assistant", "", tool_calls=(
                       ToolCall("call_w1", "get_weather", '{"city": "Oslo"}'),)),
                   Message("tool", "sunny, 21", tool_call_id="call_w1"))


def _history(request: ChatRequest) -> tuple[tuple[str, str, tuple[ToolCall, ...],
                                                  str | None], ...]:
    return tuple((m.role, m.content, m.tool_calls, m.tool_call_id) for m in request.messages)


def test_sdk_function_tool_round_trip_with_previous_response_id() -> None:
    provider = _weather_turns()
    with _sdk(provider) as (client, _):
        # WHEN the model asks for the tool (streamed) ...
        with client.responses.stream(model="scripted-1", input="Weather in Oslo?",
                                     tools=[WEATHER]) as stream:  # type: ignore[list-item]
            first = stream.get_final_response()
        (call,) = first.output
        assert call.type == "function_call" and call.name == "get_weather"
        # ... and the answer goes back on the stored response
        second = client.responses.create(
            model="scripted-1", previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
            input=[{"type": "function_call_output", "call_id": call.call_id,
                    "output": "sunny, 21"}])
        items = list(client.responses.input_items.list(second.id, order="asc"))
    # THEN the backend saw the whole conversation, and the model's answer came back
    assert second.output_text == "Sunny, 21 °C." and second.previous_response_id == first.id
    assert _history(provider.requests[1][0]) == tuple(
        (m.role, m.content, m.tool_calls, m.tool_call_id) for m in WEATHER_HISTORY)
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1].id == call.id


def test_sdk_function_tool_round_trip_with_the_history_resent() -> None:
    provider = _weather_turns()
    with _sdk(provider) as (client, _):
        first = client.responses.create(model="scripted-1", input="Weather in Oslo?",
                                        tools=[WEATHER], store=False)  # type: ignore[list-item]
        (call,) = first.output
        assert call.type == "function_call"
        second = client.responses.create(
            model="scripted-1", store=False, tools=[WEATHER],  # type: ignore[list-item]
            input=[{"role": "user", "content": "Weather in Oslo?"},
                   *(item.model_dump(exclude_none=True) for item in first.output),
                   {"type": "function_call_output", "call_id": call.call_id,
                    "output": "sunny, 21"}])
        # AND what was not stored cannot be continued from
        with pytest.raises(openai.NotFoundError) as info:
            client.responses.create(model="scripted-1", previous_response_id=first.id,
                                    input="And tomorrow?")
    assert second.output_text == "Sunny, 21 °C."
    assert _history(provider.requests[1][0]) == tuple(
        (m.role, m.content, m.tool_calls, m.tool_call_id) for m in WEATHER_HISTORY)
    assert info.value.status_code == 404
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "previous_response_id"
    assert len(provider.requests) == 2


def test_sdk_retrieves_lists_pages_of_input_items_and_deletes_a_stored_response() -> None:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
             for i in range(5)]
    with _sdk(ScriptedProvider()) as (client, url):
        created = client.responses.create(model="scripted-1", input=turns,  # type: ignore[arg-type]
                                          metadata={"case": "pages"})
        # retrieve: the same Response, strictly valid
        got = client.responses.retrieve(created.id)
        assert _wire(got) == _wire(created)
        check.response(requests.get(f"{url}/v1/responses/{created.id}", timeout=10).json())
        # input items: pages of 2 ascending, the SDK following ``after`` across pages
        page = client.responses.input_items.list(created.id, limit=2, order="asc")
        assert [i.content[0].text for i in page.data] == ["turn 0", "turn 1"]  # type: ignore[union-attr]
        assert page.has_more is True
        every = list(client.responses.input_items.list(created.id, limit=2, order="asc"))
        assert [i.content[0].text for i in every] == [f"turn {i}" for i in range(5)]  # type: ignore[union-attr]
        newest = list(client.responses.input_items.list(created.id))
        assert [i.id for i in newest] == [i.id for i in reversed(every)]
        after = client.responses.input_items.list(created.id, after=every[1].id, order="asc",
                                                  limit=10)
        assert [i.id for i in after.data] == [i.id for i in every[2:]]
        assert after.has_more is False
        for query in ("limit=2&order=asc", f"after={every[3].id}&order=desc", "limit=100"):
            raw = requests.get(f"{url}/v1/responses/{created.id}/input_items?{query}",
                               timeout=10).json()
            check.item_list(raw)
        # delete: gone afterwards, for every read
        assert client.responses.delete(created.id) is None
        for read in (lambda: client.responses.retrieve(created.id),
                     lambda: client.responses.delete(created.id),
                     lambda: client.responses.input_items.list(created.id)):
            with pytest.raises(openai.NotFoundError):
                read()


@pytest.mark.parametrize(("store", "call", "error", "status"), [
    ("memory", lambda c: c.responses.create(model="scripted-1", input="hi",
                                            tools=[{"type": "web_search"}]),
     openai.BadRequestError, 400),
    ("memory", lambda c: c.responses.create(model="nope", input="hi"),
     openai.NotFoundError, 404),
    ("memory", lambda c: c.responses.create(model="scripted-1", input="x" * 3_000, stream=True),
     openai.APIStatusError, 413),
    ("memory", lambda c: c.responses.retrieve("resp_unknown"), openai.NotFoundError, 404),
    ("off", lambda c: c.responses.create(model="scripted-1", input="hi", store=True),
     openai.BadRequestError, 400),
], ids=["hosted-tool", "unknown-model", "too-large", "unknown-response", "storage-off"])
def test_sdk_errors_raise_the_sdks_own_exception_classes(
        store: str, call: Any, error: type[Exception], status: int) -> None:
    with _sdk(ScriptedProvider(), max_body_bytes=2_000, responses_store=store) as (client, _), \
            pytest.raises(error) as info:
        call(client)
    assert isinstance(info.value, openai.APIStatusError)
    assert info.value.status_code == status


def test_sdk_rate_limit_is_a_rate_limit_error_and_a_failure_mid_stream_a_failed_event() -> None:
    with _sdk(ScriptedProvider([RateLimitError("Too many requests", retry_after=2)])) as (
            client, _), pytest.raises(openai.RateLimitError) as info:
        client.responses.create(model="scripted-1", input="hi", stream=True)
    assert info.value.response.headers["retry-after"] == "2"
    # AFTER the first byte: the SDK yields response.failed; its helper has no final response
    with _sdk(ScriptedProvider([TextDelta("Par"), RateLimitError("Slow down")])) as (client, _):
        stream = _sdk_events(client.responses.create(model="scripted-1", input="hi",
                                                     stream=True))
        assert stream.final["error"]["code"] == "rate_limit_exceeded"
        with client.responses.stream(model="scripted-1", input="hi") as helper:
            for _ in helper:
                pass
            with pytest.raises(RuntimeError, match="response.completed"):
                helper.get_final_response()


# -- stored responses belong to the key that created them -----------------------------------

KEYS_TABLE = "streamgate-keys"


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyStore]:
    """The keys table, made from template.yaml's definition, under moto."""
    from moto import mock_aws

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    with mock_aws():
        store = KeyStore(KEYS_TABLE)
        store.create_table(table_definition(ROOT / "template.yaml"))
        yield store


def test_a_stored_response_exists_only_for_the_key_that_created_it(keys: KeyStore) -> None:
    alice, _ = keys.create("alice")
    bob, _ = keys.create("bob")
    narrow, _ = keys.create("narrow", models=("scripted-2",))
    settings = load_settings({}, provider="local", auth="api_key", keys_table=KEYS_TABLE,
                             key_cache_ttl_s=0)
    app = App(settings, ScriptedProvider(), gate=Gate(settings, keys))

    with running_dev_server(app) as url, ExitStack() as clients:
        def client(key: str) -> openai.OpenAI:
            return clients.enter_context(openai.OpenAI(base_url=f"{url}/v1", api_key=key,
                                                       max_retries=0, timeout=30))

        a, b = client(alice), client(bob)
        created = a.responses.create(model="scripted-1", input="Alice's plans")
        # WHEN another key reads, lists, deletes or continues from it, THEN it does not exist
        reads = {"retrieve": lambda: b.responses.retrieve(created.id),
                 "delete": lambda: b.responses.delete(created.id),
                 "input_items": lambda: b.responses.input_items.list(created.id),
                 "previous_response_id": lambda: b.responses.create(
                     model="scripted-1", previous_response_id=created.id, input="and?")}
        bodies = {}
        for name, read in reads.items():
            with pytest.raises(openai.NotFoundError) as info:
                read()
            bodies[name] = info.value.body
        # ... exactly as an id nobody has (nothing tells one from the other)
        unknown = "resp_" + "0" * 32
        with pytest.raises(openai.NotFoundError) as info:
            b.responses.retrieve(unknown)
        assert json.loads(json.dumps(info.value.body).replace(unknown, created.id)) == (
            bodies["retrieve"]) == bodies["delete"] == bodies["input_items"]
        assert bodies["retrieve"] == {
            "message": f"Response with id '{created.id}' not found.",
            "type": "invalid_request_error", "param": None, "code": "response_not_found"}
        assert bodies["previous_response_id"] == {**bodies["retrieve"],
                                                  "param": "previous_response_id"}
        # AND it is still there, whole, for its owner
        assert a.responses.retrieve(created.id).output_text == "Hello, world!"
        # A key that is not one is a 401, one that may not use the model a 403
        with pytest.raises(openai.AuthenticationError):
            client("sgk_" + "x" * 43).responses.retrieve(created.id)
        with pytest.raises(openai.AuthenticationError):
            client("sgk_" + "x" * 43).responses.create(model="scripted-1", input="hi")
        with pytest.raises(openai.PermissionDeniedError):
            client(narrow).responses.create(model="scripted-1", input="hi")


# -- both drivers, the same bytes ---------------------------------------------------------------

_RANDOM_ID = re.compile(rb"\b(resp|msg|fc|rs|ctc|call)_[0-9a-f]{32}\b")
_TIME = re.compile(rb'"(created_at|completed_at)":\d+')


def _normalised(raw: bytes) -> bytes:
    """``raw`` with each random id numbered in order of appearance and times zeroed: two runs
    of one request then compare equal only if their ids repeat in the same places."""
    seen: dict[bytes, bytes] = {}

    def number(match: re.Match[bytes]) -> bytes:
        if match.group(0) not in seen:
            seen[match.group(0)] = match.group(1) + b"_%d" % len(seen)
        return seen[match.group(0)]

    return _TIME.sub(rb'"\1":0', _RANDOM_ID.sub(number, raw))


def _both_turns() -> list[Step]:
    return [ReasoningDelta("Plan."), TextDelta("Looking it up."),
            ToolCallDelta(0, '{"city": "Oslo"}', "call_1", "get_weather"),
            ToolCallDelta(1, json.dumps({"input": PATCH}), None, "apply_patch"),
            Finish("tool_calls"), Usage(12, 9)]


@pytest.mark.parametrize(("body", "failing"), [
    ({"input": "Weather?", "tools": [WEATHER, APPLY_PATCH], "stream": True}, False),
    ({"input": "Weather?", "tools": [WEATHER, APPLY_PATCH]}, False),
    ({"input": "Weather?", "tools": [{"type": "web_search"}], "stream": True}, False),
    ({"input": "Weather?", "stream": True}, True),
], ids=["stream", "document", "error", "failure"])
def test_the_lambda_loop_sends_the_bytes_the_dev_server_sends(body: dict[str, Any],
                                                              failing: bool) -> None:
    body = {"model": "scripted-1", **body}
    # GIVEN one request through the dev server ...
    def turns() -> list[Step]:
        return [TextDelta("Looking"), UpstreamError("The model went away")] if failing \
            else _both_turns()

    with running_dev_server(make_app(ScriptedProvider(turns(), capabilities=TOOLS))) as url:
        served = requests.post(f"{url}{PATH}", json=body, timeout=30)
    # ... and through the runtime loop on a fake Runtime API
    api = FakeRuntimeAPI([chat_event(body, path=PATH)])
    environ = {"AWS_LAMBDA_RUNTIME_API": api.address, "AWS_LAMBDA_FUNCTION_NAME": "streamgate",
               "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1024"}
    assert run(make_app(ScriptedProvider(turns(), capabilities=TOOLS)), environ=environ) == 0
    api.close()
    (posted,) = api.posted
    prelude_bytes, nuls, looped = posted.chunks[0][1].partition(b"\x00" * 8)
    prelude = json.loads(prelude_bytes)
    looped += b"".join(data for _, data in posted.chunks[1:])
    # THEN status, content type and body are the same, ids and times aside
    assert nuls and prelude["statusCode"] == served.status_code
    assert prelude["headers"]["content-type"] == served.headers["content-type"]
    assert _normalised(looped) == _normalised(served.content)
    if served.status_code == 200 and body.get("stream"):
        terminal = check.check_stream(looped).terminal
        assert terminal == ("response.failed" if failing else "response.completed")
    elif served.status_code == 200:
        check.response(json.loads(looped))
    # A failure after the first byte also ends the Lambda stream with real trailers
    error_type = posted.trailers.pop("Lambda-Runtime-Function-Error-Type", None)
    assert error_type == ("Function.UpstreamError" if failing else None)
    assert set(posted.trailers) == ({"Lambda-Runtime-Function-Error-Body"} if failing else set())
