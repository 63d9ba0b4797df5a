"""Auth helpers that need no table: iam mode, the reset format, the prompt estimate."""

from __future__ import annotations

import pytest

from streamgate.auth import Gate, _duration, estimate_prompt_tokens
from streamgate.config import load_settings
from streamgate.errors import AuthenticationError
from streamgate.events import HttpRequest
from streamgate.validation import ChatRequest, Image, Message, Tool, ToolCall


def test_iam_mode_needs_a_signed_identity() -> None:
    gate = Gate(load_settings({}, auth="iam"))
    with pytest.raises(AuthenticationError) as info:
        gate.authenticate(HttpRequest("POST", "/v1/chat/completions"))
    assert (info.value.status, info.value.code) == (401, "unauthenticated")
    arn = "arn:aws:iam::123456789012:role/app"
    caller = gate.authenticate(HttpRequest("POST", "/", principal=arn))
    assert (caller.id, caller.key) == (arn, None)


def test_none_mode_lets_anyone_in() -> None:
    assert Gate(load_settings({})).authenticate(HttpRequest("POST", "/")).id == "anonymous"


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0201, "21ms"), (0.9999, "1000ms"), (1, "1s"), (17.5, "17.5s"), (29.3333, "29.333s"),
    (360, "6m0s"), (61.9, "1m1s")])
def test_reset_uses_openai_duration_format(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


def test_prompt_estimate_counts_text_tools_and_images() -> None:
    text = ChatRequest(model=None, messages=(Message("user", "x" * 40),))
    assert estimate_prompt_tokens(text) == 10 + 4
    richer = ChatRequest(
        model=None,
        messages=(Message("user", "look", parts=("look", Image("png", b"\x89PNG"))),
                  Message("assistant", "", tool_calls=(ToolCall("c1", "get", '{"a":1}'),))),
        tools=(Tool("get", "Get it", {"type": "object"}),))
    # "look" 4 + "get" 3 + args 7 + tool "get" 3 + "Get it" 6 + schema 18 = 41 chars -> 11
    assert estimate_prompt_tokens(richer) == 11 + 2 * 4 + 1_600
