"""The pipeline: HTTP event → a dialect's request → provider deltas → the dialect's events → bytes.

The path picks the API dialect (streamgate/dialects/: Chat Completions, Responses): it parses
the body into the provider-neutral request and encodes the answer and its errors; everything
between (keys, limits, routes and providers, deadlines, telemetry) is the same for all of them.
Embeddings (``POST /v1/embeddings``) are a dialect whose operation is not a chat stream: after
the same steps (key, model and route, authorization, admission of its input tokens with no
output, the deadline) :meth:`App._embed` makes one routed call and answers one document.

Both drivers (the Lambda runtime loop and the local dev server) call :meth:`App.handle` and
write the :class:`Response` it returns: the status and headers first, then each body item as
one write. Everything that can fail before the first byte is done before ``handle`` returns
(including reading the provider's first delta), so it becomes a real HTTP status. After that
the body generator reports failures as one in-band error event of its dialect and records them
in ``Response.outcome`` so a driver can add trailers; it never raises, except ``GeneratorExit``
when a driver closes it because the client went away.

A request from a browser page of an origin that is neither the server's own nor allowed
(``Settings.cors_origins``) is refused 403 before anything else is looked at (see cors.py): CORS
only keeps such a page from reading the answer, not from spending the model.

Nothing a client sends makes ``handle`` raise: whatever escapes the pipeline becomes a 500
with an error body of the request's dialect. Every request has a
:class:`~streamgate.deadline.Deadline` (the Lambda deadline minus the margin, or the dev
server's request timeout); a request whose deadline has already passed is answered 504 before
it is admitted or reaches a model, and every wait in the provider ends by it.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, cast

from streamgate import cors, playground, sse
from streamgate.auth import Admission, Caller, Gate
from streamgate.config import Settings, load_settings
from streamgate.deadline import NO_DEADLINE, Deadline, bound
from streamgate.dialects import Answer, AnswerCall, Call, Dialect, Encoder
from streamgate.dialects.chat import ChatDialect
from streamgate.dialects.embeddings import EmbeddingsDialect, EmbeddingsParsed
from streamgate.errors import (
    InternalError,
    MethodNotAllowedError,
    NotFoundError,
    OriginNotAllowedError,
    RequestError,
    StreamgateError,
    UpstreamError,
    from_exception,
)
from streamgate.events import HttpRequest, parse_event
from streamgate.outcome import Outcome
from streamgate.providers import (
    Batch,
    Delta,
    Finish,
    NativeDelta,
    Provider,
    ReasoningDelta,
    TextDelta,
    TokenCounter,
    ToolCallDelta,
    Usage,
)
from streamgate.providers import create_provider as _create_provider
from streamgate.providers.embedding import EmbeddingRequest, create_embedder
from streamgate.relay import HAND_BACK, RELAYING, Pending
from streamgate.routes import Route, RoutedStream, Router
from streamgate.telemetry import Telemetry
from streamgate.validation import (
    CAP_COUNT_TOKENS,
    ChatRequest,
    check_supported,
    decode_body,
)

logger = logging.getLogger(__name__)

MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
# Not part of the API (nor of openapi.yaml): the playground page, when Settings.playground.
PLAYGROUND_PATH = "/"
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


# What a POST path speaks: a chat dialect, or embeddings (one call, not a stream).
Served = Dialect | EmbeddingsDialect


def dialects(settings: Settings) -> tuple[Served, ...]:
    """The API dialects this service speaks, each on its own POST path."""
    from streamgate.dialects.anthropic import MessagesDialect
    from streamgate.dialects.responses import ResponsesDialect

    return (ChatDialect(settings), ResponsesDialect(settings), MessagesDialect(settings),
            EmbeddingsDialect(settings))


def routes(served: tuple[Served, ...]) -> dict[str, tuple[str, ...]]:
    """Every path the API serves (as openapi.yaml and the template spell it) → its methods."""
    table: dict[str, tuple[str, ...]] = {MODELS_PATH: ("GET",), HEALTH_PATH: ("GET",)}
    for dialect in served:
        table[dialect.path] = ("POST",)
        for path, methods in dialect.resources().items():
            table[path] = methods
    return table


class App:
    """One configured service: settings, the dialects it speaks, and a router (the routes
    document's, or the one provider's models as one-target routes) built on first use."""

    def __init__(self, settings: Settings, provider: Provider | None = None, *,
                 gate: Gate | None = None, router: Router | None = None) -> None:
        self.settings = settings
        self._router = router or (Router(settings, provider) if provider is not None else None)
        self.gate = gate or Gate(settings)
        self.telemetry = Telemetry(settings)
        self._lock = threading.Lock()
        self.dialects = dialects(settings)
        self._by_path = {d.path: d for d in self.dialects}
        self.routes = routes(self.dialects)

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
                                    else Router(s, _create_provider(s),
                                                embedder=create_embedder(s)))
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
        outcome.trace = self.telemetry.begin_request(event, outcome.request_id)
        try:
            cors_headers, preflight = self._rest_api_cors(event, outcome)
            if preflight:
                response, admission = Response(204, {}, iter([]), outcome), None
            else:
                limit = deadline if deadline is not None else _deadline(context, self.settings)
                # Waits deep in shared pieces (a key lookup another request started, the
                # upstream's model list) end by it too, on both drivers (deadline.current()).
                with bound(limit):
                    response, admission = self._handle(event, context, outcome, limit,
                                                       own_origin)
            response.headers.update(cors_headers)
        except Exception:  # a bug: still an answer, never an exception in a driver
            logger.exception("unhandled error building the response")
            response = self._error(
                InternalError("The server had an error while processing your request."),
                self.dialects[0], outcome)
            admission = None
        if outcome.method == "HEAD":  # no answer to HEAD has a body, not even an error
            _close_body(response.body)
            response.body = iter(())
        return self._finalise(response, outcome, admission)

    def refuse(self, err: StreamgateError, path: str = "") -> Response:
        """An error the driver found before there was an event (the dev server at its limit,
        a request it could not read), answered and recorded like any other, in the dialect
        of ``path`` when it names one."""
        outcome = Outcome(request_id=uuid.uuid4().hex, path=path)
        outcome.trace = self.telemetry.begin_request(None, outcome.request_id)
        return self._finalise(self._error(err, self._dialect_of(path), outcome), outcome, None)

    def _finalise(self, response: Response, outcome: Outcome,
                  admission: Admission | None) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers["x-request-id"] = outcome.request_id
        # A dialect whose clients read the id under another name (Anthropic's request-id).
        other = getattr(self._dialect_of(outcome.path), "request_id_header", None)
        if other:
            response.headers[other] = outcome.request_id
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
            self.telemetry.end_request(outcome.trace, status, outcome)
            self.telemetry.finish(status, outcome)

    def _dialect_of(self, path: str) -> Served:
        """The dialect whose paths ``path`` is on (its errors are that dialect's), else the
        first (Chat Completions)."""
        for dialect in self.dialects:
            if path == dialect.path or path.startswith(dialect.path + "/"):
                return dialect
        return self.dialects[0]

    def _error(self, err: StreamgateError, dialect: Served, outcome: Outcome, *,
               stream: bool = False) -> Response:
        """An error before the first byte, in the dialect's words."""
        status, headers, body = dialect.error(err, stream=stream)
        outcome.error = err
        return Response(status, headers, iter([body]), outcome)

    def _handle(self, event: Mapping[str, Any], context: LambdaContext | None,
                outcome: Outcome, deadline: Deadline,
                own_origin: str | None) -> tuple[Response, Admission | None]:
        stream = False
        admission: Admission | None = None
        dialect: Served = self.dialects[0]
        parsed: Any = None
        try:
            request = parse_event(event)
            outcome.method, outcome.path = request.method, request.path
            dialect = self._dialect_of(request.path)
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
            methods, resource = self._route(request.path, dialect)
            # HEAD wherever GET works (RFC 9110 §9.3.2): GET's answer, its body dropped below.
            if "GET" in methods:
                methods = (*methods, "HEAD")
            if request.method not in methods:
                allow = ", ".join(methods)
                raise MethodNotAllowedError(
                    f"Method {request.method} is not allowed on {request.path}; use {allow}",
                    allow=allow)
            if request.path == HEALTH_PATH:
                return _json(200, {"status": "ok", "provider": self.settings.provider},
                             outcome), None
            # Who is calling is settled before the body is even read.
            caller = self.gate.authenticate(request)
            outcome.caller = caller.key.id if caller.key is not None else caller.principal
            call = Call(outcome.caller, deadline, request)
            if request.path == MODELS_PATH:
                return _json(200, self._models(caller), outcome), None
            if request.path == getattr(dialect, "count_path", None):
                return self._count_tokens(dialect, request, caller, call, outcome), None
            if resource:
                status, doc = dialect.resource(request, call)
                return _json(status, doc, outcome), None
            outcome.dialect = dialect.name
            data = decode_body(request.body, self.settings)
            if isinstance(dialect, EmbeddingsDialect):  # one call, not a chat stream
                outcome.operation = dialect.operation
                job = dialect.parse(data, call)
                model, route = self._resolve_embedding_model(job.request)
                self.gate.authorize(caller, model)
                outcome.model = model
                deadline.check()
                admission = Admission(self.gate, caller, model, 0,
                                      job.request.estimate_tokens())
                admission.take()
                response = self._embed(dialect, job, route, deadline, outcome)
                response.headers.update(admission.headers())
                return response, admission
            stream = data.get("stream") is True and _accepts_sse(request)
            parsed = dialect.parse(data, call)
            chat = parsed.chat
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
            response = self._generate(dialect, parsed, chat, route, deadline, outcome)
        except Exception as e:
            err = from_exception(e)
            if not isinstance(e, StreamgateError):
                logger.exception("unhandled error before the first byte")
            elif parsed is not None:  # name the field as the client's dialect does
                err.param = parsed.chat.client_param(err.param)
            response = self._error(err, dialect, outcome, stream=stream)
        if admission is not None:
            response.headers.update(admission.headers())
        return response, admission

    def _route(self, path: str, dialect: Served) -> tuple[tuple[str, ...], bool]:
        """The methods ``path`` takes, and whether it is one of a dialect's resources (a
        stored object) rather than its POST path; 404 for a path nobody serves."""
        methods = self.routes.get(path)
        if methods is not None:
            return methods, path != dialect.path and path not in (MODELS_PATH, HEALTH_PATH)
        methods = dialect.resource_methods(path)
        if methods:
            return methods, True
        raise NotFoundError(f"Unknown path {path!r}; try POST {dialect.path}")

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

    def _count_tokens(self, dialect: Any, request: HttpRequest, caller: Caller,
                      call: Call, outcome: Outcome) -> Response:
        """A dialect's token count (Anthropic's ``count_tokens``): exact, from the route's
        first backend, or a 400 saying it cannot count; never an estimate. Nothing is
        generated, so nothing is charged."""
        outcome.dialect = dialect.name
        data = decode_body(request.body, self.settings)
        parsed = dialect.parse_count(data, call)
        try:
            model, route = self._resolve_model(parsed.chat)
            self.gate.authorize(caller, model)
            provider, target_model = self.router.first(route)
            if CAP_COUNT_TOKENS not in provider.capabilities or not isinstance(
                    provider, TokenCounter):
                raise RequestError(
                    f"Counting tokens is not available for the model `{model}`: its backend "
                    f"({provider.name}) gives no exact count", param="model",
                    code="count_tokens_unsupported")
            call.deadline.check()
            outcome.model = model
            tokens = provider.count_tokens(parsed.chat, target_model, call.deadline)
        except StreamgateError as e:
            e.param = parsed.chat.client_param(e.param)
            raise
        return _json(200, dialect.count_document(tokens), outcome)

    def _resolve_model(self, chat: ChatRequest) -> tuple[str, Route]:
        """The public model and its route (404 if none), the request checked against what
        the route's first target honours."""
        model = chat.model or self.default_model()
        route = self.router.route(model)
        if route.embedding is not None:
            raise RequestError(f"The model `{model}` is an embedding model: use it on POST "
                               "/v1/embeddings", param="model", code="model_not_supported")
        check_supported(chat, self.router.capabilities(route))
        return model, route

    def _resolve_embedding_model(self, request: EmbeddingRequest) -> tuple[str, Route]:
        """The public embedding model (the first one when the request names none) and its
        route; 404 for a model nobody serves, 400 for a chat model."""
        router = self.router
        model = request.model or next(
            (m for m in router.models() if router.route(m).embedding is not None), "")
        if not model:
            raise NotFoundError("This server has no embedding model", param="model",
                                code="model_not_found")
        route = router.route(model)
        if route.embedding is None:
            raise RequestError(f"The model `{model}` is not an embedding model: use it on POST "
                               "/v1/chat/completions", param="model",
                               code="model_not_supported")
        return model, route

    def _embed(self, dialect: EmbeddingsDialect, job: EmbeddingsParsed, route: Route,
               deadline: Deadline, outcome: Outcome) -> Response:
        """One routed embeddings call; its usage is what the backend counted."""
        observe = self.telemetry.provider_call(outcome.trace, "embeddings", None, "")
        target, result = self.router.embed(route, job.request, deadline,
                                           attempts=outcome.fallbacks, observe=observe)
        outcome.backend = target.name
        outcome.usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=0)
        body = dialect.document(job, route.name, result)
        return Response(200, {**dialect.headers(), BACKEND_HEADER: target.name}, iter([body]),
                        outcome)

    def _generate(self, dialect: Dialect, parsed: Any, chat: ChatRequest, route: Route,
                  deadline: Deadline, outcome: Outcome) -> Response:
        encoder = dialect.encoder(parsed, route.name)
        # Every dialect's answer is a chat inference (gen_ai.operation.name "chat").
        observe = self.telemetry.provider_call(outcome.trace, "chat", chat,
                                               _answer_id(encoder))
        # The route's targets are tried until one gives its first delta: a failure before
        # that (throttled, bad model, unreachable) becomes a real HTTP error.
        deltas = self.router.open(route, chat, deadline, attempts=outcome.fallbacks,
                                  observe=observe)
        outcome.backend = deltas.target.name
        headers = {BACKEND_HEADER: deltas.target.name}
        try:
            first = next(deltas, None)
            if not chat.stream:
                body = _complete(first, deltas, encoder, outcome, deadline)
                return Response(200, {**encoder.headers(False), **headers}, iter([body]),
                                outcome)
        except BaseException:
            _close(deltas)
            raise
        return Response(200, {**encoder.headers(True), **headers},
                        _stream(first, deltas, encoder, outcome, deadline), outcome)

    def _rest_api_cors(self, event: Mapping[str, Any],
                       outcome: Outcome) -> tuple[dict[str, str], bool]:
        """CORS headers for a REST API (v1) event from an allowed origin, and whether it is a
        preflight to answer with them alone. The Function URL adds its own (Function URL
        events get none here); the REST API passes OPTIONS and CORS to the function."""
        settings = self.settings
        if (not settings.cors_origins or not isinstance(event, Mapping)
                or "httpMethod" not in event):
            return {}, False
        try:
            request = parse_event(event)
        except StreamgateError:
            return {}, False  # the pipeline answers it
        preflight = (cors.is_preflight(request.method, request.headers)
                     and self._serves(request.path))
        headers = cors.cors_headers(settings.cors_origins, request.headers.get("origin"),
                                    preflight=preflight)
        if preflight and headers:
            outcome.method, outcome.path = request.method, request.path
        return headers, preflight and bool(headers)

    def _serves(self, path: str) -> bool:
        return path in self.routes or bool(self._dialect_of(path).resource_methods(path))


Output = TextDelta | ReasoningDelta | ToolCallDelta | NativeDelta | Finish


def _taken(first: Delta | None, deltas: Iterator[Delta]) -> Iterator[Delta]:
    """``first``, then the deltas not yet taken, from the provider's own iterator where the
    stream offers it (:meth:`RoutedStream.remaining`): no layer of ours per delta. The caller
    still closes the stream it gave."""
    if first is None:
        return iter(())
    return itertools.chain((first,), deltas.remaining() if isinstance(deltas, RoutedStream)
                           else deltas)


def _observe(delta: Delta, outcome: Outcome, log_content: bool) -> list[Output]:
    """The checks every answer shares, on one group of deltas that arrived together (one
    delta, or a :class:`~streamgate.providers.Batch`): each delta's finish reason, usage and
    output recorded in ``outcome`` as if it had come alone; the outputs to encode returned.
    The loops that call it check the deadline before each group and require a finish reason
    at the end (:func:`_finished`)."""
    group: list[Output] = []
    for piece in delta.deltas if isinstance(delta, Batch) else (delta,):
        if type(piece) is TextDelta:  # nearly every one: the same steps as below, inline
            if outcome.first_token_at is None:
                outcome.first_token_at = time.monotonic()
            outcome.deltas += 1
            outcome.produced_chars += len(piece.text)
            if log_content:
                outcome.completion_text.append(piece.text)
            group.append(piece)
            continue
        if isinstance(piece, Usage):
            outcome.usage = piece
            continue
        if isinstance(piece, Finish):
            outcome.finish_reason = piece.reason
        elif not isinstance(piece, NativeDelta) or piece.output:
            if outcome.first_token_at is None:
                outcome.first_token_at = time.monotonic()
            text = piece.arguments if isinstance(piece, ToolCallDelta) else piece.text
            outcome.deltas += 1
            outcome.produced_chars += len(text)
            if log_content:
                outcome.completion_text.append(text)
        group.append(piece)
    return group


def _finished(outcome: Outcome) -> None:
    """The provider's deltas have ended: an answer without a finish reason is broken."""
    if outcome.finish_reason is None:
        raise UpstreamError("The model stream ended without a finish reason")


def _stream(
    first: Delta | None,
    deltas: Iterator[Delta],
    encoder: Encoder,
    outcome: Outcome,
    deadline: Deadline,
) -> Iterator[bytes]:
    """The events of one answer; a failure ends them with one in-band error event. The events
    of deltas that arrived together are one item (one write), each event intact in it.

    One loop over the provider's deltas, the checks of :func:`_observe` in it: this generator
    is the only layer of the pipeline between the driver's write and the provider's read."""
    try:
        head = encoder.start()
        if head:
            yield head
        log_content = outcome.prompt_text is not None  # set only when content is logged
        stop_at = deadline.at
        encode = encoder.delta
        relaying = RELAYING.get() is not None
        for delta in _taken(first, deltas):
            # Not a delta: the upstream has nothing yet, and the relay waits for it (relay.py).
            if delta.__class__ is Pending:  # type: ignore[comparison-overlap]
                yield cast(bytes, delta)
                continue
            # Stop before the Lambda deadline rather than be killed mid-write (deadline.check()).
            if stop_at is not None and time.monotonic() >= stop_at:
                deadline.check()
            group = _observe(delta, outcome, log_content)
            if len(group) == 1:
                event = encode(group[0])
                if event:
                    outcome.chunks += 1
                    yield event
                continue
            events = [event for event in map(encode, group) if event]
            if events:
                outcome.chunks += len(events)
                yield b"".join(events)
        _finished(outcome)
        if relaying:
            yield HAND_BACK  # the end (a stored response, say) is written by the worker
        yield from encoder.end(outcome)
    except Exception as e:
        err = from_exception(e)
        if not isinstance(e, StreamgateError):
            logger.exception("unhandled error after the first byte")
        outcome.error = err
        if relaying:
            yield HAND_BACK
        yield encoder.fail(err, outcome)
    finally:
        _close(deltas)


def _complete(
    first: Delta | None,
    deltas: Iterator[Delta],
    encoder: Encoder,
    outcome: Outcome,
    deadline: Deadline,
) -> bytes:
    """The whole answer, the same deltas joined, with the same checks as :func:`_stream`; any
    failure is a real status."""
    text: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, AnswerCall] = {}
    answer = Answer()
    log_content = outcome.prompt_text is not None
    for group in _taken(first, deltas):
        if deadline.at is not None:
            deadline.check()
        for delta in _observe(group, outcome, log_content):
            if isinstance(delta, TextDelta):
                text.append(delta.text)
            elif isinstance(delta, ReasoningDelta):
                reasoning.append(delta.text)
                answer.reasoning_signature = delta.signature or answer.reasoning_signature
            elif isinstance(delta, Finish):
                answer.finish = delta
            elif isinstance(delta, NativeDelta):
                answer.native.append(delta)
            elif isinstance(delta, ToolCallDelta):
                call = calls.get(delta.index)
                if call is None:
                    calls[delta.index] = AnswerCall(delta.id or "", delta.name or "",
                                                    delta.arguments)
                else:
                    call.arguments += delta.arguments
    _finished(outcome)
    answer.text, answer.reasoning = "".join(text), "".join(reasoning)
    answer.tool_calls = [calls[i] for i in sorted(calls)]
    return encoder.document(answer, outcome)


def _playground(outcome: Outcome) -> Response:
    html, policy = playground.page()
    headers = {"content-type": "text/html; charset=utf-8", "cache-control": "no-cache",
               "content-security-policy": policy}
    return Response(200, headers, iter([html]), outcome)


def _json(status: int, doc: Mapping[str, Any], outcome: Outcome) -> Response:
    return Response(status, dict(JSON_HEADERS), iter([sse.json_bytes(doc)]), outcome)


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


def _answer_id(encoder: Encoder) -> str:
    """The id the client gets for this answer (a chat completion's, a response's), for its
    trace; "" if the encoder has none."""
    builder = getattr(encoder, "builder", None)
    return str(getattr(encoder, "response_id", "") or getattr(builder, "completion_id", ""))


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
