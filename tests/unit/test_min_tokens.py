"""min_tokens (vLLM's extension): validation, and what each provider does with it."""

from __future__ import annotations

import pytest

from streamgate.config import load_settings
from streamgate.dialects.chat import parse_request
from streamgate.errors import RequestError
from streamgate.providers.openai import upstream_body
from streamgate.validation import (
    CAP_IMAGES,
    CAP_MIN_TOKENS,
    CAP_TOOLS,
    check_supported,
)

SETTINGS = load_settings({})
BASE = {"messages": [{"role": "user", "content": "hi"}]}


def test_the_embedded_models_default_minimum_is_a_setting() -> None:
    assert load_settings({"STREAMGATE_LOCAL_DEFAULT_MIN_TOKENS": "100"}
                         ).local_default_min_tokens == 100
    assert load_settings({"STREAMGATE_LOCAL_DEFAULT_MIN_TOKENS": "0"}
                         ).local_default_min_tokens == 0


@pytest.mark.parametrize(("body", "expected"), [
    ({}, None),
    ({"min_tokens": None}, None),
    ({"min_tokens": 0}, 0),
    ({"min_tokens": 300, "max_tokens": 300}, 300),
    ({"min_tokens": 1024}, 1024),  # the default max_tokens
])
def test_min_tokens_is_read(body: dict[str, object], expected: int | None) -> None:
    assert parse_request({**BASE, **body}, SETTINGS).min_tokens == expected


@pytest.mark.parametrize(("body", "message"), [
    ({"min_tokens": -1}, "'min_tokens' must be at least 0"),
    ({"min_tokens": 1.5}, "'min_tokens' must be an integer"),
    ({"min_tokens": True}, "'min_tokens' must be an integer"),
    ({"min_tokens": "10"}, "'min_tokens' must be an integer"),
    ({"min_tokens": 11, "max_tokens": 10}, "'min_tokens' must not exceed max_tokens (10)"),
    ({"min_tokens": 11, "max_completion_tokens": 10},
     "'min_tokens' must not exceed max_tokens (10)"),
    ({"min_tokens": 1025}, "'min_tokens' must not exceed max_tokens (1024)"),
])
def test_min_tokens_out_of_range_is_a_400_naming_it(body: dict[str, object],
                                                    message: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request({**BASE, **body}, SETTINGS)
    assert info.value.message == message and info.value.param == "min_tokens"


def test_a_backend_that_cannot_honour_min_tokens_refuses_it() -> None:
    # Bedrock's capabilities: Converse has nothing like it
    bedrock = frozenset({CAP_TOOLS, CAP_IMAGES})
    with pytest.raises(RequestError) as info:
        check_supported(parse_request({**BASE, "min_tokens": 5}, SETTINGS), bedrock)
    assert info.value.param == "min_tokens"
    check_supported(parse_request({**BASE, "min_tokens": 0}, SETTINGS), bedrock)  # asks nothing
    check_supported(parse_request({**BASE, "min_tokens": 5}, SETTINGS),
                    frozenset({CAP_MIN_TOKENS}))


def test_an_openai_compatible_upstream_gets_min_tokens_when_it_asks_for_something() -> None:
    assert upstream_body(parse_request({**BASE, "min_tokens": 5}, SETTINGS), "m")[
        "min_tokens"] == 5
    assert "min_tokens" not in upstream_body(parse_request({**BASE, "min_tokens": 0},
                                                           SETTINGS), "m")
    assert "min_tokens" not in upstream_body(parse_request(BASE, SETTINGS), "m")


def test_the_providers_say_whether_they_honour_min_tokens() -> None:
    from streamgate.providers.bedrock import BedrockProvider
    from streamgate.providers.local import LocalProvider
    from streamgate.providers.openai import OpenAIProvider

    assert CAP_MIN_TOKENS in LocalProvider.capabilities
    assert CAP_MIN_TOKENS in OpenAIProvider.capabilities
    assert CAP_MIN_TOKENS not in BedrockProvider.capabilities
