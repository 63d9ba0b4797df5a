"""One thread relaying the streams of many invocations at once (Lambda Managed Instances).

With ``AWS_LAMBDA_MAX_CONCURRENCY`` > 1 the runtime loop runs a worker thread per invocation
(runtime.py). A thread that waits for its upstream in ``recv`` costs, per chunk, a wake-up and a
hand-over of the GIL among dozens of others; at 64 streams on two cores that, not our work, was
most of the CPU per chunk and of the queueing before a new stream's first byte (issue 25). So
once a stream's answer is under way, its waits move to this module's one thread, which waits
for every parked stream at once (``epoll``) and, when an upstream has bytes, runs that stream's
pipeline on them and writes what it gives to the Runtime API without blocking:

- the worker thread still does everything before the answer (the event, keys, routing, the
  upstream's status and first delta) and everything after it (the end events, a stored
  response, trailers, the Runtime API's answer): work that may block on something other than
  the upstream (DynamoDB, a key refresh) never runs on the relay's thread;
- a provider that can read its upstream without blocking (the OpenAI-compatible one, on a
  chunked body) does so when :data:`RELAYING` is set, and yields a :class:`Pending` instead of
  waiting; the handler's stream passes it on, and yields :data:`HAND_BACK` before its end
  events; the Runtime API writer (``RuntimeAPIClient.stream_response``) parks the stream here
  on a :class:`Pending` (:meth:`Relay.carry`) and its worker sleeps until the relay hands the
  body back (at :data:`HAND_BACK`, the body's end, or what it raised), then writes the rest;
- both markers are empty ``bytes``: a writer that knows nothing of them writes nothing for
  them, and a provider that never yields one (Bedrock, the embedded model, a body with a
  length) is relayed by its worker thread as before;
- nothing here waits on a clock: every wait of a parked stream is already bounded by a
  :func:`streamgate.deadline.guard` on its socket (the upstream's first-token, idle and deadline
  timeouts; the Runtime API write's deadline), which shuts the socket down when its time is up
  and so wakes this thread to fail the stream as a worker would have. The worker's own wait is
  bounded too (:meth:`Relay.carry`).
- each step of a stream runs in a copy of its worker's context (``contextvars``): its log lines
  carry its request id and trace, as on its worker.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from typing import cast

from streamgate.deadline import Guard

logger = logging.getLogger(__name__)

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
# How long past its own bound a worker waits for the relay to hand its stream back before it
# gives the stream up (a bug in the relay; every wait of a parked stream is guarded).
_HAND_BACK_GRACE_S = 30.0


class Pending(bytes):
    """An empty item of a response body: the upstream (``sock``) has nothing to read yet."""

    sock: socket.socket

    def __new__(cls, sock: socket.socket) -> Pending:
        self = super().__new__(cls)
        self.sock = sock
        return self


class _HandBack(bytes):
    """An empty item of a response body: what follows may block on more than the upstream."""


HAND_BACK = _HandBack()

# Set (to the relay) while a worker writes a streamed response that may be parked.
RELAYING: contextvars.ContextVar[Relay | None] = contextvars.ContextVar("streamgate_relaying",
                                                                        default=None)


class _Parked:
    """One stream while the relay holds it."""

    __slots__ = ("body", "sock", "ctx", "stall", "limit", "watching", "events", "out", "error",
                 "done", "released")

    def __init__(self, body: Iterator[bytes], sock: socket.socket, ctx: contextvars.Context,
                 stall: tuple[Guard, float] | None) -> None:
        self.body = body
        self.sock = sock  # the client's (the Runtime API's), carrying the chunked response
        self.ctx = ctx
        self.stall = stall
        self.limit = stall[0].at if stall is not None else 0.0  # the guard's own bound
        self.watching: socket.socket | None = None
        self.events = 0
        self.out: memoryview | None = None  # framed bytes the Runtime API has not taken yet
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.released = False  # handed back (set on the relay's thread only)


class Relay:
    """The relay's thread (started on the first :meth:`carry`) and the streams it holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arriving: list[tuple[_Parked, socket.socket | None]] = []
        self._selector: selectors.BaseSelector | None = None
        self._wake_w: socket.socket | None = None

    def carry(self, body: Iterator[bytes], pending: Pending, sock: socket.socket,
              timeout: float | None, *, stall: tuple[Guard, float] | None = None) -> None:
        """Relay ``body`` (whose last item was ``pending``) as chunks on ``sock`` until it
        needs its worker again; return then, or raise what its writing or the body raised.
        ``timeout``: the bound the caller's guard puts on the whole response (None: none).
        ``stall``: the guard on ``sock`` and how long one write may wait for the client to
        read (the dev server's request timeout): while a write waits, the guard is moved to
        that bound (never past its own), and back once the write is done."""
        parked = _Parked(body, sock, contextvars.copy_context(), stall)
        self._send(parked, pending.sock)
        if parked.done.wait(None if timeout is None else timeout + _HAND_BACK_GRACE_S):
            if parked.error is not None:
                raise parked.error
            return
        logger.error("the relay did not hand a stream back in time; giving it up")
        self._send(parked, None)  # the relay drops it; its body is not ours to touch now
        parked.done.wait(_HAND_BACK_GRACE_S)
        raise TimeoutError("the relay did not hand the stream back in time")

    def _send(self, parked: _Parked, upstream: socket.socket | None) -> None:
        with self._lock:
            if self._selector is None:
                self._start()
            self._arriving.append((parked, upstream))
            wake = self._wake_w
        assert wake is not None
        with contextlib.suppress(BlockingIOError):  # full: the relay has a wake-up coming
            wake.send(b"\0", _DONTWAIT)

    def _start(self) -> None:
        selector = selectors.DefaultSelector()
        wake_r, self._wake_w = socket.socketpair()
        wake_r.setblocking(False)
        selector.register(wake_r, _READ, None)
        self._selector = selector
        threading.Thread(target=self._run, args=(selector, wake_r), name="streamgate-relay",
                         daemon=True).start()

    def _run(self, selector: selectors.BaseSelector, wake_r: socket.socket) -> None:
        while True:
            try:
                ready = selector.select()
            except InterruptedError:
                continue
            for key, mask in ready:
                parked: _Parked | None = key.data
                if parked is not None and parked.released:
                    continue  # handed back earlier in this round; its socket may be another's
                try:
                    if parked is None:
                        self._arrive(selector, wake_r)
                    elif parked.out is not None and mask & _WRITE:
                        self._flush(selector, parked)
                    elif parked.out is None:
                        self._advance(selector, parked)
                except Exception as e:  # noqa: BLE001 - a bug here must not stop every stream
                    logger.exception("the relay failed a stream")
                    if parked is not None:
                        self._release(selector, parked, e)

    def _arrive(self, selector: selectors.BaseSelector, wake_r: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            wake_r.recv(4096)
        with self._lock:
            arriving, self._arriving = self._arriving, []
        for parked, upstream in arriving:
            if upstream is None:  # its worker gave up on it
                if not parked.released:
                    self._release(selector, parked, TimeoutError("given up"))
                continue
            try:
                self._watch(selector, parked, upstream, _READ)
            except Exception as e:  # noqa: BLE001 - its worker raises it; the others go on
                logger.exception("the relay could not take a stream")
                self._release(selector, parked, e)

    def _advance(self, selector: selectors.BaseSelector, parked: _Parked) -> None:
        """Run the stream's pipeline on what its upstream has, writing each item as one
        chunk, until it waits again (or cannot write, ends, fails or needs its worker)."""
        run, body, send = parked.ctx.run, parked.body, parked.sock.send
        while True:
            try:
                item = run(next, body)
            except StopIteration:
                self._release(selector, parked, None)
                return
            except BaseException as e:  # noqa: BLE001 - the worker raises it as its own
                self._release(selector, parked, e)
                return
            kind = item.__class__
            if kind is bytes:
                if not item:
                    continue
                frame = b"%x\r\n%s\r\n" % (len(item), item)
                try:
                    sent = send(frame, _DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as e:
                    self._release(selector, parked, e)
                    return
                if sent < len(frame):  # the client reads slower than we write
                    parked.out = memoryview(frame)[sent:]
                    self._watch(selector, parked, parked.sock, _WRITE)
                    if parked.stall is not None:  # bound this write by the stall time
                        g, stall_s = parked.stall
                        g.move(min(time.monotonic() + stall_s, parked.limit))
                    return
                continue
            if kind is Pending:
                upstream = cast(Pending, item).sock
                if parked.watching is not upstream or parked.events != _READ:
                    self._watch(selector, parked, upstream, _READ)
                return
            self._release(selector, parked, None)  # HAND_BACK
            return

    def _flush(self, selector: selectors.BaseSelector, parked: _Parked) -> None:
        out = parked.out
        assert out is not None
        try:
            sent = parked.sock.send(out, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            self._release(selector, parked, e)
            return
        if sent < len(out):
            parked.out = out[sent:]
            return
        parked.out = None
        if parked.stall is not None:
            parked.stall[0].move(parked.limit)  # waiting for the model is not a stalled write
        self._advance(selector, parked)

    def _watch(self, selector: selectors.BaseSelector, parked: _Parked, sock: socket.socket,
               events: int) -> None:
        if parked.watching is sock:
            selector.modify(sock, events, parked)
        else:
            self._unwatch(selector, parked)
            selector.register(sock, events, parked)
            parked.watching = sock
        parked.events = events

    def _unwatch(self, selector: selectors.BaseSelector, parked: _Parked) -> None:
        sock, parked.watching = parked.watching, None
        if sock is not None:
            # A socket the body closed meanwhile is still found (by identity); epoll forgot it.
            with contextlib.suppress(KeyError, ValueError, OSError):
                selector.unregister(sock)

    def _release(self, selector: selectors.BaseSelector, parked: _Parked,
                 error: BaseException | None) -> None:
        """Hand the stream back to its worker."""
        self._unwatch(selector, parked)
        parked.released = True
        parked.error = error
        parked.done.set()
