"""A fake Lambda Runtime API: a real HTTP server on 127.0.0.1:0 that hands out queued events,
answers 410 when they run out (so the loop ends, as in aws-lambda-go's invoke_loop_test.go),
and records what the runtime sent: headers, each chunk with its arrival time, and trailers.

An :class:`Invoke` in the queue scripts a hostile Runtime API for one invocation: other
``next`` headers, a raw event, and how ``/response`` and ``/error`` are answered (a 500, a
reply cut short, a connection reset after some chunks).

Like Lambda Managed Instances it serves several ``next`` polls at once, each invocation's
posts answered as that invocation's script says: ``hold_until_polls=N`` answers no poll until
N are waiting together (``max_waiting`` says how many ever were), so the N invocations are
handed out at the same moment; ``broken`` answers every later poll with bytes that are not
HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

from tests.fake_http import start_server


@dataclass
class Invoke:
    """One invocation as scripted. ``headers`` replace the ``next`` headers of the same name
    (a None value leaves that header out); ``event`` bytes are sent verbatim. ``response`` and
    ``error`` say how to answer those posts: "ok" (202), "500", "short" (a 202 whose body is
    cut short), "reset-after-<n>" (the connection closed after n chunks), or
    "stall-after-<n>" (nothing more read after n chunks, for 8 s, then closed).
    ``rest_after``: next's answer is its status line alone until this event is set (10 s at
    most), then its headers and event: an answer caught arriving."""

    event: Any
    headers: dict[str, str | None] = field(default_factory=dict)
    response: str = "ok"
    error: str = "ok"
    rest_after: threading.Event | None = None


@dataclass
class Posted:
    path: str
    headers: dict[str, str]
    body: bytes = b""
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)


class FakeRuntimeAPI:
    def __init__(self, events: list[dict[str, Any]] | None = None, *,
                 deadline_in_ms: int = 60_000, hold_until_polls: int = 1) -> None:
        self.events = list(events or [])
        self.deadline_in_ms = deadline_in_ms
        self.hold_until_polls = hold_until_polls
        self.max_waiting = 0  # the most GET next polls ever open at once
        self.broken = False
        self.posted: list[Posted] = []
        # Arrival time (perf_counter) of each GET next, for cold-start measurements.
        self.next_times: list[float] = []
        # When each invocation was handed out (monotonic, as chunk times), by request id.
        self.handed_out: dict[str, float] = {}
        # Request ids whose answer has begun: its status line was sent (see Invoke.rest_after).
        self.begun: list[str] = []
        # Cleared to keep the loop waiting in its last GET next (to read its RSS, say).
        self.hold_when_empty = threading.Event()
        self.hold_when_empty.set()
        self.chunk_arrived = threading.Condition()
        self._counter = 0
        self._current: Invoke = Invoke(None)
        self._invokes: dict[str, Invoke] = {}  # request id -> its script
        self._polls = threading.Condition()
        self._waiting = 0
        self._gate_open = hold_until_polls <= 1
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Like Lambda's own (Go) Runtime API: an answer's header and body writes are
                # not held back for the runtime's delayed ACK (Nagle), which adds 40 ms.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                fake.next_times.append(time.perf_counter())
                if fake.broken:
                    self.close_connection = True
                    self.wfile.write(b"this is not HTTP\r\n\r\n")
                    return
                fake._wait_for_company()
                if not fake.events:
                    fake.hold_when_empty.wait(30)
                    if fake.broken:  # broken while this poll waited
                        self.close_connection = True
                        self.wfile.write(b"this is not HTTP\r\n\r\n")
                        return
                with fake._polls:
                    item = fake.events.pop(0) if fake.events else None
                    if item is not None:
                        fake._counter += 1
                        counter = fake._counter
                if not self.path.endswith("/runtime/invocation/next") or item is None:
                    self._answer(410, b'{"errorMessage":"no more invocations"}')
                    return
                invoke = item if isinstance(item, Invoke) else Invoke(item)
                request_id = str(invoke.headers.get("Lambda-Runtime-Aws-Request-Id")
                                 or f"req-{counter}")
                fake._current = invoke
                fake._invokes[request_id] = invoke
                body = (invoke.event if isinstance(invoke.event, bytes)
                        else json.dumps(invoke.event).encode())
                headers: dict[str, str | None] = {
                    "Lambda-Runtime-Aws-Request-Id": f"req-{counter}",
                    "Lambda-Runtime-Deadline-Ms": str(int(time.time() * 1000)
                                                      + fake.deadline_in_ms),
                    "Lambda-Runtime-Invoked-Function-Arn":
                        "arn:aws:lambda:us-east-1:123456789012:function:streamgate",
                    "Lambda-Runtime-Trace-Id":
                        f"Root=1-5759e988-bd862e3fe1be46a99427{counter:04d};Sampled=1",
                    **invoke.headers}
                if invoke.rest_after is not None:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")  # unbuffered: sent now
                    with fake._polls:
                        fake.begun.append(request_id)
                        fake._polls.notify_all()
                    invoke.rest_after.wait(10)
                else:
                    self.send_response(200)
                for name, value in headers.items():
                    if value is not None:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                fake.handed_out[str(headers["Lambda-Runtime-Aws-Request-Id"])] = time.monotonic()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                posted = Posted(self.path, {k.lower(): v for k, v in self.headers.items()})
                fake.posted.append(posted)
                invoke = fake._invokes.get(unquote(self.path.split("/")[-2]), fake._current)
                how = invoke.error if self.path.endswith("/error") else invoke.response
                cut = int(how.rsplit("-", 1)[1]) if how.startswith(("reset-", "stall-")) else None
                if posted.headers.get("transfer-encoding", "").lower() == "chunked":
                    if not self._read_chunked(posted, cut, stall=how.startswith("stall-")):
                        self.close_connection = True  # a reset: hang up mid-request
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                else:
                    posted.body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if how == "500":
                    self._answer(500, b'{"errorMessage":"internal"}')
                elif how == "short":
                    self.send_response(202)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b'{"stat')
                    self.close_connection = True
                else:
                    self._answer(202, b'{"status":"OK"}')

            def _read_chunked(self, posted: Posted, cut: int | None, *,
                              stall: bool = False) -> bool:
                while True:
                    if cut is not None and len(posted.chunks) >= cut:
                        if stall:
                            time.sleep(8)
                        return False
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        break
                    data = self.rfile.read(size)
                    assert self.rfile.read(2) == b"\r\n"
                    with fake.chunk_arrived:
                        posted.chunks.append((time.monotonic(), data))
                        fake.chunk_arrived.notify_all()
                while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    posted.trailers[name.strip()] = value.strip()
                return True

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = start_server(Handler)
        self.address = f"127.0.0.1:{self.server.server_port}"

    def _wait_for_company(self) -> None:
        """Until ``hold_until_polls`` polls wait together (once; 10 s at most)."""
        with self._polls:
            self._waiting += 1
            self.max_waiting = max(self.max_waiting, self._waiting)
            if self._waiting >= self.hold_until_polls:
                self._gate_open = True
                self._polls.notify_all()
            self._polls.wait_for(lambda: self._gate_open, timeout=10)
            self._waiting -= 1

    def wait_for_begun(self, n: int, timeout: float = 10) -> bool:
        """True once ``n`` answers held by ``Invoke.rest_after`` have sent their status line."""
        with self._polls:
            return self._polls.wait_for(lambda: len(self.begun) >= n, timeout)

    def wait_for_chunks(self, n: int, timeout: float = 10, *,
                        request_id: str | None = None) -> bool:
        """True once the current response (or ``request_id``'s) has delivered ``n`` chunks."""
        def arrived() -> bool:
            posts = [p for p in self.posted if request_id is None
                     or p.path == f"/2018-06-01/runtime/invocation/{request_id}/response"]
            return bool(posts) and len(posts[-1].chunks) >= n

        with self.chunk_arrived:
            return self.chunk_arrived.wait_for(arrived, timeout)

    def response_of(self, request_id: str) -> Posted:
        (posted,) = [p for p in self.posted
                     if p.path == f"/2018-06-01/runtime/invocation/{request_id}/response"]
        return posted

    def close(self) -> None:
        self.hold_when_empty.set()  # release polls still held
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeRuntimeAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
