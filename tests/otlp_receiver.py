"""An OTLP/HTTP traces receiver: a real HTTP server on 127.0.0.1:0 taking ``POST /v1/traces``,
decoding each body with the real protobuf classes of ``opentelemetry-proto`` (gzip or not), and
keeping every request (headers, raw body) and every span, flattened for assertions.

``mode`` scripts a failing collector: "ok" answers 200 with an empty
``ExportTraceServiceResponse``; "hang" reads the request and never answers (until closed);
"503" answers 503 after reading it."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.fake_http import start_server

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER",
         5: "CONSUMER"}
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def attributes(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in items:
        assert isinstance(kv, KeyValue)
        out[kv.key] = value(kv.value)
    return out


@dataclass
class Span:
    """One received span, as the receiver decoded it."""

    name: str
    kind: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16
    parent_span_id: str  # "" for a root
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str
    status_message: str
    flags: int
    links: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""
    trace_state: str = ""


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes  # as sent (gzip-compressed when content-encoding says so)


class OtlpReceiver:
    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.requests: list[Received] = []
        self.spans: list[Span] = []
        self.arrived = threading.Condition()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - stdlib naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                raw = gzip.decompress(body) if headers.get("content-encoding") == "gzip" \
                    else body
                request = ExportTraceServiceRequest()
                request.ParseFromString(raw)
                with receiver.arrived:
                    receiver.requests.append(Received(self.path, headers, body))
                    receiver.spans += receiver._flatten(request)
                    receiver.arrived.notify_all()
                if receiver.mode == "hang":
                    receiver._release.wait(60)
                    self.close_connection = True
                    return
                status = 503 if receiver.mode == "503" else 200
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(status)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = start_server(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"

    @staticmethod
    def _flatten(request: ExportTraceServiceRequest) -> list[Span]:
        spans = []
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(Span(
                        name=s.name, kind=KINDS[s.kind], trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        attributes=attributes(s.attributes), status=STATUS[s.status.code],
                        status_message=s.status.message, flags=s.flags,
                        links=[{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex(),
                                "attributes": attributes(link.attributes),
                                "flags": link.flags} for link in s.links],
                        events=[{"name": e.name, "attributes": attributes(e.attributes)}
                                for e in s.events],
                        resource=resource, scope=scope_spans.scope.name,
                        trace_state=s.trace_state))
        return spans

    def wait_for(self, n: int, timeout: float = 10) -> list[Span]:
        """The spans received, once there are at least ``n`` (fails after ``timeout``)."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.spans) >= n, timeout), (
                f"{len(self.spans)} spans arrived, expected {n}: "
                f"{[s.name for s in self.spans]}")
            return list(self.spans)

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
