"""DynamoDB endpoints for the tables' failure tests: moto's server on a loopback port, a
TCP endpoint that accepts connections and never answers, and a proxy in front of moto's
server that fails the calls a rule picks. botocore talks to all three over real sockets, so
its timeouts, error parsing and our retries run for real. And the stored responses' table,
built from template.yaml's definition."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.fake_http import start_server

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's server mode on 127.0.0.1:<ephemeral>; yields its URL."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        # The server shares moto's in-process backends: leave no table to the next test.
        conn = http.client.HTTPConnection(f"127.0.0.1:{port}", timeout=10)
        conn.request("POST", "/moto-api/reset")
        conn.getresponse().read()
        conn.close()
        server.stop()


@contextmanager
def hanging_endpoint() -> Iterator[str]:
    """A loopback TCP server that accepts every connection and never answers (a table that
    hangs); yields its URL and closes what it accepted when done."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        for conn in held:
            conn.close()


# What the proxy does with a call a rule picks.
FAIL = "fail"  # answer 500 InternalServerError, as DynamoDB does when it has a bad moment
HANG = "hang"  # never answer (until the proxy stops)
LOSE = "lose"  # forward it (the write happens), then drop the connection: the answer is lost
# A BatchWriteItem or BatchGetItem: forward only its first request of each table and answer the
# rest as UnprocessedItems / UnprocessedKeys, as DynamoDB does with what it throttled.
PARTIAL = "partial"
HOLD = "hold"  # forward it once ``released`` is set (a slow table), then answer


@dataclass
class Rule:
    operation: str  # the X-Amz-Target call name, e.g. "UpdateItem"
    contains: str  # a substring of the request body ("" for any)
    action: str
    times: int | None = None  # how many calls it applies to (None: all)


@dataclass
class Call:
    operation: str
    body: dict[str, Any]
    action: str


class FlakyTable:
    """A proxy to a DynamoDB endpoint that applies the first matching :class:`Rule` to each
    call and forwards the rest; ``calls`` records every call and what was done with it."""

    def __init__(self, upstream: str, rules: list[Rule] | None = None) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.rules = list(rules or [])
        self.calls: list[Call] = []
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._server = start_server(self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def close(self) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FlakyTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def calls_of(self, operation: str) -> list[Call]:
        return [c for c in self.calls if c.operation == operation]

    def _decide(self, operation: str, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        with self._lock:
            for rule in self.rules:
                if rule.operation == operation and rule.contains in text and (
                        rule.times is None or rule.times > 0):
                    if rule.times is not None:
                        rule.times -= 1
                    action = rule.action
                    break
            else:
                action = "forward"
            self.calls.append(Call(operation, json.loads(raw or b"{}"), action))
        return action

    def _forward(self, handler: BaseHTTPRequestHandler, raw: bytes) -> tuple[int, Any, bytes]:
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in handler.headers.items()
                       if k.lower() not in ("host", "connection", "content-length")}
            conn.request("POST", handler.path, body=raw, headers=headers)
            answer = conn.getresponse()
            return answer.status, answer.getheaders(), answer.read()
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                operation = self.headers.get("x-amz-target", "").rpartition(".")[2]
                action = proxy._decide(operation, raw)
                if action == HANG:
                    proxy.released.wait(60)
                    self.close_connection = True
                    return
                if action == FAIL:
                    body = json.dumps({
                        "__type": "com.amazonaws.dynamodb.v20120810#InternalServerError",
                        "message": "Internal server error"}).encode()
                    self.send_response(500)
                    self.send_header("content-type", "application/x-amz-json-1.0")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                withheld: dict[str, Any] = {}
                if action == PARTIAL:
                    raw, withheld = _withhold(operation, raw)
                if action == HOLD:
                    proxy.released.wait(60)
                status, headers, body = proxy._forward(self, raw)
                if action == PARTIAL and status == 200:
                    body = json.dumps({**json.loads(body), **withheld}).encode()
                    headers = [(k, v) for k, v in headers if k.lower() != "x-amz-crc32"]
                if action == LOSE:
                    self.close_connection = True
                    return
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("connection", "transfer-encoding", "content-length",
                                            "server", "date"):
                        self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


def _withhold(operation: str, raw: bytes) -> tuple[bytes, dict[str, Any]]:
    """A batch request cut to the first request of each table, and what DynamoDB answers about
    the rest (``UnprocessedItems`` or ``UnprocessedKeys``)."""
    doc = json.loads(raw)
    kept: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for table, requests in doc["RequestItems"].items():
        if operation == "BatchGetItem":
            keys = requests["Keys"]
            kept[table] = {**requests, "Keys": keys[:1]}
            if keys[1:]:
                rest[table] = {**requests, "Keys": keys[1:]}
        else:
            kept[table] = requests[:1]
            if requests[1:]:
                rest[table] = requests[1:]
    name = "UnprocessedKeys" if operation == "BatchGetItem" else "UnprocessedItems"
    return json.dumps({**doc, "RequestItems": kept}).encode(), {name: rest}


def create_responses_table(client: Any, table: str) -> None:
    """The stored responses' table exactly as template.yaml declares it, as far as the API
    creates it (point-in-time recovery and encryption at rest are CloudFormation's and change
    nothing a caller sees)."""
    from streamgate.keystore import load_template

    definition = load_template(ROOT / "template.yaml")["Resources"]["ResponsesTable"][
        "Properties"]
    # Whatever the template adds must be created here too, or knowingly left out.
    assert set(definition) == {"BillingMode", "AttributeDefinitions", "KeySchema",
                               "TimeToLiveSpecification", "PointInTimeRecoverySpecification",
                               "SSESpecification"}
    client.create_table(TableName=table, BillingMode=definition["BillingMode"],
                        AttributeDefinitions=definition["AttributeDefinitions"],
                        KeySchema=definition["KeySchema"])
    client.update_time_to_live(TableName=table,
                               TimeToLiveSpecification=definition["TimeToLiveSpecification"])


def client_for(url: str, *, timeout_s: float = 5.0) -> Any:
    """A DynamoDB client for ``url`` that fails fast (for checking a table's contents)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("dynamodb", endpoint_url=url, config=Config(
        connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1}))

