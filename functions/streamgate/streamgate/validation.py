"""Parse and validate a chat-completions request body into a :class:`ChatRequest`.

Follows the OpenAI request schema (https://platform.openai.com/docs/api-reference/chat/create)
plus our short form ``{"prompt": "...", "stream": true}``. Unknown fields are ignored; known
fields that no provider here can honour are rejected with a 400 naming the ``param``, never
dropped silently. Provider-specific support (penalties, seed, ...) is checked by
:func:`check_supported` against the capabilities the provider declares.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
CAP_IMAGES = "images"  # image_url content parts (data: URLs)
CAP_SEQUENTIAL_TOOLS = "sequential_tools"  # parallel_tool_calls: false
CAP_JSON_SCHEMA = "json_schema"  # response_format {"type": "json_schema", ...}
CAP_JSON_OBJECT = "json_object"  # response_format {"type": "json_object"}

MAX_TOOLS = 128  # OpenAI's limit
# data:image/<type>;base64,<payload> -> the format name providers use.
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg",
               "image/gif": "gif", "image/webp": "webp"}
TOOL_CHOICES = ("none", "auto", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# OpenAI's rule for response_format.json_schema.name.
_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Our caps on response_format.json_schema.schema: its compact JSON text, and how deeply its
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
        chars += len(_compact(response_format.schema))
    return chars


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
        if isinstance(messages, list) and len(messages) > settings.max_messages:
            raise RequestError(f"'messages' exceeds the maximum of {settings.max_messages} "
                               "messages", param="messages", code="too_many_messages")
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
    min_tokens = _min_tokens(data, max_tokens, settings)
    temperature = _number(data, "temperature", 0.0, 2.0)
    top_p = _number(data, "top_p", 0.0, 1.0)
    tools = _tools(data.get("tools"))
    tool_choice, tool_choice_name = _tool_choice(data.get("tool_choice"), tools)
    response_format = _response_format(data.get("response_format"))
    if input_chars(parsed, tools, response_format) > settings.max_input_chars:
        raise RequestError(f"The input exceeds the maximum of {settings.max_input_chars} "
                           "characters across messages and tools", param="messages",
                           code="input_too_long")
    return ChatRequest(
        model=_model(data),
        messages=parsed,
        stream=bool(stream),
        include_usage=include_usage,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=_stop(data.get("stop")),
        seed=_optional(data, "seed", int),
        user=_optional(data, "user", str),
        frequency_penalty=_number(data, "frequency_penalty", -2.0, 2.0),
        presence_penalty=_number(data, "presence_penalty", -2.0, 2.0),
        tools=tools,
        tool_choice=tool_choice,
        tool_choice_name=tool_choice_name,
        parallel_tool_calls=_optional(data, "parallel_tool_calls", bool),
        response_format=response_format,
    )


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
        if role not in ROLES:
            raise RequestError(
                f"'{where}.role' must be one of {', '.join(sorted(ROLES))}; got {role!r}",
                param=f"{where}.role",
            )
        out.append(_message(role, message, where))
    return tuple(out)


def _message(role: str, message: Mapping[str, Any], where: str) -> Message:
    content = message.get("content")
    tool_calls: tuple[ToolCall, ...] = ()
    if message.get("tool_calls") is not None:
        if role != "assistant":
            raise RequestError("Only assistant messages may carry 'tool_calls'",
                               param=f"{where}.tool_calls")
        tool_calls = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        if content is None:  # OpenAI sends null content next to tool calls
            return Message(role, "", tool_calls=tool_calls)
    tool_call_id = None
    if role == "tool":
        tool_call_id = message.get("tool_call_id")
        if not isinstance(tool_call_id, str) or not tool_call_id:
            raise RequestError(f"'{where}.tool_call_id' must be a non-empty string",
                               param=f"{where}.tool_call_id")
    text, parts = _content(content, where, images=role == "user")
    return Message(role, text, parts, tool_calls, tool_call_id)


def _content(content: object, where: str, *, images: bool) -> tuple[str, tuple[str | Image, ...]]:
    """The joined text, and the ordered parts if any of them is an image."""
    if isinstance(content, str):
        return content, ()
    if not isinstance(content, list):
        kinds = "text and image parts" if images else "text parts"
        raise RequestError(f"'{where}.content' must be a string or an array of {kinds}",
                           param=f"{where}.content")
    parts: list[str | Image] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(f"'{at}' must be an object with a 'type'", param=at)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"'{at}.text' must be a string", param=f"{at}.text")
            parts.append(part["text"])
        elif part["type"] == "image_url" and images:
            parts.append(_image(part.get("image_url"), f"{at}.image_url"))
        else:
            scope = "outside user messages" if part["type"] == "image_url" else "here"
            raise RequestError(
                f"Content parts of type {part['type']!r} are not supported {scope}",
                param=f"{at}.type",
            )
    text = "".join(p for p in parts if isinstance(p, str))
    return text, (tuple(parts) if any(isinstance(p, Image) for p in parts) else ())


def _image(image_url: object, at: str) -> Image:
    """An ``image_url`` part: data URLs only; this service never fetches a remote URL."""
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise RequestError(f"'{at}.url' must be a string", param=f"{at}.url")
    url = image_url["url"]
    detail = image_url.get("detail")
    if detail not in (None, "auto"):
        raise RequestError(f"'{at}.detail' {detail!r} is not supported; use 'auto'",
                           param=f"{at}.detail")
    if not url.startswith("data:"):
        raise RequestError(
            "Only data: URLs (data:image/png;base64,...) are accepted for images; "
            "this service does not fetch remote URLs", param=f"{at}.url")
    header, sep, payload = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not sep or encoding != "base64":
        raise RequestError("Image data URLs must be base64-encoded (data:<type>;base64,...)",
                           param=f"{at}.url")
    image_format = IMAGE_TYPES.get(media_type.lower())
    if image_format is None:
        raise RequestError(
            f"Image type {media_type!r} is not supported; use PNG, JPEG, GIF or WebP",
            param=f"{at}.url")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError("Image data URL is not valid base64", param=f"{at}.url") from e
    if not data:
        raise RequestError("Image data URL is empty", param=f"{at}.url")
    return Image(image_format, data)


def _tool_calls(value: object, where: str) -> tuple[ToolCall, ...]:
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be an array", param=where)
    calls = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type", "function") != "function" or (
                not isinstance(function, dict)):
            raise RequestError(f"'{at}' must be a function tool call", param=at)
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise RequestError(f"'{at}.id' must be a non-empty string", param=f"{at}.id")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"'{at}.function.name' must be a non-empty string",
                               param=f"{at}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise RequestError(f"'{at}.function.arguments' must be a string of JSON",
                               param=f"{at}.function.arguments")
        try:
            parsed = json.loads(arguments or "{}")
        except ValueError as e:
            raise RequestError(f"'{at}.function.arguments' is not valid JSON",
                               param=f"{at}.function.arguments") from e
        if not isinstance(parsed, dict):
            raise RequestError(f"'{at}.function.arguments' must be a JSON object",
                               param=f"{at}.function.arguments")
        calls.append(ToolCall(call["id"], name, arguments or "{}"))
    return tuple(calls)


def _tools(value: object) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RequestError("'tools' must be an array", param="tools")
    if len(value) > MAX_TOOLS:
        raise RequestError(f"'tools' accepts at most {MAX_TOOLS} tools", param="tools")
    tools: list[Tool] = []
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or (
                not isinstance(function, dict)):
            raise RequestError(f"'{at}' must be {{\"type\": \"function\", \"function\": {{...}}}}",
                               param=at)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"'{at}.function.name' must be a non-empty string",
                               param=f"{at}.function.name")
        if any(t.name == name for t in tools):
            raise RequestError(f"Tool name {name!r} appears twice", param=f"{at}.function.name")
        tools.append(Tool(
            name,
            _optional(function, "description", str, name=f"{at}.function.description"),
            _optional(function, "parameters", dict, name=f"{at}.function.parameters"),
            _optional(function, "strict", bool, name=f"{at}.function.strict"),
        ))
    return tuple(tools)


def _tool_choice(value: object, tools: tuple[Tool, ...]) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if value in TOOL_CHOICES:
        choice, name = str(value), None
    elif (isinstance(value, dict) and value.get("type") == "function"
          and isinstance(value.get("function"), dict)
          and isinstance(value["function"].get("name"), str)):
        choice, name = "function", value["function"]["name"]
        if tools and all(t.name != name for t in tools):
            raise RequestError(f"'tool_choice' names {name!r}, which is not in 'tools'",
                               param="tool_choice")
    else:
        raise RequestError(
            "'tool_choice' must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    if choice != "none" and not tools:
        raise RequestError("'tool_choice' is only allowed when 'tools' are given",
                           param="tool_choice")
    return choice, name


# Fields whose only honest value here is "off": anything else changes the output in a way no
# provider of ours can deliver.
_OFF_VALUES: dict[str, tuple[object, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
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


def _response_format(value: object) -> ResponseFormat | None:
    """``response_format`` by OpenAI's rules. A field we do not know inside it is refused, not
    ignored: it would change the answer's shape (``{"type": "json_object", "schema": ...}``)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise RequestError("'response_format' must be an object with a 'type'",
                           param="response_format")
    kind = value["type"]
    if kind not in RESPONSE_FORMATS:
        raise RequestError("'response_format.type' must be 'text', 'json_object' or "
                           f"'json_schema'; got {kind!r}", param="response_format.type")
    _known_fields(value, ("type", "json_schema") if kind == "json_schema" else ("type",),
                  "response_format")
    if kind != "json_schema":
        return ResponseFormat(kind)
    at = "response_format.json_schema"
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError(f"'{at}' must be an object with 'name' and 'schema' when "
                           "'response_format.type' is 'json_schema'", param=at)
    _known_fields(spec, ("name", "description", "schema", "strict"), at)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise RequestError(f"'{at}.name' must be 1 to 64 characters of a-z, A-Z, 0-9, '_' "
                           "and '-'", param=f"{at}.name")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise RequestError(f"'{at}.schema' must be a JSON Schema object", param=f"{at}.schema")
    if len(_compact(schema)) > MAX_SCHEMA_CHARS:
        raise RequestError(f"'{at}.schema' exceeds the maximum of {MAX_SCHEMA_CHARS} "
                           "characters (as compact JSON)", param=f"{at}.schema")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise RequestError(f"'{at}.schema' nests objects and arrays more than "
                           f"{MAX_SCHEMA_DEPTH} levels deep", param=f"{at}.schema")
    return ResponseFormat(
        kind, name,
        _optional(spec, "description", str, name=f"{at}.description"),
        schema,
        _optional(spec, "strict", bool, name=f"{at}.strict"),
    )


def _known_fields(value: Mapping[str, Any], known: tuple[str, ...], at: str) -> None:
    """400 for a field outside ``known`` (null fields say nothing and pass)."""
    for key, item in value.items():
        if key not in known and item is not None:
            raise RequestError(f"'{at}' has an unknown field {key!r}; it takes "
                               + ", ".join(repr(k) for k in known), param=f"{at}.{key}")


def _compact(document: Any) -> str:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def _depth(document: Any) -> int:
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


def _min_tokens(data: Mapping[str, Any], max_tokens: int | None,
                settings: Settings) -> int | None:
    """vLLM's ``min_tokens``: 0 up to the request's ``max_tokens`` (or the default one)."""
    value: int | None = _optional(data, "min_tokens", int)
    if value is None:
        return None
    if value < 0:
        raise RequestError("'min_tokens' must be at least 0", param="min_tokens")
    limit = max_tokens if max_tokens is not None else settings.default_max_tokens
    if value > limit:
        raise RequestError(f"'min_tokens' must not exceed max_tokens ({limit})",
                           param="min_tokens")
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
