"""The Responses API as openai-python's own types say it is: every streamed event, ``Response``
and ``ResponseItemList`` validated against the pydantic models in ``openai.types.responses``,
strictly (no key the model does not declare, at any depth; no required field missing; no value
coerced), and a stream checked for what the types cannot say: the event order, a dense
``sequence_number``, exactly one terminal event, and ``output_item.done`` items equal to the
final response's ``output``."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from openai.types.responses.response_item import ResponseItem
from pydantic import BaseModel, TypeAdapter

# Codes a failed response carries that openai-python's ResponseError.code does not list, yet
# which Codex acts on (DESIGN.md, "The other dialects"): accepted there, and only these.
UNLISTED_FAILURE_CODES = ("context_length_exceeded", "insufficient_quota")
TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_ITEM_EVENTS = {
    # item type -> the event types that may come between its output_item.added and .done
    "message": ("response.content_part.added", "response.output_text.delta",
                "response.output_text.done", "response.content_part.done"),
    "reasoning": ("response.content_part.added", "response.reasoning_text.delta",
                  "response.reasoning_text.done", "response.content_part.done",
                  "response.reasoning_summary_part.added",
                  "response.reasoning_summary_text.delta",
                  "response.reasoning_summary_text.done",
                  "response.reasoning_summary_part.done"),
    "function_call": ("response.function_call_arguments.delta",
                      "response.function_call_arguments.done"),
    "custom_tool_call": ("response.custom_tool_call_input.delta",
                         "response.custom_tool_call_input.done"),
}


@cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


@cache
def _events() -> dict[str, type[BaseModel]]:
    """ResponseStreamEvent's members by their ``type`` (so an error names one model, not 60)."""
    union = typing.get_args(ResponseStreamEvent)[0]
    return {typing.get_args(member.model_fields["type"].annotation)[0]: member
            for member in typing.get_args(union)}


def undeclared(obj: object, where: str = "$") -> list[str]:
    """Where a validated model holds a key its class does not declare (pydantic keeps extras
    of openai's models, which allow them, in ``model_extra``)."""
    found: list[str] = []
    if isinstance(obj, BaseModel):
        found += [f"{where}.{key}" for key in obj.model_extra or {}]
        for name in type(obj).model_fields:
            found += undeclared(getattr(obj, name), f"{where}.{name}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found += undeclared(value, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            found += undeclared(value, f"{where}.{key}")
    return found


def strict(kind: Any, doc: Any) -> Any:
    """``doc`` as openai-python's ``kind`` (a model or a union such as ResponseStreamEvent),
    in pydantic's strict mode; AssertionError naming every undeclared key."""
    if kind is ResponseStreamEvent:
        kind = _events().get(doc.get("type"))
        assert kind is not None, f"openai-python has no event of type {doc.get('type')!r}"
    obj = _adapter(kind).validate_python(doc, strict=True)
    extra = undeclared(obj)
    assert not extra, f"keys openai-python's {getattr(kind, '__name__', kind)} does not " \
                      f"declare: {extra} in {json.dumps(doc)[:2000]}"
    return obj


def response(doc: Any) -> Response:
    obj: Response = strict(Response, doc)
    return obj


def item_list(doc: Any) -> ResponseItemList:
    for item in doc["data"]:  # one by one first, so that an error names one model
        strict(_item_type(item), item)
    obj: ResponseItemList = strict(ResponseItemList, doc)
    return obj


@cache
def _items() -> dict[str, list[type[BaseModel]]]:
    union = typing.get_args(ResponseItem)[0]
    out: dict[str, list[type[BaseModel]]] = {}
    for member in typing.get_args(union):
        out.setdefault(typing.get_args(member.model_fields["type"].annotation)[0],
                       []).append(member)
    return out


def _item_type(item: dict[str, Any]) -> type[BaseModel]:
    """ResponseItem's member for ``item``: by type, and for a message by role (an assistant
    message is an output message, any other an input message)."""
    members = _items().get(item.get("type", ""), [])
    assert members, f"openai-python has no input item of type {item.get('type')!r}"
    if item["type"] == "message":
        output = item.get("role") == "assistant"
        members = [m for m in members if (m.__name__ == "ResponseOutputMessage") == output]
    return members[0]


@dataclass
class Stream:
    """A checked stream: its events (name, payload) and the final response's payload."""

    events: list[tuple[str, dict[str, Any]]]
    final: dict[str, Any]

    @property
    def types(self) -> list[str]:
        return [name for name, _ in self.events]

    @property
    def terminal(self) -> str:
        return self.events[-1][0]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [doc for name, doc in self.events if name == kind]


def frames(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``event: <type>\\ndata: <json>\\n\\n`` frames; each frame's ``event`` is its ``type``."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), f"the stream does not end with a whole event: {text[-200:]!r}"
    out = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") \
            and lines[1].startswith("data: "), f"not an event/data frame: {block[:300]!r}"
        name, doc = lines[0][len("event: "):], json.loads(lines[1][len("data: "):])
        assert doc.get("type") == name, f"event {name!r} carries type {doc.get('type')!r}"
        out.append((name, doc))
    return out


def check_stream(raw: bytes) -> Stream:
    """Every event valid and in order (DESIGN.md, "The other dialects"); see the module."""
    return check_events(frames(raw))


def check_events(events: list[tuple[str, dict[str, Any]]]) -> Stream:
    for _, doc in events:
        strict(ResponseStreamEvent, _listed(doc))
    assert [doc["sequence_number"] for _, doc in events] == list(range(len(events)))
    types = [name for name, _ in events]
    assert types[:2] == ["response.created", "response.in_progress"], types
    terminals = [t for t in types if t in TERMINAL]
    assert len(terminals) == 1 and types[-1] in TERMINAL, f"terminal events: {types}"
    final = events[-1][1]["response"]
    first = events[0][1]["response"]
    assert first["status"] == "in_progress" and first["output"] == []
    assert all(doc["response"]["id"] == final["id"] for name, doc in events
               if "response" in doc), "the response id changed within one stream"
    expected_status = {"response.completed": "completed", "response.incomplete": "incomplete",
                       "response.failed": "failed"}[types[-1]]
    assert final["status"] == expected_status

    # Items are added in output_index order; each one's events name it while it is open, and
    # it ends with one output_item.done. Calls may stay open beside later items (a backend
    # may interleave the fragments of parallel calls), as openai-python's stream state allows.
    done_items: dict[int, dict[str, Any]] = {}
    open_items: dict[int, dict[str, Any]] = {}
    texts: dict[int, list[str]] = {}
    for name, doc in events[2:-1]:
        at = doc.get("output_index")
        if name == "response.output_item.added":
            assert at == len(done_items) + len(open_items), f"item {at} added out of order"
            open_items[at] = doc["item"]
            assert doc["item"]["type"] in _ITEM_EVENTS, doc["item"]
            texts[at] = []
        elif name == "response.output_item.done":
            assert at in open_items, f"output_item.done for item {at}, which is not open"
            item, added = doc["item"], open_items.pop(at)
            assert (item["id"], item["type"]) == (added["id"], added["type"])
            _check_item_text(item, texts[at])
            done_items[at] = item
        else:
            assert at in open_items, f"{name} for item {at}, which is not open"
            item = open_items[at]
            assert name in _ITEM_EVENTS[item["type"]], f"{name} inside a {item['type']} item"
            assert doc["item_id"] == item["id"]
            if name.endswith(".delta"):
                texts[at].append(doc["delta"])
            elif name in ("response.output_text.done", "response.reasoning_text.done"):
                assert doc["text"] == "".join(texts[at])
            elif name == "response.function_call_arguments.done":
                assert doc["arguments"] == "".join(texts[at])
            elif name == "response.custom_tool_call_input.done":
                assert doc["input"] == "".join(texts[at])
    if types[-1] != "response.failed":
        assert not open_items, f"items left open: {sorted(open_items)}"
        assert final["output"] == [done_items[i] for i in sorted(done_items)], \
            "output_item.done items differ from the final response's output"
    return Stream(events, final)


def _listed(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with an unlisted failure code (see UNLISTED_FAILURE_CODES) as a listed one."""
    error = (doc.get("response") or {}).get("error")
    if not isinstance(error, dict) or error.get("code") not in UNLISTED_FAILURE_CODES:
        return doc
    return {**doc, "response": {**doc["response"], "error": {**error, "code": "server_error"}}}


def _check_item_text(item: dict[str, Any], deltas: list[str]) -> None:
    joined = "".join(deltas)
    if item["type"] == "message":
        assert [p["text"] for p in item["content"]] == [joined]
    elif item["type"] == "reasoning":
        assert [p["text"] for p in item.get("content") or []] == [joined]
    elif item["type"] == "function_call":
        assert item["arguments"] == joined
    elif item["type"] == "custom_tool_call":
        assert item["input"] == joined
