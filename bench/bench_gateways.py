"""Gateways side by side: Streamgate's dev server and the Portkey gateway (Node), each in front
of the same paced OpenAI-compatible upstream, under the same client load.

    make bench-gateways                    # 3 rounds x 20 s x 50 streams, two paces
    make bench-gateways GATEWAYS_ARGS="--seconds 5 --rounds 1 --gateways devserver"

One upstream (bench/paced_upstream.py, a process of its own) serves every request; the model
name ``paced-<chunks>-<interval µs>`` sets the answer: a first chunk at once, then <chunks>
content chunks <interval> apart (0: the whole answer in one write), a finish chunk, usage,
``[DONE]``. ``--paces 32x2,32x0`` means 32 chunks 2 ms apart, then 32 back to back.

In front of it, in turn, a fresh process of each gateway on 127.0.0.1 (an ephemeral port,
found in /proc), which ends with the bench:

- ``devserver``: ``python -m streamgate.devserver`` as ``make dev`` runs it, provider
  ``openai`` at the upstream, auth off, limits raised past the load, its console (one line per
  request) written to /dev/null; ``devserver:N`` the same with ``--workers N`` (N processes on
  the port, each with the same limits, CPU and RSS summed over the processes); streams wait
  for the upstream in the relay's thread (streamgate/relay.py); ``perthread`` and
  ``perthread:N`` are the same with STREAMGATE_RELAY_LOOP=false, each stream waiting in its
  connection's thread;
- ``portkey``: ``@portkey-ai/gateway`` pinned in bench/package.json and package-lock.json,
  installed here on first use (``npm ci``, from npm's registry) into bench/node_modules, run as
  ``start-server.js --headless`` with bench/portkey_loopback.mjs preloaded (the gateway listens
  on every interface otherwise); requests name the provider in ``x-portkey-provider: openai``
  and the upstream in ``x-portkey-custom-host``. It makes no network call of its own here.

Every gateway gets the same request bytes (the Portkey headers included): a streamed
``POST /v1/chat/completions`` with ``include_usage``. ``--concurrency`` client threads each open
one stream after another on a kept-alive connection, first for ``--warmup`` seconds (not
counted; Node compiles its hot paths), then for ``--seconds``; each reads the raw body to its
end. Reported per gateway and pace: streams per second, time to first byte p50/p99 (request
sent → first read holding ``data:``), errors (any non-200, a body not ending in ``[DONE]``, or
an exception; the target is zero), the gateway's CPU (user + system from /proc, its child
processes included) per stream and per chunk (each ``data:`` event but ``[DONE]``), and its
peak RSS. Rounds alternate the order of the gateways; the table gives medians over rounds.

Client, upstream and gateway share this machine (2 cores here): the bench prints the
upstream's and its own CPU beside the gateway's, and the load average, so a reader can see when
something other than the gateway was the limit. Compare figures from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PORTKEY = BENCH / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
INSTALLED = BENCH / "node_modules" / ".streamgate-lock"  # the lock's hash, once installed
GATEWAYS = ("devserver", "devserver:2", "portkey")
TICK = os.sysconf("SC_CLK_TCK")
PROMPT = "Explain streaming APIs"


@dataclass
class Load:
    """What the clients saw in one window."""

    wall: float = 0.0
    streams: int = 0
    chunks: int = 0
    ttfb_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Result:
    gateway: str
    pace: str
    streams_s: float
    ttfb_p50: float
    ttfb_p99: float
    errors: int
    cpu_per_stream_ms: float
    cpu_per_chunk_us: float
    gateway_cpu: float  # share of one core
    upstream_cpu: float
    client_cpu: float
    peak_rss_mib: float
    load: float  # 1-minute load average at the end of the window


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


# -- processes ------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the bench dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(command: list[str], env: dict[str, str], stdout: int | None,
           stderr: IO[str] | None) -> subprocess.Popen[str]:
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=stderr, text=True, preexec_fn=_die_with_parent)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _clean_env() -> dict[str, str]:
    """The environment without settings that would change what a gateway does: Streamgate's
    own, proxies (Portkey's fetch would use them), Portkey's cache."""
    drop = ("STREAMGATE_", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
            "NO_PROXY", "no_proxy", "REDIS_", "NODE_OPTIONS", "TRUSTED_CUSTOM_HOSTS")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(parents.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants, living or reaped."""
    total = 0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / TICK


def peak_rss_mib(pid: int) -> float:
    total = 0
    for member in _tree(pid):
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{member}/status").read_text().splitlines()
            total += int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    return total / 1024


def listening_port(process: subprocess.Popen[str], name: str, timeout_s: float = 60) -> int:
    """The TCP port ``process`` listens on, from /proc (its sockets' inodes in net/tcp), once
    it does; it must be on 127.0.0.1."""
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        inodes = set()
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{process.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
        with contextlib.suppress(OSError):
            for table in ("tcp", "tcp6"):
                for line in Path(f"/proc/{process.pid}/net/{table}").read_text().splitlines()[1:]:
                    cols = line.split()
                    if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                        address, port = cols[1].split(":")
                        if address != "0100007F":
                            raise RuntimeError(f"{name} listens on {address}, "
                                               "not 127.0.0.1")
                        return int(port, 16)
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen within {timeout_s:g} s")


# -- the peers ------------------------------------------------------------------------------------

def parse_paces(text: str) -> list[tuple[int, int]]:
    """``32x2,32x0`` → [(32 chunks, 2000 µs), (32, 0)]."""
    paces = []
    for item in text.split(","):
        chunks, _, interval_ms = item.strip().partition("x")
        paces.append((int(chunks), round(float(interval_ms or 0) * 1000)))
    return paces


def pace_name(chunks: int, interval_us: int) -> str:
    return (f"{chunks} chunks {interval_us / 1000:g} ms apart" if interval_us
            else f"{chunks} chunks back to back")


def install_portkey() -> None:
    """bench/node_modules as bench/package-lock.json says (``npm ci``), unless already so.
    ``--ignore-scripts``: the gateway's only script is a ``patch-package`` postinstall, and its
    package ships no patches."""
    digest = hashlib.sha256((BENCH / "package-lock.json").read_bytes()).hexdigest()
    if PORTKEY.is_file() and INSTALLED.is_file() and INSTALLED.read_text().strip() == digest:
        return
    npm, node = shutil.which("npm"), shutil.which("node")
    if not npm or not node:
        raise SystemExit("the Portkey gateway needs Node.js and npm: install them, or run "
                         "--gateways devserver")
    print("installing the Portkey gateway (npm ci in bench/) ...", flush=True)
    subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund",
                    "--loglevel=error"], cwd=BENCH, check=True, timeout=600)
    INSTALLED.write_text(digest + "\n")


def dev_workers(name: str) -> int:
    """N of ``devserver:N`` (1 for ``devserver``)."""
    _, _, workers = name.partition(":")
    return int(workers or 1)


@contextlib.contextmanager
def gateway(name: str, upstream: str, models: list[str],
            concurrency: int) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A fresh gateway process in front of ``upstream``, and its port."""
    env = _clean_env()
    if name.startswith(("devserver", "perthread")):
        workers = dev_workers(name)
        env.update(PYTHONPATH=f"{ROOT / 'functions' / 'streamgate'}",
                   STREAMGATE_PROVIDER="openai", STREAMGATE_UPSTREAM_BASE_URL=upstream,
                   STREAMGATE_UPSTREAM_MODELS=",".join(models), STREAMGATE_AUTH="none",
                   STREAMGATE_RELAY_LOOP="false" if name.startswith("perthread") else "true")
        command = [sys.executable, "-m", "streamgate.devserver", "--host", "127.0.0.1",
                   "--port", "0", "--workers", str(workers),
                   "--max-streams", str(concurrency * 2),
                   "--max-connections", str(max(256, concurrency * 2))]
    else:
        env.update(NODE_ENV="production")
        command = [shutil.which("node") or "node", "--import",
                   (BENCH / "portkey_loopback.mjs").as_uri(), str(PORTKEY), "--port=0",
                   "--headless"]
    with tempfile.TemporaryFile("w+") as log:  # stderr: shown if it fails, and Portkey's
        process = _start(command, env, subprocess.DEVNULL, log)
        try:
            try:
                port = listening_port(process, name)
            except RuntimeError as e:
                log.seek(0)
                raise SystemExit(f"{name} did not start: {e}\n{log.read()[-2000:]}") from e
            yield process, port
        finally:
            _stop(process)
            log.seek(0)
            tail = log.read()[-2000:].strip()
            if tail and name == "portkey":  # the gateway writes only errors there
                print(f"  {name} stderr: {tail}", file=sys.stderr)


# -- the clients ----------------------------------------------------------------------------------

def drive(port: int, body: bytes, headers: dict[str, str], concurrency: int,
          seconds: float) -> Load:
    """``concurrency`` threads, each opening one stream after another until ``seconds`` have
    passed (a stream under way is finished), reading the raw body in large reads."""
    load = Load()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        ttfb: list[float] = []
        errors: list[str] = []
        streams = chunks = 0
        while time.monotonic() < stop_at:
            try:
                start = time.perf_counter()
                conn.request("POST", "/v1/chat/completions", body, headers)
                response = conn.getresponse()
                first = 0.0
                parts = []
                while data := response.read1(65536):
                    if not first and b"data:" in data:
                        first = time.perf_counter() - start
                    parts.append(data)
                whole = b"".join(parts)
                if response.status != 200:
                    errors.append(f"status {response.status}: {whole[:200]!r}")
                elif not whole.rstrip().endswith(b"data: [DONE]"):
                    errors.append(f"no [DONE]: ...{whole[-200:]!r}")
                else:
                    streams += 1
                    chunks += whole.count(b"data: ") - 1
                    ttfb.append(first * 1000)
            except Exception as e:  # noqa: BLE001 - every failure is a reported error
                errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()
        with lock:
            load.streams += streams
            load.chunks += chunks
            load.ttfb_ms += ttfb
            load.errors += errors

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.wall = time.monotonic() - started
    return load


def measure(name: str, upstream_process: subprocess.Popen[str], upstream: str,
            models: list[str], model: str, pace: str, args: argparse.Namespace) -> Result:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}],
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    headers = {"content-type": "application/json", "authorization": "Bearer unused",
               "x-portkey-provider": "openai", "x-portkey-custom-host": upstream}
    with gateway(name, upstream, models, args.concurrency) as (process, port):
        if args.warmup:
            drive(port, body, headers, args.concurrency, args.warmup)
        cpu = cpu_seconds(process.pid)
        upstream_cpu = cpu_seconds(upstream_process.pid)
        client_cpu = sum(os.times()[:2])
        load = drive(port, body, headers, args.concurrency, args.seconds)
        cpu = cpu_seconds(process.pid) - cpu
        upstream_cpu = cpu_seconds(upstream_process.pid) - upstream_cpu
        client_cpu = sum(os.times()[:2]) - client_cpu
        peak = peak_rss_mib(process.pid)
    for error in sorted(set(load.errors))[:5]:
        print(f"    error: {error}", file=sys.stderr)
    return Result(
        gateway=name, pace=pace, streams_s=load.streams / load.wall,
        ttfb_p50=pct(load.ttfb_ms, 0.5), ttfb_p99=pct(load.ttfb_ms, 0.99),
        errors=len(load.errors),
        cpu_per_stream_ms=1000 * cpu / max(1, load.streams),
        cpu_per_chunk_us=1e6 * cpu / max(1, load.chunks),
        gateway_cpu=cpu / load.wall, upstream_cpu=upstream_cpu / load.wall,
        client_cpu=client_cpu / load.wall, peak_rss_mib=peak, load=os.getloadavg()[0])


# -- the report -----------------------------------------------------------------------------------

COLUMNS = (("streams/s", "streams_s", "{:.1f}"), ("TTFB p50", "ttfb_p50", "{:.1f} ms"),
           ("TTFB p99", "ttfb_p99", "{:.1f} ms"), ("errors", "errors", "{:d}"),
           ("CPU/stream", "cpu_per_stream_ms", "{:.2f} ms"),
           ("CPU/chunk", "cpu_per_chunk_us", "{:.1f} µs"),
           ("gateway CPU", "gateway_cpu", "{:.0%}"), ("upstream CPU", "upstream_cpu", "{:.0%}"),
           ("client CPU", "client_cpu", "{:.0%}"), ("peak RSS", "peak_rss_mib", "{:.1f} MiB"),
           ("load", "load", "{:.1f}"))


def row(label: str, values: dict[str, float]) -> str:
    cells = [fmt.format(int(values[key]) if fmt == "{:d}" else values[key])
             for _, key, fmt in COLUMNS]
    return f"  {label:<12}" + "".join(f"{cell:>14}" for cell in cells)


def summary(results: list[Result], gateways: list[str], paces: list[str]) -> None:
    print("\nmedians over rounds (errors: the sum)")
    print(f"  {'':<12}" + "".join(f"{title:>14}" for title, _, _ in COLUMNS))
    for pace in paces:
        print(f" {pace}")
        medians: dict[str, dict[str, float]] = {}
        for name in gateways:
            runs = [r for r in results if r.gateway == name and r.pace == pace]
            if not runs:
                continue
            medians[name] = {key: (sum(getattr(r, key) for r in runs) if key == "errors"
                                   else statistics.median(getattr(r, key) for r in runs))
                             for _, key, _ in COLUMNS}
            print(row(name, medians[name]))
        peer = medians.get("portkey")
        for name, dev in medians.items():
            if peer is not None and name.startswith(("devserver", "perthread")):
                print(f"  {name} / Portkey: streams/s "
                      f"{dev['streams_s'] / peer['streams_s']:.2f}x, TTFB p99 "
                      f"{dev['ttfb_p99'] / peer['ttfb_p99']:.2f}x, CPU/stream "
                      f"{dev['cpu_per_stream_ms'] / peer['cpu_per_stream_ms']:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateways", default=",".join(GATEWAYS),
                        help="comma-separated, of: devserver, devserver:N (--workers N), "
                             "perthread[:N] (the relay off), portkey (default: devserver, "
                             "devserver:2, portkey)")
    parser.add_argument("--paces", default="32x2,32x0",
                        help="CHUNKSxINTERVAL_MS, comma-separated (default 32x2,32x0: 32 chunks "
                             "2 ms apart, then back to back)")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gateways = [g.strip() for g in args.gateways.split(",") if g.strip()]
    known = re.compile(r"(devserver|perthread)(:[1-9][0-9]?)?|portkey")
    if not gateways or not all(known.fullmatch(g) for g in gateways):
        parser.error("--gateways: choose from devserver, devserver:N (N from 1 to 99), "
                     "perthread, perthread:N, portkey")
    paces = parse_paces(args.paces)
    models = [f"paced-{chunks}-{interval}" for chunks, interval in paces]
    if "portkey" in gateways:
        install_portkey()

    upstream_process = _start(
        [sys.executable, str(BENCH / "paced_upstream.py"), "--first-token-ms", "0"],
        _clean_env(), subprocess.PIPE, None)
    results: list[Result] = []
    try:
        assert upstream_process.stdout is not None
        upstream = f"http://127.0.0.1:{int(upstream_process.stdout.readline().split()[-1])}/v1"
        print(f"gateways: {', '.join(gateways)}; {args.concurrency} concurrent streams, "
              f"{args.warmup:g} s warm-up + {args.seconds:g} s per window, {args.rounds} rounds; "
              f"{os.cpu_count()} CPUs; load average at start "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        print(f"  {'':<12}" + "".join(f"{title:>14}" for title, _, _ in COLUMNS))
        for n in range(args.rounds):
            order = gateways if n % 2 == 0 else gateways[::-1]
            for (chunks, interval), model in zip(paces, models, strict=True):
                pace = pace_name(chunks, interval)
                print(f" round {n + 1}, {pace}", flush=True)
                for name in order:
                    result = measure(name, upstream_process, upstream, models, model, pace, args)
                    results.append(result)
                    print(row(name, vars(result)), flush=True)
    finally:
        _stop(upstream_process)
    summary(results, gateways, [pace_name(*p) for p in paces])
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
