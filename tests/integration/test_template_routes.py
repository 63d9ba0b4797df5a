"""The template's REST API routes and Architecture parameter, and the function Makefile
following the architecture (`sam build` passes a makefile build nothing but ARTIFACTS_DIR)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streamgate import handler
from streamgate.config import load_settings
from streamgate.keystore import load_template

pytestmark = pytest.mark.sam

ROOT = Path(__file__).resolve().parents[2]
FUNCTION_DIR = ROOT / "functions" / "streamgate"


def _function() -> dict[str, Any]:
    function: dict[str, Any] = load_template(ROOT / "template.yaml")["Resources"][
        "StreamgateFunction"]["Properties"]
    return function


def test_the_rest_api_has_every_route_the_handler_serves_and_nothing_else() -> None:
    events = _function()["Events"]
    routes = {(e["Properties"]["Path"], e["Properties"]["Method"].upper())
              for e in events.values()}
    table = handler.routes(handler.dialects(load_settings({})))
    served = {(path, method) for path, methods in table.items() for method in methods}
    # every path also takes OPTIONS: CORS preflights reach the function, as on the URL
    assert routes == served | {(path, "OPTIONS") for path in table}


def test_every_rest_route_streams() -> None:
    # The function always answers in the streaming prelude format; a buffered route
    # (no ResponseTransferMode, or the look-alike STREAM) would answer 502.
    for name, event in _function()["Events"].items():
        assert event["Type"] == "Api", name
        assert event["Properties"]["ResponseTransferMode"] == "RESPONSE_STREAM", name
        assert "RestApiId" not in event["Properties"], name  # all on the one ApiUrl API


def test_the_architecture_is_a_parameter_defaulting_to_arm64() -> None:
    template = load_template(ROOT / "template.yaml")
    parameter = template["Parameters"]["Architecture"]
    assert parameter["Default"] == "arm64"
    assert parameter["AllowedValues"] == ["arm64", "x86_64"]
    assert _function()["Architectures"] == [{"Ref": "Architecture"}]


def test_the_function_gets_the_cors_origins_the_function_url_has() -> None:
    env = _function()["Environment"]["Variables"]
    assert env["STREAMGATE_CORS_ALLOW_ORIGINS"] == {"Fn::Join": [",", {"Ref": "CorsAllowOrigins"}]}


def _make(tmp_path: Path, *variables: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "requirements.txt").write_text("markupsafe==3.0.2\n")
    return subprocess.run(
        ["make", "-C", str(FUNCTION_DIR), "build-StreamgateFunction",
         f"ARTIFACTS_DIR={tmp_path / 'out'}", f"REQUIREMENTS={tmp_path / 'requirements.txt'}",
         f"PYTHON={sys.executable}", *variables],
        capture_output=True, text=True, timeout=300)


def test_packaging_follows_architecture_x86_64(tmp_path: Path) -> None:
    # GIVEN a requirement with native code, WHEN built as `ARCHITECTURE=x86_64 sam build` does
    result = _make(tmp_path, "ARCHITECTURE=x86_64")
    assert result.returncode == 0, result.stdout + result.stderr
    # THEN the native library is for Python 3.13 on x86_64 Linux
    natives = [p.name for p in (tmp_path / "out").rglob("*.so")]
    assert natives and all("cpython-313-x86_64-linux-gnu" in n for n in natives), natives


def test_packaging_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    result = _make(tmp_path, "ARCHITECTURE=amd64")
    assert result.returncode != 0
    assert "ARCHITECTURE must be arm64 or x86_64, not 'amd64'" in result.stderr
    assert not (tmp_path / "out").exists()
