"""Load: concurrent streams against the dev server with a scripted fast provider.

    make bench-load                       # 50 concurrent streams for 60 s
    make bench-load LOAD_ARGS="--concurrency 10 --seconds 5"

The server runs in a process of its own (bench/load_server.py: the real dev server and
pipeline, the provider replaced by one that yields --tokens deltas --interval-ms apart), bound to
127.0.0.1 on an ephemeral port, and stops with the bench. Each client thread opens one stream
after another for the duration, reading the response as a user does (`data:` lines to
`[DONE]`). Reported: time to first byte p50/p95/p99 (request sent → first `data:` line), streams
per second, errors (any non-200, missing `[DONE]` or exception; the target is zero), and the
server process's CPU (user+system over wall time) and RSS (end and peak). Client and server share
the machine, so compare figures from one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--interval-ms", type=float, default=2)
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'functions' / 'streamgate'}:{ROOT}"}
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "load_server.py"), "--tokens", str(args.tokens),
         "--interval-ms", str(args.interval_ms), "--max-streams", str(args.concurrency * 2)],
        env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[-1])
        body = json.dumps({"prompt": "Explain streaming APIs", "stream": True})
        ttfb: list[float] = []
        errors: list[str] = []
        done = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while time.monotonic() < stop_at:
                try:
                    start = time.perf_counter()
                    conn.request("POST", "/v1/chat/completions", body,
                                 {"content-type": "application/json"})
                    response = conn.getresponse()
                    first = None
                    last = b""
                    for line in response:
                        if line.startswith(b"data: "):
                            if first is None:
                                first = time.perf_counter() - start
                            last = line
                    ok = response.status == 200 and last.strip() == b"data: [DONE]"
                    with lock:
                        if ok and first is not None:
                            ttfb.append(first * 1000)
                            done[0] += 1
                        else:
                            errors.append(f"status {response.status}")
                except Exception as e:  # noqa: BLE001 - every failure is a reported error
                    with lock:
                        errors.append(type(e).__name__)
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.close()

        cpu_before, wall_before = _cpu_seconds(server.pid), time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - wall_before
        cpu = _cpu_seconds(server.pid) - cpu_before
        rss, peak = _rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(10)

    print(f"load: {args.concurrency} concurrent streams for {args.seconds:g} s, "
          f"{args.tokens} deltas {args.interval_ms:g} ms apart, dev server on loopback")
    print(f"  streams completed        {done[0]}  ({done[0] / wall:.1f} streams/s)")
    print(f"  time to first byte       p50 {pct(ttfb, 0.5):.1f} ms   p95 {pct(ttfb, 0.95):.1f} ms"
          f"   p99 {pct(ttfb, 0.99):.1f} ms")
    print(f"  errors                   {len(errors)}"
          + (f"  ({', '.join(sorted(set(errors)))})" if errors else ""))
    print(f"  server CPU               {100 * cpu / wall:.0f}% of one core")
    print(f"  server RSS               {rss:.1f} MiB at the end, peak {peak:.1f} MiB")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
