"""Traces with OpenTelemetry: a server span per request, a client span per provider call.

Imported only with ``STREAMGATE_TRACING`` (telemetry.py imports it then, and nothing of
OpenTelemetry is loaded otherwise). Spans are built with the OpenTelemetry SDK and leave
through streamgate/otlp.py (OTLP/HTTP, protobuf, batched on a thread of its own).

Names and attributes follow the OpenTelemetry GenAI semantic conventions v0.1.0
(github.com/open-telemetry/semantic-conventions-genai, ``docs/gen-ai/client-inference.md``,
on semantic conventions v1.45.0 for the HTTP and general attributes):

- the request: ``{method} {route}`` (``POST /v1/chat/completions``), kind SERVER, HTTP server
  attributes (``http.request.method``, ``http.route``, ``url.path``, ``url.scheme``,
  ``http.response.status_code``, ``server.address``, ``user_agent.original``), ``error.type``
  for a 5xx or a stream that failed after its 200, and ``streamgate.*`` (request id, key id,
  public model, backend, fallbacks, whether the client left);
- each provider call, each fallback attempt of a route its own: ``{gen_ai.operation.name}
  {gen_ai.request.model}`` (``chat us.amazon.nova-lite-v1:0``), kind CLIENT (INTERNAL for the
  embedded model, which runs in-process), a child of the request's span, with
  ``gen_ai.operation.name`` (from the handler: ``chat``), ``gen_ai.provider.name``
  (``aws.bedrock``, ``openai``, ``llama.cpp``), ``gen_ai.request.*`` (model, max_tokens,
  temperature, top_p, seed, penalties, stop sequences, stream), ``server.address`` /
  ``server.port``, ``gen_ai.response.model`` (the model asked: no provider reports another),
  ``gen_ai.response.id`` (the completion id the client got), ``gen_ai.response.finish_reasons``
  (``["error"]`` when the stream ended without one), ``gen_ai.usage.input_tokens`` /
  ``output_tokens`` / ``cache_read.input_tokens``, ``gen_ai.response.time_to_first_chunk``
  (seconds from the call to its first content, streamed requests) and ``error.type`` (our error
  code: ``rate_limit_exceeded``, ``upstream_error``, ``deadline_exceeded``...). A failed
  attempt's span ends when it fails; the answering one's when the response is closed.
- Content only with ``STREAMGATE_LOG_CONTENT``: ``gen_ai.input.messages`` and
  ``gen_ai.output.messages``, JSON strings in the conventions' message schema.

Context. A client's W3C ``traceparent`` (and ``tracestate``) makes the request's span a child
of the client's, in the client's trace, sampled as the client says. Otherwise the Lambda trace
header (``Lambda-Runtime-Trace-Id``: ``Root=1-{8 hex}-{24 hex};Parent={16 hex};Sampled=1``) is
X-Ray's trace: a sampled one is continued (its trace id is the W3C trace id written
differently, X-Ray's OTLP endpoint takes it as it is), and any other is linked (a span link
to X-Ray's root and parent). The span of the provider call being opened is announced to
:func:`streamgate.telemetry.trace_headers` (a context variable, so each thread and request sees
its own): the OpenAI-compatible provider sends it upstream as ``traceparent``. No span is ever
made the current OpenTelemetry context across a yield: a request's spans are tied to it by
explicit parents, whichever thread serves its body.

Nothing here runs per chunk: attributes are set when a call begins and when the response is
closed, from the :class:`~streamgate.handler.Outcome` the handler filled in.
"""

from __future__ import annotations

import atexit
import json
import re
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from streamgate import otlp, telemetry
from streamgate.errors import StreamgateError

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from streamgate.config import OtlpSettings, Settings
    from streamgate.outcome import Outcome
    from streamgate.routes import Target
    from streamgate.validation import ChatRequest, Message

SCHEMA_URL = "https://opentelemetry.io/schemas/1.45.0"
SCOPE = "streamgate"
# gen_ai.provider.name for our provider kinds: the conventions' well-known values where there
# is one ("openai" for any OpenAI-compatible server: the conventions set it from what the
# client speaks, not from who answers).
PROVIDER_NAMES = {"bedrock": "aws.bedrock", "openai": "openai", "local": "llama.cpp"}
_XRAY = re.compile(r"(?:^|;)Root=1-([0-9a-f]{8})-([0-9a-f]{24})(?:;|$)")
_XRAY_PARENT = re.compile(r"(?:^|;)Parent=([0-9a-f]{16})(?:;|$)")
_XRAY_SAMPLED = re.compile(r"(?:^|;)Sampled=1(?:;|$)")
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
_W3C = TraceContextTextMapPropagator()


class Tracing:
    """One app's tracer: the SDK's provider, our batch processor and OTLP exporter."""

    def __init__(self, settings: Settings, otlp_settings: OtlpSettings) -> None:
        self.settings = settings
        self.otlp = otlp_settings
        self.exporter = otlp.Exporter(otlp_settings)
        self.processor = otlp.BatchProcessor(
            self.exporter.export, max_queue_size=otlp_settings.max_queue_size,
            max_export_batch_size=otlp_settings.max_export_batch_size,
            schedule_delay_s=otlp_settings.schedule_delay_s)
        resource = Resource({"service.name": otlp_settings.service_name,
                             **dict(otlp_settings.resource)}, SCHEMA_URL)
        # The sampler is the SDK's default: OTEL_TRACES_SAMPLER, else parent-based always-on.
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer(SCOPE, schema_url=SCHEMA_URL)
        self._closed = threading.Event()
        # At interpreter exit (the dev server stopped), what is queued still leaves, within
        # the flush timeout. A weak reference: an app nobody uses any more is not kept alive.
        atexit.register(_shutdown, weakref.ref(self))

    def begin_request(self, event: Mapping[str, Any] | None, xray_header: str | None,
                      request_id: str) -> RequestTrace:
        headers = _headers(event)
        method, path, host = _request_line(event, headers)
        parent = _W3C.extract(headers)
        links: list[Link] = []
        xray = _xray_context(xray_header)
        if xray is not None:
            if trace.get_current_span(parent).get_span_context().is_valid:
                links.append(Link(xray, {"streamgate.link": "aws.xray"}))
            elif xray.trace_flags.sampled:
                parent = trace.set_span_in_context(trace.NonRecordingSpan(xray))
            else:
                links.append(Link(xray, {"streamgate.link": "aws.xray"}))
        attributes: dict[str, Any] = {
            "http.request.method": method if method in _METHODS else "_OTHER",
            "url.path": path,
            "url.scheme": headers.get("x-forwarded-proto", "http").split(",")[0].strip(),
            "streamgate.request_id": request_id,
        }
        if method not in _METHODS:
            attributes["http.request.method_original"] = method
        if host:
            attributes["server.address"] = host
        if headers.get("user-agent"):
            attributes["user_agent.original"] = headers["user-agent"][:256]
        span = self.tracer.start_span(method if method in _METHODS else "HTTP",
                                      context=parent, kind=SpanKind.SERVER,
                                      attributes=attributes, links=links)
        return RequestTrace(self, span, method if method in _METHODS else "HTTP")

    def flush(self, timeout_s: float) -> bool:
        return self.processor.flush(timeout_s)

    def shutdown(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self.processor.shutdown(self.otlp.flush_timeout_s)
            self.exporter.close()


def _shutdown(ref: weakref.ref[Tracing]) -> None:
    tracing = ref()
    if tracing is not None:
        tracing.shutdown()


class RequestTrace:
    """The spans of one request: its server span and the provider calls under it."""

    def __init__(self, tracing: Tracing, span: Span, method: str) -> None:
        self.tracing = tracing
        self.span = span
        self.method = method
        self.call: ProviderCall | None = None

    def provider_call(self, operation: str, chat: ChatRequest | None,
                      response_id: str) -> ProviderCall:
        self.call = ProviderCall(self, operation, chat, response_id)
        return self.call

    def end(self, status: int, outcome: Outcome) -> None:
        """Close the answering call's span (if one is open) and the request's."""
        if self.call is not None:
            self.call.end(outcome)
        span = self.span
        err = outcome.error
        route = outcome.path and not (status == 404 and err is not None
                                      and err.code == "not_found")
        if route:
            span.update_name(f"{self.method} {outcome.path}")
            span.set_attribute("http.route", outcome.path)
        span.set_attribute("http.response.status_code", status)
        for key, value in (("streamgate.key_id", outcome.caller),
                           ("streamgate.model", outcome.model),
                           ("streamgate.backend", outcome.backend)):
            if value:
                span.set_attribute(key, value)
        if outcome.fallbacks:
            span.set_attribute("streamgate.fallbacks", [
                f"{f.get('target', '')}: {f.get('outcome', '')}" for f in outcome.fallbacks])
        if _disconnected(status, outcome):
            span.set_attribute("streamgate.disconnected", True)
        if err is not None:
            span.set_attribute("streamgate.error_code", err.code or err.type)
        if status >= 500 or (err is not None and status < 400):
            # 5xx, or a stream that failed after its 200 (HTTP server spans: 4xx is the
            # client's error, not ours).
            span.set_attribute("error.type", (err.code or err.type) if err is not None
                               else str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class ProviderCall:
    """The spans of one request's provider calls: what :meth:`Router.open` calls around each
    attempt (``observe``), and the answering attempt's span until the response is closed."""

    def __init__(self, request: RequestTrace, operation: str, chat: ChatRequest | None,
                 response_id: str) -> None:
        self.request = request
        self.operation = operation
        self.chat = chat
        self.response_id = response_id
        self.open: tuple[Span, Target, float] | None = None
        self._input: str | None = None

    @contextmanager
    def __call__(self, target: Target) -> Iterator[None]:
        """One attempt: its span, announced as the current call while the provider opens its
        stream; ended here if it fails, kept open if it answers."""
        tracing = self.request.tracing
        settings = tracing.settings
        local = target.kind == "local"
        span = tracing.tracer.start_span(
            f"{self.operation} {target.model}".strip(),
            context=trace.set_span_in_context(self.request.span),
            kind=SpanKind.INTERNAL if local else SpanKind.CLIENT,
            attributes=self._request_attributes(target, settings))
        started = time.monotonic()
        carrier: dict[str, str] = {}
        _W3C.inject(carrier, context=trace.set_span_in_context(span))
        token = telemetry.announce_trace_headers(carrier)
        try:
            yield
        except BaseException as e:
            span.set_attribute("error.type", _error_type(e))
            span.set_attribute("gen_ai.response.finish_reasons", ["error"])
            span.set_status(Status(StatusCode.ERROR))
            span.end()
            raise
        finally:
            telemetry.forget_trace_headers(token)
        self.open = (span, target, started)

    def end(self, outcome: Outcome) -> None:
        if self.open is None:
            return
        (span, target, started), self.open = self.open, None
        err = outcome.error
        span.set_attribute("gen_ai.response.model", target.model)
        if self.response_id:
            span.set_attribute("gen_ai.response.id", self.response_id)
        reason = outcome.finish_reason
        if self.chat is not None:  # embeddings have no finish reasons
            span.set_attribute("gen_ai.response.finish_reasons",
                               [reason] if reason is not None and err is None else ["error"])
        usage = outcome.usage
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            if usage.cached_tokens is not None:
                span.set_attribute("gen_ai.usage.cache_read.input_tokens", usage.cached_tokens)
        if self.chat is not None and self.chat.stream and outcome.first_token_at is not None:
            span.set_attribute("gen_ai.response.time_to_first_chunk",
                               round(max(0.0, outcome.first_token_at - started), 6))
        if err is not None:
            span.set_attribute("error.type", err.code or err.type)
            span.set_status(Status(StatusCode.ERROR))
        elif reason is None and self.chat is not None:
            span.set_attribute("streamgate.disconnected", True)  # the client left
        if outcome.prompt_text is not None:  # STREAMGATE_LOG_CONTENT
            span.set_attribute("gen_ai.output.messages", json.dumps([{
                "role": "assistant",
                "parts": [{"type": "text", "content": "".join(outcome.completion_text)}],
                "finish_reason": reason if reason is not None and err is None else "error",
            }], ensure_ascii=False))
        span.end()

    def _request_attributes(self, target: Target, settings: Settings) -> dict[str, Any]:
        chat = self.chat
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.provider.name": PROVIDER_NAMES.get(target.kind, target.kind),
            "gen_ai.request.model": target.model,
            "streamgate.target": target.name,
        }
        address, port = _server(target, settings)
        if address:
            attributes["server.address"] = address
            attributes["server.port"] = port
        if chat is None:  # embeddings: no sampling settings, no messages
            return attributes
        for key, value in (("max_tokens", chat.max_tokens), ("temperature", chat.temperature),
                           ("top_p", chat.top_p), ("seed", chat.seed),
                           ("frequency_penalty", chat.frequency_penalty),
                           ("presence_penalty", chat.presence_penalty)):
            if value is not None:
                attributes[f"gen_ai.request.{key}"] = value
        if chat.stop:
            attributes["gen_ai.request.stop_sequences"] = list(chat.stop)
        if chat.stream:
            attributes["gen_ai.request.stream"] = True
        if chat.response_format is not None and chat.response_format.type != "text":
            attributes["gen_ai.output.type"] = "json"
        if settings.log_content:
            if self._input is None:
                self._input = json.dumps([_message(m) for m in chat.messages],
                                         ensure_ascii=False)
            attributes["gen_ai.input.messages"] = self._input
        return attributes


def _message(m: Message) -> dict[str, Any]:
    """A chat message in the conventions' input message schema
    (``gen-ai-input-messages.json``)."""
    parts: list[dict[str, Any]] = []
    if m.role == "tool":
        parts.append({"type": "tool_call_response", "id": m.tool_call_id,
                      "response": m.content})
    elif m.parts:
        for part in m.parts:
            parts.append({"type": "text", "content": part} if isinstance(part, str) else
                         {"type": "blob", "modality": "image",
                          "mime_type": f"image/{part.format}", "content": "(not recorded)"})
    elif m.content:
        parts.append({"type": "text", "content": m.content})
    for call in m.tool_calls:
        parts.append({"type": "tool_call", "id": call.id, "name": call.name,
                      "arguments": call.arguments})
    return {"role": m.role, "parts": parts}


def _server(target: Target, settings: Settings) -> tuple[str, int]:
    """(server.address, server.port) of a target's backend; ("", 0) in-process."""
    options = dict(target.options)
    if target.kind == "openai":
        url = urlsplit(options.get("base_url") or settings.upstream_base_url)
        return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    if target.kind == "bedrock":
        endpoint = options.get("endpoint_url", "")
        if endpoint:
            url = urlsplit(endpoint)
            return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        region = options.get("region") or settings.bedrock_region
        return (f"bedrock-runtime.{region}.amazonaws.com", 443) if region else ("", 0)
    return "", 0


def _error_type(e: BaseException) -> str:
    if isinstance(e, StreamgateError):
        return e.code or e.type
    return type(e).__qualname__


def _disconnected(status: int, outcome: Outcome) -> bool:
    """As the request log says it (telemetry.py): a 200 that ended with neither a finish
    reason nor an error, or the dev server's 499."""
    return (outcome.model is not None and status == 200 and outcome.error is None
            and outcome.finish_reason is None) or status == 499


def _headers(event: Mapping[str, Any] | None) -> dict[str, str]:
    raw = event.get("headers") if isinstance(event, Mapping) else None
    if not isinstance(raw, Mapping):
        return {}
    return {k.lower(): v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def _request_line(event: Mapping[str, Any] | None,
                  headers: Mapping[str, str]) -> tuple[str, str, str]:
    """(method, path, host) of a Function URL (v2) or REST (v1) event, as far as it has them."""
    if not isinstance(event, Mapping):
        return "HTTP", "", ""
    context = event.get("requestContext")
    http = context.get("http") if isinstance(context, Mapping) else None
    method = (http.get("method") if isinstance(http, Mapping) else None) \
        or event.get("httpMethod")
    path = event.get("rawPath") or event.get("path")
    host = (context.get("domainName") if isinstance(context, Mapping) else None) \
        or headers.get("host", "")
    return (str(method).upper()[:32] if isinstance(method, str) else "HTTP",
            str(path)[:2048] if isinstance(path, str) else "",
            str(host).split(":")[0][:256] if isinstance(host, str) else "")


def _xray_context(header: str | None) -> SpanContext | None:
    """The span context an X-Ray trace header names (its root and parent), or None."""
    if not header:
        return None
    root, parent = _XRAY.search(header), _XRAY_PARENT.search(header)
    if root is None or parent is None:
        return None
    return SpanContext(
        trace_id=int(root.group(1) + root.group(2), 16), span_id=int(parent.group(1), 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if _XRAY_SAMPLED.search(header)
                               else TraceFlags.DEFAULT))

