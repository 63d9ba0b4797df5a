"""A fake Amazon Bedrock Runtime endpoint speaking the real wire formats, so botocore's own
serializer and event-stream parser run: ``application/vnd.amazon.eventstream`` frames (prelude,
headers, CRC32s) for ConverseStream and InvokeModelWithResponseStream (whose ``chunk`` events
carry one Anthropic Messages event each, base64 in ``bytes`` as botocore's model says), JSON
answers (CountTokens), and AWS JSON error responses (``x-amzn-ErrorType``).

Reach it with ``boto3.client("bedrock-runtime", endpoint_url=fake.url)`` or through
``AWS_ENDPOINT_URL_BEDROCK_RUNTIME``. It replays a script and records each request's JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

from tests.fake_http import start_server, write_chunked


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    # type 7 = string, with a 2-byte length
    return struct.pack("!B", len(raw_name)) + raw_name + b"\x07" + struct.pack(
        "!H", len(raw_value)) + raw_value


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (lengths + CRC), headers, payload, message CRC."""
    head = b"".join(_header(k, v) for k, v in headers.items())
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack("!II", total, len(head))
    prelude += struct.pack("!I", binascii.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + head + payload
    return message + struct.pack("!I", binascii.crc32(message) & 0xFFFFFFFF)


def event(event_type: str, body: dict[str, Any]) -> bytes:
    return frame({":event-type": event_type, ":content-type": "application/json",
                  ":message-type": "event"}, json.dumps(body).encode())


def stream_exception(exception_type: str, message: str) -> bytes:
    return frame({":exception-type": exception_type, ":content-type": "application/json",
                  ":message-type": "exception"}, json.dumps({"message": message}).encode())


def text_events(*pieces: str, stop: str = "end_turn", usage: tuple[int, int] = (10, 3),
                ) -> list[bytes | float]:
    """The events Bedrock sends for a plain text answer."""
    return [
        event("messageStart", {"role": "assistant"}),
        *text_block(0, *pieces),
        *finish_events(stop, usage),
    ]


def text_block(index: int, *pieces: str) -> list[bytes | float]:
    return [*[event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": p}})
              for p in pieces],
            event("contentBlockStop", {"contentBlockIndex": index})]


def reasoning_block(index: int, *pieces: str) -> list[bytes | float]:
    """Reasoning text, then the signature Bedrock ends a reasoning block with."""
    return [*[event("contentBlockDelta", {"contentBlockIndex": index,
                                          "delta": {"reasoningContent": {"text": p}}})
              for p in pieces],
            event("contentBlockDelta", {"contentBlockIndex": index,
                                        "delta": {"reasoningContent": {"signature": "c2ln"}}}),
            event("contentBlockStop", {"contentBlockIndex": index})]


def tool_block(index: int, tool_use_id: str, name: str, *pieces: str) -> list[bytes | float]:
    """A tool-use block: its start (id, name), then the JSON input in pieces."""
    return [event("contentBlockStart", {"contentBlockIndex": index, "start": {
                "toolUse": {"toolUseId": tool_use_id, "name": name}}}),
            *[event("contentBlockDelta", {"contentBlockIndex": index,
                                          "delta": {"toolUse": {"input": p}}}) for p in pieces],
            event("contentBlockStop", {"contentBlockIndex": index})]


def finish_events(stop: str = "end_turn", usage: tuple[int, int] = (10, 3), *,
                  cache: tuple[int, int] = (0, 0)) -> list[bytes | float]:
    """messageStop and metadata; ``cache`` is (read, write) input tokens."""
    counts = {"inputTokens": usage[0], "outputTokens": usage[1],
              "totalTokens": usage[0] + usage[1] + sum(cache)}
    if any(cache):
        counts |= {"cacheReadInputTokens": cache[0], "cacheWriteInputTokens": cache[1]}
    return [event("messageStop", {"stopReason": stop}),
            event("metadata", {"usage": counts, "metrics": {"latencyMs": 100}})]


def start_event() -> bytes:
    return event("messageStart", {"role": "assistant"})


# -- InvokeModelWithResponseStream: Anthropic events in chunks --------------------------------

def chunk(anthropic_event: dict[str, Any]) -> bytes:
    """One ``chunk`` event whose ``bytes`` is an Anthropic event's JSON."""
    raw = json.dumps(anthropic_event).encode()
    return event("chunk", {"bytes": base64.b64encode(raw).decode()})


def claude_start(input_tokens: int = 10, *, cache: tuple[int, int] = (0, 0),
                 model: str = "claude-sonnet-4-5-20250929") -> dict[str, Any]:
    """``message_start`` as Claude on Bedrock sends it; ``cache`` is (read, write)."""
    return {"type": "message_start", "message": {
        "id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": cache[1],
                  "cache_read_input_tokens": cache[0], "output_tokens": 1}}}


def claude_text(index: int, *pieces: str) -> list[dict[str, Any]]:
    return [{"type": "content_block_start", "index": index,
             "content_block": {"type": "text", "text": ""}},
            *({"type": "content_block_delta", "index": index,
               "delta": {"type": "text_delta", "text": p}} for p in pieces),
            {"type": "content_block_stop", "index": index}]


def claude_thinking(index: int, signature: str, *pieces: str) -> list[dict[str, Any]]:
    return [{"type": "content_block_start", "index": index,
             "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
            *({"type": "content_block_delta", "index": index,
               "delta": {"type": "thinking_delta", "thinking": p}} for p in pieces),
            {"type": "content_block_delta", "index": index,
             "delta": {"type": "signature_delta", "signature": signature}},
            {"type": "content_block_stop", "index": index}]


def claude_tool(index: int, tool_id: str, name: str, *pieces: str) -> list[dict[str, Any]]:
    return [{"type": "content_block_start", "index": index,
             "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}}},
            *({"type": "content_block_delta", "index": index,
               "delta": {"type": "input_json_delta", "partial_json": p}} for p in pieces),
            {"type": "content_block_stop", "index": index}]


def claude_end(stop: str = "end_turn", output_tokens: int = 5,
               stop_sequence: str | None = None) -> list[dict[str, Any]]:
    """``message_delta`` and ``message_stop`` (with Bedrock's invocation metrics)."""
    return [{"type": "message_delta", "delta": {"stop_reason": stop,
                                                "stop_sequence": stop_sequence},
             "usage": {"output_tokens": output_tokens}},
            {"type": "message_stop", "amazon-bedrock-invocationMetrics": {
                "inputTokenCount": 10, "outputTokenCount": output_tokens,
                "invocationLatency": 100, "firstByteLatency": 50}}]


def claude_events(*pieces: str, stop: str = "end_turn") -> list[bytes | float]:
    """The chunks of a plain text answer from Claude."""
    return [chunk(e) for e in (claude_start(), {"type": "ping"}, *claude_text(0, *pieces),
                               *claude_end(stop))]


@dataclass
class Reply:
    """One scripted answer: an HTTP error, or a 200 with frames (floats are pauses)."""

    status: int = 200
    error_type: str = ""
    message: str = ""
    frames: list[bytes | float] = field(default_factory=list)
    # A plain JSON answer instead of an event stream (CountTokens).
    json: dict[str, Any] | None = None


class FakeBedrock:
    def __init__(self, replies: list[Reply] | None = None) -> None:
        self.replies = list(replies or [])
        self.requests: list[tuple[str, dict[str, Any]]] = []
        # Each request's operation, from its path: converse-stream,
        # invoke-with-response-stream, invoke, count-tokens.
        self.operations: list[str] = []
        self.headers: list[dict[str, str]] = []  # each request's headers, lower-cased names
        # Set when a client hung up while a reply was still being written.
        self.aborted = threading.Event()
        self._clients: list[Any] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - stdlib naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                parts = self.path.split("/")  # /model/{modelId}/converse-stream
                fake.requests.append((unquote(parts[2]), json.loads(body or b"{}")))
                fake.operations.append(parts[3] if len(parts) > 3 else "")
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                reply = fake.replies.pop(0) if fake.replies else Reply(
                    500, "InternalServerException", "script exhausted")
                if reply.status != 200:
                    payload = json.dumps({"message": reply.message}).encode()
                    self.send_response(reply.status)
                    self.send_header("x-amzn-ErrorType", reply.error_type)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if reply.json is not None:
                    payload = json.dumps(reply.json).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.amazon.eventstream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if not write_chunked(self, reply.frames):
                    fake.aborted.set()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = start_server(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def client(self, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "bedrock-runtime", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}, **config))
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeBedrock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
