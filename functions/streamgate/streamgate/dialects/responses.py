"""The Responses API dialect: ``POST /v1/responses`` and its stored responses.

Follows the OpenAI API reference (https://platform.openai.com/docs/api-reference/responses) and
openai-python's types (``openai.types.responses``), which the tests validate every event and
document against.

**Request → neutral request.** ``input`` (a string, or items) and ``instructions`` become chat
messages: ``instructions`` a system message first; ``message`` items by role (``developer``
kept as such), their ``input_text`` / ``output_text`` / ``refusal`` parts as text and
``input_image`` parts (data URLs) as images; ``function_call`` items the assistant's tool calls
(consecutive calls in one assistant turn) and ``function_call_output`` items tool messages.
Codex's ``custom`` (freeform) tools, such as ``apply_patch``, are offered to the backend as
function tools taking one string, ``input``; the backend's call is turned back into a
``custom_tool_call`` with that string as its ``input``, and ``custom_tool_call`` /
``custom_tool_call_output`` items go back the same way, so name, input text and call id
round-trip exactly. A custom tool's grammar (``format``) is given to the model in the tool's
description: no backend here can enforce a Lark or regex grammar. ``reasoning`` items sent back
are accepted and not sent to the backend (the chat backends take no earlier reasoning).
``reasoning.effort`` and ``.summary`` are accepted and echoed; they do not change what the
backends do (docs/api/responses.md). Codex's ``client_metadata`` (ids describing the client)
is accepted and not kept. Hosted tools, ``background``, ``conversation``, ``prompt``,
``truncation: "auto"`` and everything else we cannot honour are a 400 naming the field.

**Answer → events.** ``response.created``, ``response.in_progress``; per output item
``response.output_item.added``, its content events, ``response.output_item.done`` with the
complete item; then one terminal event: ``response.completed``, ``response.incomplete``
(``max_output_tokens`` reached, or a content filter) or ``response.failed`` (a failure after
the first byte, with ``error.code``: ``rate_limit_exceeded``, ``context_length_exceeded`` or
``server_error``, and our own code in ``error.type``). Every event carries a monotonic
``sequence_number``. Text streams as ``output_text`` deltas of a ``message`` item, reasoning as
``reasoning_text`` deltas of a ``reasoning`` item, a function call's arguments as
``function_call_arguments`` deltas; a custom call's input is known only when its arguments are
complete, so it comes as one ``custom_tool_call_input`` delta. Errors before the first byte are
OpenAI's JSON bodies with their status, as for Chat Completions.

**State.** ``store`` (default: true when storage is on) keeps the response, its whole input and
its owner (the caller) in the store (responsestore.py) before the terminal event is sent, so a
client that chains at once finds it; ``previous_response_id`` continues from a stored response
(its input and output come first, its instructions do not carry over); ``GET`` / ``DELETE
/v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items`` read it. Another caller's
response does not exist (404). With storage off, ``store: true`` and ``previous_response_id``
are a 400.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streamgate import sse
from streamgate.dialects.chat import JSON_HEADERS, SSE_HEADERS, error_response
from streamgate.errors import (
    NotFoundError,
    RateLimitError,
    RequestError,
    StreamgateError,
)
from streamgate.providers import Finish, ReasoningDelta, TextDelta, ToolCallDelta
from streamgate.responsestore import StoredResponse, create_store, encode
from streamgate.validation import (
    MAX_TOOLS,
    ChatRequest,
    Image,
    Message,
    ResponseFormat,
    Tool,
    ToolCall,
    data_url_image,
    function_tool,
    input_chars,
    is_int,
    json_schema_format,
    known_fields,
    model_name,
    number,
    optional,
    token_limit,
    tool_arguments,
)

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.dialects import Answer, Call, Output
    from streamgate.events import HttpRequest
    from streamgate.outcome import Outcome
    from streamgate.providers import Usage
    from streamgate.responsestore import ResponseStore

PATH = "/v1/responses"
RESPONSE_PATH = PATH + "/{response_id}"
INPUT_ITEMS_PATH = RESPONSE_PATH + "/input_items"

# What a custom (freeform) tool becomes for a backend that takes function tools only.
CUSTOM_INPUT = "input"
_CUSTOM_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {CUSTOM_INPUT: {"type": "string", "description": "The tool's input, as text"}},
    "required": [CUSTOM_INPUT],
    "additionalProperties": False,
}
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
REASONING_SUMMARIES = ("auto", "concise", "detailed")
# Values of ``include`` we honour: we produce no encrypted reasoning, so asking for it changes
# nothing (reasoning items carry their text instead).
INCLUDABLE = ("reasoning.encrypted_content",)
MAX_METADATA = 16
# Request fields and the values we honour; anything else in them is a 400.
_FIELDS = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
    "max_output_tokens", "temperature", "top_p", "text", "reasoning", "stream",
    "stream_options", "store", "previous_response_id", "include", "metadata", "user",
    "safety_identifier", "prompt_cache_key", "truncation", "service_tier", "background",
    "top_logprobs", "max_tool_calls", "client_metadata",
})
_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
                "custom_tool_call": "ctc", "custom_tool_call_output": "ctco",
                "reasoning": "rs"}
# Codes Codex and the Agents SDK act on in a failed response; anything else is server_error.
_FAILURE_CODES = ("rate_limit_exceeded", "context_length_exceeded", "insufficient_quota")


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


@dataclass(slots=True)
class ResponsesParsed:
    chat: ChatRequest
    call: Call
    store: bool
    # Echoed in the Response object, as the client sent them (defaults filled in).
    echo: dict[str, Any]
    custom_tools: frozenset[str]
    # The whole input (a previous response's input and output first), each item with an id.
    input_items: list[dict[str, Any]] = field(default_factory=list)


class ResponsesDialect:
    name = "responses"
    path = PATH

    def __init__(self, settings: Settings, store: ResponseStore | None = None) -> None:
        self._settings = settings
        self._store = store
        self._store_built = store is not None

    @property
    def store(self) -> ResponseStore | None:
        if not self._store_built:  # built on first use: the dynamodb client is not cheap
            self._store = create_store(self._settings)
            self._store_built = True
        return self._store

    # -- the request ---------------------------------------------------------------------

    def parse(self, data: Mapping[str, Any], call: Call) -> ResponsesParsed:
        return _Parser(self._settings, self, call).parse(data)

    def encoder(self, parsed: ResponsesParsed, model: str) -> ResponsesEncoder:
        return ResponsesEncoder(parsed, model, self.store if parsed.store else None,
                                self._settings.responses_max_bytes)

    def error(self, err: StreamgateError, *, stream: bool) -> tuple[int, dict[str, str], bytes]:
        return error_response(err)

    # -- stored responses ----------------------------------------------------------------

    def resources(self) -> dict[str, tuple[str, ...]]:
        return {RESPONSE_PATH: ("GET", "DELETE"), INPUT_ITEMS_PATH: ("GET",)}

    def resource_methods(self, path: str) -> tuple[str, ...]:
        response_id, sub = _resource(path)
        if not response_id:
            return ()
        return ("GET", "DELETE") if not sub else ("GET",)

    def resource(self, request: HttpRequest, call: Call) -> tuple[int, Mapping[str, Any]]:
        response_id, sub = _resource(request.path)
        store = self._stored()
        if request.method == "DELETE":
            if not store.delete(response_id, call.caller, call.deadline):
                raise _not_found(response_id)
            return 200, {"id": response_id, "object": "response", "deleted": True}
        record = store.get(response_id, call.caller, call.deadline)
        if record is None:
            raise _not_found(response_id)
        if not sub:
            if request.query.get("stream") not in (None, "", "false"):
                raise RequestError("Replaying a stored response as a stream is not supported; "
                                   "omit 'stream'", param="stream")
            return 200, record.response
        return 200, _item_page(record.input_items, request.query)

    def _stored(self) -> ResponseStore:
        store = self.store
        if store is None:
            raise RequestError("Stored responses are turned off on this server "
                               "(STREAMGATE_RESPONSES_STORE=off)", code="storage_disabled")
        return store

    def load(self, response_id: str, call: Call) -> StoredResponse:
        record = self._stored().get(response_id, call.caller, call.deadline)
        if record is None:
            raise _not_found(response_id, param="previous_response_id")
        return record


def _resource(path: str) -> tuple[str, str]:
    """``/v1/responses/<id>[/input_items]`` → (id, "" or "input_items"); ("", "") otherwise."""
    if not path.startswith(PATH + "/"):
        return "", ""
    parts = path[len(PATH) + 1:].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], ""
    if len(parts) == 2 and parts[0] and parts[1] == "input_items":
        return parts[0], "input_items"
    return "", ""


def _not_found(response_id: str, param: str | None = None) -> NotFoundError:
    shown = response_id if len(response_id) <= 80 else response_id[:80] + "…"
    return NotFoundError(f"Response with id {shown!r} not found.", param=param,
                         code="response_not_found")


def _item_page(items: Sequence[Mapping[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """One page of input items, as ``GET /v1/responses/{id}/input_items`` lists them."""
    limit_text = query.get("limit", "20")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise RequestError("'limit' must be an integer from 1 to 100", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise RequestError("'order' must be 'asc' or 'desc'", param="order")
    ordered = list(items) if order == "asc" else list(reversed(items))
    after = query.get("after")
    if after:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise RequestError(f"No input item with id {after[:80]!r}", param="after")
        ordered = ordered[ids.index(after) + 1:]
    if query.get("include"):
        raise RequestError("'include' is not supported here", param="include")
    page = ordered[: int(limit_text)]
    return {"object": "list", "data": page,
            "first_id": page[0]["id"] if page else "",
            "last_id": page[-1]["id"] if page else "",
            "has_more": len(ordered) > len(page)}


class _Parser:
    """One request's parse: the body's fields in order, each a 400 naming it when wrong."""

    def __init__(self, settings: Settings, dialect: ResponsesDialect, call: Call) -> None:
        self.settings = settings
        self.dialect = dialect
        self.call = call

    def parse(self, data: Mapping[str, Any]) -> ResponsesParsed:
        for key, value in data.items():
            if key not in _FIELDS and value is not None:
                raise RequestError(f"Unsupported parameter: '{key}'", param=key,
                                   code="unsupported_parameter")
        _refuse(data)
        stream = bool(optional(data, "stream", bool))
        _stream_options(data, stream)
        store_flag = optional(data, "store", bool)
        storage_on = self.settings.responses_store != "off"
        if store_flag and not storage_on:
            raise RequestError("This server does not store responses (storage is turned "
                               "off): send 'store': false", param="store",
                               code="storage_disabled")
        store = storage_on if store_flag is None else bool(store_flag)
        _include(data.get("include"))
        metadata = _metadata(data.get("metadata"))
        _client_metadata(data.get("client_metadata"))
        instructions = optional(data, "instructions", str)
        tools, custom = _tools(data.get("tools"))
        tool_choice, tool_choice_name, choice_doc = _tool_choice(data.get("tool_choice"),
                                                                 tools)
        text_doc, response_format = _text(data.get("text"))
        reasoning = _reasoning(data.get("reasoning"))
        truncation = data.get("truncation")
        if truncation not in (None, "disabled"):
            raise RequestError("'truncation' must be 'disabled': this server never drops "
                               "input to make it fit", param="truncation")
        service_tier = data.get("service_tier")
        if service_tier not in (None, "auto", "default"):
            raise RequestError("'service_tier' must be 'auto' or 'default' here",
                               param="service_tier")

        previous_id = optional(data, "previous_response_id", str)
        history: list[dict[str, Any]] = []
        if previous_id is not None:
            record = self.dialect.load(previous_id, self.call)
            history = [*map(dict, record.input_items),
                       *(dict(item) for item in record.response.get("output", ()))]
        own = _input_items(data.get("input"))
        items = history + own
        messages = _messages(items, len(history), custom)
        if instructions:
            messages.insert(0, Message("system", instructions, at="instructions"))
        if not messages:
            raise RequestError("'input' must contain at least one message or item",
                               param="input")
        if len(messages) > self.settings.max_messages:
            raise RequestError(f"'input' exceeds the maximum of {self.settings.max_messages} "
                               "messages", param="input", code="too_many_messages")
        if input_chars(messages, tools, response_format) > self.settings.max_input_chars:
            raise RequestError(f"The input exceeds the maximum of "
                               f"{self.settings.max_input_chars} characters across items, "
                               "instructions and tools", param="input", code="input_too_long")
        max_output = token_limit(optional(data, "max_output_tokens", int),
                                 "max_output_tokens", self.settings)
        chat = ChatRequest(
            model=model_name(data),
            messages=tuple(messages),
            stream=stream,
            max_tokens=max_output,
            temperature=number(data, "temperature", 0.0, 2.0),
            top_p=number(data, "top_p", 0.0, 1.0),
            user=optional(data, "user", str),
            tools=tuple(tools),
            tool_choice=tool_choice,
            tool_choice_name=tool_choice_name,
            parallel_tool_calls=optional(data, "parallel_tool_calls", bool),
            response_format=response_format,
            params={"messages": "input", "response_format": "text.format",
                    "max_tokens": "max_output_tokens"},
        )
        echo = {
            "instructions": instructions,
            "max_output_tokens": max_output,
            "metadata": metadata,
            "parallel_tool_calls": chat.parallel_tool_calls is not False,
            "previous_response_id": previous_id,
            "reasoning": reasoning,
            "service_tier": "default",
            "temperature": chat.temperature,
            "text": text_doc,
            "tool_choice": choice_doc,
            "tools": [dict(t) for t in data.get("tools") or ()],
            "top_p": chat.top_p,
            "truncation": "disabled",
            "user": chat.user,
            "safety_identifier": optional(data, "safety_identifier", str),
            "prompt_cache_key": optional(data, "prompt_cache_key", str),
        }
        parsed = ResponsesParsed(chat, self.call, store, echo, frozenset(custom), items)
        if store:
            _number_items(items)
            # Refused now, before any model call, rather than after the answer.
            size = len(encode(StoredResponse({}, tuple(items), self.call.caller)))
            limit = self.settings.responses_max_bytes
            if size > limit * 0.9:
                raise RequestError(
                    f"The conversation is too large to store ({size} bytes compressed; the "
                    f"limit is {limit}): send 'store': false and the history in 'input'",
                    param="store", code="storage_limit_exceeded")
        return parsed


def _refuse(data: Mapping[str, Any]) -> None:
    """Fields whose only honest value here is "off"."""
    background = data.get("background")
    if background is not None and background is not False:  # 0 is no boolean
        raise RequestError("'background' responses are not supported: stream instead",
                           param="background")
    top_logprobs = data.get("top_logprobs")
    if top_logprobs is not None and not (is_int(top_logprobs) and top_logprobs == 0):
        raise RequestError("'top_logprobs' is not supported by this server",
                           param="top_logprobs")
    if data.get("max_tool_calls") is not None:
        raise RequestError("'max_tool_calls' is not supported by this server (it applies to "
                           "hosted tools)", param="max_tool_calls")


def _stream_options(data: Mapping[str, Any], stream: bool) -> None:
    options = optional(data, "stream_options", dict)
    if options is None:
        return
    if not stream:
        raise RequestError("'stream_options' is only allowed when 'stream' is true",
                           param="stream_options")
    known_fields(options, ("include_obfuscation",), "stream_options")
    if options.get("include_obfuscation"):
        raise RequestError("'stream_options.include_obfuscation' is not supported: this "
                           "server adds no obfuscation padding", param="stream_options")


def _include(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError("'include' must be an array of strings", param="include")
    for i, name in enumerate(value):
        if name not in INCLUDABLE:
            raise RequestError(f"'include[{i}]' {name!r} is not supported by this server",
                               param=f"include[{i}]")


def _metadata(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if (not isinstance(value, dict) or len(value) > MAX_METADATA
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                       and len(v) <= 512 for k, v in value.items())):
        raise RequestError(f"'metadata' must be an object of at most {MAX_METADATA} string "
                           "values (keys up to 64 characters, values up to 512)",
                           param="metadata")
    return dict(value)


def _client_metadata(value: object) -> None:
    """Codex's ``client_metadata`` (its session, turn and window ids, as strings): what the
    client says about itself, asking nothing of the answer, so accepted and not kept."""
    if value is None:
        return
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RequestError("'client_metadata' must be an object of string values",
                           param="client_metadata")


def _reasoning(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("'reasoning' must be an object", param="reasoning")
    known_fields(value, ("effort", "summary", "generate_summary"), "reasoning")
    effort = value.get("effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise RequestError(f"'reasoning.effort' must be one of {', '.join(REASONING_EFFORTS)}",
                           param="reasoning.effort")
    summary = value.get("summary", value.get("generate_summary"))
    if summary is not None and summary not in REASONING_SUMMARIES:
        raise RequestError("'reasoning.summary' must be one of "
                           f"{', '.join(REASONING_SUMMARIES)}", param="reasoning.summary")
    return {"effort": effort, "summary": summary}


def _text(value: object) -> tuple[dict[str, Any], ResponseFormat | None]:
    """``text``: its ``format`` as our response format, and what the Response echoes."""
    if value is None:
        return {"format": {"type": "text"}}, None
    if not isinstance(value, dict):
        raise RequestError("'text' must be an object", param="text")
    known_fields(value, ("format", "verbosity"), "text")
    verbosity = value.get("verbosity")
    if verbosity not in (None, "medium"):
        raise RequestError("'text.verbosity' must be 'medium': the backends here have no "
                           "verbosity control", param="text.verbosity")
    fmt = value.get("format")
    echo: dict[str, Any] = {"format": {"type": "text"}}
    if verbosity is not None:
        echo["verbosity"] = verbosity
    if fmt is None:
        return echo, None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise RequestError("'text.format' must be an object with a 'type'", param="text.format")
    kind = fmt["type"]
    if kind == "text" or kind == "json_object":
        known_fields(fmt, ("type",), "text.format")
        echo["format"] = {"type": kind}
        return echo, (None if kind == "text" else ResponseFormat("json_object"))
    if kind != "json_schema":
        raise RequestError("'text.format.type' must be 'text', 'json_object' or "
                           f"'json_schema'; got {kind!r}", param="text.format.type")
    known_fields(fmt, ("type", "name", "schema", "description", "strict"), "text.format")
    response_format = json_schema_format(fmt, "text.format")
    echo["format"] = {k: v for k, v in fmt.items() if v is not None}
    return echo, response_format


def _tools(value: object) -> tuple[list[Tool], set[str]]:
    """Function and custom tools (custom ones as function tools of one string), and the names
    of the custom ones."""
    if value is None:
        return [], set()
    if not isinstance(value, list):
        raise RequestError("'tools' must be an array", param="tools")
    if len(value) > MAX_TOOLS:
        raise RequestError(f"'tools' accepts at most {MAX_TOOLS} tools", param="tools")
    tools: list[Tool] = []
    custom: set[str] = set()
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise RequestError(f"'{at}' must be an object with a 'type'", param=at)
        kind = tool["type"]
        if kind == "function":
            known_fields(tool, ("type", "name", "description", "parameters", "strict"), at)
            tools.append(function_tool(tools, tool.get("name"), tool.get("description"),
                                       tool.get("parameters"), tool.get("strict"), at,
                                       f"{at}.name"))
        elif kind == "custom":
            known_fields(tool, ("type", "name", "description", "format"), at)
            described = function_tool(tools, tool.get("name"), tool.get("description"), None,
                                      None, at, f"{at}.name")
            description = (described.description or "") + _grammar_note(tool.get("format"), at)
            tools.append(Tool(described.name, description.strip() or None,
                              _CUSTOM_PARAMETERS, None))
            custom.add(described.name)
        else:
            raise RequestError(f"'{at}.type' {kind!r} is a hosted tool, which this server does "
                               "not run; only 'function' and 'custom' tools are supported",
                               param=f"{at}.type")
    return tools, custom


def _grammar_note(fmt: object, at: str) -> str:
    """What a custom tool's ``format`` tells the model (no backend here enforces a grammar)."""
    if fmt is None:
        return ""
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "grammar"):
        raise RequestError(f"'{at}.format' must be {{\"type\": \"text\"}} or a grammar",
                           param=f"{at}.format")
    if fmt["type"] == "text":
        known_fields(fmt, ("type",), f"{at}.format")
        return ""
    known_fields(fmt, ("type", "syntax", "definition"), f"{at}.format")
    syntax, definition = fmt.get("syntax"), fmt.get("definition")
    if syntax not in ("lark", "regex") or not isinstance(definition, str):
        raise RequestError(f"'{at}.format' must have 'syntax' ('lark' or 'regex') and a "
                           "'definition' string", param=f"{at}.format")
    return f"\n\nThe input must follow this {syntax} grammar:\n{definition}"


def _tool_choice(value: object, tools: Sequence[Tool]) -> tuple[
        str | None, str | None, Any]:
    """(choice, named tool, what the Response echoes)."""
    if value is None:
        return None, None, "auto"
    if value in ("none", "auto", "required"):
        choice, name = str(value), None
    elif (isinstance(value, dict) and value.get("type") in ("function", "custom")
          and isinstance(value.get("name"), str)):
        known_fields(value, ("type", "name"), "tool_choice")
        choice, name = "function", value["name"]
        if all(t.name != name for t in tools):
            raise RequestError(f"'tool_choice' names {name!r}, which is not in 'tools'",
                               param="tool_choice")
    else:
        raise RequestError("'tool_choice' must be 'none', 'auto', 'required', "
                           '{"type": "function", "name": ...} or {"type": "custom", '
                           '"name": ...}', param="tool_choice")
    if choice != "none" and not tools:
        raise RequestError("'tool_choice' is only allowed when 'tools' are given",
                           param="tool_choice")
    return choice, name, value


def _input_items(value: object) -> list[dict[str, Any]]:
    """``input`` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        if not value.strip():
            raise RequestError("'input' must not be empty", param="input")
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list):
        raise RequestError("'input' must be a string or an array of items", param="input")
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise RequestError(f"'input[{i}]' must be an object", param=f"input[{i}]")
        items.append(dict(item))
    return items


_ROLES = ("user", "assistant", "system", "developer")
_CALLS = ("function_call", "custom_tool_call")
_OUTPUTS = ("function_call_output", "custom_tool_call_output")


def _messages(items: list[dict[str, Any]], first_own: int, custom: set[str]) -> list[Message]:
    """Items → chat messages. ``items[:first_own]`` came from a stored response (a 400 about
    one names ``previous_response_id``). Items are normalised in place to what the input-items
    list returns (a ``type`` on every message, text content as parts)."""
    out: list[Message] = []
    turn_open = False  # the last message is an assistant turn that calls may join
    for i, item in enumerate(items):
        at = f"input[{i - first_own}]" if i >= first_own else "previous_response_id"
        kind = item.get("type", "message")
        if kind == "message":
            item["type"] = "message"
            role = item.get("role")
            if role not in _ROLES:
                raise RequestError(f"'{at}.role' must be one of {', '.join(_ROLES)}",
                                   param=f"{at}.role")
            text, parts = _content(item, role, at)
            out.append(Message(role, text, parts, at=at))
            turn_open = role == "assistant"
        elif kind in _CALLS:
            call = _call(item, kind, at, custom)
            last = out[-1] if out and turn_open else None
            if last is not None:
                out[-1] = Message("assistant", last.content, last.parts,
                                  (*last.tool_calls, call), at=last.at)
            else:
                out.append(Message("assistant", "", tool_calls=(call,), at=at))
                turn_open = True
        elif kind in _OUTPUTS:
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(f"'{at}.call_id' must be a non-empty string",
                                   param=f"{at}.call_id")
            out.append(Message("tool", _output_text(item.get("output"), f"{at}.output"),
                               tool_call_id=call_id, at=at))
            turn_open = False
        elif kind == "reasoning":
            if not isinstance(item.get("summary", []), list):
                raise RequestError(f"'{at}.summary' must be an array", param=f"{at}.summary")
        else:
            raise RequestError(f"'{at}.type' {kind!r} is not supported here: send message, "
                               "function_call, function_call_output, custom_tool_call, "
                               "custom_tool_call_output or reasoning items",
                               param=f"{at}.type")
    return out


def _content(item: dict[str, Any], role: str, at: str) -> tuple[str, tuple[str | Image, ...]]:
    content = item.get("content")
    if isinstance(content, str):
        kind = "output_text" if role == "assistant" else "input_text"
        part: dict[str, Any] = {"type": kind, "text": content}
        if role == "assistant":
            part["annotations"] = []
        item["content"] = [part]
        content = item["content"]
    if not isinstance(content, list):
        raise RequestError(f"'{at}.content' must be a string or an array of parts",
                           param=f"{at}.content")
    parts: list[str | Image] = []
    for j, part in enumerate(content):
        where = f"{at}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(f"'{where}' must be an object with a 'type'", param=where)
        kind = part["type"]
        if kind in ("input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise RequestError(f"'{where}.text' must be a string", param=f"{where}.text")
            parts.append(part["text"])
        elif kind == "refusal" and role == "assistant":
            if not isinstance(part.get("refusal"), str):
                raise RequestError(f"'{where}.refusal' must be a string",
                                   param=f"{where}.refusal")
            parts.append(part["refusal"])
        elif kind == "input_image" and role == "user":
            if part.get("file_id") is not None:
                raise RequestError("Images by 'file_id' are not supported: send a data URL "
                                   "in 'image_url'", param=f"{where}.file_id")
            if part.get("detail") not in (None, "auto"):
                raise RequestError(f"'{where}.detail' must be 'auto' here",
                                   param=f"{where}.detail")
            url = part.get("image_url")
            if not isinstance(url, str):
                raise RequestError(f"'{where}.image_url' must be a string",
                                   param=f"{where}.image_url")
            parts.append(data_url_image(url, f"{where}.image_url"))
        else:
            raise RequestError(f"Content parts of type {kind!r} are not supported in "
                               f"{role} messages", param=f"{where}.type")
    text = "".join(p for p in parts if isinstance(p, str))
    return text, (tuple(parts) if any(isinstance(p, Image) for p in parts) else ())


def _call(item: Mapping[str, Any], kind: str, at: str, custom: set[str]) -> ToolCall:
    call_id, name = item.get("call_id"), item.get("name")
    if not isinstance(call_id, str) or not call_id:
        raise RequestError(f"'{at}.call_id' must be a non-empty string", param=f"{at}.call_id")
    if not isinstance(name, str) or not name:
        raise RequestError(f"'{at}.name' must be a non-empty string", param=f"{at}.name")
    if kind == "custom_tool_call":
        text = item.get("input")
        if not isinstance(text, str):
            raise RequestError(f"'{at}.input' must be a string", param=f"{at}.input")
        return ToolCall(call_id, name, sse.dumps({CUSTOM_INPUT: text}))
    return ToolCall(call_id, name, tool_arguments(item.get("arguments"), f"{at}.arguments"))


def _output_text(output: object, at: str) -> str:
    """A tool call's output: a string, or text parts joined."""
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise RequestError(f"'{at}' must be a string or an array of parts", param=at)
    texts = []
    for j, part in enumerate(output):
        if (not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text")
                or not isinstance(part.get("text"), str)):
            raise RequestError(f"'{at}[{j}]' must be a text part (images and files in tool "
                               "outputs are not supported)", param=f"{at}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


# Input items the input-items list gives a status (openai-python's ResponseItem types require it).
_STATUSED = frozenset({*_CALLS, *_OUTPUTS})


def _number_items(items: list[dict[str, Any]]) -> None:
    """Give every input item an id, and assistant messages, calls and their outputs a status
    (the input-items list needs them)."""
    for item in items:
        if not isinstance(item.get("id"), str) or not item["id"]:
            item["id"] = new_id(_ITEM_PREFIX.get(item.get("type", "message"), "item"))
        if item.get("type") in _STATUSED or (item.get("type") == "message"
                                              and item.get("role") == "assistant"):
            item.setdefault("status", "completed")


# -- the answer -------------------------------------------------------------------------------

def usage_object(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens or 0,
                                 "cache_write_tokens": usage.cache_write_tokens or 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _Item:
    """One output item being built: its kind, id, place and text so far."""

    __slots__ = ("call_id", "index", "item_id", "kind", "name", "parts", "status")

    def __init__(self, kind: str, index: int, *, call_id: str = "", name: str = "") -> None:
        self.kind = kind  # "message", "reasoning", "function_call" or "custom_tool_call"
        self.index = index
        self.item_id = new_id(_ITEM_PREFIX[kind])
        self.call_id = call_id
        self.name = name
        self.parts: list[str] = []
        self.status = "in_progress"

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def doc(self) -> dict[str, Any]:
        """The item as an output item (complete when its status says so)."""
        done = self.status != "in_progress"
        if self.kind == "message":
            return {"id": self.item_id, "type": "message", "status": self.status,
                    "role": "assistant", "content": [_text_part(self.text)] if done else []}
        if self.kind == "reasoning":
            return {"id": self.item_id, "type": "reasoning", "summary": [],
                    "content": [{"type": "reasoning_text", "text": self.text}] if done else [],
                    "status": self.status}
        if self.kind == "function_call":
            return {"id": self.item_id, "type": "function_call", "status": self.status,
                    "call_id": self.call_id, "name": self.name,
                    "arguments": self.text if done else ""}
        return {"id": self.item_id, "type": "custom_tool_call", "call_id": self.call_id,
                "name": self.name, "input": custom_input(self.text) if done else ""}


def custom_input(arguments: str) -> str:
    """A custom tool's input from the function call a backend made: its ``input`` string, or
    the arguments text itself when the backend did not send that shape."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get(CUSTOM_INPUT), str):
        return str(value[CUSTOM_INPUT])
    return arguments


class ResponsesEncoder:
    """Deltas → Responses events; joined → one ``Response`` object. Also what both end with:
    the record kept when the request asked to store it."""

    def __init__(self, parsed: ResponsesParsed, model: str, store: ResponseStore | None,
                 max_bytes: int) -> None:
        self.parsed = parsed
        self.model = model
        self.response_id = new_id("resp")
        self.created_at = int(time.time())
        self._store = store
        self._max_bytes = max_bytes
        self._seq = 0
        self._items: list[_Item] = []
        # The text or reasoning item text deltas go to; a call or the other kind closes it.
        self._open: _Item | None = None
        # Tool-call index -> its item. Calls stay open until the answer ends: a backend may
        # interleave the fragments of parallel calls, and a closed item cannot take more.
        self._calls: dict[int, _Item] = {}
        self._finish_reason: str | None = None

    def headers(self, stream: bool) -> Mapping[str, str]:
        return SSE_HEADERS if stream else JSON_HEADERS

    # -- events ----------------------------------------------------------------------------

    def _event(self, kind: str, doc: dict[str, Any]) -> bytes:
        doc["type"] = kind
        doc["sequence_number"] = self._seq
        self._seq += 1
        return sse.named_event(kind, doc)

    def start(self) -> bytes:
        response = self._response("in_progress")
        return (self._event("response.created", {"response": response})
                + self._event("response.in_progress", {"response": response}))

    def delta(self, delta: Output) -> bytes:
        if isinstance(delta, TextDelta):
            if not delta.text:
                return b""
            out = self._switch("message") if self._kind() != "message" else b""
            return out + self._text_delta("response.output_text.delta", delta.text)
        if isinstance(delta, ReasoningDelta):
            if not delta.text:
                return b""
            out = self._switch("reasoning") if self._kind() != "reasoning" else b""
            return out + self._text_delta("response.reasoning_text.delta", delta.text)
        if isinstance(delta, ToolCallDelta):
            return self._tool_call(delta)
        if isinstance(delta, Finish):
            self._finish_reason = delta.reason
        return b""

    def _kind(self) -> str | None:
        return self._open.kind if self._open is not None else None

    def _text_delta(self, kind: str, text: str) -> bytes:
        item = self._open
        assert item is not None
        item.parts.append(text)
        doc: dict[str, Any] = {"item_id": item.item_id, "output_index": item.index,
                               "content_index": 0, "delta": text}
        if kind == "response.output_text.delta":
            doc["logprobs"] = []
        return self._event(kind, doc)

    def _switch(self, kind: str, *, call_id: str = "", name: str = "") -> bytes:
        """Close the open text or reasoning item (if any) and open one of ``kind`` (a call
        item is not the open one: it stays open beside it until the end)."""
        out = self._close_open()
        item = _Item(kind, len(self._items), call_id=call_id, name=name)
        self._items.append(item)
        if kind in ("message", "reasoning"):
            self._open = item
        out += self._event("response.output_item.added",
                           {"output_index": item.index, "item": item.doc()})
        if kind == "message":
            out += self._event("response.content_part.added", {
                "item_id": item.item_id, "output_index": item.index, "content_index": 0,
                "part": _text_part("")})
        elif kind == "reasoning":
            out += self._event("response.content_part.added", {
                "item_id": item.item_id, "output_index": item.index, "content_index": 0,
                "part": {"type": "reasoning_text", "text": ""}})
        return out

    def _tool_call(self, delta: ToolCallDelta) -> bytes:
        item = self._calls.get(delta.index)
        out = b""
        if item is None:
            name = delta.name or ""
            kind = "custom_tool_call" if name in self.parsed.custom_tools else "function_call"
            out = self._switch(kind, call_id=delta.id or new_id("call"), name=name)
            item = self._calls[delta.index] = self._items[-1]
        if not delta.arguments:
            return out
        item.parts.append(delta.arguments)
        if item.kind == "function_call":
            out += self._event("response.function_call_arguments.delta", {
                "item_id": item.item_id, "output_index": item.index,
                "delta": delta.arguments})
        return out  # a custom call's input is known when its arguments are complete

    def _close_open(self, status: str = "completed") -> bytes:
        item, self._open = self._open, None
        if item is None:
            return b""
        return self._done(item, status)

    def _done(self, item: _Item, status: str) -> bytes:
        """The events that complete ``item``."""
        item.status = status
        text = item.text
        base = {"item_id": item.item_id, "output_index": item.index}
        out = b""
        if item.kind == "message":
            out += self._event("response.output_text.done",
                               {**base, "content_index": 0, "text": text, "logprobs": []})
            out += self._event("response.content_part.done",
                               {**base, "content_index": 0, "part": _text_part(text)})
        elif item.kind == "reasoning":
            out += self._event("response.reasoning_text.done",
                               {**base, "content_index": 0, "text": text})
            out += self._event("response.content_part.done", {
                **base, "content_index": 0, "part": {"type": "reasoning_text", "text": text}})
        elif item.kind == "function_call":
            out += self._event("response.function_call_arguments.done",
                               {**base, "arguments": text})
        else:
            value = custom_input(text)
            if value:
                out += self._event("response.custom_tool_call_input.delta",
                                   {**base, "delta": value})
            out += self._event("response.custom_tool_call_input.done", {**base, "input": value})
        return out + self._event("response.output_item.done",
                                 {"output_index": item.index, "item": item.doc()})

    def end(self, outcome: Outcome) -> list[bytes]:
        out, response = self._finish(outcome)
        kind = ("response.completed" if response["status"] == "completed"
                else "response.incomplete")
        return [out + self._event(kind, {"response": response})]

    def fail(self, err: StreamgateError, outcome: Outcome) -> bytes:
        for item in self._items:
            if item.status == "in_progress":
                item.status = "incomplete"
        code = err.code if err.code in _FAILURE_CODES else (
            "rate_limit_exceeded" if isinstance(err, RateLimitError) else "server_error")
        error = {"code": code, "message": err.message, "type": err.type}
        response = self._response("failed", outcome, error=error)
        return self._event("response.failed", {"response": response})

    def document(self, answer: Answer, outcome: Outcome) -> bytes:
        """The whole answer: the items a stream of these deltas ends with."""
        if answer.reasoning:
            self.delta(ReasoningDelta(answer.reasoning))
        if answer.text:
            self.delta(TextDelta(answer.text))
        for i, call in enumerate(answer.tool_calls):
            self.delta(ToolCallDelta(i, call.arguments, call.id or None, call.name))
        _, response = self._finish(outcome)
        return sse.json_bytes(response)

    def _finish(self, outcome: Outcome) -> tuple[bytes, dict[str, Any]]:
        """Complete the items still open (the ones an answer cut short was cut in: their
        status says so, in ``output_item.done`` as in the final response), then build and
        keep the final Response."""
        status, incomplete = _status(outcome.finish_reason)
        item_status = "completed" if incomplete is None else "incomplete"
        out = self._close_open(item_status)
        for item in self._items:  # the calls, in order
            if item.status == "in_progress":
                out += self._done(item, item_status)
        response = self._response(status, outcome, incomplete=incomplete)
        self._keep(response)
        return out, response

    # -- the Response object and the record -----------------------------------------------

    def _response(self, status: str, outcome: Outcome | None = None, *,
                  error: dict[str, Any] | None = None,
                  incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
        done = status != "in_progress"
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": False,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": [item.doc() for item in self._items] if done else [],
            "usage": usage_object(outcome.usage) if outcome is not None else None,
            **self.parsed.echo,
        }

    def _keep(self, response: dict[str, Any]) -> None:
        """Store the response before the client hears it is complete (so a request that
        chains at once finds it); a store that fails fails the response."""
        if self._store is None:
            return
        call = self.parsed.call
        record = StoredResponse(response, tuple(self.parsed.input_items), call.caller)
        blob = encode(record)
        if len(blob) > self._max_bytes:
            raise RequestError(
                f"The conversation is too large to store ({len(blob)} bytes compressed; the "
                f"limit is {self._max_bytes}): send 'store': false and the history in 'input'",
                param="store", code="storage_limit_exceeded")
        self._store.put(self.response_id, blob, call.caller, call.deadline)


def _status(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None

