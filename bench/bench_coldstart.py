"""Cold start, memory and package size of the Lambda function (issue: run it on AWS Lambda).

    make bench-lambda

- cold start: from spawning `bootstrap` (as the cloud does, with the interpreter and
  bootstrap.py as arguments) to its first GET /next on a fake Runtime API, with the Bedrock
  provider configured, tracing off and on (STREAMGATE_TRACING: the OpenTelemetry SDK and our
  OTLP exporter are set up during init); against the same run's baseline, a FastAPI app under
  uvicorn (what the Lambda Web Adapter runs) from spawn to answering its first request;
  reported as a ratio;
- what tracing's import and set-up cost alone: building the telemetry with and without it in a
  fresh interpreter;
- peak RSS of the runtime process after one streamed invocation through a fake Bedrock;
- the deployment zip's size.

Medians of one run; machines here are shared, so the ratio is the figure to compare.
"""

from __future__ import annotations

import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tests.fake_bedrock import FakeBedrock, Reply, text_events
from tests.fake_runtime_api import FakeRuntimeAPI
from tests.helpers import chat_event

ROOT = Path(__file__).resolve().parent.parent
FUNCTION = ROOT / "functions" / "streamgate"
BOOTSTRAP = FUNCTION / "bootstrap"
ENV = {**os.environ, "STREAMGATE_PROVIDER": "bedrock", "AWS_REGION": "us-east-1",
       "STREAMGATE_ALLOW_UNAUTHENTICATED": "true",
       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
       "PYTHONDONTWRITEBYTECODE": "1"}


# Tracing on, towards a port where nothing listens: init builds the exporter, nothing is sent.
TRACING = {"STREAMGATE_TRACING": "true",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}


def cold_start_ours(tracing: bool = False) -> float:
    with FakeRuntimeAPI([]) as api:
        api.hold_when_empty.clear()
        start = time.perf_counter()
        process = subprocess.Popen([str(BOOTSTRAP), sys.executable, "/var/runtime/bootstrap.py"],
                                   env={**ENV, **(TRACING if tracing else {}),
                                        "AWS_LAMBDA_RUNTIME_API": api.address})
        while not api.next_times:
            time.sleep(0.0005)
        elapsed = api.next_times[0] - start
        api.hold_when_empty.set()
        process.wait(30)
    return elapsed * 1000


def cold_start_fastapi() -> float:
    port = 18000 + os.getpid() % 1000
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.fastapi_app:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"], env=ENV, cwd=ROOT)
    try:
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("POST", "/v1/chat/completions", body=b"{}")
                if conn.getresponse().status == 200:
                    return (time.perf_counter() - start) * 1000
            except OSError:
                time.sleep(0.001)
    finally:
        process.terminate()
        process.wait(10)


_SETUP = """
import sys, time
from streamgate import telemetry
from streamgate.config import load_settings
settings = load_settings({}, provider="bedrock", tracing=sys.argv[1] == "on")
telemetry.logger()  # Powertools' logger: built either way
start = time.perf_counter()
built = telemetry.Telemetry(settings)
print((time.perf_counter() - start) * 1000)
"""


def tracing_setup_ms(tracing: bool) -> float:
    """Building the telemetry (with tracing: importing OpenTelemetry, our exporter, the tracer
    provider and its export thread) in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _SETUP, "on" if tracing else "off"],
                          env={**ENV, **TRACING, "PYTHONPATH": f"{FUNCTION}"},
                          capture_output=True, text=True, check=True, timeout=60)
    return float(done.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    with FakeBedrock([Reply(frames=text_events(*["word "] * 200))]) as bedrock, \
            FakeRuntimeAPI([chat_event({"prompt": "hi", "stream": True})]) as api:
        api.hold_when_empty.clear()
        process = subprocess.Popen(
            [str(BOOTSTRAP), sys.executable, "/var/runtime/bootstrap.py"],
            env={**ENV, "AWS_LAMBDA_RUNTIME_API": api.address,
                 "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": bedrock.url})
        while len(api.next_times) < 2:  # the second GET next: the invocation is done
            time.sleep(0.01)
        status = Path(f"/proc/{process.pid}/status").read_text()
        api.hold_when_empty.set()
        process.wait(30)
    assert api.posted and api.posted[0].chunks[-1][1].endswith(b"data: [DONE]\n\n")
    kib = next(int(line.split()[1]) for line in status.splitlines()
               if line.startswith("VmHWM:"))
    return kib / 1024


def zip_size_kib() -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "artefact"
        subprocess.run(["make", "-s", "-C", str(FUNCTION), "build-StreamgateFunction",
                        f"ARTIFACTS_DIR={out}", f"PYTHON={sys.executable}"], check=True)
        archive = Path(tmp) / "function.zip"
        files = [p for p in out.rglob("*") if p.is_file()]
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, p.relative_to(out))
        return archive.stat().st_size / 1024, len(files)


def main() -> None:
    rounds = 15
    ours, traced, theirs, setup_off, setup_on = [], [], [], [], []
    for _ in range(rounds):  # interleaved, so all see the same machine load
        ours.append(cold_start_ours())
        traced.append(cold_start_ours(tracing=True))
        theirs.append(cold_start_fastapi())
        setup_off.append(tracing_setup_ms(False))
        setup_on.append(tracing_setup_ms(True))
    a, b, t = statistics.median(ours), statistics.median(theirs), statistics.median(traced)
    print(f"cold start, {rounds} rounds each, interleaved")
    print(f"  streamgate bootstrap -> first GET next (Bedrock configured)  median {a:6.1f} ms"
          f"   min {min(ours):6.1f} ms")
    print(f"  the same with tracing on                                    median {t:6.1f} ms"
          f"   min {min(traced):6.1f} ms")
    print(f"  FastAPI + uvicorn -> first response (baseline)              median {b:6.1f} ms"
          f"   min {min(theirs):6.1f} ms")
    print(f"  ratio baseline / streamgate                                  {b / a:6.1f}x")
    print(f"telemetry set-up in a fresh interpreter: tracing off median "
          f"{statistics.median(setup_off):.1f} ms, on median {statistics.median(setup_on):.1f} ms"
          f" (min {min(setup_on):.1f} ms)")
    print(f"peak RSS of one streamed invocation (200 chunks via fake Bedrock)  "
          f"{peak_rss_mib():.1f} MiB")
    size, count = zip_size_kib()
    print(f"deployment zip  {size:.1f} KiB, {count} files")


if __name__ == "__main__":
    main()
