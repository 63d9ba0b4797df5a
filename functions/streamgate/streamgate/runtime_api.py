"""Client for the Lambda Runtime API, 2018-06-01, with response streaming (stdlib only).

https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html and
https://docs.aws.amazon.com/lambda/latest/dg/runtimes-custom.html#runtimes-custom-response-streaming.
The only module that talks to the Runtime API.

What the Runtime API sends is read defensively: an event is read up to ``MAX_EVENT_BYTES``
(Lambda's own payload limit is 6 MB), a missing or unreadable deadline is ``None`` (the loop
then starts no model call), a request id is carried percent-encoded in the paths, and every
call but the long poll has a timeout. A streamed response is bounded as a whole by a
:func:`streamgate.deadline.guard` instead of a timeout per write: its socket stays blocking, so
a chunk costs one ``send`` and no ``poll`` or ``ioctl`` around it, and a Runtime API that stops
reading is still cut when the time is up. Failures are :class:`RuntimeAPIError` or ``OSError``;
:class:`InvocationError` says the invocation itself could not be read, and names it so it can
still be answered.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from streamgate.deadline import Guard, guard
from streamgate.relay import Pending, Relay

logger = logging.getLogger(__name__)

# --- Wire constants -----------------------------------------------------------------------------
API_VERSION = "2018-06-01"
NEXT_PATH = f"/{API_VERSION}/runtime/invocation/next"
RESPONSE_PATH = f"/{API_VERSION}/runtime/invocation/{{request_id}}/response"
ERROR_PATH = f"/{API_VERSION}/runtime/invocation/{{request_id}}/error"
INIT_ERROR_PATH = f"/{API_VERSION}/runtime/init/error"

HEADER_REQUEST_ID = "Lambda-Runtime-Aws-Request-Id"
HEADER_DEADLINE_MS = "Lambda-Runtime-Deadline-Ms"
HEADER_FUNCTION_ARN = "Lambda-Runtime-Invoked-Function-Arn"
HEADER_TRACE_ID = "Lambda-Runtime-Trace-Id"
HEADER_CLIENT_CONTEXT = "Lambda-Runtime-Client-Context"
HEADER_COGNITO_IDENTITY = "Lambda-Runtime-Cognito-Identity"
HEADER_RESPONSE_MODE = "Lambda-Runtime-Function-Response-Mode"
HEADER_ERROR_TYPE = "Lambda-Runtime-Function-Error-Type"
HEADER_ERROR_BODY = "Lambda-Runtime-Function-Error-Body"

STREAMING = "streaming"
HTTP_INTEGRATION_CONTENT_TYPE = "application/vnd.awslambda.http-integration-response"
# The prelude JSON and the body are separated by exactly eight NUL bytes.
PRELUDE_SEPARATOR = b"\x00" * 8
# Largest event read from GET next (a 6 MB body, base64-encoded, plus the event around it).
MAX_EVENT_BYTES = 16 << 20
# Longest answer read from any other call (they are a few bytes of JSON).
MAX_REPLY_BYTES = 64 << 10
# Timeout of every call but the long poll: the Runtime API is local and answers at once.
CALL_TIMEOUT_S = 10.0
# ------------------------------------------------------------------------------------------------


class RuntimeAPIError(Exception):
    """The Runtime API answered something a runtime cannot continue from."""


class InvocationError(RuntimeAPIError):
    """GET next named an invocation that cannot be served (its event is unreadable or too
    large); it can still be answered with ``post_error(request_id, ...)``."""

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Invocation:
    request_id: str
    deadline_ms: int | None  # epoch ms; None when missing or unreadable
    invoked_function_arn: str
    trace_id: str | None
    client_context: str | None
    cognito_identity: str | None
    event: bytes


def error_payload(error_type: str, message: str) -> dict[str, Any]:
    """The error document Lambda expects; never a stack trace from our code."""
    return {"errorType": error_type, "errorMessage": message, "stackTrace": []}


class RuntimeAPIClient:
    """One keep-alive connection to the Runtime API, used for one request at a time, by one
    thread (each worker of the loop has its own); only :meth:`stop_polling` may come from
    another."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._host, self._port = host, int(port)
        self._conn: http.client.HTTPConnection | None = None
        # stop_polling() against the owner's next_invocation(): both under this lock.
        self._lock = threading.Lock()
        self._polling = False
        self._stopped = False

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is not None:
            return self._conn
        conn = http.client.HTTPConnection(self._host, self._port)
        conn.connect()
        # Each SSE event is written as soon as it is made: no Nagle delay on small chunks.
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            # A stop that came while this poll was connecting found no socket to cut.
            cut = self._stopped and self._polling
            if not cut:
                self._conn = conn
        if cut:
            conn.close()
            raise ConnectionAbortedError("the runtime loop is stopping")
        return conn

    def _exchange(
        self, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None, *, timeout: float | None = CALL_TIMEOUT_S,
        limit: int = MAX_REPLY_BYTES, poll: bool = False,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One call; its answer's body read up to ``limit`` bytes (more: the connection is not
        reused). A dropped kept-alive connection is retried once on a new one; a body shorter
        than its Content-Length raises ``http.client.IncompleteRead``. A ``poll`` may be cut
        by :meth:`stop_polling` until its answer starts to arrive."""
        for attempt in (1, 2):
            if poll:
                with self._lock:
                    if self._stopped:
                        raise ConnectionAbortedError("the runtime loop is stopping")
                    self._polling = True
            conn = self._connection()
            try:
                assert conn.sock is not None
                conn.sock.settimeout(timeout)
                conn.request(method, path, body=body, headers=headers or {})
                if poll:
                    self._await_answer(conn.sock)
                response = conn.getresponse()
                data = response.read(limit)
                if len(data) < limit and response.length:  # the peer closed before the end
                    raise http.client.IncompleteRead(data, response.length)
                if not response.isclosed():
                    self.close()  # an answer larger than we read: drop the rest with the socket
                return response.status, response.headers, data
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt == 2 or self._poll_cut():
                    raise
            except OSError:  # a timeout or a socket error: the connection is unusable
                self.close()
                raise
        raise AssertionError("unreachable")

    def _await_answer(self, sock: socket.socket) -> None:
        """Block until the poll's answer starts to arrive (or its socket is cut). From its
        first byte on, a stop no longer cuts it: the invocation is already handed to this
        environment, and cutting its status line from its headers would lose it. Reading
        the rest is a transfer, not a wait: it gets the calls' timeout."""
        try:
            arrived = bool(sock.recv(1, socket.MSG_PEEK))  # blocks: the long poll
        except OSError:
            arrived = False  # cut, or broken: getresponse() says which
        if arrived:
            with self._lock:
                self._polling = False
            sock.settimeout(CALL_TIMEOUT_S)

    def _poll_cut(self) -> bool:
        with self._lock:
            return self._stopped and self._polling

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def stop_polling(self) -> None:
        """From another thread: no more ``GET next`` on this client, and a poll waiting now is
        cut (it fails with ``OSError``), unless a byte of its answer has arrived: that
        invocation is read whole, returned and served. Posting responses and errors goes on."""
        with self._lock:
            self._stopped = True
            conn = self._conn if self._polling else None
            sock = conn.sock if conn is not None else None
            # An answer whose first byte is here, not yet seen by the poll's thread, is as
            # good as arrived: only a poll with nothing to read is cut.
            if sock is not None and not _unread(sock):
                with contextlib.suppress(OSError):  # already closed
                    sock.shutdown(socket.SHUT_RDWR)  # shut down, not closed: the owner closes

    def next_invocation(self) -> Invocation:
        """Long-poll ``GET next``; raises RuntimeAPIError if the API says stop (e.g. 410),
        InvocationError for an invocation whose event cannot be read, ``OSError`` if
        :meth:`stop_polling` was called."""
        try:
            status, headers, body = self._exchange("GET", NEXT_PATH, timeout=None,
                                                   limit=MAX_EVENT_BYTES + 1, poll=True)
        except http.client.IncompleteRead as e:
            raise ConnectionAbortedError(f"GET next was cut short ({len(e.partial)} bytes)") \
                from None
        finally:
            with self._lock:
                self._polling = False
                if self._stopped:
                    # The poll may have been shut down after its answer arrived: the answer
                    # (and its error) go out on a new connection.
                    self.close()
        if status != 200:
            raise RuntimeAPIError(f"GET next answered {status}")
        request_id = headers.get(HEADER_REQUEST_ID)
        if not request_id:
            raise RuntimeAPIError(f"GET next answered without {HEADER_REQUEST_ID}")
        if len(body) > MAX_EVENT_BYTES:
            raise InvocationError(f"The event is larger than {MAX_EVENT_BYTES} bytes",
                                  request_id)
        return Invocation(
            request_id=request_id,
            deadline_ms=_epoch_ms(headers.get(HEADER_DEADLINE_MS)),
            invoked_function_arn=headers.get(HEADER_FUNCTION_ARN, ""),
            trace_id=headers.get(HEADER_TRACE_ID),
            client_context=headers.get(HEADER_CLIENT_CONTEXT),
            cognito_identity=headers.get(HEADER_COGNITO_IDENTITY),
            event=body,
        )

    def post_response(self, request_id: str, body: bytes) -> None:
        """A buffered (non-streaming) response, for `sam local`."""
        status, _, _ = self._exchange(
            "POST", RESPONSE_PATH.format(request_id=_path_id(request_id)), body,
            {"Content-Type": "application/json"},
        )
        if status != 202:
            raise RuntimeAPIError(f"POST response answered {status}")

    def post_error(self, request_id: str, error_type: str, message: str) -> None:
        """Report a failure before any response byte was sent."""
        self._post_error(ERROR_PATH.format(request_id=_path_id(request_id)), error_type, message)

    def post_init_error(self, error_type: str, message: str) -> None:
        self._post_error(INIT_ERROR_PATH, error_type, message)

    def _post_error(self, path: str, error_type: str, message: str) -> None:
        body = json.dumps(error_payload(error_type, message)).encode()
        status, _, _ = self._exchange(
            "POST", path, body,
            {"Content-Type": "application/json", HEADER_ERROR_TYPE: error_type},
        )
        if status != 202:
            raise RuntimeAPIError(f"POST {path} answered {status}")

    def stream_response(
        self,
        request_id: str,
        prelude: dict[str, Any],
        events: Iterable[bytes],
        failure: Callable[[], tuple[str, str] | None],
        *,
        timeout: float | None = None,
        relay: Relay | None = None,
    ) -> None:
        """One chunked POST: prelude JSON + 8 NULs, then each item of ``events`` as one chunk
        (one ``send``, written as soon as it is given), then the terminator, with real
        trailers if ``failure()`` - asked once ``events`` is exhausted - names an error type
        and message. ``timeout`` bounds the whole of it, the writes and the wait for the
        answer, with a guard on the socket rather than a timeout per call (a Runtime API that
        stops reading cannot hold the loop forever; it fails with ``TimeoutError``). Should
        ``events`` itself raise, the body still ends properly, with trailers naming it (what
        is not an ``Exception``, SystemExit say, is raised again once the body has ended).
        With a ``relay``, a :class:`~streamgate.relay.Pending` item parks the body there until
        it needs this thread again (the relay writes the chunks meanwhile, framed the same).
        """
        escaped: BaseException | None = None
        conn = self._connection()
        cut: Guard | None = None
        try:
            sock = conn.sock
            assert sock is not None
            sock.settimeout(None)  # blocking: the guard below is the only bound
            if timeout is not None:
                cut = guard(sock, time.monotonic() + timeout)
            send = sock.sendall
            conn.putrequest("POST", RESPONSE_PATH.format(request_id=_path_id(request_id)),
                            skip_accept_encoding=True)
            conn.putheader(HEADER_RESPONSE_MODE, STREAMING)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.putheader("Content-Type", HTTP_INTEGRATION_CONTENT_TYPE)
            conn.putheader("Trailer", f"{HEADER_ERROR_TYPE}, {HEADER_ERROR_BODY}")
            conn.endheaders()
            send(_chunk(json.dumps(prelude, separators=(",", ":")).encode()
                        + PRELUDE_SEPARATOR))
            try:
                body = iter(events)
                for event in body:
                    if event.__class__ is not bytes:  # one of the relay's (empty) markers
                        if relay is not None and event.__class__ is Pending:
                            relay.carry(body, event, sock, timeout)
                        continue
                    if event:
                        send(b"%x\r\n%s\r\n" % (len(event), event))
                trailers = failure()
            except OSError:
                raise
            except BaseException as e:  # a bug in the body: still end it, with trailers
                logger.exception("the response body failed mid-stream")
                trailers = ("Runtime.ResponseFailed", "The response failed mid-stream")
                escaped = None if isinstance(e, Exception) else e
            send(b"0\r\n" + _trailers(trailers) + b"\r\n")
            response = conn.getresponse()
            response.read(MAX_REPLY_BYTES)
        except (OSError, http.client.HTTPException) as e:
            if cut is not None:
                cut.cancel()  # before the socket is closed: its descriptor may be reused
            self.close()
            if escaped is not None:
                raise escaped from e
            if cut is not None and cut.fired:
                raise TimeoutError("the Runtime API did not take the response in time") from e
            raise
        finally:
            if cut is not None:
                cut.cancel()
        if escaped is not None:
            raise escaped
        if response.status != 202:
            raise RuntimeAPIError(f"POST response answered {response.status}")


def _unread(sock: socket.socket) -> bool:
    """Whether the peer has sent bytes (or closed) that are not read yet; never blocks."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed meanwhile
        return False


def _epoch_ms(raw: str | None) -> int | None:
    """``Lambda-Runtime-Deadline-Ms`` as an int, or None if it is not a plain number."""
    try:
        value = float((raw or "").strip())
    except ValueError:
        return None
    return int(value) if math.isfinite(value) else None


def _path_id(request_id: str) -> str:
    """The request id as one path segment: percent-encoded, so no id can break the request
    line (real ids are UUIDs and pass unchanged)."""
    return quote(request_id, safe="-_.~")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _trailers(failure: tuple[str, str] | None) -> bytes:
    if failure is None:
        return b""
    error_type, message = failure
    encoded = base64.b64encode(json.dumps(error_payload(error_type, message)).encode())
    return (f"{HEADER_ERROR_TYPE}: {error_type}\r\n".encode()
            + f"{HEADER_ERROR_BODY}: ".encode() + encoded + b"\r\n")
