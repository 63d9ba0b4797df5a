"""``make bench-gateways`` runs end to end: a short run against the dev server alone (no Node,
no npm) prints its figures with every stream answered in full."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gateway_bench_serves_streams_through_the_dev_server_without_errors() -> None:
    # GIVEN the bench, the dev server only, a short window and a small load
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'functions' / 'streamgate'}:{ROOT}"}
    # WHEN it runs
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gateways.py"), "--gateways", "devserver",
         "--paces", "8x1", "--concurrency", "4", "--seconds", "1.5", "--warmup", "0",
         "--rounds", "1"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    # THEN it succeeds, and its summary row gives streams per second and zero errors
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.split("medians over rounds", 1)[1]
    row = next(line for line in summary.splitlines() if line.startswith("  devserver"))
    cells = [row[14 + 14 * i:14 + 14 * (i + 1)].strip() for i in range(4)]
    streams_s, _, _, errors = cells
    assert float(streams_s) > 0
    assert errors == "0"
