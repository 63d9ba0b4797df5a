"""Amazon Bedrock: ConverseStream for every model, and Claude's own Messages API natively.

Request and stream mapping per ../shared/DESIGN.md ("Bedrock ConverseStream mapping") and
https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_ConverseStream.html.

**Claude natively.** A request that came in Anthropic's Messages API (``ChatRequest.native``)
for a Claude model (an id with ``anthropic.claude``) is sent as it is, with
InvokeModelWithResponseStream and the Anthropic body (``anthropic_version:
"bedrock-2023-05-31"``, the client's betas as ``anthropic_beta``;
https://docs.aws.amazon.com/bedrock/latest/userguide/model-parameters-anthropic-claude-messages.html),
and each event Bedrock sends (``chunk.bytes``, one Anthropic event each) is handed on as it
came: thinking signatures, ``cache_control``, tool use and betas survive exactly. Only the body
fields in ``NATIVE_FIELDS`` and the betas in ``NATIVE_BETAS`` are sent (Bedrock answers 400 to
others): a field outside the list is a 400 naming it, a beta outside it is not sent (a beta
only unlocks fields, which the field list governs, or behaviour Bedrock does not offer).
A request that does not stream is streamed too, and joined by the dialect: the first-token and
idle timeouts then hold for it as well, which a single InvokeModel call could not give.
Alongside the events the provider yields the neutral Finish and Usage, so usage, limits,
routes and telemetry work as for any answer; leading ``message_start`` and ``ping`` events are
held until the model's first output, so a failure before it (throttled, overloaded) is still
retried, or a real HTTP status. ``cache_control`` in a request that goes through Converse
becomes a ``cachePoint`` only on models with prompt caching (``PROMPT_CACHE_MODELS``): Bedrock
refuses one elsewhere.

Token counts (``count_tokens``) come from Bedrock's CountTokens, exact, for the same body.
The boto3 client is built on first use (importing boto3 costs ~150 ms of cold start) and
reused for the life of the container; tests inject their own.

Each attempt reads the response on a helper thread, so the waits are exact and wall-clock:
the first content must arrive within ``bedrock_first_token_timeout_s`` of the call, later
content within ``bedrock_idle_timeout_s`` of the last (events without content do not count),
and nothing waits past the request's deadline; the reader is then woken and left to end.
Transient failures (throttling, unavailable, 5xx, unreachable) are retried under the shared
policy (:mod:`streamgate.retry`) while nothing has been yielded yet, which is also before
the handler commits the HTTP status. Whatever Bedrock sends back is mapped defensively: a
malformed event is an ``upstream_error``, and its messages are relayed text.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import queue
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streamgate.errors import (
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestError,
    StreamgateError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    relayed,
)
from streamgate.providers import (
    Batch,
    Delta,
    Finish,
    FinishReason,
    NativeDelta,
    OutputTimer,
    Piece,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
    malformed_is_upstream_error,
)
from streamgate.retry import with_retries
from streamgate.validation import (
    CAP_COUNT_TOKENS,
    CAP_IMAGES,
    CAP_JSON_SCHEMA,
    CAP_SEQUENTIAL_TOOLS,
    CAP_TOOLS,
    CAP_TOP_K,
    Image,
)

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.deadline import Deadline
    from streamgate.validation import ChatRequest, Message, ResponseFormat, Tool

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "us.amazon.nova-lite-v1:0"

STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

# Bedrock error code (HTTP errors and in-stream exceptions alike) → our error class.
_ERRORS: dict[str, type[StreamgateError]] = {
    "AccessDeniedException": PermissionDeniedError,
    "AccessDenied": PermissionDeniedError,  # STS, assuming BedrockRoleArn
    "UnrecognizedClientException": PermissionDeniedError,
    "ResourceNotFoundException": NotFoundError,
    "ValidationException": RequestError,
    "ThrottlingException": RateLimitError,
    "ServiceQuotaExceededException": RateLimitError,
    "ModelNotReadyException": RateLimitError,
    "ModelTimeoutException": UpstreamTimeoutError,
    "ModelErrorException": UpstreamError,
    "ModelStreamErrorException": UpstreamError,
    "InternalServerException": UpstreamError,
    "ServiceUnavailableException": UpstreamUnavailableError,
    # Claude's "overloaded" (Anthropic's 529), mid-stream on InvokeModelWithResponseStream.
    "OverloadedException": UpstreamUnavailableError,
}
# Worth another attempt if nothing has reached the client yet.
_TRANSIENT = frozenset({
    "ThrottlingException", "ServiceQuotaExceededException", "ModelNotReadyException",
    "InternalServerException", "ServiceUnavailableException", "OverloadedException",
})
_RETRY_AFTER_S = 2.0

# What Converse accepts (botocore's service model: ToolName, ToolUseId).
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_TOOL_ID = re.compile(r"[a-zA-Z0-9_.:-]{1,64}")
_EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
# Words by which a ValidationException to a request with outputConfig is about that field.
_OUTPUT_CONFIG_WORDS = ("outputconfig", "textformat", "output config", "output format",
                        "structured output", "json schema", "jsonschema", "json_schema")

# -- Claude natively --------------------------------------------------------------------------
ANTHROPIC_VERSION = "bedrock-2023-05-31"
# The Messages request fields Bedrock's Claude takes (``model`` is the modelId, ``stream`` the
# choice of API; ``metadata.user_id`` goes as request metadata, as on Converse).
NATIVE_FIELDS = frozenset({"max_tokens", "system", "messages", "temperature", "top_p", "top_k",
                           "stop_sequences", "tools", "tool_choice", "thinking"})
# A client tool's fields Bedrock takes; ``eager_input_streaming`` is not sent: it only makes
# tool input stream in smaller pieces (Anthropic's fine-grained tool streaming).
NATIVE_TOOL_FIELDS = ("type", "name", "description", "input_schema", "cache_control")
_NATIVE_STRIPPED_TOOL_FIELDS = ("eager_input_streaming",)
# The ``anthropic_beta`` values Bedrock accepts (its Claude Messages API page); others are not
# forwarded.
NATIVE_BETAS = frozenset({
    "computer-use-2024-10-22", "computer-use-2025-01-24", "token-efficient-tools-2025-02-19",
    "interleaved-thinking-2025-05-14", "output-128k-2025-02-19", "dev-full-thinking-2025-05-14",
    "context-1m-2025-08-07",
})
# Anthropic stop_reason → ours.
NATIVE_STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
    "model_context_window_exceeded": "length", "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# An error event of Anthropic's (inside a chunk) → Bedrock's name for it.
_NATIVE_ERRORS = {"overloaded_error": "OverloadedException",
                  "rate_limit_error": "ThrottlingException",
                  "api_error": "InternalServerException",
                  "invalid_request_error": "ValidationException",
                  "not_found_error": "ResourceNotFoundException",
                  "permission_error": "AccessDeniedException"}
# Events held back until the model's first output (see the module docstring).
_LEADING = ("message_start", "ping")
# Models with prompt caching on Bedrock (model ids containing one of these), where a
# ``cachePoint`` may go; elsewhere Bedrock refuses it (https://docs.aws.amazon.com/bedrock/
# latest/userguide/prompt-caching.html).
PROMPT_CACHE_MODELS = (
    "anthropic.claude-3-7-sonnet", "anthropic.claude-3-5-haiku", "anthropic.claude-sonnet-4",
    "anthropic.claude-opus-4", "anthropic.claude-haiku-4", "amazon.nova-micro",
    "amazon.nova-lite", "amazon.nova-pro", "amazon.nova-premier",
)
_CACHE_POINT = {"cachePoint": {"type": "default"}}


def is_claude(model: str) -> bool:
    """A Claude model (foundation model or inference profile id, or its ARN)."""
    return "anthropic.claude" in model


def caches_prompts(model: str) -> bool:
    return any(name in model for name in PROMPT_CACHE_MODELS)


class BedrockProvider:
    name = "bedrock"
    # response_format json_schema only: Converse has no JSON mode (see _output_config).
    # top_k and parallel_tool_calls: false: Claude natively only (Anthropic's
    # disable_parallel_tool_use); Converse has no such fields and refuses them (400).
    capabilities: frozenset[str] = frozenset({
        CAP_TOOLS, CAP_IMAGES, CAP_JSON_SCHEMA, CAP_TOP_K, CAP_COUNT_TOKENS,
        CAP_SEQUENTIAL_TOOLS})

    def __init__(self, settings: Settings, client: Any = None, *,
                 access: BedrockAccess | None = None) -> None:
        self._settings = settings
        self._client = client
        self._access = access or BedrockAccess()
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The boto3 client, built on first use (importing boto3 costs ~150 ms); shared by
        every request of the container (botocore clients are thread-safe)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = _build_client(self._settings, self._access)
        return self._client

    def default_model(self) -> str:
        return self._settings.default_model or DEFAULT_MODEL

    def models(self) -> list[str]:
        return list(dict.fromkeys([self.default_model(), *self._settings.bedrock_models]))

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        if is_native(request, model):
            kwargs = native_request(request, model, self._settings)
            return self._retried(lambda: self._native_attempt(kwargs, deadline), deadline)
        kwargs = converse_request(request, model, self._settings)
        names = {tool_name(n): n for n in _tool_names(request)}
        structured = "outputConfig" in kwargs
        return self._retried(
            lambda: self._attempt(kwargs, names, deadline, structured, request.stop), deadline)

    def _retried(self, attempt: Callable[[], Iterator[Delta]],
                 deadline: Deadline) -> Iterator[Delta]:
        return with_retries(attempt, attempts=self._settings.bedrock_max_attempts,
                            backoff_s=self._settings.bedrock_backoff_s, deadline=deadline,
                            upstream="Bedrock", honour_retry_after=False)

    def count_tokens(self, request: ChatRequest, model: str, deadline: Deadline) -> int:
        """Bedrock's CountTokens for the body this request would send: exact."""
        if is_native(request, model):
            body = native_request(request, model, self._settings)["body"]
            counted: dict[str, Any] = {"invokeModel": {"body": body}}
        else:
            kwargs = converse_request(request, model, self._settings)
            counted = {"converse": {k: kwargs[k] for k in ("messages", "system", "toolConfig")
                                    if k in kwargs}}

        def attempt() -> Iterator[int]:
            yield self._count_attempt(model, counted, deadline)

        return next(with_retries(attempt, attempts=self._settings.bedrock_max_attempts,
                                 backoff_s=self._settings.bedrock_backoff_s,
                                 deadline=deadline, upstream="Bedrock",
                                 honour_retry_after=False))

    def _count_attempt(self, model: str, counted: dict[str, Any], deadline: Deadline) -> int:
        deadline.check()
        timer = OutputTimer("Amazon Bedrock", self._settings.bedrock_first_token_timeout_s,
                            self._settings.bedrock_idle_timeout_s, deadline)
        pump: _EventPump | None = None
        try:
            pump = _EventPump(lambda: iter(
                [self.client.count_tokens(modelId=model, input=counted)]))
            try:
                answer = pump.get(timer.remaining())
            except queue.Empty:
                raise timer.expired() from None
            tokens = answer.get("inputTokens") if isinstance(answer, dict) else None
            return _count(tokens)
        except Exception as e:
            if isinstance(e, StreamgateError):
                raise
            raise map_error(e) from e
        finally:
            if pump is not None:
                pump.close()

    def _native_attempt(self, kwargs: dict[str, Any], deadline: Deadline) -> Iterator[Delta]:
        s = self._settings
        deadline.check()
        timer = OutputTimer("Amazon Bedrock", s.bedrock_first_token_timeout_s,
                            s.bedrock_idle_timeout_s, deadline)
        pump: _EventPump | None = None
        events = _NativeEvents()
        held: list[Delta] = []  # message_start and pings, until the first output
        try:
            pump = _EventPump(
                lambda: self.client.invoke_model_with_response_stream(**kwargs)["body"],
                _named_exceptions)
            while True:
                try:
                    event = pump.get(timer.remaining())
                except queue.Empty:
                    raise timer.expired() from None
                if event is None:
                    break
                for delta in events.deltas(event):
                    timer.saw(delta)
                    if (isinstance(delta, NativeDelta) and not events.output
                            and delta.event.get("type") in _LEADING):
                        held.append(delta)
                        continue
                    yield from held
                    held.clear()
                    yield delta
            yield from held  # a stream of nothing else: the pipeline says what is missing
        except Exception as e:
            if isinstance(e, StreamgateError):
                raise
            raise map_error(e) from e
        finally:
            if pump is not None:
                pump.close()

    def _attempt(self, kwargs: dict[str, Any], names: dict[str, str],
                 deadline: Deadline, structured: bool,
                 stop: tuple[str, ...] = ()) -> Iterator[Delta]:
        s = self._settings
        deadline.check()
        timer = OutputTimer("Amazon Bedrock", s.bedrock_first_token_timeout_s,
                            s.bedrock_idle_timeout_s, deadline)
        pump: _EventPump | None = None
        blocks = _Blocks(names, stop)
        try:
            # Building the client can fail too (an assumed role refused, no credentials).
            pump = _EventPump(lambda: self.client.converse_stream(**kwargs)["stream"])
            while True:
                try:
                    event = pump.get(timer.remaining())
                except queue.Empty:
                    raise timer.expired() from None
                if event is None:
                    return
                # With the events the reader has already parsed (a burst), as one item: one
                # write to the client. Nothing waits for more. An event that fails its checks
                # ends the stream after the good ones before it, as if each had come alone.
                got = blocks.deltas(event)
                failure: StreamgateError | None = None
                try:
                    for more in pump.ready():
                        got += blocks.deltas(more)
                except StreamgateError as e:
                    failure = e
                for delta in got:
                    timer.saw(delta)
                if got:
                    yield got[0] if len(got) == 1 else Batch(tuple(got))
                if failure is not None:
                    raise failure
        except Exception as e:
            err = e if isinstance(e, StreamgateError) else map_error(e)
            if structured:
                err = _output_config_refused(err)
            if err is e:
                raise
            raise err from e
        finally:
            if pump is not None:
                pump.close()  # client gone, timed out or failed: free the connection now


class _EventPump:
    """Calls Bedrock (``call`` gives the event iterator: ConverseStream's ``stream``,
    InvokeModelWithResponseStream's ``body``) and reads its events on a daemon thread,
    handing them over a queue so the consumer's waits have exact timeouts.

    Only the reader thread touches the response object: closing it from the consumer would
    wait on the lock of a read blocked in ``recv``. ``close()`` instead shuts the socket down,
    which wakes that read at once; the reader then closes the response itself.
    """

    _END = object()

    def __init__(self, call: Callable[[], Any],
                 read: Callable[[Any], Iterator[Any]] = iter) -> None:
        self._read = read  # the events of what ``call`` returned
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._events: Any = None
        self._closed = False
        self._drained = False  # the consumer has taken the end or the reader's error
        self._next: Any = None  # the end or an error met by ready(), for the next get()
        # In the request's context: what it logs (botocore's credential refresh, say, or our
        # own lines) carries the request's id and trace, as the consumer's lines do.
        threading.Thread(target=contextvars.copy_context().run, args=(self._run, call),
                         name="bedrock-stream", daemon=True).start()

    def _run(self, call: Callable[[], Any]) -> None:
        events = None
        try:
            events = call()
            with self._lock:
                self._events = events
            for event in self._read(events):
                if self._closed:
                    return
                self._queue.put(event)
            self._queue.put(self._END)
        except BaseException as e:  # handed to the consumer, who maps it
            if not self._closed:
                self._queue.put(e)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            if self._closed:  # the request stopped reading (done, timed out, client gone)
                logger.debug("the Bedrock reader has ended, after its request stopped reading")

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event, None at the end; raises the reader's error or ``queue.Empty``."""
        if self._next is not None:
            item, self._next = self._next, None
        else:
            item = self._queue.get(timeout=max(timeout, 0.0))
        if item is self._END:
            self._drained = True
            return None
        if isinstance(item, BaseException):
            self._drained = True
            raise item
        event: dict[str, Any] = item
        return event

    def ready(self) -> list[dict[str, Any]]:
        """The events the reader has already handed over, without waiting; the end or an
        error among them is left for the next :meth:`get`."""
        events: list[dict[str, Any]] = []
        while self._next is None:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is self._END or isinstance(item, BaseException):
                self._next = item
            else:
                events.append(item)
        return events

    def close(self) -> None:
        """Stop reading. A read still in progress (client gone, timed out) is woken up."""
        with self._lock:
            self._closed, events = True, self._events
        if events is not None and not self._drained:
            _wake(events)


def _named_exceptions(stream: Any) -> Iterator[Any]:
    """The events of a botocore event stream, parsed by botocore; an exception event whose
    type its service model does not list (Claude's ``overloadedException``) keeps its type and
    message, which botocore's parser would drop (it reads them only for listed types)."""
    from botocore.exceptions import EventStreamError

    raw = getattr(stream, "_event_generator", None)
    parse = getattr(stream, "_parse_event", None)
    if raw is None or parse is None:
        yield from stream
        return
    for message in raw:
        try:
            parsed = parse(message)
        except EventStreamError as e:
            if e.response.get("Error", {}).get("Code"):
                raise
            kind = str(message.headers.get(":exception-type", ""))
            try:
                text = str(json.loads(message.payload).get("message", ""))
            except (ValueError, AttributeError, UnicodeDecodeError):
                text = ""
            raise _error(kind[:1].upper() + kind[1:], text) from e
        if parsed:
            yield parsed


def _wake(events: Any) -> None:
    """Shut down the socket under a botocore event stream (urllib3 1.26 and 2.x both expose
    ``HTTPResponse.connection``). urllib3 discards a shut-down socket instead of reusing it."""
    response = getattr(events, "_raw_stream", None)
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is None:
        logger.debug("no socket to shut down; the reader ends at its read timeout")
        return
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


class _Blocks:
    """Bedrock stream events → deltas. Tool-use blocks get dense 0-based indexes in the order
    they start, whatever their ``contentBlockIndex`` (text and reasoning blocks take those too)."""

    def __init__(self, names: dict[str, str], stop: tuple[str, ...] = ()) -> None:
        self._names = names  # Bedrock tool name -> the name the client declared
        self._stop = stop  # the request's stop sequences
        self._tools: dict[int, int] = {}  # contentBlockIndex -> tool call index
        self._with_input: set[int] = set()

    def deltas(self, event: Any) -> list[Piece]:
        """The deltas of one event; a malformed one is Bedrock's fault, not a bug of ours."""
        return malformed_is_upstream_error(self._deltas(event), "Amazon Bedrock")

    def _deltas(self, event: dict[str, Any]) -> Iterator[Piece]:
        if "contentBlockStart" in event:
            start = event["contentBlockStart"]
            tool = start.get("start", {}).get("toolUse")
            if tool:
                new = self._tools[start.get("contentBlockIndex", -1)] = len(self._tools)
                name = str(tool.get("name", ""))
                yield ToolCallDelta(new, id=str(tool.get("toolUseId", "")),
                                    name=self._names.get(name, name))
        elif "contentBlockDelta" in event:
            block = event["contentBlockDelta"]
            delta = block.get("delta", {})
            if delta.get("text"):
                yield TextDelta(delta["text"])
            elif "toolUse" in delta:
                index = self._tools.get(block.get("contentBlockIndex", -1))
                if index is None:
                    raise UpstreamError("Amazon Bedrock sent tool input for a call it never began")
                piece = str(delta["toolUse"].get("input", ""))
                if piece:
                    self._with_input.add(index)
                    yield ToolCallDelta(index, piece)
            elif "reasoningContent" in delta:
                # Redacted reasoning has no neutral field; a signature goes to the dialects
                # that hand it back (text-only ones ignore it).
                reasoning = delta["reasoningContent"]
                text, signature = reasoning.get("text"), reasoning.get("signature")
                if text or isinstance(signature, str) and signature:
                    yield ReasoningDelta(str(text or ""), signature=signature or None)
        elif "contentBlockStop" in event:
            ended = self._tools.get(event["contentBlockStop"].get("contentBlockIndex", -1))
            if ended is not None and ended not in self._with_input:
                yield ToolCallDelta(ended, "{}")  # a call without arguments is still JSON
        elif "messageStop" in event:
            reason = event["messageStop"].get("stopReason", "")
            if not isinstance(reason, str) or reason not in STOP_REASONS:
                raise UpstreamError("The model stopped abnormally "
                                    f"({relayed(str(reason))[:64] or 'no reason'})")
            yield Finish(STOP_REASONS[reason], self._stop_sequence(event["messageStop"], reason))
        elif "metadata" in event:
            usage = event["metadata"].get("usage")
            if usage:
                output = _count(usage.get("outputTokens", 0))
                read = _count(usage.get("cacheReadInputTokens", 0))
                write = _count(usage.get("cacheWriteInputTokens", 0))
                total = _count(usage.get(
                    "totalTokens", output + _count(usage.get("inputTokens", 0)) + read + write))
                if total < output:
                    raise UpstreamError("Amazon Bedrock reported impossible usage")
                yield Usage(prompt_tokens=total - output, completion_tokens=output,
                            cached_tokens=read, cache_write_tokens=write)
        else:
            for key, value in event.items():  # in-stream exceptions arrive as events too
                if key.endswith("Exception"):
                    raise _error(key[0].upper() + key[1:], str(value.get("message", "")))


    def _stop_sequence(self, stop: Mapping[str, Any], reason: str) -> str | None:
        """Which stop sequence ended the answer: Claude names it in its additional response
        fields; with one stop sequence it can only be that one."""
        if reason != "stop_sequence":
            return None
        extra = stop.get("additionalModelResponseFields")
        named = extra.get("stop_sequence") if isinstance(extra, dict) else None
        if isinstance(named, str) and named:
            return named
        return self._stop[0] if len(self._stop) == 1 else None


class _NativeEvents:
    """InvokeModelWithResponseStream events (``chunk.bytes``: one Anthropic event each) →
    :class:`NativeDelta` each, plus the neutral Finish and Usage after ``message_delta``."""

    def __init__(self) -> None:
        self.output = False  # the model has produced output (a content block began)
        self._usage: dict[str, int] = {}

    def deltas(self, event: Any) -> list[Delta]:
        return malformed_is_upstream_error(self._deltas(event), "Amazon Bedrock")

    def _deltas(self, event: dict[str, Any]) -> Iterator[Delta]:
        if "chunk" not in event:
            for key, value in event.items():  # exceptions botocore did not raise itself
                if key.endswith("Exception"):
                    raise _error(key[0].upper() + key[1:], str(value.get("message", "")))
            return
        payload = json.loads(event["chunk"]["bytes"])
        kind = payload["type"]
        if not isinstance(kind, str):
            raise TypeError("event type")
        if kind == "error":
            error = payload["error"]
            raise _error(_NATIVE_ERRORS.get(str(error.get("type")), "ModelStreamErrorException"),
                         str(error.get("message", "")))
        text, output = "", False
        if kind == "message_start":
            self._take_usage(payload["message"]["usage"])
        elif kind == "content_block_start":
            block = payload["content_block"]
            output = self.output = True
            text = str(block.get("name", "")) if block.get("type") == "tool_use" else ""
        elif kind == "content_block_delta":
            delta = payload["delta"]
            piece = delta.get("text", delta.get("thinking", delta.get("partial_json", "")))
            text, output = str(piece), True
        elif kind == "message_stop":
            # Bedrock's own invocation metrics are not part of Anthropic's event.
            payload = {k: v for k, v in payload.items()
                       if k != "amazon-bedrock-invocationMetrics"}
        yield NativeDelta(payload, text, output)
        if kind == "message_delta":
            self._take_usage(payload.get("usage") or {})
            reason = payload["delta"].get("stop_reason")
            if reason not in NATIVE_STOP_REASONS:
                raise UpstreamError("The model stopped abnormally "
                                    f"({relayed(str(reason))[:64] or 'no reason'})")
            sequence = payload["delta"].get("stop_sequence")
            yield Finish(NATIVE_STOP_REASONS[reason],
                         sequence if isinstance(sequence, str) else None)
            u = self._usage
            read, write = u.get("cache_read_input_tokens", 0), u.get(
                "cache_creation_input_tokens", 0)
            yield Usage(prompt_tokens=u.get("input_tokens", 0) + read + write,
                        completion_tokens=u.get("output_tokens", 0),
                        cached_tokens=read, cache_write_tokens=write)

    def _take_usage(self, usage: Mapping[str, Any]) -> None:
        """Anthropic's usage counts are cumulative: the latest of each wins."""
        for name in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                     "cache_creation_input_tokens"):
            value = usage.get(name)
            if value is not None:
                self._usage[name] = _count(value)


def is_native(request: ChatRequest, model: str) -> bool:
    """Whether a request goes to Bedrock in Anthropic's own Messages API."""
    return (request.native is not None and request.native.dialect == "messages"
            and is_claude(model))


def native_request(request: ChatRequest, model: str, settings: Settings) -> dict[str, Any]:
    """InvokeModelWithResponseStream keyword arguments for a native Messages request."""
    assert request.native is not None
    body: dict[str, Any] = {"anthropic_version": ANTHROPIC_VERSION}
    for key, value in request.native.body.items():
        if key not in NATIVE_FIELDS:
            raise RequestError(f"'{key}' is not accepted by Claude on Amazon Bedrock",
                               param=key)
        body[key] = value
    if "tools" in body:
        body["tools"] = [_native_tool(tool, f"tools[{i}]")
                         for i, tool in enumerate(body["tools"])]
    if "max_tokens" not in body:  # counting: Claude's body needs one; it counts no input
        body["max_tokens"] = (request.thinking_budget or 0) + 1
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("display") == "summarized":
        # Summarised thinking is what Claude 4 models give anyway: the field is Anthropic's.
        body["thinking"] = {k: v for k, v in thinking.items() if k != "display"}
    betas = [b for b in request.native.betas if b in NATIVE_BETAS]
    dropped = [b for b in request.native.betas if b not in NATIVE_BETAS]
    if dropped:
        logger.info("betas not forwarded to Bedrock: %s", ", ".join(d[:64] for d in dropped))
    if betas:
        body["anthropic_beta"] = betas
    kwargs: dict[str, Any] = {
        "modelId": model, "contentType": "application/json", "accept": "application/json",
        "body": json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")}
    if request.user:
        kwargs["requestMetadata"] = json.dumps({"user": request.user[:256]})
    if settings.bedrock_guardrail_id:
        kwargs["guardrailIdentifier"] = settings.bedrock_guardrail_id
        kwargs["guardrailVersion"] = settings.bedrock_guardrail_version or "DRAFT"
    return kwargs


def _native_tool(tool: Mapping[str, Any], at: str) -> dict[str, Any]:
    out = {}
    for key, value in tool.items():
        if key in NATIVE_TOOL_FIELDS:
            out[key] = value
        elif key not in _NATIVE_STRIPPED_TOOL_FIELDS:
            raise RequestError(f"'{at}.{key}' is not accepted by Claude on Amazon Bedrock",
                               param=f"{at}.{key}")
    return out


def _count(value: Any) -> int:
    """A token count as Bedrock documents it (an integer, 0 or more), else a malformed event."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100_000_000:
        raise UpstreamError("Amazon Bedrock reported impossible usage")
    return value


def tool_name(name: str) -> str:
    """A name Converse accepts. Valid names pass unchanged; others get their invalid
    characters replaced and a hash suffix, so the mapping is stable and collision-free."""
    return _sanitise(name, _TOOL_NAME, r"[^a-zA-Z0-9_-]")


def tool_use_id(call_id: str) -> str:
    """An id Converse accepts (OpenAI ids are unrestricted); stable, like :func:`tool_name`,
    so a tool result finds its call."""
    return _sanitise(call_id, _TOOL_ID, r"[^a-zA-Z0-9_.:-]")


def _sanitise(value: str, valid: re.Pattern[str], invalid: str) -> str:
    if valid.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]
    return re.sub(invalid, "_", value)[:55] + "_" + digest


def _tool_names(request: ChatRequest) -> list[str]:
    """Declared tool names, then names only the history uses, in a stable order."""
    declared = [t.name for t in request.tools]
    used = {c.name for m in request.messages for c in m.tool_calls}
    return declared + sorted(used - set(declared))


def converse_request(request: ChatRequest, model: str, settings: Settings) -> dict[str, Any]:
    """ChatRequest → ConverseStream keyword arguments."""
    if request.temperature is not None and request.temperature > 1:
        raise RequestError("'temperature' must be between 0 and 1 for Bedrock models",
                           param="temperature")
    if request.top_k is not None:
        raise RequestError("'top_k' is supported on Bedrock only for Claude models, through "
                           "the Messages API (POST /v1/messages)", param="top_k")
    if request.tools and request.parallel_tool_calls is False:
        raise RequestError("'parallel_tool_calls: false' cannot be enforced by this model",
                           param="parallel_tool_calls")
    caching = caches_prompts(model)
    system: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role in ("system", "developer"):
            if m.content:
                system.append({"text": m.content})
            if m.cache_point and caching and system:
                system.append(dict(_CACHE_POINT))
    messages: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role in ("system", "developer"):
            continue
        role, blocks = _blocks(m)
        if blocks and m.cache_point and caching:
            blocks.append(dict(_CACHE_POINT))
        if not blocks:
            continue  # Converse rejects empty content; an empty turn says nothing anyway
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)  # Converse needs alternating roles
        else:
            messages.append({"role": role, "content": blocks})
    if not messages:
        raise RequestError("At least one user message is required", param="messages")
    inference: dict[str, Any] = {}
    if request.max_tokens is not None:
        inference["maxTokens"] = request.max_tokens
    if request.temperature is not None:
        inference["temperature"] = request.temperature
    if request.top_p is not None:
        inference["topP"] = request.top_p
    if request.stop:
        inference["stopSequences"] = list(request.stop)
    kwargs: dict[str, Any] = {"modelId": model, "messages": messages}
    if system:
        kwargs["system"] = system
    if inference:
        kwargs["inferenceConfig"] = inference
    tool_config = _tool_config(request, caching)
    if tool_config:
        kwargs["toolConfig"] = tool_config
    output_config = _output_config(request.response_format)
    if output_config:
        kwargs["outputConfig"] = output_config
    if request.user:
        kwargs["requestMetadata"] = {"user": request.user[:256]}
    if settings.bedrock_guardrail_id:
        kwargs["guardrailConfig"] = {
            "guardrailIdentifier": settings.bedrock_guardrail_id,
            "guardrailVersion": settings.bedrock_guardrail_version or "DRAFT",
            "streamProcessingMode": settings.bedrock_guardrail_stream_mode,
        }
    return kwargs


def _blocks(m: Message) -> tuple[str, list[dict[str, Any]]]:
    """One message's Converse role and content blocks (tool results are user content)."""
    if m.role == "tool":
        return "user", [{"toolResult": {"toolUseId": tool_use_id(m.tool_call_id or ""),
                                        "content": [{"text": m.content}]}}]
    blocks: list[dict[str, Any]] = []
    for part in m.parts or (m.content,):
        if isinstance(part, Image):
            blocks.append({"image": {"format": part.format, "source": {"bytes": part.data}}})
        elif part:
            blocks.append({"text": part})
    for call in m.tool_calls:
        blocks.append({"toolUse": {"toolUseId": tool_use_id(call.id), "name": tool_name(call.name),
                                   "input": json.loads(call.arguments)}})
    return m.role, blocks


def _tool_config(request: ChatRequest, caching: bool = False) -> dict[str, Any] | None:
    """``toolConfig``: the declared tools, plus any the history used (Converse rejects tool
    blocks without it). ``tool_choice: "none"`` has no Converse twin: the tools are left out,
    unless the history needs them."""
    history = any(m.tool_calls or m.role == "tool" for m in request.messages)
    if not history and (not request.tools or request.tool_choice == "none"):
        return None
    declared = {t.name: t for t in request.tools}
    specs = []
    for name in _tool_names(request):
        tool = declared.get(name)
        specs.append(_tool_spec(tool, name))
        if caching and tool is not None and tool.cache_point:
            specs.append(dict(_CACHE_POINT))
    if not specs:
        return None  # tool results with no call anywhere: Converse explains the problem
    config: dict[str, Any] = {"tools": specs}
    if request.tool_choice == "auto":
        config["toolChoice"] = {"auto": {}}
    elif request.tool_choice == "required":
        config["toolChoice"] = {"any": {}}
    elif request.tool_choice == "function" and request.tool_choice_name:
        config["toolChoice"] = {"tool": {"name": tool_name(request.tool_choice_name)}}
    return config


def _tool_spec(tool: Tool | None, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": tool_name(name)}
    if tool is not None and tool.description:
        spec["description"] = tool.description
    schema = tool.parameters if tool is not None and tool.parameters else _EMPTY_SCHEMA
    spec["inputSchema"] = {"json": dict(schema)}
    if tool is not None and tool.strict is not None:
        spec["strict"] = tool.strict
    return {"toolSpec": spec}


def _output_config(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """``response_format`` json_schema → ``outputConfig.textFormat``, whose ``schema`` is the
    JSON Schema as a JSON *string* (botocore's ``JsonSchemaDefinition``). OpenAI's ``strict``
    has no field there: Bedrock always decodes under the schema, which satisfies both values.

    ``json_object`` has no honest mapping, so the capability gate refuses it before this: the
    only ``textFormat.type`` is ``json_schema``, and an open ``{"type": "object"}`` schema does
    not mean "any JSON object" on every model (structured outputs that require
    ``additionalProperties: false`` refuse it, or would allow only ``{}``)."""
    if fmt is None or not fmt.constrained:
        return None
    if fmt.type != "json_schema" or fmt.schema is None:
        raise RequestError(f"'response_format' type '{fmt.type}' is not supported by Amazon "
                           "Bedrock; send type 'json_schema'", param="response_format")
    definition: dict[str, Any] = {
        "name": fmt.name,
        "schema": json.dumps(fmt.schema, ensure_ascii=False, separators=(",", ":")),
    }
    if fmt.description:
        definition["description"] = fmt.description
    return {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": definition}}}


def _output_config_refused(err: StreamgateError) -> StreamgateError:
    """A 400 about the output config (a model without structured outputs, a schema it cannot
    take) names ``response_format``; Bedrock's reason stays the message."""
    if (type(err) is RequestError and err.param is None
            and any(w in err.message.lower() for w in _OUTPUT_CONFIG_WORDS)):
        return RequestError(err.message, param="response_format", code=err.code)
    return err


def map_error(exc: Exception) -> StreamgateError:
    """botocore exceptions → our errors; messages from Bedrock are kept, secrets never appear."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        return _error(code[0].upper() + code[1:] if code else "", str(error.get("Message", "")))
    from urllib3.exceptions import ProtocolError
    from urllib3.exceptions import ReadTimeoutError as StreamReadTimeout

    if isinstance(exc, ConnectTimeoutError):
        return UpstreamTimeoutError("Could not connect to Amazon Bedrock in time", transient=True)
    if isinstance(exc, (ReadTimeoutError, StreamReadTimeout)):
        return UpstreamTimeoutError("Amazon Bedrock did not answer in time")
    if isinstance(exc, EndpointConnectionError):
        return UpstreamError("Could not reach Amazon Bedrock", transient=True)
    if isinstance(exc, ProtocolError):
        return UpstreamError("The connection to Amazon Bedrock broke mid-stream")
    logger.exception("unexpected Bedrock failure")
    return UpstreamError("Amazon Bedrock failed unexpectedly")


# Who we are, as AWS names it in a refusal ("User: arn:aws:sts::123456789012:assumed-role/
# streamgate-role/fn is not authorized to perform ..."): the function's role, session and
# account are ours to log, not a client's to read.
_IDENTITY = re.compile(r"arn:aws[\w-]*:(?:sts|iam)::\d{12}:[^\s,;]+")
_ACCOUNT = re.compile(r"(?<![\w-])\d{12}(?![\w-])")


def _error(code: str, message: str) -> StreamgateError:
    cls = _ERRORS.get(code, UpstreamError)
    if _IDENTITY.search(message) or _ACCOUNT.search(message):
        logger.warning("Amazon Bedrock refused the call (%s): %s", code[:64], message[:1000])
        message = _ACCOUNT.sub("[account]", _IDENTITY.sub("[the function's role]", message))
    message, code = relayed(message), relayed(code)[:64]
    text = f"Amazon Bedrock: {message}" if message else f"Amazon Bedrock: {code or 'an error'}"
    transient = code in _TRANSIENT
    if cls is RequestError and _is_context_overflow(message):
        return RequestError(text, param="messages", code="context_length_exceeded")
    if cls in (RateLimitError, UpstreamUnavailableError):
        return cls(text, retry_after=_RETRY_AFTER_S, transient=transient)
    if cls is NotFoundError:
        return NotFoundError(text, param="model", code="model_not_found")
    return cls(text, transient=transient)


def _is_context_overflow(message: str) -> bool:
    lowered = message.lower()
    return "too long" in lowered or "context length" in lowered or "too many tokens" in lowered


@dataclass(frozen=True, slots=True)
class BedrockAccess:
    """Where and as whom to call Bedrock, beyond the function's own region and role: another
    endpoint (a VPC endpoint, a test's fake), or another account's role assumed through STS."""

    endpoint_url: str = ""
    role_arn: str = ""
    external_id: str = field(default="", repr=False)


def _build_client(settings: Settings, access: BedrockAccess) -> Any:
    from botocore.config import Config

    from streamgate import aws

    config = Config(
        connect_timeout=settings.bedrock_connect_timeout_s,
        # Only a backstop for the reader thread: the provider enforces the exact waits.
        read_timeout=max(settings.bedrock_first_token_timeout_s,
                         settings.bedrock_idle_timeout_s) + 5,
        # One attempt per call: the provider retries itself, because it can also retry
        # errors that arrive as the stream's first event, which botocore cannot.
        retries={"mode": "standard", "total_max_attempts": 1},
    )
    region = settings.bedrock_region or None
    session = None if not access.role_arn else assumed_role_session(
        access.role_arn, access.external_id, region)
    return aws.client("bedrock-runtime", session=session, region_name=region, config=config,
                      endpoint_url=access.endpoint_url or None)


def assumed_role_session(role_arn: str, external_id: str, region: str | None) -> Any:
    """A boto3 session whose credentials come from ``sts:AssumeRole`` on ``role_arn``, kept in
    memory and renewed by botocore before they expire (its refresh windows: 15 minutes
    ahead, and at the latest 10). Errors reach the caller when the role is first used."""
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.credentials import RefreshableCredentials

    from streamgate import aws

    sts = aws.client("sts", region_name=region, config=Config(
        connect_timeout=2, read_timeout=5, retries={"mode": "standard", "total_max_attempts": 2}))

    def fetch() -> dict[str, str]:
        kwargs = {"RoleArn": role_arn, "RoleSessionName": "streamgate"}
        if external_id:
            kwargs["ExternalId"] = external_id
        credentials = sts.assume_role(**kwargs)["Credentials"]
        return {"access_key": credentials["AccessKeyId"],
                "secret_key": credentials["SecretAccessKey"],
                "token": credentials["SessionToken"],
                "expiry_time": credentials["Expiration"].isoformat()}

    botocore_session = botocore.session.get_session()
    botocore_session._credentials = RefreshableCredentials.create_from_metadata(
        metadata=fetch(), refresh_using=fetch, method="sts-assume-role")
    return boto3.Session(botocore_session=botocore_session, region_name=region)


def create(settings: Settings) -> BedrockProvider:
    return BedrockProvider(settings)
