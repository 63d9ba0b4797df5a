"""Parse and validate a chat-completions request body into a :class:`ChatRequest`.

Follows the OpenAI request schema (https://platform.openai.com/docs/api-reference/chat/create)
plus our short form ``{"prompt": "...", "stream": true}``. Unknown fields are ignored; known
fields that no provider here can honour are rejected with a 400 naming the ``param``, never
dropped silently. Provider-specific support (penalties, seed, ...) is checked by
:func:`check_supported` against the capabilities the provider declares.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamgate.config import Settings
from streamgate.errors import PayloadTooLargeError, RequestError

ROLES = frozenset({"system", "developer", "user", "assistant"})

# Capabilities a provider may declare; each gates the request fields named here.
CAP_PENALTIES = "penalties"  # frequency_penalty, presence_penalty
CAP_SEED = "seed"


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str | None
    messages: tuple[Message, ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


def decode_body(body: bytes | None, settings: Settings) -> dict[str, Any]:
    """Raw bytes → JSON object, with the messages our first users rely on."""
    if body is not None and len(body) > settings.max_body_bytes:
        raise PayloadTooLargeError(
            f"Request body exceeds maximum size of {settings.max_body_bytes} bytes"
        )
    if body is None or not body.strip():
        raise RequestError("No JSON body provided")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RequestError("Invalid JSON body") from e
    if data is None:
        raise RequestError("No JSON body provided")
    if not isinstance(data, dict):
        raise RequestError("Invalid JSON body")
    return data


def _reject_constant(name: str) -> None:
    # NaN / Infinity are not JSON; Python accepts them unless told otherwise.
    raise ValueError(f"invalid JSON constant {name}")


def parse_request(data: Mapping[str, Any], settings: Settings) -> ChatRequest:
    """Validate a decoded body. Raises :class:`RequestError` naming the offending ``param``."""
    prompt = data.get("prompt")
    messages = data.get("messages")
    if prompt is not None and messages is not None:
        raise RequestError("Provide either 'prompt' or 'messages', not both", param="prompt")
    if prompt is not None:
        parsed: tuple[Message, ...] = (Message("user", _prompt(prompt, settings)),)
    elif messages is not None:
        parsed = _messages(messages)
    else:
        raise RequestError("'messages' is required (or 'prompt' for the short form)",
                           param="messages")

    _reject_unsupported(data)

    stream = _optional(data, "stream", bool)
    stream_options = _optional(data, "stream_options", dict)
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise RequestError("'stream_options' is only allowed when 'stream' is true",
                               param="stream_options")
        include_usage = bool(_optional(stream_options, "include_usage", bool,
                                       name="stream_options.include_usage"))

    max_tokens = _max_tokens(data, settings)
    temperature = _number(data, "temperature", 0.0, 2.0)
    top_p = _number(data, "top_p", 0.0, 1.0)
    return ChatRequest(
        model=_model(data),
        messages=parsed,
        stream=bool(stream),
        include_usage=include_usage,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=_stop(data.get("stop")),
        seed=_optional(data, "seed", int),
        user=_optional(data, "user", str),
        frequency_penalty=_number(data, "frequency_penalty", -2.0, 2.0),
        presence_penalty=_number(data, "presence_penalty", -2.0, 2.0),
    )


def check_supported(request: ChatRequest, capabilities: frozenset[str]) -> None:
    """400 for a parameter the chosen provider cannot honour (never a silent drop)."""
    if CAP_PENALTIES not in capabilities:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(request, name):
                raise RequestError(f"'{name}' is not supported by this model", param=name)
    if CAP_SEED not in capabilities and request.seed is not None:
        raise RequestError("'seed' is not supported by this model", param="seed")


def _prompt(prompt: object, settings: Settings) -> str:
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string", param="prompt")
    if not prompt.strip():
        raise RequestError("Prompt cannot be empty", param="prompt")
    if len(prompt) > settings.max_prompt_chars:
        raise RequestError(
            f"Prompt exceeds maximum length of {settings.max_prompt_chars} chars", param="prompt"
        )
    return prompt


def _messages(messages: object) -> tuple[Message, ...]:
    if not isinstance(messages, list):
        raise RequestError("'messages' must be an array", param="messages")
    if not messages:
        raise RequestError("'messages' must contain at least one message", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"'{where}' must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str):
            raise RequestError(f"'{where}.role' must be a string", param=f"{where}.role")
        if role == "tool" or message.get("tool_calls"):
            raise RequestError("Tool calls are not supported by this model", param=where)
        if role not in ROLES:
            raise RequestError(
                f"'{where}.role' must be one of {', '.join(sorted(ROLES))}; got {role!r}",
                param=f"{where}.role",
            )
        out.append(Message(role, _content(message.get("content"), where)))
    return tuple(out)


def _content(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise RequestError(f"'{at}' must be an object with a 'type'", param=at)
            if part["type"] != "text":
                raise RequestError(
                    f"Content parts of type {part['type']!r} are not supported by this model",
                    param=f"{at}.type",
                )
            if not isinstance(part.get("text"), str):
                raise RequestError(f"'{at}.text' must be a string", param=f"{at}.text")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(
        f"'{where}.content' must be a string or an array of text parts", param=f"{where}.content"
    )


# Fields whose only honest value here is "off": anything else changes the output in a way no
# provider of ours can deliver.
_OFF_VALUES: dict[str, tuple[object, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "modalities": (None, ["text"]),
}


def _reject_unsupported(data: Mapping[str, Any]) -> None:
    n = data.get("n")
    if n is not None and (not _is_int(n) or n < 1):
        raise RequestError("'n' must be a positive integer", param="n")
    if n is not None and n > 1:
        raise RequestError("Only n=1 is supported", param="n")
    for name, allowed in _OFF_VALUES.items():
        if name in data and not any(
            data[name] == value and type(data[name]) is type(value) for value in allowed
        ):
            raise RequestError(f"'{name}' is not supported by this model", param=name)
    response_format = data.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError("Only response_format type 'text' is supported",
                           param="response_format")


def _model(data: Mapping[str, Any]) -> str | None:
    model: str | None = _optional(data, "model", str)
    if model is not None and not model.strip():
        raise RequestError("'model' must not be empty", param="model")
    return model


def _max_tokens(data: Mapping[str, Any], settings: Settings) -> int | None:
    a: int | None = _optional(data, "max_completion_tokens", int)
    b: int | None = _optional(data, "max_tokens", int)
    if a is not None and b is not None and a != b:
        raise RequestError("'max_tokens' and 'max_completion_tokens' disagree; send one",
                           param="max_tokens")
    value, name = (a, "max_completion_tokens") if a is not None else (b, "max_tokens")
    if value is None:
        return None
    if value < 1:
        raise RequestError(f"'{name}' must be at least 1", param=name)
    if value > settings.max_tokens_cap:
        raise RequestError(f"'{name}' must be at most {settings.max_tokens_cap}", param=name)
    return value


def _stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise RequestError("'stop' must be a non-empty string or an array of them", param="stop")
    if len(items) > 4:
        raise RequestError("'stop' accepts at most 4 sequences", param="stop")
    return tuple(items)


def _number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number", param=name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low:g} and {high:g}", param=name)
    return float(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", str: "a string", dict: "an object"}


def _optional(data: Mapping[str, Any], key: str, kind: type, *, name: str | None = None) -> Any:
    """``data[key]`` if present and of ``kind`` (bool is not an int), None if absent or null."""
    value = data.get(key)
    if value is None:
        return None
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        label = name or key
        raise RequestError(f"'{label}' must be {_TYPE_NAMES[kind]}", param=label)
    return value
