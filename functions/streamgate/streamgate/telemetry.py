"""Per-request logs, metrics and traces, with Powertools for AWS Lambda.

Each request ends with exactly one structured JSON log record (``"message": "request"``) and
one set of CloudWatch metrics in Embedded Metric Format, both written to stdout when the
response is closed: after its last byte, an error, the deadline, or the client going away. So
the failure paths are recorded like the rest. Prompt and completion text are never logged unless
``STREAMGATE_LOG_CONTENT`` says so.

Metrics (namespace ``Streamgate``, dimension ``service``): ``Requests``, ``Duration``,
``TimeToFirstToken``, ``TokensPerSecond``, ``InputTokens``, ``OutputTokens``, ``Errors``,
``Throttles``, ``Disconnects``, ``Fallbacks`` (route targets skipped or failed); and, in blobs
of their own, ``Responses`` by ``Status`` (what the client saw) and ``ErrorsByType`` by
``ErrorType``.

With ``STREAMGATE_TRACING`` each request is an OpenTelemetry trace exported over OTLP: a server
span for the request, a client span per provider call (streamgate/tracing.py, which alone
imports OpenTelemetry, and only then; the export itself is streamgate/otlp.py). Without it
nothing of OpenTelemetry is imported.

Concurrency (the dev server's threads, and the Lambda loop's workers on Lambda Managed
Instances): what belongs to one request is that request's own - its metric set is built and
flushed per request, its spans are tied to it by explicit parents, and its trace header (the
log field ``xray_trace_id``, the X-Ray trace its spans continue or link to) is read from the
thread serving it (:func:`streamgate.config.trace_id`), never from the process-wide
``_X_AMZN_TRACE_ID``. What is shared is the Powertools logger and stdout:
every line we write goes out in one piece under one lock, so concurrent requests' records and
EMF blobs never interleave within a line.
"""

from __future__ import annotations

import contextvars
import io
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import IO, TYPE_CHECKING, Any, cast

from streamgate.config import trace_id

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.outcome import Outcome
    from streamgate.routes import Target
    from streamgate.validation import ChatRequest

SERVICE = "streamgate"
_lock = threading.Lock()  # builds the shared logger once
# Held for each write of a whole line to stdout (a log record, an EMF blob): print() writes a
# line's text and its newline separately, so threads could otherwise splice their lines.
# Reentrant: nothing written under it may wait for it again.
_output = threading.RLock()
_logger: Any = None


class _Stdout(io.TextIOBase):
    """``sys.stdout`` looked up at each write: Lambda ships stdout to CloudWatch, and a test's
    capture of it sees what CloudWatch would."""

    def write(self, text: str) -> int:
        with _output:
            return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def logger() -> Any:
    """The Powertools logger, the ``streamgate`` logger of the logging tree: every module's
    ``logging.getLogger(__name__)`` writes through it as JSON."""
    global _logger
    if _logger is None:
        with _lock:
            if _logger is None:
                from aws_lambda_powertools import Logger

                _logger = Logger(service=SERVICE, stream=cast("IO[str]", _Stdout()),
                                 logger_formatter=_formatter())
                _logger.append_keys(name="%(name)s")  # which module logged it
    return _logger


def _formatter() -> Any:
    """Powertools' JSON formatter, its ``xray_trace_id`` field read from the thread's own
    invocation: Powertools reads the process-wide ``_X_AMZN_TRACE_ID``
    (``LambdaPowertoolsFormatter._get_latest_trace_id``, 3.37), which names whichever
    invocation set it last when several run at once."""
    from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

    class PerRequestTraceFormatter(LambdaPowertoolsFormatter):
        def _get_latest_trace_id(self) -> str | None:
            if self.log_format.get("xray_trace_id", "") is None:
                return None  # the field is turned off
            header = trace_id()
            return header.split(";")[0].replace("Root=", "") if header else None

    return PerRequestTraceFormatter()


def bind_request(request_id: str | None) -> None:
    """Every line the calling thread logs from now on carries ``function_request_id`` (the
    field Powertools' ``inject_lambda_context`` uses), until the next call; ``None`` removes
    it. For drivers serving several invocations at once, whose lines interleave."""
    log = logger()
    if request_id is None:
        # Not thread_safe_remove_keys: Powertools (3.37) pops the key from the context's dict in
        # place, and that dict is also the one a thread started with this context (a Bedrock
        # reader, copy_context) still logs with: its last lines would lose the id. Clearing sets
        # a new dict, leaving theirs alone.
        rest = {k: v for k, v in log.thread_safe_get_current_keys().items()
                if k != "function_request_id"}
        log.thread_safe_clear_keys()
        if rest:
            log.thread_safe_append_keys(**rest)
    else:
        log.thread_safe_append_keys(function_request_id=request_id)


class Telemetry:
    def __init__(self, settings: Settings) -> None:
        self.provider = settings.provider
        self.namespace = settings.metrics_namespace
        self.metrics_enabled = settings.metrics
        self.log_content = settings.log_content
        self.tracing: Any = None  # streamgate.tracing.Tracing, with STREAMGATE_TRACING
        self._log = logger()
        if settings.tracing:
            from streamgate import tracing
            from streamgate.config import load_otlp_settings

            self.tracing = tracing.Tracing(settings, load_otlp_settings())

    # -- tracing (streamgate/tracing.py); each call a no-op without tracing, none raises -----

    def begin_request(self, event: Mapping[str, Any] | None, request_id: str) -> Any:
        """The request's server span (a ``tracing.RequestTrace``), or None."""
        if self.tracing is None:
            return None
        try:
            return self.tracing.begin_request(event, trace_id(), request_id)
        except Exception:  # noqa: BLE001 - tracing must never fail a request
            logging.getLogger(__name__).warning("could not start the request's span",
                                                exc_info=True)
            return None

    def provider_call(self, trace: Any, operation: str, chat: ChatRequest | None,
                      response_id: str) -> Callable[[Target], AbstractContextManager[None]] | None:
        """What :meth:`Router.open` calls around each provider call it makes (one client span
        each, ``gen_ai.operation.name`` = ``operation``), or None."""
        if trace is None:
            return None
        try:
            return cast("Callable[[Target], AbstractContextManager[None]]",
                        trace.provider_call(operation, chat, response_id))
        except Exception:  # noqa: BLE001
            logging.getLogger(__name__).warning("could not trace the provider call",
                                                exc_info=True)
            return None

    def end_request(self, trace: Any, status: int, outcome: Outcome) -> None:
        """End the request's spans (the answering call's, then the request's) from what the
        outcome says; they leave with the next export, never on this thread."""
        if trace is None:
            return
        try:
            trace.end(status, outcome)
        except Exception:  # noqa: BLE001
            logging.getLogger(__name__).warning("could not end the request's spans",
                                                exc_info=True)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for the spans ended so far to be exported, at most ``timeout_s`` (default
        ``STREAMGATE_TRACING_FLUSH_TIMEOUT_MS``): the Lambda loop calls it after a response
        is written, before the environment may be frozen."""
        if self.tracing is None:
            return
        try:
            limit = self.tracing.otlp.flush_timeout_s
            self.tracing.flush(limit if timeout_s is None else min(limit, timeout_s))
        except Exception:  # noqa: BLE001
            logging.getLogger(__name__).warning("could not flush the spans", exc_info=True)

    def shutdown(self) -> None:
        """Export what is left and stop the exporter's thread (tests, the dev server's exit)."""
        if self.tracing is not None:
            self.tracing.shutdown()

    # -- the record of one request ---------------------------------------------------------

    def finish(self, status: int, outcome: Outcome) -> None:
        """Log and count one finished request. Never raises."""
        try:
            self._finish(status, outcome)
        except Exception:  # noqa: BLE001
            logging.getLogger(__name__).exception("could not record the request's telemetry")

    def _finish(self, status: int, outcome: Outcome) -> None:
        ended = time.monotonic()
        duration_ms = (ended - outcome.started) * 1000
        ttft_ms = (None if outcome.first_token_at is None
                   else (outcome.first_token_at - outcome.started) * 1000)
        err = outcome.error
        # A 200 that ended with neither a finish reason nor an error: the client left; or it
        # left before the answer began (the dev server sees that).
        disconnected = (outcome.model is not None and status == 200 and err is None
                        and outcome.finish_reason is None and outcome.operation == "chat"
                        ) or status == 499
        record: dict[str, Any] = {
            "request_id": outcome.request_id, "method": outcome.method, "path": outcome.path,
            "status": status, "key_id": outcome.caller or None, "provider": self.provider,
            "model": outcome.model, "operation": outcome.operation, "stream": outcome.stream,
            "ttft_ms": None if ttft_ms is None else round(ttft_ms, 1),
            "duration_ms": round(duration_ms, 1),
            "prompt_tokens": outcome.usage.prompt_tokens if outcome.usage else None,
            "completion_tokens": outcome.usage.completion_tokens if outcome.usage else None,
            "finish_reason": outcome.finish_reason,
            "error_type": err.type if err else None, "error_code": err.code if err else None,
            "disconnected": disconnected,
        }
        if outcome.backend is not None:
            record["backend"] = outcome.backend  # the route target that answered
        if outcome.fallbacks:
            record["fallbacks"] = outcome.fallbacks  # targets skipped or failed before it
        if self.log_content:
            record["prompt"] = outcome.prompt_text
            record["completion"] = "".join(outcome.completion_text)
        level = logging.ERROR if status >= 500 or (err is not None and err.status >= 500) \
            else logging.INFO
        self._log.log(level, "request", extra=record)
        if self.metrics_enabled:
            self._count(status, outcome, duration_ms, ttft_ms, ended, disconnected)

    def _count(self, status: int, outcome: Outcome, duration_ms: float, ttft_ms: float | None,
               ended: float, disconnected: bool) -> None:
        from aws_lambda_powertools import single_metric
        from aws_lambda_powertools.metrics import MetricUnit
        from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import (
            AmazonCloudWatchEMFProvider,
        )

        err = outcome.error
        throttled = status == 429 or (err is not None and err.status == 429)
        # This request's own metric set. Powertools' Metrics keeps one set in class attributes,
        # shared by every instance: with requests finishing at once in several threads, one's
        # metrics would ride in another's flush. Its EMF provider, used directly, holds its own.
        metrics = AmazonCloudWatchEMFProvider(namespace=self.namespace, service=SERVICE)
        metrics.add_metric("Requests", MetricUnit.Count, 1)
        metrics.add_metric("Duration", MetricUnit.Milliseconds, duration_ms)
        metrics.add_metric("Errors", MetricUnit.Count, 0 if err is None else 1)
        metrics.add_metric("Throttles", MetricUnit.Count, 1 if throttled else 0)
        metrics.add_metric("Disconnects", MetricUnit.Count, 1 if disconnected else 0)
        metrics.add_metric("Fallbacks", MetricUnit.Count, len(outcome.fallbacks))
        if ttft_ms is not None:
            metrics.add_metric("TimeToFirstToken", MetricUnit.Milliseconds, ttft_ms)
        usage = outcome.usage
        if usage is not None:
            metrics.add_metric("InputTokens", MetricUnit.Count, usage.prompt_tokens)
            metrics.add_metric("OutputTokens", MetricUnit.Count, usage.completion_tokens)
            if outcome.first_token_at is not None and usage.completion_tokens > 0:
                generating = ended - outcome.first_token_at
                if generating > 0:
                    metrics.add_metric("TokensPerSecond", MetricUnit.CountPerSecond,
                                       usage.completion_tokens / generating)
        metrics.add_metadata("request_id", outcome.request_id)
        metrics.add_metadata("provider", self.provider)
        if outcome.model:
            metrics.add_metadata("model", outcome.model)
        dimensions = {"service": SERVICE}
        # Powertools print()s each blob (its text, then the newline): whole lines only if no
        # other thread writes between the two.
        with _output:
            metrics.flush_metrics()
            with single_metric(name="Responses", unit=MetricUnit.Count, value=1,
                               namespace=self.namespace,
                               default_dimensions=dimensions) as responses:
                responses.add_dimension("Status", str(status))
            if err is not None:
                with single_metric(name="ErrorsByType", unit=MetricUnit.Count, value=1,
                                   namespace=self.namespace,
                                   default_dimensions=dimensions) as errors:
                    errors.add_dimension("ErrorType", err.code or err.type)



# The W3C trace context of the provider call being opened on this thread (tracing.py sets it),
# for the OpenAI-compatible provider's request headers. A context variable: each thread, and
# each request on it, sees only its own.
_TRACE_HEADERS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "streamgate_trace_headers", default=None)


def trace_headers() -> Mapping[str, str]:
    """``traceparent`` (and ``tracestate``) of the provider call being opened on this thread;
    empty without tracing or outside a provider call."""
    return _TRACE_HEADERS.get() or {}


def announce_trace_headers(
        headers: Mapping[str, str]) -> contextvars.Token[Mapping[str, str] | None]:
    return _TRACE_HEADERS.set(dict(headers))


def forget_trace_headers(token: contextvars.Token[Mapping[str, str] | None]) -> None:
    _TRACE_HEADERS.reset(token)
