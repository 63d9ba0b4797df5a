"""Request validation: every error our users rely on, with its exact status, message and param."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamgate.config import load_settings
from streamgate.errors import StreamgateError
from streamgate.validation import (
    CAP_PENALTIES,
    CAP_SEED,
    ChatRequest,
    Message,
    check_supported,
    decode_body,
    parse_request,
)

SETTINGS = load_settings({})
USER = [{"role": "user", "content": "hi"}]


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
         "'messages[0].role' must be one of assistant, developer, system, user; got 'robot'",
         "messages[0].role"),
        ({"messages": [{"role": "user", "content": 7}]},
         "'messages[0].content' must be a string or an array of text parts",
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "Content parts of type 'image_url' are not supported by this model",
         "messages[0].content[0].type"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "a"}]},
         "Tool calls are not supported by this model", "messages[0]"),
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
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
         "'tools' is not supported by this model", "tools"),
        ({"messages": USER, "tool_choice": "auto"}, "'tool_choice' is not supported by this model",
         "tool_choice"),
        ({"messages": USER, "logit_bias": {"50256": -100}},
         "'logit_bias' is not supported by this model", "logit_bias"),
        ({"messages": USER, "response_format": {"type": "json_object"}},
         "Only response_format type 'text' is supported", "response_format"),
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


def test_error_body_is_openai_shaped() -> None:
    err = _error(parse_request, {"prompt": ""}, SETTINGS)
    assert json.loads(json.dumps(err.body())) == {
        "error": {"message": "Prompt cannot be empty", "type": "invalid_request_error",
                  "param": "prompt", "code": None}
    }
