"""The OTLP protobuf we write by hand, decoded by the real ``opentelemetry-proto`` classes; the
exporter's settings read from the standard OTEL_* variables."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from streamgate import otlp
from streamgate.config import load_otlp_settings
from streamgate.errors import ConfigError
from tests.otlp_receiver import attributes


class Collect(SpanProcessor):
    """The SDK's ended spans, kept in memory."""

    def __init__(self) -> None:
        self.ended: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


def _spans() -> Sequence[ReadableSpan]:
    collect = Collect()
    provider = TracerProvider(resource=Resource({"service.name": "svc", "n": 3},
                                                "https://opentelemetry.io/schemas/1.45.0"),
                              shutdown_on_exit=False)
    provider.add_span_processor(collect)
    tracer = provider.get_tracer("scope", "1.2.3")
    remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True,
                         TraceFlags(1), TraceState([("vendor", "abc")]))
    linked = SpanContext(0x5759E988BD862E3FE1BE46A994272793, 0x53995C3F42CD8AD8, True,
                         TraceFlags(0))
    parent = tracer.start_span("parent", set_span_in_context(NonRecordingSpan(remote)),
                               kind=SpanKind.SERVER, links=[Link(linked, {"why": "x-ray"})])
    child = tracer.start_span("child", set_span_in_context(parent), kind=SpanKind.CLIENT,
                              attributes={"s": "é", "empty": "", "t": True, "f": False,
                                          "i": 7, "zero": 0, "neg": -5, "d": 0.25,
                                          "strings": ["a", "b"], "ints": [1, -2],
                                          "floats": [1.5], "bools": [True, False]})
    child.add_event("first", {"at": 1})
    child.set_status(Status(StatusCode.ERROR, "broke"))
    child.end()
    parent.end()
    return collect.ended


def test_encoded_spans_decode_with_the_official_protobuf_classes_field_for_field() -> None:
    # GIVEN two SDK spans: a server span under a remote parent with a link, a client span
    # with every attribute type, an event and an error status
    spans = _spans()
    # WHEN they are encoded
    request = ExportTraceServiceRequest()
    request.ParseFromString(otlp.encode(spans))
    # THEN the official classes read back exactly what the SDK recorded
    (resource_spans,) = request.resource_spans
    assert attributes(resource_spans.resource.attributes) == {"service.name": "svc", "n": 3}
    assert resource_spans.schema_url == "https://opentelemetry.io/schemas/1.45.0"
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("scope", "1.2.3")
    child, parent = scope_spans.spans
    sdk_child, sdk_parent = spans
    assert parent.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert parent.parent_span_id.hex() == "b7ad6b7169203331"
    assert parent.trace_state == "vendor=abc"
    assert parent.kind == PbSpan.SPAN_KIND_SERVER and child.kind == PbSpan.SPAN_KIND_CLIENT
    assert parent.flags == 0x301  # sampled; the parent is known to be remote
    assert child.flags == 0x101  # sampled; the parent is known to be local
    assert (child.parent_span_id, child.span_id) == (parent.span_id,
                                                     sdk_child.context.span_id.to_bytes(8,
                                                                                        "big"))
    assert (child.start_time_unix_nano, child.end_time_unix_nano) == (
        sdk_child.start_time, sdk_child.end_time)
    assert attributes(child.attributes) == {
        "s": "é", "empty": "", "t": True, "f": False, "i": 7, "zero": 0, "neg": -5, "d": 0.25,
        "strings": ["a", "b"], "ints": [1, -2], "floats": [1.5], "bools": [True, False]}
    (event,) = child.events
    assert (event.name, attributes(event.attributes), event.time_unix_nano) == (
        "first", {"at": 1}, sdk_child.events[0].timestamp)
    assert (child.status.code, child.status.message) == (2, "broke")
    (link,) = parent.links
    assert (link.trace_id.hex(), link.span_id.hex(), attributes(link.attributes),
            link.flags) == ("5759e988bd862e3fe1be46a994272793", "53995c3f42cd8ad8",
                            {"why": "x-ray"}, 0x300)
    assert sdk_parent.name == parent.name


def test_a_partial_success_answer_is_read() -> None:
    answer = ExportTraceServiceResponse()
    answer.partial_success.rejected_spans = 3
    answer.partial_success.error_message = "too big"
    assert otlp._rejected(answer.SerializeToString()) == (3, "too big")
    assert otlp._rejected(b"") == (0, "")
    assert otlp._rejected(b"\x0a\x05\x08") == (0, "")  # cut short: ignored


@pytest.mark.parametrize(("environ", "endpoint", "region"), [
    ({}, "http://localhost:4318/v1/traces", ""),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318/"}, "http://jaeger:4318/v1/traces",
     ""),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://b/custom"}, "https://b/custom", ""),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://xray.eu-west-1.amazonaws.com/v1/traces"},
     "https://xray.eu-west-1.amazonaws.com/v1/traces", "eu-west-1"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://vpce-1.xray.us-east-1.vpce.amazonaws.com"
                                            "/v1/traces",
      "STREAMGATE_TRACING_SIGV4_REGION": "us-east-1"},
     "https://vpce-1.xray.us-east-1.vpce.amazonaws.com/v1/traces", "us-east-1"),
])
def test_the_traces_endpoint_follows_the_otlp_exporter_variables(
        environ: dict[str, str], endpoint: str, region: str) -> None:
    settings = load_otlp_settings(environ)
    assert (settings.endpoint, settings.sigv4_region) == (endpoint, region)


def test_headers_timeout_compression_and_the_lambda_resource_are_read() -> None:
    settings = load_otlp_settings({
        "OTEL_EXPORTER_OTLP_HEADERS": "x-a=1",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "Authorization=Bearer%20k, x-honeycomb-team=t",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
        "OTEL_SERVICE_NAME": "gateway", "AWS_LAMBDA_FUNCTION_NAME": "sg",
        "AWS_REGION": "us-east-1", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512"})
    assert settings.headers == (("authorization", "Bearer k"), ("x-honeycomb-team", "t"))
    assert (settings.timeout_s, settings.gzip, settings.service_name) == (2.5, True, "gateway")
    assert dict(settings.resource) == {
        "cloud.provider": "aws", "cloud.platform": "aws_lambda", "faas.name": "sg",
        "cloud.region": "us-east-1", "faas.max_memory": 512 * 1024 * 1024}


@pytest.mark.parametrize("environ", [
    {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    {"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "zstd"},
    {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4318"},
    {"OTEL_EXPORTER_OTLP_HEADERS": "novalue"},
    {"OTEL_EXPORTER_OTLP_TIMEOUT": "-1"},
    {"STREAMGATE_TRACING_FLUSH_TIMEOUT_MS": "soon"},
])
def test_exporter_settings_we_cannot_honour_are_refused(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_otlp_settings(environ)
