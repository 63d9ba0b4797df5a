"""The dev server with a scripted fast provider, for bench/bench_load.py: the real HTTP driver,
handler, chunk building and SSE encoding; only the model is replaced. Prints its port, then
serves until terminated."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Iterator

from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.devserver import DevServer
from streamgate.handler import App
from streamgate.providers import Delta, Finish, TextDelta, Usage
from streamgate.validation import ChatRequest


class FastProvider:
    name = "scripted"
    capabilities: frozenset[str] = frozenset()

    def __init__(self, tokens: int, interval_s: float) -> None:
        self.tokens = tokens
        self.interval_s = interval_s

    def default_model(self) -> str:
        return "fast"

    def models(self) -> list[str]:
        return ["fast"]

    def stream(self, request: ChatRequest, model: str,
                   deadline: Deadline) -> Iterator[Delta]:
        for i in range(self.tokens):
            if i and self.interval_s:
                time.sleep(self.interval_s)
            yield TextDelta(f" tok{i}")
        yield Finish("stop")
        yield Usage(prompt_tokens=8, completion_tokens=self.tokens)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--interval-ms", type=float, default=2)
    parser.add_argument("--max-streams", type=int, default=100)
    args = parser.parse_args()
    # Telemetry as on Lambda, metrics included; written to /dev/null rather than the console.
    sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - for the life of the process
    app = App(load_settings({}, provider="local"),
              FastProvider(args.tokens, args.interval_ms / 1000))
    # Never fewer connections than streams: a load past 256 clients must not meet the cap.
    server = DevServer(("127.0.0.1", 0), app, max_streams=args.max_streams,
                       max_connections=max(256, args.max_streams))
    print(f"port {server.server_port}", file=sys.__stdout__, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
