"""Request validation: every error our users rely on, with its exact status, message and param."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from streamgate.config import load_settings
from streamgate.dialects.chat import parse_request
from streamgate.errors import StreamgateError
from streamgate.validation import (
    CAP_IMAGES,
    CAP_JSON_OBJECT,
    CAP_JSON_SCHEMA,
    CAP_PENALTIES,
    CAP_SEED,
    CAP_SEQUENTIAL_TOOLS,
    CAP_TOOLS,
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DEPTH,
    ChatRequest,
    Image,
    Message,
    ResponseFormat,
    Tool,
    ToolCall,
    check_supported,
    decode_body,
)

SETTINGS = load_settings({})
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather"}}
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def _image(url: str, **extra: Any) -> list[dict[str, Any]]:
    part = {"type": "image_url", "image_url": {"url": url, **extra}}
    return [{"role": "user", "content": [part]}]


def _call(arguments: Any = "{}", **extra: Any) -> dict[str, Any]:
    return {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}, **extra}


def _error(fn: Any, *args: Any) -> StreamgateError:
    with pytest.raises(StreamgateError) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (None, 400, "No JSON body provided"),
        (b"", 400, "No JSON body provided"),
        (b"  \n", 400, "No JSON body provided"),
        (b"null", 400, "No JSON body provided"),
        (b"{", 400, "Invalid JSON body"),
        (b"[1, 2]", 400, "Invalid JSON body"),
        (b'"prompt"', 400, "Invalid JSON body"),
        (b'{"prompt": "\xff\xfe"}', 400, "Invalid JSON body"),
        (b'{"temperature": NaN}', 400, "Invalid JSON body"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "Invalid JSON body"),
        (b"x" * (1_048_576 + 1), 413, "Request body exceeds maximum size of 1048576 bytes"),
    ],
    ids=["none", "empty", "whitespace", "null", "truncated", "array", "string", "invalid-utf8",
         "nan", "deeply-nested", "too-large"],
)
def test_body_errors_have_the_documented_status_and_message(
    body: bytes | None, status: int, message: str
) -> None:
    err = _error(decode_body, body, SETTINGS)
    assert (err.status, err.message) == (status, message)
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_body_limit_is_configurable() -> None:
    small = load_settings({"STREAMGATE_MAX_BODY_BYTES": "10"})
    assert _error(decode_body, b'{"prompt": "hello"}', small).status == 413
    assert decode_body(b'{"a": 1}', small) == {"a": 1}


@pytest.mark.parametrize(
    ("data", "message", "param"),
    [
        ({"prompt": ""}, "Prompt cannot be empty", "prompt"),
        ({"prompt": " \t\n"}, "Prompt cannot be empty", "prompt"),
        ({"prompt": "x" * 5001}, "Prompt exceeds maximum length of 5000 chars", "prompt"),
        ({"prompt": 42}, "'prompt' must be a string", "prompt"),
        ({"prompt": "a", "messages": USER}, "Provide either 'prompt' or 'messages', not both",
         "prompt"),
        ({}, "'messages' is required (or 'prompt' for the short form)", "messages"),
        ({"messages": []}, "'messages' must contain at least one message", "messages"),
        ({"messages": "hi"}, "'messages' must be an array", "messages"),
        ({"messages": ["hi"]}, "'messages[0]' must be an object", "messages[0]"),
        ({"messages": [{"content": "hi"}]}, "'messages[0].role' must be a string",
         "messages[0].role"),
        ({"messages": [{"role": "robot", "content": "hi"}]},
         "'messages[0].role' must be one of assistant, developer, system, tool, user; "
         "got 'robot'", "messages[0].role"),
        ({"messages": [{"role": "user", "content": 7}]},
         "'messages[0].content' must be a string or an array of text and image parts",
         "messages[0].content"),
        ({"messages": [{"role": "system", "content": None}]},
         "'messages[0].content' must be a string or an array of text parts",
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         "Content parts of type 'input_audio' are not supported here",
         "messages[0].content[0].type"),
        ({"messages": _image("https://example.com/cat.png")},
         "Only data: URLs (data:image/png;base64,...) are accepted for images; "
         "this service does not fetch remote URLs", "messages[0].content[0].image_url.url"),
        ({"messages": _image("data:image/tiff;base64,AAAA")},
         "Image type 'image/tiff' is not supported; use PNG, JPEG, GIF or WebP",
         "messages[0].content[0].image_url.url"),
        ({"messages": _image("data:image/png,rawbytes")},
         "Image data URLs must be base64-encoded (data:<type>;base64,...)",
         "messages[0].content[0].image_url.url"),
        ({"messages": _image("data:image/png;base64,not base64!")},
         "Image data URL is not valid base64", "messages[0].content[0].image_url.url"),
        ({"messages": _image(PNG, detail="high")},
         "'messages[0].content[0].image_url.detail' 'high' is not supported; use 'auto'",
         "messages[0].content[0].image_url.detail"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "'messages[0].content[0].image_url.url' must be a string",
         "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "assistant", "content": _image(PNG)[0]["content"]}]},
         "Content parts of type 'image_url' are not supported outside user messages",
         "messages[0].content[0].type"),
        ({"messages": [{"role": "tool", "content": "x"}]},
         "'messages[0].tool_call_id' must be a non-empty string", "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [_call()]}]},
         "Only assistant messages may carry 'tool_calls'", "messages[0].tool_calls"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": {"id": 1}}]},
         "'messages[0].tool_calls' must be an array", "messages[0].tool_calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [_call(id="")]}]},
         "'messages[0].tool_calls[0].id' must be a non-empty string",
         "messages[0].tool_calls[0].id"),
        ({"messages": [{"role": "assistant", "tool_calls": [_call("{oops")]}]},
         "'messages[0].tool_calls[0].function.arguments' is not valid JSON",
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "assistant", "tool_calls": [_call("[1]")]}]},
         "'messages[0].tool_calls[0].function.arguments' must be a JSON object",
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "assistant", "tool_calls": [_call({"a": 1})]}]},
         "'messages[0].tool_calls[0].function.arguments' must be a string of JSON",
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": USER, "tools": TOOL}, "'tools' must be an array", "tools"),
        ({"messages": USER, "tools": [{"type": "web_search"}]},
         '\'tools[0]\' must be {"type": "function", "function": {...}}', "tools[0]"),
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": ""}}]},
         "'tools[0].function.name' must be a non-empty string", "tools[0].function.name"),
        ({"messages": USER, "tools": [TOOL, TOOL]},
         "Tool name 'get_weather' appears twice", "tools[1].function.name"),
        ({"messages": USER, "tools": [TOOL] * 129}, "'tools' accepts at most 128 tools", "tools"),
        ({"messages": USER, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": "{}"}}]},
         "'tools[0].function.parameters' must be an object", "tools[0].function.parameters"),
        ({"messages": USER, "tool_choice": "auto"},
         "'tool_choice' is only allowed when 'tools' are given", "tool_choice"),
        ({"messages": USER, "tools": [TOOL], "tool_choice": "any"},
         "'tool_choice' must be 'none', 'auto', 'required' or "
         '{"type": "function", "function": {"name": ...}}', "tool_choice"),
        ({"messages": USER, "tools": [TOOL],
          "tool_choice": {"type": "function", "function": {"name": "other"}}},
         "'tool_choice' names 'other', which is not in 'tools'", "tool_choice"),
        ({"messages": USER, "tools": [TOOL], "parallel_tool_calls": "no"},
         "'parallel_tool_calls' must be a boolean", "parallel_tool_calls"),
        ({"messages": USER, "model": 3}, "'model' must be a string", "model"),
        ({"messages": USER, "model": " "}, "'model' must not be empty", "model"),
        ({"messages": USER, "stream": "true"}, "'stream' must be a boolean", "stream"),
        ({"messages": USER, "stream": 1}, "'stream' must be a boolean", "stream"),
        ({"messages": USER, "stream_options": {"include_usage": True}},
         "'stream_options' is only allowed when 'stream' is true", "stream_options"),
        ({"messages": USER, "stream": True, "stream_options": {"include_usage": "yes"}},
         "'stream_options.include_usage' must be a boolean", "stream_options.include_usage"),
        ({"messages": USER, "max_tokens": "10"}, "'max_tokens' must be an integer", "max_tokens"),
        ({"messages": USER, "max_tokens": True}, "'max_tokens' must be an integer", "max_tokens"),
        ({"messages": USER, "max_tokens": 0}, "'max_tokens' must be at least 1", "max_tokens"),
        ({"messages": USER, "max_completion_tokens": 5000},
         "'max_completion_tokens' must be at most 4096", "max_completion_tokens"),
        ({"messages": USER, "max_tokens": 5, "max_completion_tokens": 6},
         "'max_tokens' and 'max_completion_tokens' disagree; send one", "max_tokens"),
        ({"messages": USER, "temperature": "hot"}, "'temperature' must be a number",
         "temperature"),
        ({"messages": USER, "temperature": 2.5}, "'temperature' must be between 0 and 2",
         "temperature"),
        ({"messages": USER, "top_p": 1.5}, "'top_p' must be between 0 and 1", "top_p"),
        ({"messages": USER, "stop": 5}, "'stop' must be a non-empty string or an array of them",
         "stop"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]},
         "'stop' accepts at most 4 sequences", "stop"),
        ({"messages": USER, "seed": 1.5}, "'seed' must be an integer", "seed"),
        ({"messages": USER, "user": 5}, "'user' must be a string", "user"),
        ({"messages": USER, "n": 2}, "Only n=1 is supported", "n"),
        ({"messages": USER, "n": 0}, "'n' must be a positive integer", "n"),
        ({"messages": USER, "logprobs": True}, "'logprobs' is not supported by this model",
         "logprobs"),
        ({"messages": USER, "top_logprobs": 2}, "'top_logprobs' is not supported by this model",
         "top_logprobs"),
        ({"messages": USER, "functions": [{"name": "f"}]},
         "'functions' is not supported by this model", "functions"),
        ({"messages": USER, "logit_bias": {"50256": -100}},
         "'logit_bias' is not supported by this model", "logit_bias"),
    ],
)
def test_invalid_requests_get_a_400_naming_the_param(
    data: dict[str, Any], message: str, param: str
) -> None:
    err = _error(parse_request, data, SETTINGS)
    assert (err.status, err.message, err.param) == (400, message, param)


def test_prompt_limit_is_configurable() -> None:
    settings = load_settings({"STREAMGATE_MAX_PROMPT_CHARS": "10"})
    err = _error(parse_request, {"prompt": "x" * 11}, settings)
    assert err.message == "Prompt exceeds maximum length of 10 chars"
    assert parse_request({"prompt": "x" * 10}, settings).messages == (Message("user", "x" * 10),)


def test_short_form_is_one_user_message() -> None:
    request = parse_request({"prompt": "Explain streaming APIs", "stream": True}, SETTINGS)
    assert request.messages == (Message("user", "Explain streaming APIs"),)
    assert request.stream is True


def test_openai_form_keeps_every_supported_parameter() -> None:
    request = parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "c"},
                {"role": "user", "content": "d"},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 12,
            "temperature": 0,
            "top_p": 0.5,
            "stop": "END",
            "seed": 7,
            "user": "u-1",
            "frequency_penalty": 0.5,
            "presence_penalty": -0.5,
            "n": 1,
            "logprobs": False,
            "metadata": {"ignored": "unknown fields are ignored"},
        },
        SETTINGS,
    )
    assert request == ChatRequest(
        model="m",
        messages=(Message("developer", "be brief"), Message("user", "ab"),
                  Message("assistant", "c"), Message("user", "d")),
        stream=True, include_usage=True, max_tokens=12, temperature=0.0, top_p=0.5,
        stop=("END",), seed=7, user="u-1", frequency_penalty=0.5, presence_penalty=-0.5,
    )


def test_stream_absent_or_false_means_one_json_completion() -> None:
    assert parse_request({"messages": USER}, SETTINGS).stream is False
    assert parse_request({"messages": USER, "stream": False}, SETTINGS).stream is False


@pytest.mark.parametrize(
    ("field", "value", "capability"),
    [("frequency_penalty", 0.5, CAP_PENALTIES), ("presence_penalty", 1.0, CAP_PENALTIES),
     ("seed", 3, CAP_SEED)],
)
def test_provider_without_a_capability_rejects_its_parameter(
    field: str, value: Any, capability: str
) -> None:
    request = parse_request({"messages": USER, field: value}, SETTINGS)
    err = _error(check_supported, request, frozenset())
    assert (err.status, err.param) == (400, field)
    check_supported(request, frozenset({capability}))


def test_tools_images_and_tool_history_are_parsed_into_the_request() -> None:
    request = parse_request({
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": PNG}}]},
            {"role": "assistant", "content": None, "tool_calls": [_call('{"city": "Oslo"}')]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "4C"}]},
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object"}, "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": True,
    }, SETTINGS)
    image = Image("png", b"\x89PNG\r\n\x1a\nfake")
    assert request.messages == (
        Message("user", "What is this?", parts=("What is this?", image)),
        Message("assistant", "",
                tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),)),
        Message("tool", "4C", tool_call_id="call_1"),
    )
    assert request.tools == (Tool("get_weather", "Weather now", {"type": "object"}, True),)
    assert (request.tool_choice, request.tool_choice_name) == ("function", "get_weather")
    assert request.parallel_tool_calls is True


@pytest.mark.parametrize(
    ("data", "param", "capability"),
    [({"messages": USER, "tools": [TOOL]}, "tools", CAP_TOOLS),
     ({"messages": [*USER, {"role": "assistant", "tool_calls": [_call()]}]}, "messages[1]",
      CAP_TOOLS),
     ({"messages": [{"role": "tool", "tool_call_id": "c", "content": "x"}]}, "messages[0]",
      CAP_TOOLS),
     ({"messages": _image(PNG)}, "messages[0].content", CAP_IMAGES)],
)
def test_tools_and_images_need_a_provider_that_declares_them(
    data: dict[str, Any], param: str, capability: str
) -> None:
    request = parse_request(data, SETTINGS)
    assert _error(check_supported, request, frozenset()).param == param
    check_supported(request, frozenset({capability}))


def test_sequential_tool_calls_are_refused_unless_the_provider_can_enforce_them() -> None:
    request = parse_request({"messages": USER, "tools": [TOOL], "parallel_tool_calls": False},
                            SETTINGS)
    err = _error(check_supported, request, frozenset({CAP_TOOLS}))
    assert (err.param, err.message) == (
        "parallel_tool_calls", "'parallel_tool_calls: false' cannot be enforced by this model")
    check_supported(request, frozenset({CAP_TOOLS, CAP_SEQUENTIAL_TOOLS}))


def test_tool_choice_none_without_tools_is_accepted_everywhere() -> None:
    check_supported(parse_request({"messages": USER, "tool_choice": "none"}, SETTINGS),
                    frozenset())


def test_error_body_is_openai_shaped() -> None:
    err = _error(parse_request, {"prompt": ""}, SETTINGS)
    assert json.loads(json.dumps(err.body())) == {
        "error": {"message": "Prompt cannot be empty", "type": "invalid_request_error",
                  "param": "prompt", "code": None}
    }


# --- response_format -------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def _schema_format(**json_schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                   **json_schema}}


@pytest.mark.parametrize(
    ("response_format", "parsed"),
    [
        (None, None),
        ({"type": "text"}, ResponseFormat("text")),
        ({"type": "json_object"}, ResponseFormat("json_object")),
        (_schema_format(), ResponseFormat("json_schema", "person", None, PERSON)),
        (_schema_format(description="A person", strict=True),
         ResponseFormat("json_schema", "person", "A person", PERSON, True)),
        (_schema_format(strict=False, description=None),
         ResponseFormat("json_schema", "person", None, PERSON, False)),
        # null fields say nothing, so they are no unknown field either
        ({"type": "json_object", "json_schema": None}, ResponseFormat("json_object")),
        ({"type": "json_schema", "json_schema": {
            "name": "a" * 64, "schema": {}, "extra": None}},
         ResponseFormat("json_schema", "a" * 64, None, {})),
        ({"type": "json_schema", "json_schema": {"name": "A-z_0-9", "schema": PERSON}},
         ResponseFormat("json_schema", "A-z_0-9", None, PERSON)),
    ],
)
def test_response_format_is_parsed_exactly_as_sent(
    response_format: Any, parsed: ResponseFormat | None
) -> None:
    request = parse_request({"messages": USER, "response_format": response_format}, SETTINGS)
    assert request.response_format == parsed


NAME_RULE = ("'response_format.json_schema.name' must be 1 to 64 characters of a-z, A-Z, "
             "0-9, '_' and '-'")
SCHEMA_RULE = "'response_format.json_schema.schema' must be a JSON Schema object"


@pytest.mark.parametrize(
    ("response_format", "message", "param"),
    [
        ("json", "'response_format' must be an object with a 'type'", "response_format"),
        ({}, "'response_format' must be an object with a 'type'", "response_format"),
        ({"type": None}, "'response_format' must be an object with a 'type'",
         "response_format"),
        ({"type": "json"},
         "'response_format.type' must be 'text', 'json_object' or 'json_schema'; got 'json'",
         "response_format.type"),
        ({"type": "JSON_OBJECT"},
         "'response_format.type' must be 'text', 'json_object' or 'json_schema'; got "
         "'JSON_OBJECT'", "response_format.type"),
        ({"type": "json_object", "schema": PERSON},
         "'response_format' has an unknown field 'schema'; it takes 'type'",
         "response_format.schema"),
        ({"type": "text", "json_schema": {"name": "x", "schema": PERSON}},
         "'response_format' has an unknown field 'json_schema'; it takes 'type'",
         "response_format.json_schema"),
        ({"type": "json_schema"},
         "'response_format.json_schema' must be an object with 'name' and 'schema' when "
         "'response_format.type' is 'json_schema'", "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": "person"},
         "'response_format.json_schema' must be an object with 'name' and 'schema' when "
         "'response_format.type' is 'json_schema'", "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON}}, NAME_RULE,
         "response_format.json_schema.name"),
        (_schema_format(name=""), NAME_RULE, "response_format.json_schema.name"),
        (_schema_format(name="a" * 65), NAME_RULE, "response_format.json_schema.name"),
        (_schema_format(name="my schema"), NAME_RULE, "response_format.json_schema.name"),
        (_schema_format(name="person.v2"), NAME_RULE, "response_format.json_schema.name"),
        (_schema_format(name=7), NAME_RULE, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "person"}}, SCHEMA_RULE,
         "response_format.json_schema.schema"),
        (_schema_format(schema=json.dumps(PERSON)), SCHEMA_RULE,
         "response_format.json_schema.schema"),
        (_schema_format(schema=[PERSON]), SCHEMA_RULE, "response_format.json_schema.schema"),
        (_schema_format(schema=True), SCHEMA_RULE, "response_format.json_schema.schema"),
        (_schema_format(description=["a"]),
         "'response_format.json_schema.description' must be a string",
         "response_format.json_schema.description"),
        (_schema_format(strict="true"), "'response_format.json_schema.strict' must be a boolean",
         "response_format.json_schema.strict"),
        (_schema_format(parameters=PERSON),
         "'response_format.json_schema' has an unknown field 'parameters'; it takes 'name', "
         "'description', 'schema', 'strict'", "response_format.json_schema.parameters"),
        (_schema_format(schema={"type": "object", "description": "x" * MAX_SCHEMA_CHARS}),
         "'response_format.json_schema.schema' exceeds the maximum of 100000 characters (as "
         "compact JSON)", "response_format.json_schema.schema"),
        (_schema_format(schema=json.loads('{"items":' * MAX_SCHEMA_DEPTH + "{}"
                                          + "}" * MAX_SCHEMA_DEPTH)),
         "'response_format.json_schema.schema' nests objects and arrays more than 32 levels "
         "deep", "response_format.json_schema.schema"),
    ],
)
def test_invalid_response_formats_get_a_400_naming_the_field(
    response_format: Any, message: str, param: str
) -> None:
    err = _error(parse_request, {"messages": USER, "response_format": response_format},
                 SETTINGS)
    assert (err.status, err.message, err.param) == (400, message, param)


def test_schema_caps_are_inclusive() -> None:
    # GIVEN schemas exactly at the size and depth caps
    padding = MAX_SCHEMA_CHARS - len('{"description":""}')
    widest = {"description": "x" * padding}
    deepest = json.loads('{"items":' * (MAX_SCHEMA_DEPTH - 1) + "{}" + "}" * (MAX_SCHEMA_DEPTH - 1))
    for schema in (widest, deepest):
        # WHEN each is sent THEN it is accepted
        request = parse_request({"messages": USER,
                                 "response_format": _schema_format(schema=schema)}, SETTINGS)
        assert request.response_format is not None
        assert request.response_format.schema == schema


def test_the_schema_counts_toward_the_input_limit() -> None:
    settings = load_settings({}, max_input_chars=1000)
    schema = {"type": "object", "description": "x" * 1000}
    err = _error(parse_request, {"messages": USER,
                                 "response_format": _schema_format(schema=schema)}, settings)
    assert (err.status, err.param, err.code) == (400, "messages", "input_too_long")


@pytest.mark.parametrize(
    ("response_format", "capabilities", "message"),
    [
        ({"type": "json_object"}, frozenset(),
         "'response_format' type 'json_object' is not supported by this model"),
        ({"type": "json_object"}, frozenset({CAP_JSON_SCHEMA}),
         "'response_format' type 'json_object' is not supported by this model; send type "
         "'json_schema' with the schema the answer must follow"),
        (_schema_format(), frozenset({CAP_JSON_OBJECT}),
         "'response_format' type 'json_schema' is not supported by this model"),
    ],
)
def test_a_response_format_needs_a_provider_that_declares_it(
    response_format: dict[str, Any], capabilities: frozenset[str], message: str
) -> None:
    request = parse_request({"messages": USER, "response_format": response_format}, SETTINGS)
    err = _error(check_supported, request, capabilities)
    assert (err.status, err.message, err.param) == (400, message, "response_format")
    check_supported(request, capabilities | {response_format["type"]})


def test_text_response_format_needs_no_capability() -> None:
    check_supported(parse_request({"messages": USER, "response_format": {"type": "text"}},
                                  SETTINGS), frozenset())
