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
import sys
import threading
from urllib.parse import urlsplit

PRELUDE = json.dumps({"statusCode": 200, "headers": {
    "content-type": "text/event-stream"}}).encode() + b"\0" * 8


def loop(api: str, upstream: str, body: bytes) -> None:
    target = urlsplit(upstream)
    runtime = http.client.HTTPConnection(api)
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
        sink = http.client.HTTPConnection(api)
        sink.putrequest("POST", f"/2018-06-01/runtime/invocation/{request_id}/response")
        sink.putheader("Lambda-Runtime-Function-Response-Mode", "streaming")
        sink.putheader("Content-Type", "application/vnd.awslambda.http-integration-response")
        sink.putheader("Transfer-Encoding", "chunked")
        sink.endheaders()
        assert sink.sock is not None
        sink.sock.sendall(b"%x\r\n%s\r\n" % (len(PRELUDE), PRELUDE))
        while data := answer.read1(65536):
            sink.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
        sink.sock.sendall(b"0\r\n\r\n")
        sink.getresponse().read()
        sink.close()


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
