"""The pipeline: HTTP event → validated request → provider deltas → OpenAI chunks → SSE bytes.

Both drivers (the Lambda runtime loop and the local dev server) call :meth:`App.handle` and
write the :class:`Response` it returns: the status and headers first, then each body item as
one write. Everything that can fail before the first byte is done before ``handle`` returns
(including reading the provider's first delta), so it becomes a real HTTP status. After that
the body generator reports failures as one in-band SSE error event and records them in
``Response.outcome`` so a driver can add trailers; it never raises, except ``GeneratorExit``
when a driver closes it because the client went away.

A request from a browser page of an origin that is neither the server's own nor allowed
(``Settings.cors_origins``) is refused 403 before anything else is looked at (see cors.py): CORS
only keeps such a page from reading the answer, not from spending the model.

Nothing a client sends makes ``handle`` raise: whatever escapes the pipeline becomes a 500
with an OpenAI body. Every request has a :class:`~streamgate.deadline.Deadline` (the Lambda
deadline minus the margin, or the dev server's request timeout); a request whose deadline has
already passed is answered 504 before it is admitted or reaches a model, and every wait in
the provider ends by it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

from streamgate import cors, playground, sse
from streamgate.auth import Admission, Caller, Gate
from streamgate.chunks import ChunkBuilder, tool_call_object
from streamgate.config import Settings, load_settings
from streamgate.deadline import NO_DEADLINE, Deadline
from streamgate.errors import (
    InternalError,
    MethodNotAllowedError,
    NotFoundError,
    OriginNotAllowedError,
    StreamgateError,
    UpstreamError,
    from_exception,
)
from streamgate.events import HttpRequest, parse_event
from streamgate.providers import (
    Delta,
    Finish,
    FinishReason,
    Provider,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from streamgate.providers import create_provider as _create_provider
from streamgate.routes import Route, Router
from streamgate.telemetry import Telemetry
from streamgate.validation import ChatRequest, check_supported, decode_body, parse_request

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
_ROUTES = {CHAT_PATH: "POST", MODELS_PATH: "GET", HEALTH_PATH: "GET"}
# Not part of the API (nor of openapi.yaml): the playground page, when Settings.playground.
PLAYGROUND_PATH = "/"

SSE_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
JSON_HEADERS = {"content-type": "application/json", "cache-control": "no-store"}
# Which of the model's backends (a route target's name) served the answer.
BACKEND_HEADER = "x-streamgate-backend"
# On every response: nothing here is a page to render, frame, sniff or refer from (the
# playground brings its own Content-Security-Policy, which lets exactly that page run).
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "strict-transport-security": "max-age=31536000",
}
# What of an event's or a runtime's request id may travel in a header: 128 plain characters.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class LambdaContext(Protocol):
    """The part of the Lambda context object the pipeline uses."""

    aws_request_id: str

    def get_remaining_time_in_millis(self) -> int: ...


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in while the body streams; telemetry reads it when
    the response is closed."""

    request_id: str = ""
    method: str = ""
    path: str = ""
    stream: bool = False
    caller: str = ""  # key id or IAM ARN, never a key
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    trace: Any = None  # the provider call's X-Ray subsegment, when tracing
    # The route's target that answered, and the targets skipped or failed before it.
    backend: str | None = None
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    # Only with STREAMGATE_LOG_CONTENT (debugging): the text in and out.
    prompt_text: str | None = None
    completion_text: list[str] = field(default_factory=list)
    model: str | None = None
    error: StreamgateError | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    chunks: int = 0
    # What the provider produced (content deltas and their characters), to charge a stream
    # that ended without usage.
    deltas: int = 0
    produced_chars: int = 0


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    # One item per write: one SSE event each for streams, the whole document otherwise.
    body: Iterator[bytes]
    outcome: Outcome = field(default_factory=Outcome)
    # Runs once when the response is closed: charges the caller's usage, ends the trace, and
    # writes the request's log record and metrics.
    on_close: Callable[[], None] | None = None

    def close(self) -> None:
        """Drivers call this when the response is over (written, failed, or the client went
        away): it stops generation and frees the provider, then records usage."""
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            on_close, self.on_close = self.on_close, None
            if on_close is not None:
                try:
                    on_close()
                except Exception:
                    logger.exception("could not finish the request's accounting")


class App:
    """One configured service: settings plus a router (the routes document's, or the one
    provider's models as one-target routes) built on first use."""

    def __init__(self, settings: Settings, provider: Provider | None = None, *,
                 gate: Gate | None = None, router: Router | None = None) -> None:
        self.settings = settings
        self._router = router or (Router(settings, provider) if provider is not None else None)
        self.gate = gate or Gate(settings)
        self.telemetry = Telemetry(settings)
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, *, defaults: Mapping[str, str] | None = None) -> App:
        return cls(load_settings(defaults=defaults))

    @property
    def router(self) -> Router:
        if self._router is None:
            with self._lock:
                if self._router is None:
                    s = self.settings
                    self._router = (Router(s) if s.routed
                                    else Router(s, _create_provider(s)))
        return self._router

    def default_model(self) -> str:
        """The model used when a request names none: configuration, else the first route's
        (the provider's default without routes)."""
        return self.settings.default_model or self.router.default_model()

    def handle(self, event: Mapping[str, Any], context: LambdaContext | None = None, *,
               deadline: Deadline | None = None, own_origin: str | None = None) -> Response:
        """Run one request through the pipeline; see the module docstring for the contract.
        ``deadline`` defaults to the Lambda context's (none outside Lambda); ``own_origin``,
        the origin of the pages this server serves ("" for none), to the event's domain over
        HTTPS (the Function URL's)."""
        outcome = Outcome(request_id=_request_id(event, context))
        try:
            cors_headers, preflight = _rest_api_cors(self.settings, event, outcome)
            if preflight:
                response, admission = Response(204, {}, iter([]), outcome), None
            else:
                response, admission = self._handle(
                    event, context, outcome,
                    deadline if deadline is not None else _deadline(context, self.settings),
                    own_origin)
            response.headers.update(cors_headers)
        except Exception:  # a bug: still an answer, never an exception in a driver
            logger.exception("unhandled error building the response")
            response = error_response(
                InternalError("The server had an error while processing your request."),
                outcome=outcome)
            admission = None
        if outcome.method == "HEAD":  # no answer to HEAD has a body, not even an error
            _close_body(response.body)
            response.body = iter(())
        return self._finalise(response, outcome, admission)

    def refuse(self, err: StreamgateError) -> Response:
        """An error the driver found before there was an event (the dev server at its limit,
        a request it could not read), answered and recorded like any other."""
        outcome = Outcome(request_id=uuid.uuid4().hex)
        return self._finalise(error_response(err, outcome=outcome), outcome, None)

    def _finalise(self, response: Response, outcome: Outcome,
                  admission: Admission | None) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers["x-request-id"] = outcome.request_id
        # Bound to the outcome, not the response: no reference cycle, so an abandoned response
        # is still closed (freeing the provider) as soon as it is dropped.
        response.on_close = partial(self._closed, response.status, response.outcome, admission)
        return response

    def _closed(self, status: int, outcome: Outcome, admission: Admission | None) -> None:
        """The request is over: charge its usage, end its trace, log and count it."""
        try:
            if admission is not None:
                admission.settle(outcome)
        finally:
            self.telemetry.end_provider_call(outcome.trace, outcome)
            self.telemetry.finish(status, outcome)

    def _handle(self, event: Mapping[str, Any], context: LambdaContext | None,
                outcome: Outcome, deadline: Deadline,
                own_origin: str | None) -> tuple[Response, Admission | None]:
        wants_sse = False
        admission: Admission | None = None
        try:
            request = parse_event(event)
            outcome.method, outcome.path = request.method, request.path
            # A page from another origin may send a simple POST without asking (cors.py):
            # refused here, before any route, key lookup or model call.
            origin = request.headers.get("origin")
            own = (own_origin if own_origin is not None
                   else cors.function_url_origin(request.domain))
            if not cors.origin_allowed(self.settings.cors_origins, origin, own):
                raise OriginNotAllowedError(
                    f"Requests from the origin {origin!r} are not allowed: browsers may call "
                    "this server only from its own pages and the allowed CORS origins")
            if request.path == PLAYGROUND_PATH and self.settings.playground:
                if request.method not in ("GET", "HEAD"):
                    raise MethodNotAllowedError(
                        f"Method {request.method} is not allowed on /; use GET",
                        allow="GET, HEAD")
                return _playground(outcome), None
            allowed = _ROUTES.get(request.path)
            if allowed is None:
                raise NotFoundError(f"Unknown path {request.path!r}; try POST {CHAT_PATH}")
            # HEAD wherever GET works (RFC 9110 §9.3.2): GET's answer, its body dropped below.
            if request.method != allowed and (request.method, allowed) != ("HEAD", "GET"):
                raise MethodNotAllowedError(
                    f"Method {request.method} is not allowed on {request.path}; use {allowed}",
                    allow="GET, HEAD" if allowed == "GET" else allowed,
                )
            if request.path == HEALTH_PATH:
                return _json(200, {"status": "ok", "provider": self.settings.provider},
                             outcome), None
            # Who is calling is settled before the body is even read.
            caller = self.gate.authenticate(request)
            outcome.caller = caller.key.id if caller.key is not None else caller.principal
            if request.path == MODELS_PATH:
                return _json(200, self._models(caller), outcome), None
            data = decode_body(request.body, self.settings)
            wants_sse = data.get("stream") is True and _accepts_sse(request)
            chat = parse_request(data, self.settings)
            outcome.stream = chat.stream
            if self.settings.log_content:
                outcome.prompt_text = "\n".join(m.content for m in chat.messages)
            model, route = self._resolve_model(chat)
            self.gate.authorize(caller, model)
            if chat.max_tokens is None:
                chat = replace(chat, max_tokens=self.settings.default_max_tokens)
            outcome.model = model
            deadline.check()  # no time left: admit nothing, start no model call
            admission = self.gate.admission(caller, chat, model)
            admission.take()
            response = self._chat(chat, route, deadline, outcome)
        except Exception as e:
            err = from_exception(e)
            if not isinstance(e, StreamgateError):
                logger.exception("unhandled error before the first byte")
            response = error_response(err, sse_event=wants_sse, outcome=outcome)
        if admission is not None:
            response.headers.update(admission.headers())
        return response, admission

    def _models(self, caller: Caller) -> dict[str, Any]:
        router = self.router
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0,
                 "owned_by": router.owner(router.route(m))}
                for m in self.gate.allowed_models(caller, router.models())
            ],
        }

    def _resolve_model(self, chat: ChatRequest) -> tuple[str, Route]:
        """The public model and its route (404 if none), the request checked against what
        the route's first target honours."""
        model = chat.model or self.default_model()
        route = self.router.route(model)
        check_supported(chat, self.router.capabilities(route))
        return model, route

    def _chat(self, chat: ChatRequest, route: Route, deadline: Deadline,
              outcome: Outcome) -> Response:
        builder = ChunkBuilder(route.name, include_usage=chat.include_usage)
        outcome.trace = self.telemetry.begin_provider_call(route.name)
        # The route's targets are tried until one gives its first delta: a failure before
        # that (throttled, bad model, unreachable) becomes a real HTTP error.
        deltas = self.router.open(route, chat, deadline, attempts=outcome.fallbacks)
        outcome.backend = deltas.target.name
        headers = {BACKEND_HEADER: deltas.target.name}
        try:
            first = next(deltas, None)
            if not chat.stream:
                body = _complete(first, deltas, builder, outcome, deadline)
                return Response(200, {**JSON_HEADERS, **headers}, iter([body]), outcome)
        except BaseException:
            _close(deltas)
            raise
        return Response(200, {**SSE_HEADERS, **headers},
                        _stream(first, deltas, builder, outcome, deadline), outcome)


def _observe(
    first: Delta | None, deltas: Iterator[Delta], outcome: Outcome, deadline: Deadline
) -> Iterator[TextDelta | ReasoningDelta | ToolCallDelta | Finish]:
    """The provider's deltas with the checks both response kinds share: the deadline before
    each one, finish reason and usage recorded in ``outcome``, and a finish reason required."""
    log_content = outcome.prompt_text is not None  # set only when content is logged
    delta = first
    while delta is not None:
        deadline.check()  # stop before the Lambda deadline rather than be killed mid-write
        if isinstance(delta, Usage):
            outcome.usage = delta
        else:
            if isinstance(delta, Finish):
                outcome.finish_reason = delta.reason
            else:
                if outcome.first_token_at is None:
                    outcome.first_token_at = time.monotonic()
                text = delta.arguments if isinstance(delta, ToolCallDelta) else delta.text
                outcome.deltas += 1
                outcome.produced_chars += len(text)
                if log_content:
                    outcome.completion_text.append(text)
            yield delta
        delta = next(deltas, None)
    if outcome.finish_reason is None:
        raise UpstreamError("The model stream ended without a finish reason")


def _stream(
    first: Delta | None,
    deltas: Iterator[Delta],
    builder: ChunkBuilder,
    outcome: Outcome,
    deadline: Deadline,
) -> Iterator[bytes]:
    """SSE events for one completion; failures end it with one in-band error event."""
    try:
        for delta in _observe(first, deltas, outcome, deadline):
            if isinstance(delta, Finish):
                chunk = builder.finish(delta.reason)
            elif isinstance(delta, ToolCallDelta):
                chunk = builder.tool_call(delta)
            elif not delta.text:
                continue
            elif isinstance(delta, ReasoningDelta):
                chunk = builder.reasoning(delta.text)
            else:
                chunk = builder.text(delta.text)
            outcome.chunks += 1
            yield sse.data_event(chunk)
        if builder.include_usage and outcome.usage is not None:
            yield sse.data_event(builder.usage(outcome.usage))
        yield sse.DONE
    except Exception as e:
        err = from_exception(e)
        if not isinstance(e, StreamgateError):
            logger.exception("unhandled error after the first byte")
        outcome.error = err
        yield sse.data_event(err.body())
    finally:
        _close(deltas)


def _complete(
    first: Delta | None,
    deltas: Iterator[Delta],
    builder: ChunkBuilder,
    outcome: Outcome,
    deadline: Deadline,
) -> bytes:
    """The whole ``chat.completion`` document, the same deltas joined; any failure is a real
    status."""
    text: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for delta in _observe(first, deltas, outcome, deadline):
        if isinstance(delta, TextDelta):
            text.append(delta.text)
        elif isinstance(delta, ReasoningDelta):
            reasoning.append(delta.text)
        elif isinstance(delta, ToolCallDelta):
            call = calls.get(delta.index)
            if call is None:
                calls[delta.index] = tool_call_object(
                    delta.index, delta.id or "", delta.name or "", delta.arguments)
            else:
                call["function"]["arguments"] += delta.arguments
    assert outcome.finish_reason is not None  # _observe guarantees it
    doc = builder.completion(
        "".join(text), outcome.finish_reason, outcome.usage,
        reasoning="".join(reasoning), tool_calls=[calls[i] for i in sorted(calls)])
    return sse.json_bytes(doc)


def error_response(err: StreamgateError, *, sse_event: bool = False,
                   outcome: Outcome | None = None) -> Response:
    """An error before the first byte: real status, OpenAI body, as JSON or one SSE event."""
    headers = dict(SSE_HEADERS if sse_event else JSON_HEADERS)
    headers.update(err.headers())
    body = sse.data_event(err.body()) if sse_event else sse.json_bytes(err.body())
    outcome = outcome or Outcome()
    outcome.error = err
    return Response(err.status, headers, iter([body]), outcome)


def _playground(outcome: Outcome) -> Response:
    html, policy = playground.page()
    headers = {"content-type": "text/html; charset=utf-8", "cache-control": "no-cache",
               "content-security-policy": policy}
    return Response(200, headers, iter([html]), outcome)


def _json(status: int, doc: Mapping[str, Any], outcome: Outcome) -> Response:
    return Response(status, dict(JSON_HEADERS), iter([sse.json_bytes(doc)]), outcome)


def _rest_api_cors(settings: Settings, event: Mapping[str, Any],
                   outcome: Outcome) -> tuple[dict[str, str], bool]:
    """CORS headers for a REST API (v1) event from an allowed origin, and whether it is a
    preflight to answer with them alone. The Function URL adds its own (Function URL events
    get none here); the REST API passes OPTIONS and CORS to the function."""
    if (not settings.cors_origins or not isinstance(event, Mapping)
            or "httpMethod" not in event):
        return {}, False
    try:
        request = parse_event(event)
    except StreamgateError:
        return {}, False  # the pipeline answers it
    preflight = cors.is_preflight(request.method, request.headers) and request.path in _ROUTES
    headers = cors.cors_headers(settings.cors_origins, request.headers.get("origin"),
                                preflight=preflight)
    if preflight and headers:
        outcome.method, outcome.path = request.method, request.path
    return headers, preflight and bool(headers)


def _accepts_sse(request: HttpRequest) -> bool:
    """False when the client's Accept header asks for JSON (the OpenAI SDKs send that)."""
    accept = request.headers.get("accept", "")
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return "application/json" not in types


def _request_id(event: Mapping[str, Any], context: LambdaContext | None) -> str:
    """Lambda's request id (what its logs carry), else the event's, else a new one; only one
    that is safe in a header and a log line."""
    candidates: list[object] = []
    if context is not None:
        candidates.append(context.aws_request_id)
    request_context = event.get("requestContext") if isinstance(event, Mapping) else None
    if isinstance(request_context, Mapping):
        candidates.append(request_context.get("requestId"))
    for candidate in candidates:
        if isinstance(candidate, str) and _REQUEST_ID.fullmatch(candidate):
            return candidate
    return uuid.uuid4().hex


def _deadline(context: LambdaContext | None, settings: Settings) -> Deadline:
    """When generation must stop: the Lambda deadline less the margin (none outside Lambda)."""
    if context is None:
        return NO_DEADLINE
    remaining_ms = context.get_remaining_time_in_millis() - settings.deadline_margin_ms
    return Deadline(time.monotonic() + remaining_ms / 1000)


def _close_body(body: Iterator[bytes]) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


def _close(deltas: Iterator[Delta]) -> None:
    close = getattr(deltas, "close", None)
    if close is not None:
        close()


_default_app: App | None = None


def handler(event: Mapping[str, Any], context: LambdaContext | None = None) -> Response:
    """Entry point for the Lambda runtime loop: the app configured from the environment."""
    global _default_app
    if _default_app is None:
        _default_app = App.from_env()
    return _default_app.handle(event, context)
