"""The Chat Completions dialect: ``POST /v1/chat/completions``.

Requests follow the OpenAI request schema (https://platform.openai.com/docs/api-reference/chat/
create), plus our short form ``{"prompt": "...", "stream": true}``. Unknown fields are ignored;
known fields that no provider here can honour are rejected with a 400 naming the ``param``,
never dropped silently; what only some providers honour is checked against the chosen one's
capabilities (validation.check_supported).

Answers are ``chat.completion.chunk`` and ``chat.completion`` objects (https://platform.openai.
com/docs/api-reference/chat-streaming/streaming): ``id`` and ``created`` are the same on every
chunk; the first delta carries ``"role": "assistant"``; the last choice chunk carries
``finish_reason``; with ``stream_options.include_usage`` every chunk has ``"usage": null`` and
one extra chunk with ``"choices": []`` carries the usage, before ``data: [DONE]``. Tool calls
stream as ``delta.tool_calls[]`` fragments keyed by ``index``; reasoning as
``delta.reasoning_content`` (the field vLLM, DeepSeek and most gateways use).

Errors are OpenAI's ``{"error": {...}}``: before the first byte with their status (as one SSE
event when the client streams and accepts ``text/event-stream``), after it as one ``data:``
event, with no ``[DONE]`` after it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamgate import sse
from streamgate.errors import RequestError, StreamgateError
from streamgate.providers import (
    Finish,
    FinishReason,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from streamgate.sse import encode_text as _encode_text
from streamgate.validation import (
    MAX_TOOLS,
    RESPONSE_FORMATS,
    ROLES,
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
    stop_sequences,
    token_limit,
    tool_arguments,
)

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.dialects import Answer, Call, Output
    from streamgate.events import HttpRequest
    from streamgate.outcome import Outcome

PATH = "/v1/chat/completions"
TOOL_CHOICES = ("none", "auto", "required")
SSE_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
JSON_HEADERS = {"content-type": "application/json", "cache-control": "no-store"}


@dataclass(frozen=True, slots=True)
class ChatParsed:
    chat: ChatRequest


class ChatDialect:
    name = "chat"
    path = PATH

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def parse(self, data: Mapping[str, Any], call: Call) -> ChatParsed:
        return ChatParsed(parse_request(data, self._settings))

    def encoder(self, parsed: ChatParsed, model: str) -> ChatEncoder:
        return ChatEncoder(ChunkBuilder(model, include_usage=parsed.chat.include_usage))

    def error(self, err: StreamgateError, *, stream: bool) -> tuple[int, dict[str, str], bytes]:
        return error_response(err, sse_event=stream)

    def resources(self) -> dict[str, tuple[str, ...]]:
        return {}

    def resource_methods(self, path: str) -> tuple[str, ...]:
        return ()

    def resource(self, request: HttpRequest, call: Call) -> tuple[int, Mapping[str, Any]]:
        raise AssertionError("Chat Completions has no resource paths")


def error_response(err: StreamgateError, *, sse_event: bool = False) -> tuple[
        int, dict[str, str], bytes]:
    """An error before the first byte: real status, OpenAI body, as JSON or one SSE event."""
    headers = dict(SSE_HEADERS if sse_event else JSON_HEADERS)
    headers.update(err.headers())
    body = sse.data_event(err.body()) if sse_event else sse.json_bytes(err.body())
    return err.status, headers, body


class ChatEncoder:
    """Deltas → ``chat.completion.chunk`` events; joined → one ``chat.completion``."""

    __slots__ = ("builder",)

    def __init__(self, builder: ChunkBuilder) -> None:
        self.builder = builder

    def headers(self, stream: bool) -> Mapping[str, str]:
        return SSE_HEADERS if stream else JSON_HEADERS

    def start(self) -> bytes:
        return b""

    def delta(self, delta: Output) -> bytes:
        builder = self.builder
        if type(delta) is TextDelta:  # nearly every event: its fixed bytes are encoded once
            return builder.text_event(delta.text) if delta.text else b""
        if isinstance(delta, Finish):
            return sse.data_event(builder.finish(delta.reason))
        if isinstance(delta, ToolCallDelta):
            return sse.data_event(builder.tool_call(delta))
        if not delta.text:
            return b""
        if isinstance(delta, ReasoningDelta):
            return sse.data_event(builder.reasoning(delta.text))
        return sse.data_event(builder.text(delta.text))

    def end(self, outcome: Outcome) -> list[bytes]:
        if self.builder.include_usage and outcome.usage is not None:
            return [sse.data_event(self.builder.usage(outcome.usage)), sse.DONE]
        return [sse.DONE]

    def fail(self, err: StreamgateError, outcome: Outcome) -> bytes:
        return sse.data_event(err.body())

    def document(self, answer: Answer, outcome: Outcome) -> bytes:
        assert outcome.finish_reason is not None  # the pipeline guarantees it
        calls = [tool_call_object(i, c.id, c.name, c.arguments)
                 for i, c in enumerate(answer.tool_calls)]
        return sse.json_bytes(self.builder.completion(
            answer.text, outcome.finish_reason, outcome.usage, reasoning=answer.reasoning,
            tool_calls=calls))


# -- the request ------------------------------------------------------------------------------

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

    stream = optional(data, "stream", bool)
    stream_options = optional(data, "stream_options", dict)
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise RequestError("'stream_options' is only allowed when 'stream' is true",
                               param="stream_options")
        include_usage = bool(optional(stream_options, "include_usage", bool,
                                       name="stream_options.include_usage"))

    max_tokens = _max_tokens(data, settings)
    min_tokens = _min_tokens(data, max_tokens, settings)
    temperature = number(data, "temperature", 0.0, 2.0)
    top_p = number(data, "top_p", 0.0, 1.0)
    tools = _tools(data.get("tools"))
    tool_choice, tool_choice_name = _tool_choice(data.get("tool_choice"), tools)
    response_format = _response_format(data.get("response_format"))
    if input_chars(parsed, tools, response_format) > settings.max_input_chars:
        raise RequestError(f"The input exceeds the maximum of {settings.max_input_chars} "
                           "characters across messages and tools", param="messages",
                           code="input_too_long")
    return ChatRequest(
        model=model_name(data),
        messages=parsed,
        stream=bool(stream),
        include_usage=include_usage,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop_sequences(data.get("stop")),
        seed=optional(data, "seed", int),
        user=optional(data, "user", str),
        frequency_penalty=number(data, "frequency_penalty", -2.0, 2.0),
        presence_penalty=number(data, "presence_penalty", -2.0, 2.0),
        tools=tools,
        tool_choice=tool_choice,
        tool_choice_name=tool_choice_name,
        parallel_tool_calls=optional(data, "parallel_tool_calls", bool),
        response_format=response_format,
    )


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
    """An ``image_url`` part: ``{"url": "data:...", "detail"?: "auto"}``."""
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise RequestError(f"'{at}.url' must be a string", param=f"{at}.url")
    detail = image_url.get("detail")
    if detail not in (None, "auto"):
        raise RequestError(f"'{at}.detail' {detail!r} is not supported; use 'auto'",
                           param=f"{at}.detail")
    return data_url_image(image_url["url"], f"{at}.url")


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
        arguments = tool_arguments(function.get("arguments"), f"{at}.function.arguments")
        calls.append(ToolCall(call["id"], name, arguments))
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
        tools.append(function_tool(
            tools, function.get("name"), function.get("description"),
            function.get("parameters"), function.get("strict"), f"{at}.function",
            f"{at}.function.name"))
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
    if n is not None and (not is_int(n) or n < 1):
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
    known_fields(value, ("type", "json_schema") if kind == "json_schema" else ("type",),
                  "response_format")
    if kind != "json_schema":
        return ResponseFormat(kind)
    at = "response_format.json_schema"
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError(f"'{at}' must be an object with 'name' and 'schema' when "
                           "'response_format.type' is 'json_schema'", param=at)
    known_fields(spec, ("name", "description", "schema", "strict"), at)
    return json_schema_format(spec, at)


def _max_tokens(data: Mapping[str, Any], settings: Settings) -> int | None:
    a: int | None = optional(data, "max_completion_tokens", int)
    b: int | None = optional(data, "max_tokens", int)
    if a is not None and b is not None and a != b:
        raise RequestError("'max_tokens' and 'max_completion_tokens' disagree; send one",
                           param="max_tokens")
    if a is not None:
        return token_limit(a, "max_completion_tokens", settings)
    return token_limit(b, "max_tokens", settings)


def _min_tokens(data: Mapping[str, Any], max_tokens: int | None,
                settings: Settings) -> int | None:
    """vLLM's ``min_tokens``: 0 up to the request's ``max_tokens`` (or the default one)."""
    value: int | None = optional(data, "min_tokens", int)
    if value is None:
        return None
    if value < 0:
        raise RequestError("'min_tokens' must be at least 0", param="min_tokens")
    limit = max_tokens if max_tokens is not None else settings.default_max_tokens
    if value > limit:
        raise RequestError(f"'min_tokens' must not exceed max_tokens ({limit})",
                           param="min_tokens")
    return value



# -- the answer -------------------------------------------------------------------------------

def new_completion_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


def usage_object(usage: Usage) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    # cached_tokens is OpenAI's field; cache_write_tokens has no OpenAI twin, so it is named
    # for what it counts (prompt tokens written to the cache, billed differently). Only what
    # the provider reported appears.
    details = {name: value for name, value in (("cached_tokens", usage.cached_tokens),
                                               ("cache_write_tokens", usage.cache_write_tokens))
               if value is not None}
    if details:
        doc["prompt_tokens_details"] = details
    return doc


def tool_call_object(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"index": index, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ChunkBuilder:
    """Builds the chunks of one completion; keeps ``id``/``created``/``model`` constant."""

    __slots__ = ("completion_id", "created", "model", "include_usage", "_role_sent",
                 "_text_frame")

    def __init__(
        self,
        model: str,
        *,
        include_usage: bool = False,
        completion_id: str | None = None,
        created: int | None = None,
    ) -> None:
        self.completion_id = completion_id or new_completion_id()
        self.created = int(time.time()) if created is None else created
        self.model = model
        self.include_usage = include_usage
        self._role_sent = False
        self._text_frame: tuple[bytes, bytes] | None = None

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _delta(self, delta: dict[str, Any], finish_reason: FinishReason | None) -> dict[str, Any]:
        if not self._role_sent:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def text(self, text: str) -> dict[str, Any]:
        return self._delta({"content": text}, None)

    def text_event(self, text: str) -> bytes:
        """``sse.data_event(self.text(text))``, the same bytes: after the first chunk, the
        event around the text is encoded once (from the dict itself, so it cannot drift) and
        only the text is encoded each time."""
        frame = self._text_frame
        if frame is None:
            if not self._role_sent:
                return sse.data_event(self.text(text))
            marker = "\ue000streamgate\ue001"
            whole = sse.data_event(self._chunk([{"index": 0, "delta": {"content": marker},
                                                 "logprobs": None, "finish_reason": None}]))
            head, *tail = whole.split(sse.json_bytes(marker))
            if len(tail) != 1:  # the marker in an id or model name: no shortcut
                return sse.data_event(self.text(text))
            frame = self._text_frame = (head, tail[0])
        try:  # sse.text_bytes(text), inline: one call fewer per event
            return frame[0] + _encode_text(text).encode("utf-8") + frame[1]
        except UnicodeEncodeError:
            return frame[0] + sse.text_bytes(text) + frame[1]

    def reasoning(self, text: str) -> dict[str, Any]:
        return self._delta({"reasoning_content": text}, None)

    def tool_call(self, delta: ToolCallDelta) -> dict[str, Any]:
        """One fragment: id/type/name on a call's first, argument pieces after."""
        if delta.id is not None:
            call = tool_call_object(delta.index, delta.id, delta.name or "", delta.arguments)
        else:
            call = {"index": delta.index, "function": {"arguments": delta.arguments}}
        return self._delta({"tool_calls": [call]}, None)

    def finish(self, reason: FinishReason) -> dict[str, Any]:
        # A finish with no content before it still needs the role on the first delta.
        return self._delta({} if self._role_sent else {"content": ""}, reason)

    def usage(self, usage: Usage) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = usage_object(usage)
        return chunk

    def completion(
        self,
        text: str,
        finish_reason: FinishReason,
        usage: Usage | None,
        *,
        reasoning: str = "",
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The non-streaming ``chat.completion`` object for the same id/created/model."""
        message: dict[str, Any] = {
            "role": "assistant",
            # OpenAI sends null content when the answer is only tool calls.
            "content": text if text or not tool_calls else None,
            "refusal": None,
        }
        if tool_calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"}
                                     for c in tool_calls]
        if reasoning:
            message["reasoning_content"] = reasoning
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if usage is not None:
            body["usage"] = usage_object(usage)
        return body
