"""API dialects: the wire formats clients speak, over one pipeline.

A dialect owns three things, and only these (handler.py shares everything else: keys, limits,
usage, routes, providers, deadlines, telemetry, both drivers):

- **its request**: :meth:`Dialect.parse` turns the decoded JSON body into a :class:`Parsed`,
  whose ``chat`` is the provider-neutral :class:`~streamgate.validation.ChatRequest` every
  provider takes; a field it cannot honour is a 400 naming it, never dropped;
- **its answer**: :meth:`Dialect.encoder` gives the :class:`Encoder` of one answer, which turns
  the provider's deltas (text, reasoning, tool-call fragments, the finish reason; usage arrives
  in the :class:`~streamgate.outcome.Outcome`) into its stream events, or, joined as an
  :class:`Answer`, into its whole-answer document;
- **its errors**: :meth:`Dialect.error` renders an error before the first byte (a status,
  headers and a body), :meth:`Encoder.fail` one after it (an in-band event ending the stream).

A dialect reads like a translation table, not like a second pipeline: it never calls a
provider and does no I/O of its own (stored state, which the Responses API keeps,
is read and written through the store it was built with, within the request's deadline).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from streamgate.deadline import Deadline
    from streamgate.errors import StreamgateError
    from streamgate.events import HttpRequest
    from streamgate.outcome import Outcome
    from streamgate.providers import Finish, ReasoningDelta, TextDelta, ToolCallDelta
    from streamgate.validation import ChatRequest

    Output = TextDelta | ReasoningDelta | ToolCallDelta | Finish


@dataclass(frozen=True, slots=True)
class Call:
    """Who asks, and by when: what a dialect may need beyond the body (stored state is per
    caller)."""

    caller: str  # the key id or IAM principal ("" when nothing authenticates)
    deadline: Deadline
    request: HttpRequest


class Parsed(Protocol):
    """A dialect's parsed request: the neutral request, plus whatever its encoder echoes."""

    @property
    def chat(self) -> ChatRequest: ...


@dataclass(slots=True)
class AnswerCall:
    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class Answer:
    """A whole answer, the deltas joined (for a request that does not stream)."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[AnswerCall] = field(default_factory=list)


class Encoder(Protocol):
    """The encoding of one answer. Each method returns the bytes to write (b"" for none);
    nothing here raises for a well-formed sequence of deltas."""

    # Headers of the successful answer (its content type).
    def headers(self, stream: bool) -> Mapping[str, str]: ...

    def start(self) -> bytes:
        """What a stream sends before the first delta's own event (b"" if nothing)."""
        ...

    def delta(self, delta: Output) -> bytes:
        """The events for one delta (an empty text delta may give b"")."""
        ...

    def end(self, outcome: Outcome) -> list[bytes]:
        """The writes that end a stream that completed (``outcome`` holds the finish reason
        and usage)."""
        ...

    def fail(self, err: StreamgateError, outcome: Outcome) -> bytes:
        """The in-band event that ends a stream that failed after its first byte."""
        ...

    def document(self, answer: Answer, outcome: Outcome) -> bytes:
        """The whole answer, for a request that does not stream."""
        ...


class Dialect(Protocol):
    name: str  # "chat", "responses", ...: the log record's ``dialect``
    path: str  # the POST path it generates on

    def parse(self, data: Mapping[str, Any], call: Call) -> Parsed: ...

    def encoder(self, parsed: Any, model: str) -> Encoder: ...

    def error(self, err: StreamgateError, *, stream: bool) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body for an error before the first byte; ``stream``: the client
        asked for a stream and accepts ``text/event-stream``."""
        ...

    def resources(self) -> dict[str, tuple[str, ...]]:
        """Paths of stored objects it serves besides its POST path (OpenAPI templates such
        as ``/v1/responses/{response_id}``) → their methods."""
        ...

    def resource_methods(self, path: str) -> tuple[str, ...]:
        """The methods a concrete resource path takes (() when it serves no such path)."""
        ...

    def resource(self, request: HttpRequest, call: Call) -> tuple[int, Mapping[str, Any]]:
        """Serve a resource path (the method is one :meth:`resource_methods` gave):
        status and JSON document."""
        ...
