"""Strict checks of Anthropic Messages documents and event streams against the ``anthropic``
SDK's own pydantic types: a required field missing fails (pydantic), and so does any key the
type does not declare, at any depth (the SDK's models allow extra keys; these checks do not).
"""

from __future__ import annotations

import json
from typing import Any

import anthropic.types as t
from pydantic import BaseModel, TypeAdapter

from streamgate.sse import Decoder

# Documented by Anthropic (https://docs.anthropic.com/en/api/errors) but absent from the
# SDK's ErrorObject union: checked by shape instead.
UNTYPED_ERRORS = ("request_too_large",)


def strict(kind: Any, doc: Any) -> Any:
    """``doc`` validated as ``kind``; fails on a missing required field or an unknown key."""
    value = TypeAdapter(kind).validate_python(doc)
    _no_extra(value, getattr(kind, "__name__", str(kind)))
    return value


def _no_extra(value: Any, at: str) -> None:
    if isinstance(value, BaseModel):
        extra = value.__pydantic_extra__ or {}
        assert not extra, f"{at}: keys the SDK's type does not declare: {sorted(extra)}"
        for name in type(value).model_fields:
            _no_extra(getattr(value, name), f"{at}.{name}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _no_extra(item, f"{at}[{i}]")


def error(doc: Any) -> None:
    """An error body: ``{"type": "error", "error": {"type", "message"}}``."""
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict) and (
            doc["error"].get("type") in UNTYPED_ERRORS):
        assert set(doc) == {"type", "error"} and doc["type"] == "error", doc
        assert set(doc["error"]) == {"type", "message"}, doc
        assert isinstance(doc["error"]["message"], str)
        return
    strict(t.ErrorResponse, doc)


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The (name, data) of each SSE event of a Messages stream, each checked strictly: its
    ``event:`` name equals its ``type``, and its data is a ping, an error, or one of the
    SDK's RawMessageStreamEvent types; the order is Anthropic's."""
    decoder = Decoder()
    out = []
    for event in [*decoder.feed(raw), *decoder.end()]:
        data = json.loads(event.data)
        assert data["type"] == event.event, (event.event, data)
        if event.event == "ping":
            assert data == {"type": "ping"}
        elif event.event == "error":
            error(data)
        else:
            strict(t.RawMessageStreamEvent, data)
        out.append((event.event, data))
    names = [name for name, _ in out]
    if "error" not in names:
        assert names[0] == "message_start", names
        assert names[-2:] == ["message_delta", "message_stop"], names
    open_block = None
    for name, data in out:
        if name == "content_block_start":
            assert open_block is None, "blocks must not overlap"
            open_block = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_block
        elif name == "content_block_stop":
            assert data["index"] == open_block
            open_block = None
    return out


def message(doc: Any) -> t.Message:
    value: t.Message = strict(t.Message, doc)
    return value
