"""Model backends behind one narrow interface.

A provider takes a validated :class:`ChatRequest` and the request's deadline, and yields deltas.
Errors before the first delta are raised from ``stream()`` or the first ``next()`` and become
real HTTP statuses; errors after it end the SSE stream with an in-band error event. Closing
the iterator (client gone, deadline) must stop generation and free whatever the provider holds.

The registry maps a name to the module that builds the provider, imported only when chosen, so
the Lambda zip never imports the embedded model's library.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from streamgate.deadline import DEADLINE_MESSAGE
from streamgate.errors import (
    ConfigError,
    DeadlineExceededError,
    StreamgateError,
    UpstreamError,
    UpstreamTimeoutError,
)

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.deadline import Deadline
    from streamgate.validation import ChatRequest

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning, sent as ``reasoning_content``, never as ``content``.
    ``signature``: the backend's signature that ends a reasoning block (Claude's extended
    thinking), for dialects that hand it back to the client; text-only dialects ignore it."""

    text: str
    signature: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of tool call ``index`` (dense, 0-based per response): the first fragment of
    each call carries ``id`` and ``name``, later ones only pieces of the JSON ``arguments``."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    reason: FinishReason
    # The client's stop sequence that ended the answer, when the backend says which one
    # (reason "stop"); None when the model ended by itself or the backend does not say.
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens read from / written to the provider's prompt cache, when it reports them.
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class NativeDelta:
    """One event of the backend's own wire format, produced only for a request that asked for
    it (``ChatRequest.native``) and relayed as it is by the dialect that asked. ``event`` is
    the decoded event (its ``type`` names it); ``text`` the model output it carries (text,
    reasoning or tool input), which the pipeline counts as it counts the other deltas;
    ``output`` whether it is model output at all (the first-token and idle timeouts). The
    provider yields the neutral :class:`Finish` and :class:`Usage` beside these events, so
    usage, limits and telemetry work as for every other answer; the relaying encoder ignores
    them (the events already say so)."""

    event: Mapping[str, Any]
    text: str = ""
    output: bool = False


# What a Batch holds: the deltas of a provider that reads a stream of events.
Piece = TextDelta | ReasoningDelta | ToolCallDelta | Finish | Usage


@dataclass(frozen=True, slots=True)
class Batch:
    """Deltas that arrived together (what one read of an upstream delivered), handed on as one
    item: the pipeline checks and counts each of them as if it had come alone, encodes each as
    its own event, and a driver writes those events with one write. A provider yields one only
    for deltas it already has: it never waits for more to fill one."""

    deltas: tuple[Piece, ...]


Delta = TextDelta | ReasoningDelta | ToolCallDelta | NativeDelta | Finish | Usage | Batch


class Provider(Protocol):
    """What the pipeline needs from a model backend."""

    name: str
    # Optional request features this backend honours (see validation.CAP_*).
    capabilities: frozenset[str]

    def default_model(self) -> str: ...

    def models(self) -> list[str]: ...

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        """Content pieces (text, reasoning, tool-call fragments) for ``request`` on ``model``,
        then one Finish, then Usage if known. Every wait inside (connect, read, retry, queue)
        ends by ``deadline`` at the latest, with ``DeadlineExceededError``."""
        ...


@runtime_checkable
class TokenCounter(Protocol):
    """An optional capability (``validation.CAP_COUNT_TOKENS``): the exact number of input
    tokens ``request`` would use on ``model``, as the backend counts them. A provider without
    it cannot count; the pipeline then answers with a 400 saying so, never an estimate."""

    def count_tokens(self, request: ChatRequest, model: str, deadline: Deadline) -> int: ...


logger = logging.getLogger(__name__)

# name -> module that defines ``create(settings) -> Provider``.
REGISTRY: dict[str, str] = {
    "local": "streamgate.providers.local",
    "bedrock": "streamgate.providers.bedrock",
    "openai": "streamgate.providers.openai",
}


class OutputTimer:
    """The first-token and idle timeouts, measured from model output (content, reasoning,
    tool-call deltas), never from bytes: keep-alive comments, empty chunks and metadata do not
    keep a silent model alive. Both end at the request's deadline at the latest."""

    __slots__ = ("_deadline", "_first_by", "_first_s", "_idle_s", "_last", "_who")

    def __init__(self, who: str, first_token_s: float, idle_s: float,
                 deadline: Deadline) -> None:
        self._who = who
        self._deadline = deadline
        self._first_s = first_token_s
        self._idle_s = idle_s
        self._first_by = time.monotonic() + first_token_s
        self._last: float | None = None

    def until(self) -> float:
        """The monotonic instant by which the next output must arrive."""
        limit = self._first_by if self._last is None else self._last + self._idle_s
        at = self._deadline.at  # as Deadline.until does
        return limit if at is None or limit < at else at

    def remaining(self) -> float:
        return max(0.0, self.until() - time.monotonic())

    def saw(self, delta: Delta) -> None:
        if isinstance(delta, (TextDelta, ReasoningDelta, ToolCallDelta)) or (
                isinstance(delta, NativeDelta) and delta.output):
            self._last = time.monotonic()

    def expired(self) -> StreamgateError:
        """The error for a wait that reached :meth:`until`: the deadline's if it has passed,
        else the timeout's (raise it)."""
        if self._deadline.expired():
            return DeadlineExceededError(DEADLINE_MESSAGE)
        if self._last is None:
            return UpstreamTimeoutError(
                f"{self._who} sent no output within {self._first_s:g} s")
        return UpstreamTimeoutError(f"{self._who} sent no output for {self._idle_s:g} s")


_D = TypeVar("_D", bound=Delta)


def malformed_is_upstream_error(deltas: Iterator[_D], who: str) -> list[_D]:
    """The deltas a provider maps from one upstream event, taken at once: whatever the event's
    shape makes the mapping trip over (a list where a dict was due, a number too large) is
    the upstream's fault, an ``upstream_error``, never a 500 of ours."""
    try:
        return list(deltas)
    except StreamgateError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
        raise UpstreamError(f"{who} sent a malformed stream event") from e


def create_provider(settings: Settings) -> Provider:
    """Build the configured provider (import deferred to here)."""
    module_name = REGISTRY.get(settings.provider)
    if module_name is None:
        raise ConfigError(f"provider {settings.provider!r} is not available in this build")
    module = importlib.import_module(module_name)
    provider: Provider = module.create(settings)
    return provider
