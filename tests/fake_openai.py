"""A scripted OpenAI-compatible upstream for what a real server will not do on demand:
throttling, failures, cut streams, garbage, stalls, odd line endings. It speaks HTTP/1.1 with
keep-alive and chunked bodies, records every request, and notes when a client hangs up."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fake_http import start_server, write_chunked


def chunk(content: str | None = None, *, finish: str | None = None, role: str | None = None,
          tool_calls: list[dict[str, Any]] | None = None, reasoning: str | None = None,
          usage: dict[str, Any] | None = None, choices: bool = True) -> dict[str, Any]:
    """An upstream chat.completion.chunk, with the upstream's own id and model."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    doc: dict[str, Any] = {
        "id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 1,
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
    }
    if usage is not None:
        doc["usage"] = usage
    return doc


def sse(*items: dict[str, Any] | str, done: bool = True, eol: str = "\n") -> bytes:
    """Items as SSE events (str items are sent verbatim as the data), then [DONE]."""
    events = [f"data: {json.dumps(i) if isinstance(i, dict) else i}{eol}{eol}" for i in items]
    if done:
        events.append(f"data: [DONE]{eol}{eol}")
    return "".join(events).encode()


def text_stream(*pieces: str, finish: str = "stop", usage: tuple[int, int] | None = (7, 3),
                ) -> bytes:
    items: list[dict[str, Any] | str] = [chunk("", role="assistant")]
    items += [chunk(p) for p in pieces]
    items.append(chunk(finish=finish))
    if usage is not None:
        items.append(chunk(choices=False, usage={
            "prompt_tokens": usage[0], "completion_tokens": usage[1],
            "total_tokens": sum(usage)}))
    return sse(*items)


@dataclass
class Reply:
    """One scripted answer: status, headers and body pieces (floats are pauses). With
    ``cut`` the connection is dropped after the pieces, without ending the chunked body."""

    status: int = 200
    body: list[bytes | float] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "text/event-stream"})
    cut: bool = False


def completion_reply(content: str | None, *, finish: str = "stop",
                     usage: dict[str, Any] | None = None, **message: Any) -> Reply:
    """A non-streaming chat.completion answer."""
    doc: dict[str, Any] = {
        "id": "chatcmpl-upstream", "object": "chat.completion", "created": 1,
        "model": "upstream-model",
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content, **message}}]}
    if usage is not None:
        doc["usage"] = usage
    return Reply(200, [json.dumps(doc).encode()], {"content-type": "application/json"})


def error_reply(status: int, message: str, *, code: str | None = None, param: str | None = None,
                headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": param, "code": code}}).encode()
    return Reply(status, [body], {"content-type": "application/json", **(headers or {})})


class FakeUpstream:
    def __init__(self, replies: list[Reply] | None = None,
                 models: tuple[str, ...] = ("upstream-model",), *,
                 host: str = "127.0.0.1") -> None:
        self.replies = list(replies or [])
        self.models = models
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.connections: set[int] = set()  # client ports seen: one per TCP connection
        self.aborted = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _record(self) -> None:
                fake.connections.add(self.client_address[1])
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length) if length else b""
                fake.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()},
                                      json.loads(raw) if raw else None))

            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                self._record()
                if self.path != "/v1/models":
                    self._send(Reply(404, [b'{"error": {"message": "no such path"}}'],
                                     {"content-type": "application/json"}))
                    return
                body = json.dumps({"object": "list", "data": [
                    {"id": m, "object": "model", "owned_by": "fake"} for m in fake.models]})
                self._send(Reply(200, [body.encode()], {"content-type": "application/json"}))

            def do_POST(self) -> None:  # noqa: N802
                self._record()
                reply = fake.replies.pop(0) if fake.replies else error_reply(
                    500, "script exhausted")
                self._send(reply)

            def _send(self, reply: Reply) -> None:
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                if not write_chunked(self, reply.body, cut=reply.cut):
                    fake.aborted.set()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = start_server(Handler, host)
        self.url = f"http://{host}:{self.server.server_port}/v1"

    def chat_requests(self) -> list[Any]:
        return [body for path, _, body in self.requests if path == "/v1/chat/completions"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
