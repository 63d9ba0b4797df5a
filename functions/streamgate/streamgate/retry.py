"""The retry policy every provider shares: reading ``Retry-After``, and when a failed call is
tried again.

A call is retried only while nothing has been yielded (so before the handler commits the HTTP
status), only for a transient failure, and only when its wait is short: at most
``8 × backoff`` (the backoff cap) and ending before the request's deadline. A longer
``Retry-After`` is not slept out: the client gets the 429/503 at once, with the (capped) wait,
and decides for itself (https://www.rfc-editor.org/rfc/rfc9110#field.retry-after).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, TypeVar

from streamgate.errors import RETRY_AFTER_CAP_S, StreamgateError

if TYPE_CHECKING:
    from streamgate.deadline import Deadline

logger = logging.getLogger(__name__)

T = TypeVar("T")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds: delay-seconds or an HTTP date, as RFC 9110 allows (and the
    fractional seconds some servers send). Finite, at least 0, at most ``RETRY_AFTER_CAP_S``:
    ``inf``, ``1e400`` and dates years ahead all mean "long", i.e. the cap. ``None`` when
    absent or unreadable."""
    if not value:
        return None
    text = value.strip()[:64]
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text).timestamp()
        except (TypeError, ValueError, OverflowError, IndexError):
            return None
        seconds = when - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def with_retries(
    attempt: Callable[[], Iterator[T]],
    *,
    attempts: int,
    backoff_s: float,
    deadline: Deadline,
    upstream: str,
    honour_retry_after: bool = True,
) -> Retrying[T]:
    """The items of ``attempt()``, calling it again after a transient failure while nothing
    has been yielded. Waits use full-jitter exponential backoff (at most ``8 × backoff_s``),
    or the failure's ``retry_after`` when it asks for longer (with ``honour_retry_after``:
    the upstream said so; Bedrock sends none, and its errors carry only our hint to the
    client); see the module docstring for when a wait is too long to take."""

    def begin() -> tuple[Iterator[T], T] | None:
        cap = backoff_s * 8
        for n in range(1, attempts + 1):
            try:
                items = iter(attempt())
                return items, next(items)
            except StopIteration:
                return None
            except StreamgateError as e:
                if not e.transient or n == attempts:
                    raise
                delay = random.uniform(0, min(cap, backoff_s * 2 ** (n - 1)))
                if honour_retry_after and e.retry_after is not None:
                    delay = max(delay, e.retry_after)
                if delay > cap or delay >= deadline.remaining():
                    raise  # not worth holding the request for: the client decides
                logger.warning("%s attempt %d of %d failed (%s); retrying in %.2f s",
                               upstream, n, attempts, e.code, delay)
                time.sleep(delay)
                deadline.check()
        return None  # attempts < 1: nothing was tried

    return Retrying(begin)


class Retrying(Iterator[T]):
    """What :func:`with_retries` returns: the first item is taken (and retried) on the first
    ``next()``; once it has come, the attempt's own iterator holds the rest and
    :meth:`remaining` hands it over, so a consumer reads on with no retry layer per item.
    :meth:`close` closes that iterator at once (when the consumer stops early, not when it is
    collected); after a failure, the end or a close, ``next()`` raises ``StopIteration``."""

    __slots__ = ("_begin", "_items")

    def __init__(self, begin: Callable[[], tuple[Iterator[T], T] | None]) -> None:
        self._begin: Callable[[], tuple[Iterator[T], T] | None] | None = begin
        self._items: Iterator[T] | None = None

    def __iter__(self) -> Retrying[T]:
        return self

    def __next__(self) -> T:
        if self._items is not None:
            return next(self._items)
        begin, self._begin = self._begin, None
        begun = begin() if begin is not None else None
        if begun is None:
            raise StopIteration
        self._items, first = begun
        return first

    def remaining(self) -> Iterator[T]:
        """The items not yet taken: the attempt's own iterator once the first has come."""
        return self if self._items is None else self._items

    def close(self) -> None:
        self._begin = None
        items, self._items = self._items, None
        close = getattr(items, "close", None)
        if close is not None:
            close()
