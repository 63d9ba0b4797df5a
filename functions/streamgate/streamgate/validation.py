"""The provider-neutral request every API dialect parses into, and the checks they share.

A dialect (streamgate/dialects/) turns its own body into a :class:`ChatRequest`: messages with
roles, text and images, tool calls and their results, tools, sampling and format settings.
Providers take only this. The checks here are drawn the same way for every dialect: the body as
JSON (size, UTF-8, lone surrogates), images as data URLs, tool-call arguments as JSON objects,
JSON Schema formats within bounds, numbers in range, and :func:`check_supported`, the 400 for a
field the chosen provider cannot honour (never a silent drop), by the capabilities it declares.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamgate.config import Settings
from streamgate.errors import PayloadTooLargeError, RequestError
from streamgate.events import invalid_text

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

# Capabilities a provider may declare; each gates the request fields named here.
CAP_PENALTIES = "penalties"  # frequency_penalty, presence_penalty
CAP_SEED = "seed"
CAP_MIN_TOKENS = "min_tokens"  # min_tokens (vLLM's extension) above 0
CAP_TOOLS = "tools"  # tools, tool_choice, assistant tool_calls, tool messages
CAP_IMAGES = "images"  # image content parts (data: URLs)
CAP_SEQUENTIAL_TOOLS = "sequential_tools"  # parallel_tool_calls: false
CAP_JSON_SCHEMA = "json_schema"  # response_format {"type": "json_schema", ...}
CAP_JSON_OBJECT = "json_object"  # response_format {"type": "json_object"}

MAX_TOOLS = 128  # OpenAI's limit
# data:image/<type>;base64,<payload> -> the format name providers use.
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg",
               "image/gif": "gif", "image/webp": "webp"}
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# OpenAI's rule for a JSON schema's name (and a function's).
SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Our caps on a JSON schema format's schema: its compact JSON text, and how deeply its
# objects and arrays nest (grammar converters and validators walk it recursively).
MAX_SCHEMA_CHARS = 100_000
MAX_SCHEMA_DEPTH = 32
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Image:
    format: str  # png, jpeg, gif or webp
    data: bytes


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call from an earlier assistant turn; ``arguments`` is JSON object text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None  # JSON Schema of the arguments
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """``response_format``: ``text``, ``json_object``, or ``json_schema`` with the fields of
    ``json_schema`` exactly as the client sent them (https://platform.openai.com/docs/guides/
    structured-outputs)."""

    type: str  # one of RESPONSE_FORMATS
    name: str | None = None
    description: str | None = None
    schema: Mapping[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None

    @property
    def constrained(self) -> bool:
        """True unless this is plain text: the answer must be JSON."""
        return self.type != "text"


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str  # the text parts, joined
    # The content parts in order, kept only when they include an image.
    parts: tuple[str | Image, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # role "tool": the call this message answers
    # Where the message came from in the client's request, when that is not ``messages[i]``
    # (``input[2]``, ``messages[0].content[1]``): what a 400 about it names.
    at: str = ""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str | None
    messages: tuple[Message, ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    # vLLM's extension: end-of-text (and a frame's own stops) ignored until this many tokens.
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    tools: tuple[Tool, ...] = ()
    # "none", "auto", "required", or "function" (then tool_choice_name names the tool).
    tool_choice: str | None = None
    tool_choice_name: str | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # How the client's dialect names what this request calls by the chat names (a 400 names
    # the field the client sent): ``{"response_format": "text.format", ...}``; see
    # :meth:`client_param`.
    params: Mapping[str, str] = field(default_factory=dict)

    def client_param(self, param: str | None) -> str | None:
        """``param`` (a chat name, as checks and providers give it) as the client's dialect
        names it: a mapped name, or a message's own place (``input[3]``) for ``messages[i]``."""
        if param is None:
            return None
        if param in self.params:
            return self.params[param]
        if param.startswith("messages["):
            index, _, rest = param[9:].partition("]")
            if index.isdigit() and int(index) < len(self.messages):
                at = self.messages[int(index)].at
                if at:
                    return at + rest
        return param


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
    # A lone surrogate can only arrive as a \uD800-\uDFFF escape: look only if there is one.
    if _SURROGATE_ESCAPE.search(body) is not None:
        where = invalid_text(data)
        if where is not None:
            raise RequestError(f"'{where}' is not valid Unicode text (it holds a lone UTF-16 "
                               "surrogate)", param=where)
    return data


def input_chars(messages: Sequence[Message], tools: Sequence[Tool],
                response_format: ResponseFormat | None = None) -> int:
    """Characters of text a request sends the model (images not included; a response
    format's schema included, since the backends show it to the model)."""
    chars = 0
    for message in messages:
        chars += len(message.content)
        for call in message.tool_calls:
            chars += len(call.name) + len(call.arguments)
    for tool in tools:
        chars += len(tool.name) + len(tool.description or "")
        chars += len(json.dumps(tool.parameters)) if tool.parameters else 0
    if response_format is not None and response_format.schema is not None:
        chars += len(compact(response_format.schema))
    return chars


def _reject_constant(name: str) -> None:
    # NaN / Infinity are not JSON; Python accepts them unless told otherwise.
    raise ValueError(f"invalid JSON constant {name}")


def parse_json_text(text: str, at: str, what: str) -> Any:
    """JSON text inside a request (tool-call arguments), as the body is read: no NaN."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"'{at}' is not valid JSON{what}", param=at) from e


def tool_arguments(arguments: object, at: str) -> str:
    """A tool call's ``arguments``: JSON object text ("" means ``{}``)."""
    if not isinstance(arguments, str):
        raise RequestError(f"'{at}' must be a string of JSON", param=at)
    if not isinstance(parse_json_text(arguments or "{}", at, ""), dict):
        raise RequestError(f"'{at}' must be a JSON object", param=at)
    return arguments or "{}"


def function_tool(tools: Sequence[Tool], name: object, description: object,
                  parameters: object, strict: object, at: str, name_at: str) -> Tool:
    """A function tool, its name unique among ``tools`` (the ones before it)."""
    if not isinstance(name, str) or not name:
        raise RequestError(f"'{name_at}' must be a non-empty string", param=name_at)
    if any(t.name == name for t in tools):
        raise RequestError(f"Tool name {name!r} appears twice", param=name_at)
    holder = {"description": description, "parameters": parameters, "strict": strict}
    return Tool(
        name,
        optional(holder, "description", str, name=f"{at}.description"),
        optional(holder, "parameters", dict, name=f"{at}.parameters"),
        optional(holder, "strict", bool, name=f"{at}.strict"),
    )


def json_schema_format(spec: Mapping[str, Any], at: str) -> ResponseFormat:
    """A ``json_schema`` format's fields (``name``, ``description``, ``schema``, ``strict``) by
    OpenAI's rules and our bounds; ``at`` is where they sit in the request."""
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
        raise RequestError(f"'{at}.name' must be 1 to 64 characters of a-z, A-Z, 0-9, '_' "
                           "and '-'", param=f"{at}.name")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise RequestError(f"'{at}.schema' must be a JSON Schema object", param=f"{at}.schema")
    if len(compact(schema)) > MAX_SCHEMA_CHARS:
        raise RequestError(f"'{at}.schema' exceeds the maximum of {MAX_SCHEMA_CHARS} "
                           "characters (as compact JSON)", param=f"{at}.schema")
    if depth(schema) > MAX_SCHEMA_DEPTH:
        raise RequestError(f"'{at}.schema' nests objects and arrays more than "
                           f"{MAX_SCHEMA_DEPTH} levels deep", param=f"{at}.schema")
    return ResponseFormat(
        "json_schema", name,
        optional(spec, "description", str, name=f"{at}.description"),
        schema,
        optional(spec, "strict", bool, name=f"{at}.strict"),
    )


def token_limit(value: int | None, name: str, settings: Settings) -> int | None:
    """An output token limit: 1 to the configured cap."""
    if value is None:
        return None
    if value < 1:
        raise RequestError(f"'{name}' must be at least 1", param=name)
    if value > settings.max_tokens_cap:
        raise RequestError(f"'{name}' must be at most {settings.max_tokens_cap}", param=name)
    return value


def model_name(data: Mapping[str, Any]) -> str | None:
    model: str | None = optional(data, "model", str)
    if model is not None and not model.strip():
        raise RequestError("'model' must not be empty", param="model")
    return model


def check_supported(request: ChatRequest, capabilities: frozenset[str]) -> None:
    """400 for a parameter the chosen provider cannot honour (never a silent drop)."""
    if CAP_PENALTIES not in capabilities:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(request, name):
                raise RequestError(f"'{name}' is not supported by this model", param=name)
    if CAP_SEED not in capabilities and request.seed is not None:
        raise RequestError("'seed' is not supported by this model", param="seed")
    if CAP_MIN_TOKENS not in capabilities and request.min_tokens:
        raise RequestError("'min_tokens' is not supported by this model", param="min_tokens")
    if CAP_TOOLS not in capabilities:
        if request.tools:
            raise RequestError("'tools' is not supported by this model", param="tools")
        for i, m in enumerate(request.messages):
            if m.tool_calls or m.role == "tool":
                raise RequestError("Tool calls are not supported by this model",
                                   param=f"messages[{i}]")
    if (CAP_SEQUENTIAL_TOOLS not in capabilities and request.tools
            and request.parallel_tool_calls is False):
        raise RequestError("'parallel_tool_calls: false' cannot be enforced by this model",
                           param="parallel_tool_calls")
    if CAP_IMAGES not in capabilities:
        for i, m in enumerate(request.messages):
            if any(isinstance(p, Image) for p in m.parts):
                raise RequestError("Image inputs are not supported by this model",
                                   param=f"messages[{i}].content")
    fmt = request.response_format
    if fmt is not None and fmt.constrained and fmt.type not in capabilities:
        hint = ("; send type 'json_schema' with the schema the answer must follow"
                if CAP_JSON_SCHEMA in capabilities else "")
        raise RequestError(f"'response_format' type '{fmt.type}' is not supported by this "
                           f"model{hint}", param="response_format")


def data_url_image(url: str, at: str) -> Image:
    """An image given as a URL (``at`` names the field): data URLs only; this service never
    fetches a remote URL."""
    if not url.startswith("data:"):
        raise RequestError(
            "Only data: URLs (data:image/png;base64,...) are accepted for images; "
            "this service does not fetch remote URLs", param=at)
    header, sep, payload = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not sep or encoding != "base64":
        raise RequestError("Image data URLs must be base64-encoded (data:<type>;base64,...)",
                           param=at)
    image_format = IMAGE_TYPES.get(media_type.lower())
    if image_format is None:
        raise RequestError(
            f"Image type {media_type!r} is not supported; use PNG, JPEG, GIF or WebP",
            param=at)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError("Image data URL is not valid base64", param=at) from e
    if not data:
        raise RequestError("Image data URL is empty", param=at)
    return Image(image_format, data)


def known_fields(value: Mapping[str, Any], known: tuple[str, ...], at: str) -> None:
    """400 for a field outside ``known`` (null fields say nothing and pass)."""
    for key, item in value.items():
        if key not in known and item is not None:
            raise RequestError(f"'{at}' has an unknown field {key!r}; it takes "
                               + ", ".join(repr(k) for k in known), param=f"{at}.{key}")


def compact(document: Any) -> str:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def depth(document: Any) -> int:
    """How deeply objects and arrays nest in a decoded JSON document (a scalar is 0)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            level += 1
            deepest = max(deepest, level)
            stack.extend((item, level) for item in
                         (value.values() if isinstance(value, dict) else value))
    return deepest


def stop_sequences(stop: object, param: str = "stop", limit: int | None = 4) -> tuple[str, ...]:
    """Stop sequences: one non-empty string or an array of them, at most ``limit``."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise RequestError(f"'{param}' must be a non-empty string or an array of them",
                           param=param)
    if limit is not None and len(items) > limit:
        raise RequestError(f"'{param}' accepts at most {limit} sequences", param=param)
    return tuple(items)


def number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number", param=name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low:g} and {high:g}", param=name)
    return float(value)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", str: "a string", dict: "an object"}


def optional(data: Mapping[str, Any], key: str, kind: type, *, name: str | None = None) -> Any:
    """``data[key]`` if present and of ``kind`` (bool is not an int), None if absent or null."""
    value = data.get(key)
    if value is None:
        return None
    ok = is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        label = name or key
        raise RequestError(f"'{label}' must be {_TYPE_NAMES[kind]}", param=label)
    return value
