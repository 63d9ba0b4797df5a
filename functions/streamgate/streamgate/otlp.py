"""OTLP/HTTP trace export: spans → protobuf bytes → ``POST /v1/traces``, in batches, off the
request path.

Imported only with ``STREAMGATE_TRACING`` (by streamgate/tracing.py). Three parts:

- :func:`encode` writes an ``ExportTraceServiceRequest`` (opentelemetry-proto 1.x,
  ``opentelemetry/proto/collector/trace/v1/trace_service.proto`` and ``trace/v1/trace.proto``)
  from the SDK's finished spans with the protobuf wire format written by hand: varints and
  length-delimited fields are all it takes, and it spares the zip the ``protobuf`` runtime,
  ``requests`` and the generated classes (docs/operating.md, "Logs, metrics, traces"). The
  tests decode what it writes with the real ``opentelemetry-proto`` classes.
- :class:`Exporter` sends one body per batch over ``http.client`` (keep-alive, gzip when asked,
  the configured headers), signed with SigV4 for X-Ray (service ``xray``) by botocore's own
  signer when the settings say so, with the function's credentials. It never raises: a
  refused, failed or timed-out export is logged (once per outage, not once per batch) and
  its spans are dropped.
- :class:`BatchProcessor` queues ended spans (a lock and an append: what ``span.end()`` costs
  a request) and exports them from its own thread every ``schedule_delay_s``, or as soon as a
  batch is full, or when :meth:`BatchProcessor.flush` asks. ``flush`` waits for the spans
  ended so far to leave, at most its timeout, and never exports on the caller's thread (the
  SDK's ``BatchSpanProcessor.force_flush`` exports on it and ignores its timeout, 1.45): a
  hanging collector costs a flush its timeout once, then nothing until that export ends.
  A full queue drops new spans and counts them.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import ssl
import struct
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import Span
    from opentelemetry.trace import SpanContext

    from streamgate.config import OtlpSettings

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-protobuf"
_RESPONSE_LIMIT = 65536
# Span.flags (trace.proto): bits 0-7 the W3C trace flags; bit 8 says bit 9 is known; bit 9 says
# the parent (or linked) span context came from another process.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200


# -- protobuf wire format (https://protobuf.dev/programming-guides/encoding/) --------------------

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64: negatives as their two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes(field: int, data: bytes) -> bytes:
    """A length-delimited field: bytes, a string, or a nested message."""
    return _key(field, 2) + _varint(len(data)) + data


def _string(field: int, text: str) -> bytes:
    return _bytes(field, text.encode("utf-8", "surrogatepass")) if text else b""


def _uint(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value) if value else b""


def _fixed64(field: int, value: int) -> bytes:
    return _key(field, 1) + struct.pack("<Q", value) if value else b""


def _fixed32(field: int, value: int) -> bytes:
    return _key(field, 5) + struct.pack("<I", value) if value else b""


def _any_value(value: object) -> bytes:
    """``AnyValue`` (common.proto): exactly one field set, even when it is zero or empty."""
    if isinstance(value, str):
        return _bytes(1, value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bool):
        return _key(2, 0) + _varint(int(value))
    if isinstance(value, int):
        return _key(3, 0) + _varint(value)
    if isinstance(value, float):
        return _key(4, 1) + struct.pack("<d", value)
    if isinstance(value, bytes):
        return _bytes(7, value)
    if isinstance(value, Sequence):
        return _bytes(5, b"".join(_bytes(1, _any_value(v)) for v in value))
    return _bytes(1, str(value).encode("utf-8", "surrogatepass"))


def _attributes(field: int, attributes: Mapping[str, object] | None) -> bytes:
    """``repeated KeyValue``: each ``{key = 1, value = 2}``."""
    if not attributes:
        return b""
    return b"".join(_bytes(field, _string(1, k) + _bytes(2, _any_value(v)))
                    for k, v in attributes.items())


def _flags(context: SpanContext, remote: bool | None) -> int:
    flags = int(context.trace_flags)
    if remote is not None:
        flags |= _HAS_IS_REMOTE | (_IS_REMOTE if remote else 0)
    return flags


def _trace_state(context: SpanContext) -> str:
    return context.trace_state.to_header() if context.trace_state else ""


def _span(span: ReadableSpan) -> bytes:
    """``Span`` (trace.proto)."""
    context = span.context
    assert context is not None
    parent = span.parent
    out = [
        _bytes(1, context.trace_id.to_bytes(16, "big")),
        _bytes(2, context.span_id.to_bytes(8, "big")),
        _string(3, _trace_state(context)),
        _bytes(4, parent.span_id.to_bytes(8, "big")) if parent is not None else b"",
        _string(5, span.name),
        # The SDK's SpanKind is INTERNAL = 0 .. CONSUMER = 4; OTLP's adds UNSPECIFIED = 0 first.
        _uint(6, span.kind.value + 1),
        _fixed64(7, span.start_time or 0),
        _fixed64(8, span.end_time or 0),
        _attributes(9, span.attributes),
        _uint(10, span.dropped_attributes),
    ]
    for event in span.events:
        out.append(_bytes(11, _fixed64(1, event.timestamp) + _string(2, event.name)
                          + _attributes(3, event.attributes)))
    out.append(_uint(12, span.dropped_events))
    for link in span.links:
        linked = link.context
        out.append(_bytes(13, _bytes(1, linked.trace_id.to_bytes(16, "big"))
                          + _bytes(2, linked.span_id.to_bytes(8, "big"))
                          + _string(3, _trace_state(linked))
                          + _attributes(4, link.attributes)
                          + _fixed32(6, _flags(linked, linked.is_remote))))
    out.append(_uint(14, span.dropped_links))
    status = span.status
    description = status.description or ""
    if status.status_code.value or description:
        out.append(_bytes(15, _string(2, description) + _uint(3, status.status_code.value)))
    out.append(_fixed32(16, _flags(context, parent.is_remote if parent is not None else False)))
    return b"".join(out)


def encode(spans: Iterable[ReadableSpan]) -> bytes:
    """``ExportTraceServiceRequest``: the spans grouped by resource, then by instrumentation
    scope, in the order given."""
    groups: dict[int, tuple[Any, dict[tuple[str, str, str], list[ReadableSpan]]]] = {}
    for span in spans:
        resource, scopes = groups.setdefault(id(span.resource), (span.resource, {}))
        scope = span.instrumentation_scope
        key = (scope.name, scope.version or "", scope.schema_url or "") if scope else ("", "", "")
        scopes.setdefault(key, []).append(span)
    out = []
    for resource, scopes in groups.values():
        scope_spans = b"".join(
            _bytes(2, _bytes(1, _string(1, name) + _string(2, version))
                   + b"".join(_bytes(2, _span(s)) for s in members) + _string(3, schema))
            for (name, version, schema), members in scopes.items())
        out.append(_bytes(1, _bytes(1, _attributes(1, resource.attributes)) + scope_spans
                          + _string(3, resource.schema_url)))
    return b"".join(out)


def _rejected(body: bytes) -> tuple[int, str]:
    """``ExportTraceServiceResponse.partial_success``: (rejected spans, error message); (0, "")
    when there is none or the body cannot be read."""
    def fields(data: bytes) -> Iterable[tuple[int, int | bytes]]:
        i = 0
        while i < len(data):
            key, i = _read_varint(data, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _read_varint(data, i)
                yield field, value
            elif wire == 2:
                size, i = _read_varint(data, i)
                yield field, data[i:i + size]
                i += size
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            else:
                return

    try:
        for field, value in fields(body):
            if field == 1 and isinstance(value, bytes):
                parts = dict(fields(value))
                count, message = parts.get(1, 0), parts.get(2, b"")
                return (count if isinstance(count, int) else 0,
                        message.decode("utf-8", "replace")[:300]
                        if isinstance(message, bytes) else "")
    except IndexError:
        pass
    return 0, ""


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


# -- the exporter --------------------------------------------------------------------------------

class Exporter:
    """Sends batches to one OTLP/HTTP traces endpoint; see the module docstring."""

    def __init__(self, settings: OtlpSettings) -> None:
        self.settings = settings
        url = urllib.parse.urlsplit(settings.endpoint)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if self._https else 80)
        default_port = self._port == (443 if self._https else 80)
        # The Host header, as SigV4 signs it (botocore leaves a default port out too).
        self._authority = self._host if default_port else f"{self._host}:{self._port}"
        if ":" in self._host:
            self._authority = f"[{self._host}]" + ("" if default_port else f":{self._port}")
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._url = f"{url.scheme}://{self._authority}{self._path}"
        # What the log names: no path or query, which some backends give a key in.
        self._where = f"{url.scheme}://{self._authority}"
        self._headers = dict(settings.headers)
        # X-Ray also takes an API key as a bearer token: then there is nothing to sign.
        self._sign = bool(settings.sigv4_region) and "authorization" not in self._headers
        self._conn: http.client.HTTPConnection | None = None
        self._credentials: Any = None
        self._failing = False
        self._dropped_while_failing = 0

    def export(self, spans: Sequence[ReadableSpan]) -> bool:
        """Send one batch; False (logged) when it did not arrive. Never raises."""
        try:
            body = encode(spans)
            headers = {"content-type": CONTENT_TYPE, "user-agent": "streamgate",
                       **self._headers, "host": self._authority}
            if self.settings.gzip:
                body = gzip.compress(body, compresslevel=6)
                headers["content-encoding"] = "gzip"
            if self._sign:
                headers = self._signed(body, headers)
            status, answer = self._post(body, headers)
        except Exception as e:  # noqa: BLE001 - an export never fails anything else
            return self._failed(len(spans), f"{type(e).__name__}: {e}"[:300])
        if not 200 <= status < 300:
            text = answer[:300].decode("utf-8", "replace").strip()
            return self._failed(len(spans), f"HTTP {status} {text}".strip())
        rejected, message = _rejected(answer)
        if rejected:
            logger.warning("the trace endpoint rejected %d of %d spans: %s", rejected,
                           len(spans), message)
        if self._failing:
            logger.info("trace export works again (%d spans were dropped meanwhile)",
                        self._dropped_while_failing)
            self._failing, self._dropped_while_failing = False, 0
        return True

    def _failed(self, count: int, why: str) -> bool:
        self.close()
        if not self._failing:
            logger.warning("trace export to %s failed, %d spans dropped (logged once until "
                           "exports work again): %s", self._where, count, why)
        self._failing = True
        self._dropped_while_failing += count
        return False

    def _signed(self, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        """The headers with SigV4's (botocore's ``SigV4Auth``, service ``xray``)."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        if self._credentials is None:
            import botocore.session

            self._credentials = botocore.session.get_session().get_credentials()
            if self._credentials is None:
                raise RuntimeError("no AWS credentials to sign trace exports with")
        request = AWSRequest(method="POST", url=self._url, data=body, headers=headers)
        SigV4Auth(self._credentials.get_frozen_credentials(), "xray",
                  self.settings.sigv4_region).add_auth(request)
        return {k.lower(): v for k, v in request.headers.items()}

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST on the kept-alive connection, once more on a new one if a reused connection
        turns out closed (the server's keep-alive ended while we were idle)."""
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._conn or self._connect()
            try:
                conn.request("POST", self._path, body=body, headers=headers)
                response = conn.getresponse()
                answer = response.read(_RESPONSE_LIMIT)
                if response.will_close or not response.isclosed():
                    self.close()  # closing, or more body than we read: not reusable
                else:
                    self._conn = conn
                return response.status, answer
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if not reused or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        timeout = self.settings.timeout_s
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


# -- batching ------------------------------------------------------------------------------------

class BatchProcessor(SpanProcessor):
    """Ended spans → batches → ``export`` on a thread of its own; see the module docstring."""

    def __init__(self, export: Callable[[Sequence[ReadableSpan]], bool], *,
                 max_queue_size: int = 2048, max_export_batch_size: int = 512,
                 schedule_delay_s: float = 5.0) -> None:
        self._export = export
        self._max_queue = max(1, max_queue_size)
        self._max_batch = max(1, min(max_export_batch_size, self._max_queue))
        self._delay = schedule_delay_s
        self._queue: deque[ReadableSpan] = deque()
        self._cond = threading.Condition()
        self._accepted = 0  # spans ended (queued or dropped), ever
        self._handled = 0  # of those, exported, failed or dropped
        self._dropped = 0
        self._exporting: int | None = None  # the number of the export under way
        self._exports = 0
        self._stuck: int | None = None  # an export a flush gave up waiting for
        self._wake = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="streamgate-otlp-export",
                                        daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._cond:
            self._accepted += 1
            if self._stopping or len(self._queue) >= self._max_queue:
                self._dropped += 1
                self._handled += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    logger.warning("%d spans dropped so far (the export queue was full, or "
                                   "shutting down)", self._dropped)
                return
            self._queue.append(span)
            if len(self._queue) >= self._max_batch:
                self._wake = True
            if len(self._queue) == 1 or self._wake:
                self._cond.notify_all()  # the first span starts the schedule's clock

    def flush(self, timeout_s: float) -> bool:
        """Wait until the spans ended so far have been exported (or given up on), at most
        ``timeout_s``; never on an export already known to hang."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            target = self._accepted
            if self._handled >= target:
                return True
            if self._stuck is not None and self._exporting == self._stuck:
                return False  # still in the export a flush gave up on: do not wait again
            self._wake = True
            self._cond.notify_all()
            while self._handled < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    self._stuck = self._exporting
                    return False
                self._cond.wait(left)
            return True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.flush(timeout_millis / 1000)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is queued (at most ``timeout_s``), then stop the thread."""
        self.flush(timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                # A batch leaves schedule_delay_s after its first span, or when full or asked.
                due = time.monotonic() + self._delay
                while not (self._stopping or self._wake
                           or len(self._queue) >= self._max_batch):
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._queue:
                    return  # stopping, nothing left
                batch = [self._queue.popleft()
                         for _ in range(min(self._max_batch, len(self._queue)))]
                if not self._queue:
                    self._wake = False
                self._exports += 1
                self._exporting = self._exports
            try:
                self._export(batch)
            except Exception:  # noqa: BLE001 - the thread outlives any export
                logger.exception("trace export failed")
            finally:
                with self._cond:
                    self._handled += len(batch)
                    self._exporting = None
                    self._cond.notify_all()
