"""Shared test helpers: event loading, a scripted provider and SSE reading."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from streamgate.config import Settings, load_settings
from streamgate.deadline import Deadline
from streamgate.handler import App, Response
from streamgate.providers import Delta, Finish, TextDelta, Usage
from streamgate.validation import ChatRequest

EVENTS = Path(__file__).resolve().parent.parent / "events"


def load_event(name: str) -> dict[str, Any]:
    """One of the events in events/, the same files `sam local invoke -e` uses."""
    return json.loads((EVENTS / name).read_text())


def chat_event(body: Any, *, method: str = "POST", path: str = "/v1/chat/completions",
               headers: dict[str, str] | None = None, raw: str | None = None) -> dict[str, Any]:
    """A Function URL event for an arbitrary body (``raw`` given verbatim)."""
    event = load_event("function-url-chat-stream.json")
    event["rawPath"] = path
    event["requestContext"]["http"]["method"] = method
    event["requestContext"]["http"]["path"] = path
    event["headers"].update(headers or {})
    event["isBase64Encoded"] = False
    if raw is not None:
        event["body"] = raw
    elif body is None:
        event.pop("body", None)
    else:
        event["body"] = json.dumps(body)
    return event


Step = Delta | BaseException | float  # a float is a pause in seconds


class ScriptedProvider:
    """A provider that replays a script: deltas, exceptions to raise, pauses."""

    name = "scripted"

    def __init__(self, script: Sequence[Step] | None = None, *,
                 capabilities: frozenset[str] = frozenset(),
                 models: Sequence[str] = ("scripted-1", "scripted-2")) -> None:
        self.script = list(script if script is not None else default_script())
        self.capabilities = capabilities
        self._models = list(models)
        self.requests: list[tuple[ChatRequest, str]] = []
        self.deadlines: list[Deadline] = []
        self.closed = threading.Event()
        self.finished = threading.Event()

    def default_model(self) -> str:
        return self._models[0]

    def models(self) -> list[str]:
        return list(self._models)

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        """Replays the script; a pause ends at the deadline, as a real provider's waits do."""
        self.requests.append((request, model))
        self.deadlines.append(deadline)
        try:
            yield from replay(self.script, deadline)
            self.finished.set()
        finally:
            self.closed.set()


def replay(script: Sequence[Step], deadline: Deadline) -> Iterator[Delta]:
    """A script's deltas; a pause (a float) ends at the deadline, as a real provider's waits
    do, and an exception in it is raised there."""
    for step in script:
        if isinstance(step, float):
            time.sleep(deadline.cap(step))
            deadline.check()
        elif isinstance(step, BaseException):
            raise step
        else:
            yield step


def default_script(words: Sequence[str] = ("Hello", ",", " world", "!")) -> list[Step]:
    return [*(TextDelta(w) for w in words), Finish("stop"), Usage(5, len(words))]


def make_app(provider: ScriptedProvider | None = None, **settings: Any) -> App:
    base: Settings = load_settings({}, provider="local", **settings)
    return App(base, provider or ScriptedProvider())


def body_bytes(response: Response) -> bytes:
    return b"".join(response.body)


def sse_data(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE byte stream, as our first users read it."""
    return [line[len("data: "):] for line in raw.decode().split("\n") if line.startswith("data: ")]


def sse_json(raw: bytes) -> list[Any]:
    return [json.loads(d) for d in sse_data(raw) if d != "[DONE]"]


_NAMED_FRAME = re.compile(r"event: ([^\r\n]*)\ndata: ([^\r\n]*)\n\n")


def named_events(raw: bytes) -> tuple[list[tuple[str, Any]], str | None]:
    """The events of a named-event stream (the Responses and Messages APIs), each exactly
    ``event: <name>\\ndata: <json>\\n\\n``, and what first broke that framing (None if nothing)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], f"not UTF-8: {e}"
    events: list[tuple[str, Any]] = []
    position = 0
    while position < len(text):
        match = _NAMED_FRAME.match(text, position)
        if match is None:
            return events, (f"character {position}: not an `event:`/`data:` event: "
                            f"{text[position:position + 80]!r}")
        try:
            events.append((match.group(1), json.loads(match.group(2))))
        except ValueError:
            return events, f"event {len(events)}: its data is not JSON"
        position = match.end()
    return events, None
