"""The Anthropic Messages dialect: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Follows Anthropic's Messages API reference (https://docs.anthropic.com/en/api/messages) and the
``anthropic`` SDK's types, which the tests validate every event and document against, strictly.

**Request → neutral request.** ``system`` (a string or text blocks) becomes a system message;
``messages`` keep their roles (``system`` messages among them too): a user turn's
``tool_result`` blocks become tool messages (before the turn's text and images), an assistant
turn's ``tool_use`` blocks its tool calls. Images
come as base64 sources or ``data:`` URLs (this service fetches no remote URL). ``thinking`` and
``redacted_thinking`` blocks sent back are checked and, for a backend that takes no earlier
reasoning, not sent (as Anthropic itself drops earlier turns' thinking). ``tool_result`` with
``is_error`` reaches such a backend as its text marked ``Error:``. ``cache_control`` on a block
is a cache breakpoint after its message (or its tool): a hint only backends with prompt caching
use. ``stop_sequences``, ``temperature`` (0 to 1), ``top_p``, ``top_k``, ``tools`` (client
tools), ``tool_choice`` (``auto``, ``any``, ``tool``, ``none``, ``disable_parallel_tool_use``),
``thinking`` and ``metadata.user_id`` map to their neutral twins; what the chosen backend
cannot honour is a 400 naming the field (validation.check_supported). ``thinking`` sets an upper
bound ("Claude may not use the entire budget"; ``adaptive`` lets the model decide): a model
without reasoning honours it by thinking not at all, so Claude Code, which always sends it,
works with every backend; ``display: "omitted"`` leaves the thinking text out. Server tools,
deferred tools, ``container``, ``mcp_servers``, ``output_config``, context edits that would
change anything (Claude Code's ``clear_thinking`` keeping all is accepted: it changes nothing),
output formats and any field we do not know are a 400 naming it, as Anthropic's API answers
unknown fields; ``output_config.effort`` is accepted as a hint no backend here takes.
``max_tokens`` (required) above the server's cap (``STREAMGATE_MAX_TOKENS_CAP``) is lowered to
it, and a thinking budget with it: Claude Code always asks 32,000 or more, and an answer cut
there ends with ``stop_reason: "max_tokens"``, as any model's limit does.

The validated body also travels as it is (``ChatRequest.native``), with the ``anthropic-beta``
header's betas, for a backend that speaks this API itself: Claude on Bedrock relays its own
events (providers/bedrock.py), which this encoder writes out one for one.

**Answer → events.** ``message_start`` (usage so far: input tokens are known at the end and
given, cumulatively, in ``message_delta``), one ``ping``, then per content block
``content_block_start``, its deltas (``text_delta``, ``thinking_delta`` and ``signature_delta``,
``input_json_delta``), ``content_block_stop``; then ``message_delta`` (``stop_reason``
``end_turn``, ``stop_sequence``, ``max_tokens``, ``tool_use`` or ``refusal``, and the usage) and
``message_stop``. Pings are sent at the start only: a keep-alive during a silence would need a
timer per stream, and the first-token and idle timeouts end any silence long before a client
gives up on one. A failure after the first byte is an ``error`` event (``overloaded_error``,
``rate_limit_error``, ``timeout_error``, ``api_error``, ...). Errors before it are Anthropic's
``{"type": "error", "error": {"type", "message"}}`` with its statuses: 400, 401, 403, 404, 413,
429 (with ``retry-after``), 500, 504, and 529 when the backend is overloaded or unavailable.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streamgate import sse
from streamgate.errors import (
    AuthenticationError,
    DeadlineExceededError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RequestError,
    StreamgateError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from streamgate.providers import (
    Finish,
    NativeDelta,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)
from streamgate.validation import (
    IMAGE_TYPES,
    MAX_TOOLS,
    ChatRequest,
    Image,
    Message,
    NativeBody,
    Tool,
    ToolCall,
    data_url_image,
    depth,
    function_tool,
    input_chars,
    is_int,
    known_fields,
    number,
    optional,
    stop_sequences,
)

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.dialects import Answer, Call, Output
    from streamgate.events import HttpRequest
    from streamgate.outcome import Outcome
    from streamgate.providers import Usage

NAME = "messages"
PATH = "/v1/messages"
COUNT_PATH = PATH + "/count_tokens"
# Anthropic answers with this header (the SDKs read it); ours is the request's id.
REQUEST_ID_HEADER = "request-id"
SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache",
               "x-accel-buffering": "no"}
JSON_HEADERS = {"content-type": "application/json", "cache-control": "no-store"}
MAX_STOP_SEQUENCES = 64
MIN_THINKING_BUDGET = 1_024
THINKING_TYPES = ("enabled", "disabled", "adaptive")
# Request fields we take (others are a 400: Anthropic's API refuses unknown fields too).
_FIELDS = ("model", "max_tokens", "messages", "system", "stream", "stop_sequences",
           "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "metadata",
           "context_management", "output_config")
_COUNT_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking",
                 "context_management", "output_config")
# Fields checked here and sent to no backend: what they ask changes nothing (see
# _context_management), or is a hint none of them takes (output_config.effort).
_NOT_FORWARDED = ("model", "stream", "metadata", "context_management", "output_config")
EFFORTS = ("low", "medium", "high", "xhigh", "max")
# Known fields we cannot honour, and why (a 400 says so).
_REFUSED = {
    "container": "containers belong to Anthropic's server tools, which this server does not run",
    "mcp_servers": "this server does not connect to MCP servers",
    "output_format": "structured output formats are not available on this server",
    "service_tier": "this server has one service tier",
    "cache_control": "send cache_control on the blocks to cache, not on the request",
}
# Fields a client tool may carry; ``eager_input_streaming`` only changes how its input
# streams (fine-grained tool streaming) and is accepted and not sent to a backend.
_TOOL_FIELDS = ("type", "name", "description", "input_schema", "cache_control",
                "eager_input_streaming", "strict", "defer_loading")
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")
_EVENT_NAME = re.compile(r"[a-z_]{1,64}")
# Our error classes → Anthropic's error type (the status stays ours, except overloaded).
OVERLOADED_STATUS = 529


def new_message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def new_tool_id() -> str:
    return "toolu_" + os.urandom(12).hex()


@dataclass(slots=True)
class MessagesParsed:
    chat: ChatRequest
    # What the client asked for before a cap lowered it (for the log; the answer says
    # max_tokens when the cap ends it).
    asked_max_tokens: int | None = None
    betas: tuple[str, ...] = field(default_factory=tuple)
    # thinking.display "omitted": thinking blocks carry their signature, not their text.
    omit_thinking: bool = False


class MessagesDialect:
    name = NAME
    path = PATH
    count_path = COUNT_PATH
    request_id_header = REQUEST_ID_HEADER

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def parse(self, data: Mapping[str, Any], call: Call) -> MessagesParsed:
        return parse_request(data, self._settings, call.request.headers)

    def parse_count(self, data: Mapping[str, Any], call: Call) -> MessagesParsed:
        """A ``count_tokens`` body: the request's input, without generation settings."""
        return parse_request(data, self._settings, call.request.headers, counting=True)

    def count_document(self, tokens: int) -> dict[str, Any]:
        return {"input_tokens": tokens}

    def encoder(self, parsed: MessagesParsed, model: str) -> MessagesEncoder:
        return MessagesEncoder(model, omit_thinking=parsed.omit_thinking)

    def error(self, err: StreamgateError, *, stream: bool) -> tuple[int, dict[str, str], bytes]:
        status, kind = error_type(err)
        headers = dict(JSON_HEADERS)
        headers.update(err.headers())
        return status, headers, sse.json_bytes(error_body(err, kind))

    def resources(self) -> dict[str, tuple[str, ...]]:
        return {COUNT_PATH: ("POST",)}

    def resource_methods(self, path: str) -> tuple[str, ...]:
        return ("POST",) if path == COUNT_PATH else ()

    def resource(self, request: HttpRequest, call: Call) -> tuple[int, Mapping[str, Any]]:
        raise AssertionError("the handler counts tokens itself (it needs the provider)")


def error_type(err: StreamgateError) -> tuple[int, str]:
    """The status and Anthropic error type for one of our errors
    (https://docs.anthropic.com/en/api/errors)."""
    if isinstance(err, RateLimitError):
        return err.status, "rate_limit_error"
    if isinstance(err, AuthenticationError):
        return err.status, "authentication_error"
    if isinstance(err, PermissionDeniedError):
        return err.status, "permission_error"
    if isinstance(err, NotFoundError):
        return err.status, "not_found_error"
    if isinstance(err, PayloadTooLargeError):
        return err.status, "request_too_large"
    if isinstance(err, RequestError):
        return err.status, "invalid_request_error"
    if isinstance(err, UpstreamUnavailableError):
        return OVERLOADED_STATUS, "overloaded_error"
    if isinstance(err, (UpstreamTimeoutError, DeadlineExceededError)):
        return err.status, "timeout_error"
    return err.status, "api_error"


def error_body(err: StreamgateError, kind: str | None = None) -> dict[str, Any]:
    return {"type": "error",
            "error": {"type": kind or error_type(err)[1], "message": err.message}}


# -- the request ------------------------------------------------------------------------------

def parse_request(data: Mapping[str, Any], settings: Settings, headers: Mapping[str, str],
                  *, counting: bool = False) -> MessagesParsed:
    """Validate a decoded Messages body (or a ``count_tokens`` one). Raises
    :class:`RequestError` naming the offending field."""
    allowed = _COUNT_FIELDS if counting else _FIELDS
    for key, value in data.items():
        if key in allowed:
            continue
        if key in _REFUSED and value is not None:
            raise RequestError(f"'{key}' is not supported: {_REFUSED[key]}", param=key)
        if value is not None or key not in _FIELDS:
            raise RequestError(f"{key}: Extra inputs are not permitted", param=key)
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise RequestError("model: Field required (a non-empty string)", param="model")
    stream = bool(optional(data, "stream", bool))
    asked = max_tokens = None
    if not counting:
        asked = data.get("max_tokens")
        if not is_int(asked):
            raise RequestError("max_tokens: Field required (an integer)", param="max_tokens")
        assert isinstance(asked, int)
        if asked < 1:
            raise RequestError("max_tokens: must be at least 1", param="max_tokens")
        max_tokens = min(asked, settings.max_tokens_cap)
    system = _system(data.get("system"))
    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RequestError("messages: must be a non-empty array of messages", param="messages")
    if len(raw_messages) > settings.max_messages:
        raise RequestError(f"messages: exceeds the maximum of {settings.max_messages} "
                           "messages", param="messages", code="too_many_messages")
    messages = [*system, *_messages(raw_messages)]
    tools = _tools(data.get("tools"))
    tool_choice, tool_choice_name, parallel = _tool_choice(data.get("tool_choice"), tools)
    thinking_budget, omit_thinking = _thinking(data.get("thinking"), asked)
    _context_management(data.get("context_management"))
    _output_config(data.get("output_config"))
    user = None
    metadata = optional(data, "metadata", dict)
    if metadata is not None:
        known_fields(metadata, ("user_id",), "metadata")
        user = optional(metadata, "user_id", str, name="metadata.user_id")
    top_k = optional(data, "top_k", int)
    if top_k is not None and top_k < 0:
        raise RequestError("top_k: must be at least 0", param="top_k")
    if input_chars(messages, tools) > settings.max_input_chars:
        raise RequestError(f"The input exceeds the maximum of {settings.max_input_chars} "
                           "characters across system, messages and tools", param="messages",
                           code="input_too_long")
    betas = _betas(headers.get("anthropic-beta", ""))
    native = {k: v for k, v in data.items() if k in allowed and v is not None
              and k not in _NOT_FORWARDED}
    if max_tokens is not None:
        native["max_tokens"] = max_tokens
        if thinking_budget is not None and thinking_budget >= max_tokens:
            # The cap lowered max_tokens under the budget: the budget comes down with it.
            if max_tokens - 1 < MIN_THINKING_BUDGET:
                raise RequestError(
                    f"thinking.budget_tokens: this server's cap on max_tokens ({max_tokens}) "
                    f"leaves no room for a thinking budget of at least {MIN_THINKING_BUDGET}",
                    param="thinking.budget_tokens")
            thinking_budget = max_tokens - 1
            native["thinking"] = {**data["thinking"], "budget_tokens": thinking_budget}
    chat = ChatRequest(
        model=model,
        messages=tuple(messages),
        stream=stream and not counting,
        max_tokens=max_tokens,
        temperature=number(data, "temperature", 0.0, 1.0),
        top_p=number(data, "top_p", 0.0, 1.0),
        top_k=top_k,
        stop=_stop_sequences(data.get("stop_sequences")),
        user=user,
        tools=tuple(tools),
        tool_choice=tool_choice,
        tool_choice_name=tool_choice_name,
        parallel_tool_calls=parallel,
        thinking_budget=thinking_budget,
        native=NativeBody(NAME, native, betas),
        params={"stop": "stop_sequences", "user": "metadata.user_id",
                "parallel_tool_calls": "tool_choice.disable_parallel_tool_use"},
    )
    return MessagesParsed(chat, asked, betas, omit_thinking)


def _stop_sequences(value: object) -> tuple[str, ...]:
    """``stop_sequences``: an array of strings (Anthropic takes no single string here)."""
    if value is not None and not isinstance(value, list):
        raise RequestError("stop_sequences: must be an array of strings",
                           param="stop_sequences")
    return stop_sequences(value, "stop_sequences", MAX_STOP_SEQUENCES)


def _betas(header: str) -> tuple[str, ...]:
    """``anthropic-beta: a,b`` (the SDKs join several with commas)."""
    return tuple(dict.fromkeys(b.strip() for b in header.split(",") if b.strip()))


def _cached(block: Mapping[str, Any], at: str) -> bool:
    """Whether a block carries ``cache_control`` (checked: ``{"type": "ephemeral"}`` with an
    optional ``ttl`` of ``5m`` or ``1h``)."""
    value = block.get("cache_control")
    if value is None:
        return False
    if (not isinstance(value, dict) or value.get("type") != "ephemeral"
            or value.get("ttl") not in (None, "5m", "1h")):
        raise RequestError(f"'{at}.cache_control' must be {{\"type\": \"ephemeral\"}} with an "
                           "optional 'ttl' of '5m' or '1h'", param=f"{at}.cache_control")
    known_fields(value, ("type", "ttl"), f"{at}.cache_control")
    return True


def _text_block(block: Mapping[str, Any], at: str) -> str:
    known_fields(block, ("type", "text", "cache_control", "citations"), at)
    if block.get("citations"):
        raise RequestError(f"'{at}.citations' is not supported (this server cites no "
                           "documents)", param=f"{at}.citations")
    text = block.get("text")
    if not isinstance(text, str):
        raise RequestError(f"'{at}.text' must be a string", param=f"{at}.text")
    return text


def _system(value: object, at: str = "system") -> list[Message]:
    """The system prompt (or a system message's content): a string or text blocks."""
    if value is None:
        return []
    if isinstance(value, str):
        return [Message("system", value, at=at)] if value else []
    if not isinstance(value, list):
        raise RequestError(f"{at}: must be a string or an array of text blocks", param=at)
    where = at
    texts, cached = [], False
    for j, block in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise RequestError(f"'{at}' must be a text block", param=at)
        texts.append(_text_block(block, at))
        cached = _cached(block, at) or cached
    text = "\n\n".join(t for t in texts if t)
    return [Message("system", text, at=where, cache_point=cached)] if text or cached else []


def _messages(value: list[Any]) -> list[Message]:
    out: list[Message] = []
    for i, message in enumerate(value):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"'{at}' must be an object", param=at)
        known_fields(message, ("role", "content"), at)
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise RequestError(f"'{at}.role' must be 'user', 'assistant' or 'system'",
                               param=f"{at}.role")
        content = message.get("content")
        if isinstance(content, str):
            out.append(Message(role, content, at=at))
        elif isinstance(content, list) and role == "system":
            out += [Message("system", m.content, at=at, cache_point=m.cache_point)
                    for m in _system(content, at=f"{at}.content")]
        elif isinstance(content, list):
            out += (_user(content, at) if role == "user" else [_assistant(content, at)])
        else:
            raise RequestError(f"'{at}.content' must be a string or an array of content "
                               "blocks", param=f"{at}.content")
    return out


def _blocks(content: list[Any], at: str) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(type, place, block) of each block, each an object with a string ``type``."""
    out: list[tuple[str, str, Mapping[str, Any]]] = []
    for j, block in enumerate(content):
        where = f"{at}.content[{j}]"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise RequestError(f"'{where}' must be an object with a 'type'", param=where)
        out.append((block["type"], where, block))
    return out


def _user(content: list[Any], at: str) -> list[Message]:
    """A user turn: its tool results as tool messages first, then its text and images."""
    results: list[Message] = []
    parts: list[str | Image] = []
    cached = False
    for kind, where, block in _blocks(content, at):
        if kind == "text":
            parts.append(_text_block(block, where))
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "tool_result":
            result, images = _tool_result(block, where)
            results.append(result)
            parts += images
            continue
        else:
            raise RequestError(f"'{where}.type' {kind!r} is not supported in user messages: "
                               "send text, image and tool_result blocks", param=f"{where}.type")
        cached = _cached(block, where) or cached
    if parts or cached or not results:
        text = "".join(p for p in parts if isinstance(p, str))
        kept = tuple(parts) if any(isinstance(p, Image) for p in parts) else ()
        results.append(Message("user", text, kept, at=at, cache_point=cached))
    return results


def _tool_result(block: Mapping[str, Any], at: str) -> tuple[Message, list[Image]]:
    """A ``tool_result`` block → a tool message, and the images it returned (which go to the
    model in the user turn that holds the result)."""
    known_fields(block, ("type", "tool_use_id", "content", "is_error", "cache_control"), at)
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise RequestError(f"'{at}.tool_use_id' must be a non-empty string",
                           param=f"{at}.tool_use_id")
    content = block.get("content", "")
    images: list[Image] = []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for kind, where, part in _blocks(content, at):
            if kind == "text":
                texts.append(_text_block(part, where))
            elif kind == "image":
                images.append(_image(part, where))
            else:
                raise RequestError(f"'{where}.type' {kind!r} is not supported in a tool "
                                   "result: send text and image blocks", param=f"{where}.type")
        text = "".join(texts)
    else:
        raise RequestError(f"'{at}.content' must be a string or an array of blocks",
                           param=f"{at}.content")
    is_error = optional(block, "is_error", bool, name=f"{at}.is_error")
    if is_error:
        text = "Error: " + text
    return Message("tool", text, tool_call_id=call_id, at=at,
                   cache_point=_cached(block, at)), images


def _image(block: Mapping[str, Any], at: str) -> Image:
    known_fields(block, ("type", "source", "cache_control"), at)
    source = block.get("source")
    where = f"{at}.source"
    if not isinstance(source, dict):
        raise RequestError(f"'{where}' must be an object", param=where)
    kind = source.get("type")
    if kind == "url":
        known_fields(source, ("type", "url"), where)
        url = source.get("url")
        if not isinstance(url, str):
            raise RequestError(f"'{where}.url' must be a string", param=f"{where}.url")
        return data_url_image(url, f"{where}.url")
    if kind != "base64":
        raise RequestError(f"'{where}.type' must be 'base64' or 'url'", param=f"{where}.type")
    known_fields(source, ("type", "media_type", "data"), where)
    media_type, data = source.get("media_type"), source.get("data")
    image_format = IMAGE_TYPES.get(media_type) if isinstance(media_type, str) else None
    if image_format is None or media_type == "image/jpg":
        raise RequestError(f"'{where}.media_type' must be image/jpeg, image/png, image/gif or "
                           "image/webp", param=f"{where}.media_type")
    if not isinstance(data, str):
        raise RequestError(f"'{where}.data' must be a base64 string", param=f"{where}.data")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"'{where}.data' is not valid base64", param=f"{where}.data") from e
    if not raw:
        raise RequestError(f"'{where}.data' is empty", param=f"{where}.data")
    return Image(image_format, raw)


def _assistant(content: list[Any], at: str) -> Message:
    texts: list[str] = []
    calls: list[ToolCall] = []
    cached = False
    for kind, where, block in _blocks(content, at):
        if kind == "text":
            texts.append(_text_block(block, where))
        elif kind == "tool_use":
            known_fields(block, ("type", "id", "name", "input", "cache_control", "caller"), where)
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(f"'{where}.id' must be a non-empty string",
                                   param=f"{where}.id")
            if not isinstance(name, str) or not name:
                raise RequestError(f"'{where}.name' must be a non-empty string",
                                   param=f"{where}.name")
            if not isinstance(arguments, dict):
                raise RequestError(f"'{where}.input' must be an object", param=f"{where}.input")
            calls.append(ToolCall(call_id, name, sse.dumps(arguments)))
        elif kind == "thinking":
            known_fields(block, ("type", "thinking", "signature"), where)
            if not isinstance(block.get("thinking"), str) or not isinstance(
                    block.get("signature"), str):
                raise RequestError(f"'{where}' must have 'thinking' and 'signature' strings",
                                   param=where)
            continue  # cannot carry cache_control
        elif kind == "redacted_thinking":
            known_fields(block, ("type", "data"), where)
            if not isinstance(block.get("data"), str):
                raise RequestError(f"'{where}.data' must be a string", param=f"{where}.data")
            continue
        else:
            raise RequestError(f"'{where}.type' {kind!r} is not supported in assistant "
                               "messages: send text, tool_use, thinking and redacted_thinking "
                               "blocks", param=f"{where}.type")
        cached = _cached(block, where) or cached
    return Message("assistant", "".join(texts), tool_calls=tuple(calls), at=at,
                   cache_point=cached)


def _tools(value: object) -> list[Tool]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError("tools: must be an array", param="tools")
    if len(value) > MAX_TOOLS:
        raise RequestError(f"tools: at most {MAX_TOOLS} tools are accepted", param="tools")
    tools: list[Tool] = []
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise RequestError(f"'{at}' must be an object", param=at)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise RequestError(f"'{at}.type' {kind!r} is a server tool, which this server does "
                               "not run; only client tools (with 'input_schema') are supported",
                               param=f"{at}.type")
        known_fields(tool, _TOOL_FIELDS, at)
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise RequestError(f"'{at}.name' must be 1 to 128 characters of a-z, A-Z, 0-9, '_' "
                               "and '-'", param=f"{at}.name")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise RequestError(f"'{at}.input_schema' must be a JSON Schema object with type "
                               "'object'", param=f"{at}.input_schema")
        if depth(schema) > 32:
            raise RequestError(f"'{at}.input_schema' nests too deeply",
                               param=f"{at}.input_schema")
        optional(tool, "eager_input_streaming", bool, name=f"{at}.eager_input_streaming")
        if optional(tool, "defer_loading", bool, name=f"{at}.defer_loading"):
            raise RequestError(f"'{at}.defer_loading': deferred tools need Anthropic's tool "
                               "search, which this server does not run; send the tool without "
                               "it", param=f"{at}.defer_loading")
        described = function_tool(tools, name, tool.get("description"), schema,
                                  tool.get("strict"), at, f"{at}.name")
        tools.append(Tool(described.name, described.description, described.parameters,
                          described.strict, cache_point=_cached(tool, at)))
    return tools


def _tool_choice(value: object, tools: Sequence[Tool]) -> tuple[
        str | None, str | None, bool | None]:
    """(neutral choice, named tool, parallel_tool_calls)."""
    if value is None:
        return None, None, None
    if not isinstance(value, dict) or value.get("type") not in ("auto", "any", "tool", "none"):
        raise RequestError("tool_choice: must be {\"type\": \"auto\"}, {\"type\": \"any\"}, "
                           "{\"type\": \"tool\", \"name\": ...} or {\"type\": \"none\"}",
                           param="tool_choice")
    kind = value["type"]
    known_fields(value, ("type", "name", "disable_parallel_tool_use") if kind == "tool" else
                 ("type",) if kind == "none" else ("type", "disable_parallel_tool_use"),
                 "tool_choice")
    disable = optional(value, "disable_parallel_tool_use", bool,
                       name="tool_choice.disable_parallel_tool_use")
    parallel = False if disable else None
    if kind == "none":
        return "none", None, None
    if not tools:
        raise RequestError("tool_choice: is only allowed when 'tools' are given",
                           param="tool_choice")
    if kind == "tool":
        name = value.get("name")
        if not isinstance(name, str) or all(t.name != name for t in tools):
            raise RequestError(f"tool_choice.name: {name!r} is not one of 'tools'",
                               param="tool_choice.name")
        return "function", name, parallel
    return ("auto" if kind == "auto" else "required"), None, parallel


def _output_config(value: object) -> None:
    """``output_config``: ``effort`` is accepted as the hint it is (Claude Code sends it; no
    backend here takes it, as the Responses dialect's ``reasoning.effort``); an output
    ``format`` is a 400."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise RequestError("output_config: must be an object", param="output_config")
    if value.get("format") is not None:
        raise RequestError("output_config.format: structured output formats are not "
                           "available on this server's Messages API",
                           param="output_config.format")
    known_fields(value, ("effort", "format"), "output_config")
    if value.get("effort") not in (None, *EFFORTS):
        raise RequestError(f"output_config.effort: must be one of {', '.join(EFFORTS)}",
                           param="output_config.effort")


def _context_management(value: object) -> None:
    """``context_management``: only edits that change nothing are accepted (Claude Code sends
    ``clear_thinking`` keeping all thinking); no backend here edits a context."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise RequestError("context_management: must be an object", param="context_management")
    known_fields(value, ("edits",), "context_management")
    edits = value.get("edits") or []
    if not isinstance(edits, list):
        raise RequestError("context_management.edits: must be an array",
                           param="context_management.edits")
    for i, edit in enumerate(edits):
        at = f"context_management.edits[{i}]"
        if not (isinstance(edit, dict) and edit.get("type") == "clear_thinking_20251015"
                and edit.get("keep") == "all" and set(edit) <= {"type", "keep"}):
            raise RequestError(f"{at}: context editing is not available on this server (only "
                               "clear_thinking keeping 'all', which changes nothing)", param=at)


def _thinking(value: object, max_tokens: int | None) -> tuple[int | None, bool]:
    """``thinking``: the budget of ``enabled`` (None for ``adaptive``, ``disabled``), and
    whether its text is to be omitted. A budget is an upper bound ("Claude may not use the
    entire budget"): a backend without reasoning honours it by using none of it."""
    if value is None:
        return None, False
    if not isinstance(value, dict) or value.get("type") not in THINKING_TYPES:
        raise RequestError("thinking: must be {\"type\": \"enabled\", \"budget_tokens\": N}, "
                           "{\"type\": \"adaptive\"} or {\"type\": \"disabled\"}",
                           param="thinking")
    kind = value["type"]
    if kind == "disabled":
        known_fields(value, ("type",), "thinking")
        return None, False
    known_fields(value, ("type", "budget_tokens", "display") if kind == "enabled"
                 else ("type", "display"), "thinking")
    display = value.get("display")
    if display not in (None, "summarized", "omitted"):
        raise RequestError("thinking.display: must be 'summarized' or 'omitted'",
                           param="thinking.display")
    omit = display == "omitted"
    if kind == "adaptive":
        return None, omit
    budget = value.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < MIN_THINKING_BUDGET:
        raise RequestError(f"thinking.budget_tokens: must be an integer of at least "
                           f"{MIN_THINKING_BUDGET}", param="thinking.budget_tokens")
    if max_tokens is not None and budget >= max_tokens:
        raise RequestError(f"thinking.budget_tokens: must be less than max_tokens "
                           f"({max_tokens} here)", param="thinking.budget_tokens")
    return budget, omit


# -- the answer -------------------------------------------------------------------------------

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "content_filter": "refusal"}


def stop_reason(finish: Finish | None, reason: str | None) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for the answer's finish."""
    if finish is not None and finish.reason == "stop" and finish.stop_sequence is not None:
        return "stop_sequence", finish.stop_sequence
    return STOP_REASONS.get(reason or "stop", "end_turn"), None


def usage_object(usage: Usage | None) -> dict[str, Any]:
    """Anthropic's usage: ``input_tokens`` are those neither read from nor written to the
    cache (their sum is the prompt). Zeros when the backend reported nothing."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    read, write = usage.cached_tokens or 0, usage.cache_write_tokens or 0
    return {"input_tokens": max(0, usage.prompt_tokens - read - write),
            "cache_creation_input_tokens": write, "cache_read_input_tokens": read,
            "output_tokens": usage.completion_tokens}


class _Block:
    __slots__ = ("index", "kind", "call", "parts")

    def __init__(self, index: int, kind: str, call: int | None = None) -> None:
        self.index = index
        self.kind = kind  # "text", "thinking" or "tool_use"
        self.call = call  # the tool call's index, for tool_use
        self.parts: list[str] = []


class MessagesEncoder:
    """Deltas → Messages events; joined → one ``Message``. A backend's own Messages events
    (:class:`~streamgate.providers.NativeDelta`) are written out as they came."""

    def __init__(self, model: str, *, omit_thinking: bool = False) -> None:
        self.model = model
        self._omit_thinking = omit_thinking
        self.message_id = new_message_id()
        self._started = False
        self._native = False
        self._native_stopped = False
        self._blocks: list[_Block] = []
        self._open: _Block | None = None
        self._calls: dict[int, _Block] = {}
        self._finish: Finish | None = None

    def headers(self, stream: bool) -> Mapping[str, str]:
        return SSE_HEADERS if stream else JSON_HEADERS

    def start(self) -> bytes:
        return b""  # the first delta says whether the backend speaks Messages itself

    def _message(self, content: list[dict[str, Any]], stop: str | None,
                 sequence: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message", "role": "assistant",
                "model": self.model, "content": content, "stop_reason": stop,
                "stop_sequence": sequence, "usage": usage}

    def _begin(self) -> bytes:
        self._started = True
        start = self._message([], None, None, usage_object(None))
        return (sse.named_event("message_start", {"type": "message_start", "message": start})
                + sse.named_event("ping", {"type": "ping"}))

    def delta(self, delta: Output) -> bytes:
        if not self._started:
            if isinstance(delta, NativeDelta):
                self._started = self._native = True
            else:
                return self._begin() + self.delta(delta)
        if self._native:
            return self._relay(delta)
        if isinstance(delta, Finish):
            self._finish = delta
            return b""
        if isinstance(delta, TextDelta):
            if not delta.text:
                return b""
            out = self._switch("text") if self._kind() != "text" else b""
            return out + self._block_delta({"type": "text_delta", "text": delta.text})
        if isinstance(delta, ReasoningDelta):
            if not delta.text and not delta.signature:
                return b""
            out = self._switch("thinking") if self._kind() != "thinking" else b""
            if delta.text and not self._omit_thinking:
                out += self._block_delta({"type": "thinking_delta", "thinking": delta.text})
            if delta.signature:
                out += self._block_delta({"type": "signature_delta",
                                          "signature": delta.signature})
            return out
        if isinstance(delta, ToolCallDelta):
            return self._tool_call(delta)
        raise UpstreamError("The backend sent an event of another API")  # NativeDelta mid-way

    def _relay(self, delta: Output) -> bytes:
        if not isinstance(delta, NativeDelta):
            return b""  # Finish (the events carry it)
        kind = delta.event.get("type")
        if not isinstance(kind, str) or not _EVENT_NAME.fullmatch(kind):
            raise UpstreamError("The backend sent a malformed event")
        if kind == "message_stop":
            self._native_stopped = True
        return sse.named_event(kind, delta.event)

    def _kind(self) -> str | None:
        return self._open.kind if self._open is not None else None

    def _block_delta(self, delta: dict[str, Any]) -> bytes:
        block = self._open
        assert block is not None
        return sse.named_event("content_block_delta", {
            "type": "content_block_delta", "index": block.index, "delta": delta})

    def _switch(self, kind: str, *, call: ToolCallDelta | None = None) -> bytes:
        out = self._close_open()
        block = _Block(len(self._blocks), kind, call.index if call is not None else None)
        self._blocks.append(block)
        self._open = block
        if kind == "text":
            content: dict[str, Any] = {"type": "text", "text": ""}
        elif kind == "thinking":
            content = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            assert call is not None
            content = {"type": "tool_use", "id": call.id or new_tool_id(),
                       "name": call.name or "", "input": {}}
        return out + sse.named_event("content_block_start", {
            "type": "content_block_start", "index": block.index, "content_block": content})

    def _tool_call(self, delta: ToolCallDelta) -> bytes:
        block = self._calls.get(delta.index)
        out = b""
        if block is None:
            out = self._switch("tool_use", call=delta)
            block = self._calls[delta.index] = self._blocks[-1]
        elif block is not self._open:
            raise UpstreamError("The backend interleaved the input of two tool calls")
        if delta.arguments:
            out += self._block_delta({"type": "input_json_delta",
                                      "partial_json": delta.arguments})
        return out

    def _close_open(self) -> bytes:
        block, self._open = self._open, None
        if block is None:
            return b""
        return sse.named_event("content_block_stop",
                               {"type": "content_block_stop", "index": block.index})

    def end(self, outcome: Outcome) -> list[bytes]:
        if self._native:
            if self._native_stopped:
                return []
            return [sse.named_event("message_stop", {"type": "message_stop"})]
        out = b"" if self._started else self._begin()
        out += self._close_open()
        reason, sequence = stop_reason(self._finish, outcome.finish_reason)
        out += sse.named_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": usage_object(outcome.usage)})
        return [out + sse.named_event("message_stop", {"type": "message_stop"})]

    def fail(self, err: StreamgateError, outcome: Outcome) -> bytes:
        return sse.named_event("error", error_body(err))

    def document(self, answer: Answer, outcome: Outcome) -> bytes:
        if answer.native:
            return sse.json_bytes(joined([d.event for d in answer.native]))
        content: list[dict[str, Any]] = []
        if answer.reasoning:
            content.append({"type": "thinking",
                            "thinking": "" if self._omit_thinking else answer.reasoning,
                            "signature": answer.reasoning_signature})
        if answer.text:
            content.append({"type": "text", "text": answer.text})
        for call in answer.tool_calls:
            try:
                arguments = json.loads(call.arguments or "{}")
            except ValueError as e:
                raise UpstreamError("The model's tool call input is not valid JSON") from e
            if not isinstance(arguments, dict):
                raise UpstreamError("The model's tool call input is not a JSON object")
            content.append({"type": "tool_use", "id": call.id or new_tool_id(),
                            "name": call.name, "input": arguments})
        reason, sequence = stop_reason(answer.finish, outcome.finish_reason)
        return sse.json_bytes(self._message(content, reason, sequence,
                                            usage_object(outcome.usage)))


def joined(events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A backend's own Messages events joined into the whole ``Message`` (as the SDKs'
    ``get_final_message()`` does): blocks in order, deltas appended, tool input parsed, the
    stop reason and the cumulative usage of ``message_delta``."""
    try:
        message: dict[str, Any] | None = None
        inputs: dict[int, list[str]] = {}
        for event in events:
            kind = event.get("type")
            if kind == "message_start":
                message = {**event["message"], "content": list(event["message"]["content"])}
                message["usage"] = dict(message["usage"])
                continue
            if message is None:
                continue  # pings before the start
            if kind == "content_block_start":
                message["content"].append(dict(event["content_block"]))
            elif kind == "content_block_delta":
                block, delta = message["content"][event["index"]], event["delta"]
                if delta["type"] == "text_delta":
                    block["text"] += delta["text"]
                elif delta["type"] == "thinking_delta":
                    block["thinking"] += delta["thinking"]
                elif delta["type"] == "signature_delta":
                    block["signature"] = delta["signature"]
                elif delta["type"] == "input_json_delta":
                    inputs.setdefault(event["index"], []).append(delta["partial_json"])
            elif kind == "content_block_stop" and event["index"] in inputs:
                value = json.loads("".join(inputs.pop(event["index"])) or "{}")
                if not isinstance(value, dict):
                    raise ValueError("tool input is not an object")
                message["content"][event["index"]]["input"] = value
            elif kind == "message_delta":
                message["stop_reason"] = event["delta"].get("stop_reason")
                message["stop_sequence"] = event["delta"].get("stop_sequence")
                message["usage"].update({k: v for k, v in event["usage"].items()
                                         if v is not None})
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise UpstreamError("The backend sent a malformed Messages event stream") from e
    if message is None:
        raise UpstreamError("The backend's answer has no message_start")
    return message
