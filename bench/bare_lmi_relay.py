"""The floor of the threads model of bench/bench_lmi.py: N threads in one process, each a loop
that polls the Runtime API, asks the upstream for the stream and writes every upstream read to
the Runtime API as one chunk, nothing else (no parsing, validation, deadline, telemetry).
What a thread per stream costs on this machine before any of Streamgate's work.

    python bench/bare_lmi_relay.py THREADS UPSTREAM_URL     # AWS_LAMBDA_RUNTIME_API set

Each loop ends when the Runtime API answers its poll with anything but 200 (the fake answers
410 once it has nothing more to hand out).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import threading
from urllib.parse import urlsplit

PRELUDE = json.dumps({"statusCode": 200, "headers": {
    "content-type": "text/event-stream"}}).encode() + b"\0" * 8


def loop(api: str, upstream: str, body: bytes) -> None:
    try:
        relay(api, upstream, body)
    except Exception as e:  # a loop that fails is said, not silent: its streams go unserved
        print(f"bare relay loop failed: {e!r}", file=sys.stderr, flush=True)
        raise


def relay(api: str, upstream: str, body: bytes) -> None:
    target = urlsplit(upstream)
    runtime = http.client.HTTPConnection(api)
    runtime.connect()
    assert runtime.sock is not None  # each chunk goes out when written, as the runtime's do
    runtime.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    model = http.client.HTTPConnection(target.hostname or "", target.port)
    while True:
        runtime.request("GET", "/2018-06-01/runtime/invocation/next")
        polled = runtime.getresponse()
        polled.read()
        if polled.status != 200:
            return
        request_id = polled.headers["Lambda-Runtime-Aws-Request-Id"]
        model.request("POST", f"{target.path}/chat/completions", body,
                      {"content-type": "application/json"})
        answer = model.getresponse()
        # The poll's connection carries the response too, as the runtime's own client does.
        runtime.putrequest("POST", f"/2018-06-01/runtime/invocation/{request_id}/response")
        runtime.putheader("Lambda-Runtime-Function-Response-Mode", "streaming")
        runtime.putheader("Content-Type", "application/vnd.awslambda.http-integration-response")
        runtime.putheader("Transfer-Encoding", "chunked")
        runtime.endheaders()
        assert runtime.sock is not None
        send = runtime.sock.sendall
        send(b"%x\r\n%s\r\n" % (len(PRELUDE), PRELUDE))
        while data := answer.read1(65536):
            send(b"%x\r\n%s\r\n" % (len(data), data))
        send(b"0\r\n\r\n")
        runtime.getresponse().read()


def main() -> int:
    threads_n, upstream = int(sys.argv[1]), sys.argv[2]
    api = os.environ["AWS_LAMBDA_RUNTIME_API"]
    body = json.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "Explain streaming APIs"}]}
                      ).encode()
    threads = [threading.Thread(target=loop, args=(api, upstream, body))
               for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
