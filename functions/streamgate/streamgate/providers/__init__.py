"""Model backends behind one narrow interface.

A provider takes a validated :class:`ChatRequest` and yields deltas. Errors before the first
delta are raised from ``stream()`` or the first ``next()`` and become real HTTP statuses; errors
after it end the SSE stream with an in-band error event. Closing the iterator (client gone,
deadline) must stop generation and free whatever the provider holds.

The registry maps a name to the module that builds the provider, imported only when chosen, so
the Lambda zip never imports the embedded model's library.
"""

from __future__ import annotations

import importlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from streamgate.errors import ConfigError, StreamgateError

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.validation import ChatRequest

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning, sent as ``reasoning_content``, never as ``content``."""

    text: str


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


Delta = TextDelta | ReasoningDelta | ToolCallDelta | Finish | Usage


class Provider(Protocol):
    """What the pipeline needs from a model backend."""

    name: str
    # Optional request features this backend honours (see validation.CAP_*).
    capabilities: frozenset[str]

    def default_model(self) -> str: ...

    def models(self) -> list[str]: ...

    def stream(self, request: ChatRequest, model: str) -> Iterator[Delta]:
        """Content pieces (text, reasoning, tool-call fragments) for ``request`` on ``model``,
        then one Finish, then Usage if known."""
        ...


logger = logging.getLogger(__name__)

# name -> module that defines ``create(settings) -> Provider``.
REGISTRY: dict[str, str] = {
    "local": "streamgate.providers.local",
    "bedrock": "streamgate.providers.bedrock",
    "openai": "streamgate.providers.openai",
}


def with_retries(
    attempt: Callable[[], Iterator[Delta]],
    *,
    attempts: int,
    backoff_s: float,
    upstream: str,
    honour_retry_after: bool = False,
) -> Iterator[Delta]:
    """The deltas of ``attempt()``, calling it again after a transient failure, but only while
    nothing has been yielded (so before the handler commits the HTTP status). Waits use
    full-jitter exponential backoff capped at 8x ``backoff_s``; with ``honour_retry_after`` an
    upstream's Retry-After is waited out too (its errors are only transient when it is short).
    """
    for n in range(1, attempts + 1):
        started = False
        try:
            for delta in attempt():
                started = True
                yield delta
            return
        except StreamgateError as e:
            if started or not e.transient or n == attempts:
                raise
            delay = random.uniform(0, min(backoff_s * 8, backoff_s * 2 ** (n - 1)))
            if honour_retry_after and e.retry_after:
                delay = max(delay, e.retry_after)
            logger.warning("%s attempt %d of %d failed (%s); retrying in %.2f s",
                           upstream, n, attempts, e.code, delay)
            time.sleep(delay)


def create_provider(settings: Settings) -> Provider:
    """Build the configured provider (import deferred to here)."""
    module_name = REGISTRY.get(settings.provider)
    if module_name is None:
        raise ConfigError(f"provider {settings.provider!r} is not available in this build")
    module = importlib.import_module(module_name)
    provider: Provider = module.create(settings)
    return provider
