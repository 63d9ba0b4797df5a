"""When a request must end, and the guard that makes a socket honour it.

Every wait in the service is bounded twice: by its own timeout (connect, first token, idle,
queue, retry wait), and by the request's :class:`Deadline`. The Lambda loop sets the deadline
from ``Lambda-Runtime-Deadline-Ms`` minus ``DeadlineMarginMs``; the dev server from its request
timeout, and it can also tell whether its client has left. A wait asks :meth:`Deadline.cap`
for the time it may block; when the wait ends without what it waited for,
:meth:`Deadline.check` says whether the deadline was the reason (``DeadlineExceededError``,
which ends a stream with our deadline event) or the wait's own timeout was.

A socket timeout bounds each ``recv``, not a read: a peer that trickles one byte a second
keeps a ``readline`` going for hours without ever tripping it. :func:`guard` closes that gap.
One daemon thread per process shuts a guarded socket down when its wall-clock limit passes,
which wakes any read or write blocked on it at once; the owner then sees ``Guard.fired`` and
reports the timeout. Moving a limit later (each model output restarts the idle timer) is an
attribute write, so the guard costs nothing per chunk.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator

from streamgate.errors import DeadlineExceededError

logger = logging.getLogger(__name__)

DEADLINE_MESSAGE = "Generation stopped: the request reached the function's time limit"


class Deadline:
    """A monotonic instant (``None``: no limit but the waits' own timeouts), plus an optional
    probe that tells whether the client has gone (the dev server can see that; Lambda cannot)."""

    __slots__ = ("at", "_client_gone")

    def __init__(self, at: float | None = None, *,
                 client_gone: Callable[[], bool] | None = None) -> None:
        self.at = at
        self._client_gone = client_gone

    @classmethod
    def after(cls, seconds: float, *, client_gone: Callable[[], bool] | None = None) -> Deadline:
        return cls(time.monotonic() + seconds, client_gone=client_gone)

    def remaining(self) -> float:
        """Seconds left (``inf`` without a deadline; negative once it has passed)."""
        return math.inf if self.at is None else self.at - time.monotonic()

    def cap(self, timeout: float) -> float:
        """How long a wait whose own timeout is ``timeout`` may block: never past the deadline,
        never negative."""
        return max(0.0, min(timeout, self.remaining()))

    def until(self, limit: float) -> float:
        """The earlier of a monotonic instant ``limit`` and the deadline."""
        return limit if self.at is None else min(limit, self.at)

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def check(self) -> None:
        """Raise :class:`DeadlineExceededError` once the deadline has passed."""
        if self.expired():
            raise DeadlineExceededError(DEADLINE_MESSAGE)

    def client_gone(self) -> bool:
        """True once the driver knows the client has left (never on Lambda)."""
        return self._client_gone is not None and self._client_gone()


NO_DEADLINE = Deadline()
# The deadline of the request the current thread (or context) serves, for the waits that
# no call passes one to: the key lookup, the model list. Set by the driver (bound()).
_CURRENT: contextvars.ContextVar[Deadline] = contextvars.ContextVar("streamgate_deadline",
                                                                   default=NO_DEADLINE)


def current() -> Deadline:
    """The deadline bound by :func:`bound` in this context; :data:`NO_DEADLINE` if none."""
    return _CURRENT.get()


@contextlib.contextmanager
def bound(deadline: Deadline) -> Iterator[None]:
    """Make ``deadline`` this context's :func:`current` deadline while the block runs."""
    token = _CURRENT.set(deadline)
    try:
        yield
    finally:
        _CURRENT.reset(token)


class Guard:
    """One socket's wall-clock limit (a monotonic instant). :meth:`move` changes it,
    :meth:`cancel` ends the guard; ``fired`` tells the owner why its read ended."""

    __slots__ = ("sock", "at", "fired", "active", "_scheduled", "_watchdog", "_context")

    def __init__(self, watchdog: _Watchdog, sock: socket.socket, at: float) -> None:
        self.sock = sock
        self.at = at
        self.fired = False
        self.active = True
        self._scheduled = math.inf
        self._watchdog = watchdog
        # The owner's context (its request id and trace, for the log): the watchdog acts in it.
        self._context = contextvars.copy_context()

    def move(self, at: float) -> None:
        self.at = at
        if at < self._scheduled:  # later is picked up when the old time comes round
            self._watchdog.schedule(self)

    def cancel(self) -> None:
        if self.active:
            self.active = False
            self._watchdog.cancelled()


class _Watchdog:
    """The one thread that fires guards: a heap of (time, seq, guard), lazily corrected."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, Guard]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._thread: threading.Thread | None = None

    def guard(self, sock: socket.socket, at: float) -> Guard:
        g = Guard(self, sock, at)
        self.schedule(g)
        return g

    def schedule(self, g: Guard) -> None:
        with self._cv:
            g._scheduled = g.at
            heapq.heappush(self._heap, (g.at, next(self._seq), g))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="streamgate-watchdog",
                                                daemon=True)
                self._thread.start()
            if self._heap[0][2] is g:
                self._cv.notify()

    def cancelled(self) -> None:
        with self._cv:
            self._cancelled += 1
            # Drop dead entries once they are most of the heap, so it stays the size of the
            # live guards (a cancelled entry would otherwise wait for its time to come).
            if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2].active and e[0] == e[2]._scheduled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def _run(self) -> None:
        while True:
            due: list[Guard] = []
            with self._cv:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    at, _, g = heapq.heappop(self._heap)
                    if not g.active or at != g._scheduled:
                        continue  # cancelled, or superseded by an earlier entry
                    if g.at > now:  # moved later since it was scheduled
                        g._scheduled = g.at
                        heapq.heappush(self._heap, (g.at, next(self._seq), g))
                        continue
                    g.active = False
                    g.fired = True
                    due.append(g)
                if not due:
                    self._cv.wait(self._heap[0][0] - now if self._heap else None)
            for g in due:
                g._context.run(_fire, g)


def _fire(g: Guard) -> None:
    """Cut a guarded socket whose time has come, saying so in its request's log. Nothing here
    may end the watchdog: every guard of the process depends on it."""
    try:
        logger.debug("a wait reached its time limit: its socket is shut down")
        # socket.socket's own shutdown, even for an SSLSocket (whose override would unwrap
        # TLS under a reader's feet): it only needs the file descriptor.
        socket.socket.shutdown(g.sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed
    except Exception:  # noqa: BLE001
        logger.exception("the deadline watchdog could not cut a socket")


_watchdog = _Watchdog()


def guard(sock: socket.socket, at: float) -> Guard:
    """Shut ``sock`` down at monotonic time ``at`` unless the guard is moved or cancelled
    first. Cancel it before closing the socket."""
    return _watchdog.guard(sock, at)
