"""Any OpenAI-compatible upstream (vLLM, Ollama, llama.cpp server, LM Studio, OpenAI).

The request is rebuilt from the validated :class:`ChatRequest`, so only parameters of the chat
completions contract reach the upstream. A streamed request is streamed upstream with
``stream_options.include_usage`` (usage is relayed when the upstream reports it, never
invented), read incrementally with :class:`streamgate.sse.Decoder`, and each upstream chunk
becomes our deltas; the handler re-emits them with our own id, created and model name. A
non-streaming request is sent as one too (servers such as llama.cpp's report usage only
there), and its ``chat.completion`` goes through the same delta mapping.

HTTP client: the standard library's ``http.client``. It streams, lets us set the socket timeout
before every read (the first-token and idle timeouts are exact that way, on one thread), keeps
connections alive for reuse across invocations of the container, and costs nothing at cold
start; urllib3 (present in the Lambda runtime through botocore) would add ~20 ms of imports
for nothing we use.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from streamgate import sse
from streamgate.credentials import ApiKey, api_key
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
)
from streamgate.providers import (
    Delta,
    Finish,
    FinishReason,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
    with_retries,
)
from streamgate.validation import (
    CAP_IMAGES,
    CAP_PENALTIES,
    CAP_SEED,
    CAP_SEQUENTIAL_TOOLS,
    CAP_TOOLS,
    Image,
)

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.validation import ChatRequest, Message

logger = logging.getLogger(__name__)

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "tool_calls",  # the deprecated name for the same thing
}
_READ_SIZE = 65536
_ERROR_BODY_LIMIT = 65536
_MODELS_BODY_LIMIT = 1 << 20
_COMPLETION_BODY_LIMIT = 16 << 20


class OpenAIProvider:
    name = "openai"
    # The upstream decides what it supports; what it refuses comes back as its own 400.
    capabilities: frozenset[str] = frozenset(
        {CAP_PENALTIES, CAP_SEED, CAP_TOOLS, CAP_IMAGES, CAP_SEQUENTIAL_TOOLS})

    def __init__(self, settings: Settings, key: ApiKey, http: Upstream | None = None) -> None:
        self._settings = settings
        self._key = key
        self._http = http or Upstream(settings.upstream_base_url,
                                      settings.upstream_connect_timeout_s)
        self._public = model_map(settings.upstream_models)  # our name -> upstream name
        self._lock = threading.Lock()
        self._listed: list[str] = []
        self._listed_until = float("-inf")

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
        """The configured names, else the upstream's own ``/models`` (cached like the key)."""
        if self._public:
            return list(self._public)
        with self._lock:
            if time.monotonic() >= self._listed_until:
                self._listed = self._list_models()
                self._listed_until = time.monotonic() + self._settings.upstream_api_key_ttl_s
            return list(self._listed)

    def _list_models(self) -> list[str]:
        doc = self._fetch_json("GET", "/models", None, _MODELS_BODY_LIMIT)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            raise UpstreamError("The upstream's /models answer has no 'data' list")
        return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]

    def _fetch_json(self, method: str, path: str, body: bytes | None, limit: int) -> Any:
        """One whole JSON answer; the first-token timeout bounds the wait for it."""
        s = self._settings
        exchange = self._http.open(method, path, body, self._headers(),
                                   timeout=s.upstream_first_token_timeout_s)
        try:
            if exchange.status != 200:
                raise self._status_error(exchange)
            doc = _json(exchange.body(limit, s.upstream_idle_timeout_s))
            exchange.finish()
            return doc
        finally:
            exchange.close()

    def stream(self, request: ChatRequest, model: str) -> Iterator[Delta]:
        body = json.dumps(upstream_body(request, self._public.get(model, model)),
                          ensure_ascii=False).encode("utf-8")
        s = self._settings
        attempt = self._attempt if request.stream else self._attempt_whole
        return with_retries(lambda: attempt(body), attempts=s.upstream_max_attempts,
                            backoff_s=s.upstream_backoff_s, upstream="Upstream",
                            honour_retry_after=True)

    def _attempt_whole(self, body: bytes) -> Iterator[Delta]:
        """A non-streaming exchange, mapped through the same chunk reader."""
        doc = self._fetch_json("POST", "/chat/completions", body, _COMPLETION_BODY_LIMIT)
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise UpstreamError("The upstream's answer has no choices")
        # The message has the shape of a delta that carries everything at once.
        whole = {"choices": [{"delta": choices[0].get("message"),
                              "finish_reason": choices[0].get("finish_reason")}],
                 "usage": doc.get("usage")}
        yield from _Chunks().deltas(whole)

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "text/event-stream",
                   "user-agent": "streamgate"}
        key = self._key.get()
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _attempt(self, body: bytes) -> Iterator[Delta]:
        s = self._settings
        first_by = time.monotonic() + s.upstream_first_token_timeout_s
        exchange = self._http.open("POST", "/chat/completions", body, self._headers(),
                                   timeout=s.upstream_first_token_timeout_s)
        try:
            if exchange.status != 200:
                raise self._status_error(exchange)
            content_type = exchange.header("content-type")
            if "text/event-stream" not in content_type:
                raise UpstreamError(
                    f"The upstream answered {content_type or 'no content type'}, not a stream")
            decoder = sse.Decoder()
            chunks = _Chunks()
            started = done = False
            while not done:
                if started:
                    data = exchange.read(s.upstream_idle_timeout_s, "The upstream sent nothing "
                                         f"for {s.upstream_idle_timeout_s:g} s")
                else:
                    data = exchange.read(first_by - time.monotonic(), "The upstream sent no "
                                         f"output within {s.upstream_first_token_timeout_s:g} s")
                for event in decoder.feed(data) if data else decoder.end():
                    if event.data == "[DONE]":
                        done = True
                        break
                    for delta in chunks.deltas(_json(event.data)):
                        started = True
                        yield delta
                if not data and not done:
                    raise UpstreamError("The upstream stream ended before [DONE]")
            exchange.finish()
        finally:
            exchange.close()

    def _status_error(self, exchange: Exchange) -> StreamgateError:
        """An upstream HTTP error → the same status class, with an OpenAI error body."""
        status = exchange.status
        retry_after = _retry_after(exchange.header("retry-after"))
        raw = exchange.body(_ERROR_BODY_LIMIT, self._settings.upstream_idle_timeout_s)
        if status in (401, 403):
            # Not the client's fault, and the upstream's message may quote part of our key.
            self._key.invalidate()
            return UpstreamError(f"The upstream rejected the gateway's credentials (HTTP {status})",
                                 code="upstream_auth_failed")
        message, param, code = _error_fields(raw)
        text = f"Upstream: {message}" if message else f"The upstream answered HTTP {status}"
        cap = self._settings.upstream_backoff_s * 8
        if status == 429:
            return RateLimitError(text, retry_after=retry_after or 1.0,
                                  transient=retry_after is None or retry_after <= cap)
        if status == 404:
            return NotFoundError(text, param=param or "model", code=code or "model_not_found")
        if status == 413:
            return PayloadTooLargeError(text)
        if 400 <= status < 500:
            return RequestError(text, param=param, code=code)
        if status == 503:
            return UpstreamUnavailableError(text, retry_after=retry_after or 1.0, transient=True)
        if status == 504:
            return UpstreamTimeoutError(text, transient=True)
        return UpstreamError(text, transient=status >= 500)


class _Chunks:
    """Upstream ``chat.completion.chunk`` objects → deltas. Tool-call indexes are kept as the
    upstream sent them; id and name pass only on a call's first fragment, as OpenAI sends
    them (some servers repeat them, which would make clients concatenate the name)."""

    def __init__(self) -> None:
        self._calls: set[int] = set()

    def deltas(self, chunk: Any) -> Iterator[Delta]:
        if not isinstance(chunk, dict):
            raise UpstreamError("The upstream sent an event that is not a JSON object")
        if chunk.get("error") is not None:
            raise _stream_error(chunk["error"])
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise UpstreamError("The upstream sent a chunk whose 'choices' is not a list")
        for choice in choices:
            yield from self._choice(choice)
        usage = chunk.get("usage")
        if usage is not None:
            yield _usage(usage)

    def _choice(self, choice: Any) -> Iterator[Delta]:
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
            if reason not in FINISH_REASONS:
                raise UpstreamError(f"The upstream stopped with an unknown reason ({reason!r})")
            yield Finish(FINISH_REASONS[reason])

    def _tool_call(self, position: int, call: Any) -> Iterator[Delta]:
        function = call.get("function") if isinstance(call, dict) else None
        index = call.get("index", position) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(index, int):
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


def _usage(usage: Any) -> Usage:
    try:
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        return Usage(prompt_tokens=int(usage["prompt_tokens"]),
                     completion_tokens=int(usage["completion_tokens"]),
                     cached_tokens=None if cached is None else int(cached))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UpstreamError("The upstream sent a malformed 'usage'") from e


def _stream_error(error: Any) -> StreamgateError:
    """An error the upstream reported inside its stream."""
    message = error.get("message") if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    return UpstreamError(f"Upstream: {message}" if message else "The upstream reported an error",
                         code=str(code) if isinstance(code, str) and code else None)


def _json(data: str | bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise UpstreamError("The upstream sent an event that is not valid JSON") from e


def _error_fields(raw: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) from an OpenAI error body, or FastAPI's ``detail``, or text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:500], None, None
    error = doc.get("error", doc) if isinstance(doc, dict) else doc
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or ""
        param, code = error.get("param"), error.get("code")
        return (str(message)[:500],
                param if isinstance(param, str) else None,
                code if isinstance(code, str) else None)
    return str(error)[:500], None, None


def _retry_after(value: str) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


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
    return body


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


class Upstream:
    """Keep-alive HTTP/1.1 connections to one base URL, reused across invocations."""

    def __init__(self, base_url: str, connect_timeout_s: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("STREAMGATE_UPSTREAM_BASE_URL must be an http:// or https:// URL "
                              "such as http://127.0.0.1:8000/v1")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._where = f"{self._host}:{self._port}"  # for messages: never the path or userinfo
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def open(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str],
             *, timeout: float) -> Exchange:
        """Send a request, wait up to ``timeout`` for the response headers."""
        with self._lock:
            reused = self._idle.pop() if self._idle else None
        if reused is not None:
            try:
                return self._send(reused, method, path, body, headers, timeout)
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                reused.close()  # the upstream closed a kept-alive connection: use a new one
        return self._send(self._new(), method, path, body, headers, timeout)

    def _new(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port,
                                               timeout=self._connect_timeout_s,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port,
                                          timeout=self._connect_timeout_s)

    def _send(self, conn: http.client.HTTPConnection, method: str, path: str,
              body: bytes | None, headers: Mapping[str, str], timeout: float) -> Exchange:
        fresh = conn.sock is None
        if fresh:
            try:
                conn.connect()
            except TimeoutError as e:
                conn.close()
                raise UpstreamTimeoutError(f"Could not connect to the upstream at {self._where} "
                                           "in time", transient=True) from e
            except ssl.SSLError as e:
                conn.close()
                raise UpstreamError(f"TLS with the upstream at {self._where} failed") from e
            except OSError as e:  # refused, unreachable, DNS
                conn.close()
                raise UpstreamError(f"Could not reach the upstream at {self._where}",
                                    transient=True) from e
        try:
            assert conn.sock is not None
            conn.sock.settimeout(max(timeout, 0.001))
            conn.request(method, self._prefix + path, body=body, headers=dict(headers))
            response = conn.getresponse()
        except TimeoutError as e:
            conn.close()
            raise UpstreamTimeoutError(
                f"The upstream sent no output within {timeout:g} s") from e
        except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
            conn.close()
            if not fresh:
                raise  # open() retries once on a new connection
            raise UpstreamError(f"The upstream at {self._where} closed the connection",
                                transient=True) from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise UpstreamError(f"The upstream at {self._where} sent a broken response") from e
        return Exchange(self, conn, response)

    def give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class Exchange:
    """One request's response: reads with a timeout each, then either back to the pool
    (``finish()`` after a complete, keep-alive response) or closed (``close()``)."""

    def __init__(self, upstream: Upstream, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse) -> None:
        self._upstream = upstream
        self._conn = conn
        self._response = response
        self._done = False
        self.status = response.status

    def header(self, name: str) -> str:
        return self._response.getheader(name, "") or ""

    def read(self, timeout: float, message: str) -> bytes:
        """The next bytes of the body (b"" at its end), or UpstreamTimeoutError(message)."""
        self._timeout(timeout)
        try:
            return self._response.read1(_READ_SIZE)
        except TimeoutError as e:
            raise UpstreamTimeoutError(message) from e
        except (OSError, http.client.HTTPException) as e:
            raise UpstreamError("The connection to the upstream broke mid-stream") from e

    def body(self, limit: int, timeout: float) -> bytes:
        self._timeout(timeout)
        try:
            return self._response.read(limit)
        except (OSError, http.client.HTTPException):
            return b""

    def finish(self) -> None:
        """After a complete answer: keep the connection if the upstream allows it."""
        try:
            self._timeout(1.0)
            clean = not self._response.read(1) and not self._response.will_close
        except (OSError, http.client.HTTPException):
            clean = False
        if clean:
            self._done = True
            self._response.close()
            self._upstream.give_back(self._conn)

    def close(self) -> None:
        """Drop the connection unless ``finish()`` returned it (client gone, error, timeout)."""
        if not self._done:
            self._done = True
            self._response.close()
            self._conn.close()

    def _timeout(self, seconds: float) -> None:
        sock = self._conn.sock
        if sock is not None:
            sock.settimeout(max(seconds, 0.001))


def create(settings: Settings) -> OpenAIProvider:
    if not settings.upstream_base_url:
        raise ConfigError("STREAMGATE_UPSTREAM_BASE_URL is required when "
                          "STREAMGATE_PROVIDER=openai (e.g. http://127.0.0.1:8000/v1)")
    http_client = Upstream(settings.upstream_base_url, settings.upstream_connect_timeout_s)
    return OpenAIProvider(settings, api_key(settings), http_client)

