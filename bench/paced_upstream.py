"""An OpenAI-compatible upstream that streams at a model's pace, for bench/bench_lmi.py: every
POST .../chat/completions is answered 200 with the first chunk after --first-token-ms, then
--chunks content chunks --interval-ms apart, a finish chunk, usage and [DONE], over HTTP/1.1
keep-alive. A request for the model ``paced-<chunks>-<interval µs>`` sets both for itself
(bench_pipeline.py's Lambda-loop figures use several lengths and paces from one server); an
interval of 0 sends the whole answer in one write, so a reader is never waiting for it.
Prints its port, then serves until terminated."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _event(doc: dict[str, Any] | str) -> bytes:
    data = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--first-token-ms", type=float, default=150)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--interval-ms", type=float, default=25)
    args = parser.parse_args()

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _event({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                       "model": "m", "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": finish}]})

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # As servers in front of models do (Go, uvicorn): each chunk goes out when written.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_POST(self) -> None:  # noqa: N802 - stdlib naming
            request = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            chunks, interval_s = args.chunks, args.interval_ms / 1000
            model = str(request.get("model", "")).split("-")
            if len(model) == 3 and model[0] == "paced":
                chunks, interval_s = int(model[1]), int(model[2]) / 1e6
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            events = [chunk({"role": "assistant", "content": "Streaming"})]
            events += [chunk({"content": f" word{i}"}) for i in range(chunks)]
            events.append(chunk({}, "stop"))
            events.append(_event({"id": "chatcmpl-up", "object": "chat.completion.chunk",
                                  "created": 1, "model": "m", "choices": [],
                                  "usage": {"prompt_tokens": 12,
                                            "completion_tokens": chunks + 1,
                                            "total_tokens": chunks + 13}}))
            events.append(_event("[DONE]"))
            time.sleep(args.first_token_ms / 1000)
            if not interval_s:  # back to back: the whole answer at once, as fast as TCP goes
                events = [b"".join(events)]
            try:
                for n, event in enumerate(events):
                    if 1 <= n <= chunks and interval_s:
                        time.sleep(interval_s)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True

        def log_message(self, format: str, *a: Any) -> None:  # noqa: A002
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # a burst of 64 new connections must not meet a full backlog

    server = Server(("127.0.0.1", 0), Handler)
    print(f"port {server.server_port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
