"""Any OpenAI-compatible upstream (vLLM, Ollama, llama.cpp server, LM Studio, OpenAI).

The request is rebuilt from the validated :class:`ChatRequest`, so only parameters of the chat
completions contract reach the upstream. A streamed request is streamed upstream with
``stream_options.include_usage`` (usage is relayed when the upstream reports it, never
invented), read incrementally with :class:`streamgate.sse.Decoder`, and each upstream chunk
becomes our deltas; the handler re-emits them with our own id, created and model name. A
non-streaming request is sent as one too (servers such as llama.cpp's report usage only
there), and its ``chat.completion`` goes through the same delta mapping.

What the upstream sends is its responsibility, never ours: a malformed chunk, usage or finish
reason is an ``upstream_error``, and no text it sends reaches our client without passing
:func:`streamgate.errors.relayed` (which removes our key, or any part of it, and anything
shaped like a credential). Transport and waits: :mod:`streamgate.httpclient`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

from streamgate import sse, telemetry
from streamgate.credentials import ApiKey, api_key
from streamgate.deadline import Deadline
from streamgate.deadline import current as deadline_of_request
from streamgate.errors import (
    ConfigError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    RequestError,
    StreamgateError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    relayed,
)
from streamgate.httpclient import Exchange, Upstream, WaitExpired
from streamgate.providers import (
    Batch,
    Delta,
    Finish,
    FinishReason,
    OutputTimer,
    Piece,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
    malformed_is_upstream_error,
)
from streamgate.relay import RELAYING, Pending
from streamgate.retry import parse_retry_after, with_retries
from streamgate.validation import (
    CAP_IMAGES,
    CAP_JSON_OBJECT,
    CAP_JSON_SCHEMA,
    CAP_MIN_TOKENS,
    CAP_PENALTIES,
    CAP_SEED,
    CAP_SEQUENTIAL_TOOLS,
    CAP_TOOLS,
    Image,
)

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.validation import ChatRequest, Message, ResponseFormat

logger = logging.getLogger(__name__)

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "tool_calls",  # the deprecated name for the same thing
}
_ERROR_BODY_LIMIT = 65536
_MODELS_BODY_LIMIT = 1 << 20
_COMPLETION_BODY_LIMIT = 16 << 20
# Token counts past this are not a real answer's: refused as malformed, never charged.
_MAX_TOKENS_REPORTED = 100_000_000
WHO = "The upstream"
_RELIST_AFTER_FAILURE_S = 10.0  # a failed refresh of /models is not tried again sooner


class OpenAIProvider:
    name = "openai"
    # The upstream decides what it supports; what it refuses comes back as its own 400.
    # min_tokens is vLLM's (and SGLang's) extension: passed on; OpenAI itself refuses it.
    capabilities: frozenset[str] = frozenset(
        {CAP_PENALTIES, CAP_SEED, CAP_TOOLS, CAP_IMAGES, CAP_SEQUENTIAL_TOOLS,
         CAP_JSON_SCHEMA, CAP_JSON_OBJECT, CAP_MIN_TOKENS})

    def __init__(self, settings: Settings, key: ApiKey, http: Upstream | None = None) -> None:
        self._settings = settings
        self._key = key
        self._http = http or Upstream(settings.upstream_base_url,
                                      settings.upstream_connect_timeout_s,
                                      max_idle_s=settings.upstream_max_idle_s)
        self._public = model_map(settings.upstream_models)  # our name -> upstream name
        self._lock = threading.Lock()
        self._listed: list[str] | None = None  # the upstream's /models, once fetched
        self._listed_until = float("-inf")
        self._listing: Future[list[str]] | None = None  # the fetch in flight

    def close(self) -> None:
        self._http.close()

    def default_model(self) -> str:
        if self._settings.default_model:
            return self._settings.default_model
        models = self.models()
        if not models:
            raise UpstreamError("The upstream lists no models; set STREAMGATE_DEFAULT_MODEL")
        return models[0]

    def models(self) -> list[str]:
        """The configured names, else the upstream's own ``/models``, cached like the key.

        One request at a time fetches the list, within its deadline
        (:func:`streamgate.deadline.current`) and the first-token timeout. While it does, the
        others use the list they have; with none yet, they wait for that fetch (sharing its
        failure), each no longer than its own deadline. A refresh that fails keeps the old
        list, and is tried again after ``_RELIST_AFTER_FAILURE_S``."""
        if self._public:
            return list(self._public)
        with self._lock:
            listed = self._listed
            if listed is not None and time.monotonic() < self._listed_until:
                return list(listed)
            flight = self._listing
            if flight is None:
                flight = self._listing = Future()
                leader = True
            else:
                leader = False
        if not leader:
            return list(listed) if listed is not None else self._await_listing(flight)
        try:
            models = self._list_models(deadline_of_request())
        except BaseException as e:
            with self._lock:
                self._listing = None
                if listed is not None:
                    self._listed_until = time.monotonic() + _RELIST_AFTER_FAILURE_S
            flight.set_exception(e)
            if listed is None or not isinstance(e, Exception):
                raise
            logger.warning("the upstream's model list was not refreshed; the one before is "
                           "kept (%s)", e.message if isinstance(e, StreamgateError)
                           else type(e).__name__)
            return list(listed)
        with self._lock:
            self._listed, self._listing = models, None
            self._listed_until = time.monotonic() + self._settings.upstream_api_key_ttl_s
        flight.set_result(models)
        return list(models)

    def _await_listing(self, flight: Future[list[str]]) -> list[str]:
        """Another request's first fetch of the list: no longer than this request's deadline,
        nor than that fetch may take (connecting, then its answer)."""
        s = self._settings
        deadline = deadline_of_request()
        try:
            return list(flight.result(timeout=deadline.cap(
                s.upstream_connect_timeout_s + s.upstream_first_token_timeout_s)))
        except TimeoutError:
            deadline.check()
            raise UpstreamTimeoutError("The upstream's model list did not arrive in time",
                                       transient=True) from None

    def _list_models(self, deadline: Deadline) -> list[str]:
        doc = self._fetch_json("GET", "/models", None, _MODELS_BODY_LIMIT, deadline)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            raise UpstreamError("The upstream's /models answer has no 'data' list")
        return [relayed(str(m["id"])) for m in data if isinstance(m, dict) and m.get("id")]

    def _fetch_json(self, method: str, path: str, body: bytes | None, limit: int,
                    deadline: Deadline) -> Any:
        """One whole JSON answer, all of it within the first-token timeout (and deadline)."""
        s = self._settings
        timer = OutputTimer(WHO, s.upstream_first_token_timeout_s,
                            s.upstream_idle_timeout_s, deadline)
        exchange = self._http.open(method, path, body, self._headers(), until=timer.until(),
                                   deadline=deadline)
        try:
            if exchange.status != 200:
                raise self._status_error(exchange, deadline)
            try:
                doc = _json(exchange.body(limit, timer.until()))
            except WaitExpired:
                raise timer.expired() from None
            exchange.finish()
            return doc
        finally:
            exchange.close()

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        body = json.dumps(upstream_body(request, self._public.get(model, model)),
                          ensure_ascii=False).encode("utf-8")
        s = self._settings
        attempt = self._attempt if request.stream else self._attempt_whole
        return with_retries(lambda: attempt(body, deadline), attempts=s.upstream_max_attempts,
                            backoff_s=s.upstream_backoff_s, deadline=deadline,
                            upstream="Upstream")

    def _attempt_whole(self, body: bytes, deadline: Deadline) -> Iterator[Delta]:
        """A non-streaming exchange, mapped through the same chunk reader."""
        doc = self._fetch_json("POST", "/chat/completions", body, _COMPLETION_BODY_LIMIT,
                               deadline)
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise UpstreamError("The upstream's answer has no choices")
        # The message has the shape of a delta that carries everything at once.
        whole = {"choices": [{"delta": choices[0].get("message"),
                              "finish_reason": choices[0].get("finish_reason")}],
                 "usage": doc.get("usage")}
        yield from _Chunks(self._secrets()).deltas(whole)

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "text/event-stream",
                   "user-agent": "streamgate",
                   # W3C traceparent of the provider call's span, when tracing
                   **telemetry.trace_headers()}
        key = self._key.get()
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _secrets(self) -> tuple[str, ...]:
        """What must never be relayed: the key we send upstream."""
        key = self._key.get()
        return (key,) if key else ()

    def _attempt(self, body: bytes, deadline: Deadline) -> Iterator[Delta]:
        s = self._settings
        timer = OutputTimer(WHO, s.upstream_first_token_timeout_s,
                            s.upstream_idle_timeout_s, deadline)
        exchange = self._http.open("POST", "/chat/completions", body, self._headers(),
                                   until=timer.until(), deadline=deadline)
        try:
            if exchange.status != 200:
                raise self._status_error(exchange, deadline)
            content_type = exchange.header("content-type")
            if "text/event-stream" not in content_type:
                raise UpstreamError("The upstream answered "
                                    f"{relayed(content_type) or 'no content type'}, not a stream")
            decoder = sse.Decoder(s.upstream_max_event_chars)
            chunks = _Chunks(self._secrets())
            done = False
            # While the answer is relayed (streamgate.relay), a read finding nothing yields
            # this instead of waiting: the relay's thread waits for the socket.
            pending = Pending(exchange.sock) if exchange.chunked else None
            while not done:
                try:
                    if pending is not None and RELAYING.get() is not None:
                        data = exchange.read(timer.until(), True)
                        if data is None:
                            yield cast(Delta, pending)
                            continue
                    else:
                        data = exchange.read(timer.until())
                    events = decoder.feed(data) if data else decoder.end()
                except WaitExpired:
                    raise timer.expired() from None
                except sse.EventTooLargeError:
                    raise UpstreamError("The upstream sent an event larger than "
                                        f"{s.upstream_max_event_chars} characters") from None
                # Everything this read delivered goes on as one item (one write to the client):
                # nothing waits for a later read. An event that fails its checks ends the
                # stream after the good ones before it, as if each had come alone.
                got: list[Piece] = []
                failure: StreamgateError | None = None
                try:
                    for event in events:
                        text = event.data
                        if text == "[DONE]":
                            done = True
                            break
                        try:  # _json(text), its common case inline: one call fewer per event
                            chunk, end = _scan(text, 0)
                            if end != len(text):
                                chunk = _json(text)
                        except (StopIteration, ValueError, RecursionError):
                            chunk = _json(text)
                        got += chunks.deltas(chunk)
                except StreamgateError as e:
                    failure = e
                for delta in reversed(got):  # they came at one moment: the last output says it
                    if not isinstance(delta, (Finish, Usage)):
                        timer.saw(delta)
                        break
                if got:
                    yield got[0] if len(got) == 1 else Batch(tuple(got))
                if failure is not None:
                    raise failure
                if not data and not done:
                    raise UpstreamError("The upstream stream ended before [DONE]")
            while not exchange.finish(pending is not None and RELAYING.get() is not None):
                yield cast(Delta, pending)  # the body's last chunk is still to come
        finally:
            exchange.close()

    def _status_error(self, exchange: Exchange, deadline: Deadline) -> StreamgateError:
        """An upstream HTTP error → the same status class, with an OpenAI error body."""
        status = exchange.status
        retry_after = parse_retry_after(exchange.header("retry-after"))
        try:
            raw = exchange.body(_ERROR_BODY_LIMIT,
                                deadline.until(time.monotonic()
                                               + self._settings.upstream_idle_timeout_s))
        except (WaitExpired, UpstreamError):
            raw = b""  # the status says enough
        if status in (401, 403):
            # Not the client's fault: the gateway's own credentials were refused.
            self._key.invalidate()
            return UpstreamError(f"The upstream rejected the gateway's credentials (HTTP {status})",
                                 code="upstream_auth_failed")
        message, param, code = _error_fields(raw, self._secrets())
        text = f"Upstream: {message}" if message else f"The upstream answered HTTP {status}"
        if status == 429:
            return RateLimitError(text, retry_after=1.0 if retry_after is None else retry_after,
                                  transient=True)
        if status == 404:
            return NotFoundError(text, param=param or "model", code=code or "model_not_found")
        if status == 413:
            return PayloadTooLargeError(text)
        if 400 <= status < 500:
            return RequestError(text, param=param, code=code)
        if status == 503:
            return UpstreamUnavailableError(
                text, retry_after=1.0 if retry_after is None else retry_after, transient=True)
        if status == 504:
            return UpstreamTimeoutError(text, transient=True)
        return UpstreamError(text, transient=status >= 500)


class _Chunks:
    """Upstream ``chat.completion.chunk`` objects → deltas. Tool-call indexes are kept as the
    upstream sent them; id and name pass only on a call's first fragment, as OpenAI sends
    them (some servers repeat them, which would make clients concatenate the name). Anything
    malformed, whatever its shape, is an ``upstream_error``."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self._calls: set[int] = set()
        self._secrets = secrets

    def deltas(self, chunk: Any) -> list[Piece]:
        # Most chunks carry one choice with a piece of text and nothing else: mapped here
        # without the general walk below (which gives the same answer for them), checked the
        # same way. Anything else, or anything odd, takes the general walk.
        if type(chunk) is dict and chunk.get("error") is None and chunk.get("usage") is None:
            choices = chunk.get("choices")
            if type(choices) is list and len(choices) == 1:
                choice = choices[0]
                delta = choice.get("delta") if type(choice) is dict else None
                if (type(delta) is dict and not choice.get("finish_reason")
                        and not delta.get("tool_calls") and not delta.get("reasoning_content")
                        and not delta.get("reasoning")):
                    content = delta.get("content")
                    if type(content) is str:
                        return [TextDelta(content)] if content else []
                    if content is None:
                        return []
        return malformed_is_upstream_error(self._deltas(chunk), WHO)

    def _deltas(self, chunk: Any) -> Iterator[Piece]:
        if not isinstance(chunk, dict):
            raise UpstreamError("The upstream sent an event that is not a JSON object")
        if chunk.get("error") is not None:
            raise _stream_error(chunk["error"], self._secrets)
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise UpstreamError("The upstream sent a chunk whose 'choices' is not a list")
        for choice in choices:
            yield from self._choice(choice)
        usage = chunk.get("usage")
        if usage is not None:
            yield _usage(usage)

    def _choice(self, choice: Any) -> Iterator[Piece]:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            raise UpstreamError("The upstream sent a chunk choice without a 'delta' object")
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            yield ReasoningDelta(_text(reasoning, "reasoning_content"))
        if delta.get("content"):
            yield TextDelta(_text(delta["content"], "content"))
        calls = delta.get("tool_calls") or []
        if not isinstance(calls, list):
            raise UpstreamError("The upstream sent 'tool_calls' that is not a list")
        for position, call in enumerate(calls):
            yield from self._tool_call(position, call)
        reason = choice.get("finish_reason")
        if reason:
            if not isinstance(reason, str) or reason not in FINISH_REASONS:
                raise UpstreamError("The upstream stopped with an unknown reason "
                                    f"({relayed(repr(reason)[:40])})")
            yield Finish(FINISH_REASONS[reason])

    def _tool_call(self, position: int, call: Any) -> Iterator[Piece]:
        function = call.get("function") if isinstance(call, dict) else None
        index = call.get("index", position) if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(index, int)
                or isinstance(index, bool) or not 0 <= index < 1024):
            raise UpstreamError("The upstream sent a malformed tool call fragment")
        arguments = _text(function.get("arguments") or "", "arguments")
        if index in self._calls:
            if arguments:
                yield ToolCallDelta(index, arguments)
            return
        self._calls.add(index)
        # A client needs an id to send the result back; a few servers leave it out.
        call_id = call.get("id") or "call_" + os.urandom(12).hex()
        yield ToolCallDelta(index, arguments, id=_text(call_id, "id"),
                            name=_text(function.get("name") or "", "name"))


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise UpstreamError(f"The upstream sent a non-string '{field}'")
    return value


def _count(value: Any, field: str) -> int:
    """A token count as a real answer has one: a whole number, 0 or more, not absurd."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if (not isinstance(value, int) or isinstance(value, bool)
            or not 0 <= value <= _MAX_TOKENS_REPORTED):
        raise UpstreamError(f"The upstream sent an impossible '{field}' in its usage")
    return value


def _usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        raise UpstreamError("The upstream sent a malformed 'usage'")
    details = usage.get("prompt_tokens_details") or {}
    if not isinstance(details, dict):
        raise UpstreamError("The upstream sent a malformed 'usage'")
    cached = details.get("cached_tokens")
    return Usage(prompt_tokens=_count(usage.get("prompt_tokens"), "prompt_tokens"),
                 completion_tokens=_count(usage.get("completion_tokens"), "completion_tokens"),
                 cached_tokens=None if cached is None else _count(cached, "cached_tokens"))


def _stream_error(error: Any, secrets: tuple[str, ...]) -> StreamgateError:
    """An error the upstream reported inside its stream."""
    message = error.get("message") if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    text = relayed(str(message), secrets) if message else ""
    return UpstreamError(f"Upstream: {text}" if text else "The upstream reported an error",
                         code=relayed(code, secrets)[:64] if isinstance(code, str) and code
                         else None)


# json's own scanner (C), as JSONDecoder.raw_decode calls it; typeshed does not declare it.
_scan: Callable[[str, int], tuple[Any, int]] = cast(Any, json.JSONDecoder()).scan_once


def _json(data: str | bytes) -> Any:
    # An event's text: json.loads without its two whitespace matches. What scans whole from
    # the first character is what json.loads gives; the rest gets json.loads's own verdict.
    if type(data) is str:
        try:
            doc, end = _scan(data, 0)
            if end == len(data):
                return doc
        except (StopIteration, ValueError, RecursionError):
            pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise UpstreamError("The upstream sent an event that is not valid JSON") from e


def _error_fields(raw: bytes, secrets: tuple[str, ...]) -> tuple[str, str | None, str | None]:
    """(message, param, code) from an OpenAI error body, or FastAPI's ``detail``, or text;
    all of it relayed text (no secret, capped)."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return relayed(text, secrets), None, None
    error = doc.get("error", doc) if isinstance(doc, dict) else doc
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or ""
        param, code = error.get("param"), error.get("code")
        return (relayed(str(message), secrets),
                relayed(param, secrets)[:128] if isinstance(param, str) else None,
                relayed(code, secrets)[:64] if isinstance(code, str) else None)
    return relayed(str(error), secrets), None, None


def model_map(entries: tuple[str, ...]) -> dict[str, str]:
    """``("gpt-4o-mini", "fast=llama3.2:3b")`` → ``{"gpt-4o-mini": "gpt-4o-mini",
    "fast": "llama3.2:3b"}``: the name clients use → the name the upstream knows."""
    mapping: dict[str, str] = {}
    for entry in entries:
        public, _, upstream = entry.partition("=")
        mapping[public.strip()] = upstream.strip() or public.strip()
    return mapping


def upstream_body(request: ChatRequest, model: str) -> dict[str, Any]:
    """The chat completions request the upstream gets: our validated fields only."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [_message(m) for m in request.messages],
        "stream": request.stream,
    }
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    optional: dict[str, Any] = {
        "max_tokens": request.max_tokens,
        "min_tokens": request.min_tokens or None,  # 0 asks for nothing: not sent
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop": list(request.stop) or None,
        "seed": request.seed,
        "user": request.user,
        "frequency_penalty": request.frequency_penalty,
        "presence_penalty": request.presence_penalty,
        "parallel_tool_calls": request.parallel_tool_calls,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if request.tools:
        body["tools"] = [{"type": "function", "function": {
            k: v for k, v in (("name", t.name), ("description", t.description),
                              ("parameters", t.parameters), ("strict", t.strict))
            if v is not None}} for t in request.tools]
    if request.tool_choice == "function":
        body["tool_choice"] = {"type": "function",
                               "function": {"name": request.tool_choice_name}}
    elif request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    if request.response_format is not None:
        body["response_format"] = _response_format(request.response_format)
    return body


def _response_format(fmt: ResponseFormat) -> dict[str, Any]:
    """``response_format`` as the client sent it (fields it left out, or sent as null, stay
    out); the upstream honours it or refuses it with its own 400."""
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    spec = {k: v for k, v in (("name", fmt.name), ("description", fmt.description),
                              ("schema", fmt.schema), ("strict", fmt.strict))
            if v is not None}
    return {"type": "json_schema", "json_schema": spec}


def _message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role}
    if m.parts:
        out["content"] = [_part(p) for p in m.parts]
    else:
        out["content"] = m.content if m.content or not m.tool_calls else None
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _part(part: str | Image) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    import base64

    url = f"data:image/{part.format};base64," + base64.b64encode(part.data).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def create(settings: Settings) -> OpenAIProvider:
    if not settings.upstream_base_url:
        raise ConfigError("STREAMGATE_UPSTREAM_BASE_URL is required when "
                          "STREAMGATE_PROVIDER=openai (e.g. http://127.0.0.1:8000/v1)")
    http_client = Upstream(settings.upstream_base_url, settings.upstream_connect_timeout_s,
                           max_idle_s=settings.upstream_max_idle_s)
    return OpenAIProvider(settings, api_key(settings), http_client)
