"""Tool calls on the embedded model, which was never trained to make them.

- ``tool_choice`` ``auto`` (or none given): the model answers in text. A model may always
  choose not to call a tool, and this base model, which continues documents, has no way to
  choose one: the tools are named in its prompt, no more.
- ``required`` or a named tool: the answer is forced into one call by a grammar, as structured
  outputs are (:mod:`streamgate.providers.grammar`): ``{"name": <one of the tools>,
  "arguments": <that tool's parameters schema>}``. A tool whose schema the grammar cannot
  express takes any JSON object as arguments, unless the tool is ``strict``, which is a 400
  (OpenAI refuses a strict schema it cannot guarantee). The call is sent when it is complete,
  as one tool-call delta with finish reason ``tool_calls``; ``max_tokens`` cutting it short
  gives finish reason ``length`` and no call.
- ``none``: text, and no tool is named.

Earlier tool calls and their results are written into the prompt as lines of the document, so
the model reads what the tools answered.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from streamgate.errors import RequestError
from streamgate.providers import Finish, TextDelta, ToolCallDelta
from streamgate.validation import ResponseFormat

if TYPE_CHECKING:
    from streamgate.providers import Delta
    from streamgate.validation import ChatRequest, Message, Tool

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def forced(request: ChatRequest) -> bool:
    """Whether the request makes the model call a tool."""
    return bool(request.tools) and request.tool_choice in ("required", "function")


def call_format(request: ChatRequest) -> ResponseFormat:
    """The JSON format of one call to one of the tools the request allows."""
    from streamgate.providers.grammar import grammar_for

    tools = [t for t in request.tools
             if request.tool_choice != "function" or t.name == request.tool_choice_name]
    options = []
    for tool in tools:
        arguments: Any = dict(tool.parameters) if tool.parameters else ANY_OBJECT
        if arguments is not ANY_OBJECT:
            try:  # can the grammar express it? (the same check the whole format gets)
                grammar_for(ResponseFormat("json_schema", "arguments", None, arguments,
                                           tool.strict))
            except RequestError as e:
                if tool.strict:
                    raise RequestError(f"Tool {tool.name!r}: {e.message}",
                                       param="tools") from e
                arguments = ANY_OBJECT
        options.append({"type": "object",
                        "properties": {"name": {"const": tool.name}, "arguments": arguments},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return ResponseFormat("json_schema", "tool_call", None, schema, False)


def as_call(deltas: Iterator[Delta], request: ChatRequest) -> Iterator[Delta]:
    """The grammar-forced answer's text turned into one tool call (see the module docstring)."""
    text: list[str] = []
    for delta in deltas:
        if isinstance(delta, TextDelta):
            text.append(delta.text)
        elif isinstance(delta, Finish) and delta.reason == "stop":
            call = json.loads("".join(text))  # the grammar guarantees its shape
            yield ToolCallDelta(0, json.dumps(call["arguments"], ensure_ascii=False),
                                id="call_" + os.urandom(12).hex(), name=call["name"])
            yield Finish("tool_calls")
        else:
            yield delta


def render_tools(request: ChatRequest) -> str:
    """The line naming the tools, for the prompt's frame ("" when none may be called)."""
    if not request.tools or request.tool_choice == "none":
        return ""
    return "Tools: " + ", ".join(_described(t) for t in request.tools) + "\n\n"


def _described(tool: Tool) -> str:
    if not tool.description:
        return tool.name
    first = tool.description.strip().split("\n", 1)[0][:120]
    return f"{tool.name} ({first})"


def render_calls(message: Message) -> str:
    """An assistant turn's tool calls, as lines of the document."""
    return "".join(f"Called {call.name} with {call.arguments}\n" for call in message.tool_calls)


def render_result(message: Message, names: dict[str, str]) -> str:
    """A tool's result, as a line of the document."""
    name = names.get(message.tool_call_id or "", "the tool")
    return f"Result of {name}: {message.content}\n\n"
