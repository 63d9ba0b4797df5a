"""Every README example that talks to the dev server, run against it (with the embedded model),
so that what a new user copies works. An example this test does not run must name the test
that covers it in ``COVERED_ELSEWHERE``: a new example cannot go untested unnoticed."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamgate.config import load_settings
from streamgate.handler import App
from streamgate.providers import Provider
from tests.conftest import running_dev_server

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
URL = "http://127.0.0.1:8080"
# Examples run by other tests (a piece of each block -> where).
COVERED_ELSEWHERE = {
    'wire_api = "responses"': "tests/integration/test_codex_cli.py (Codex runs with this "
                              "config.toml)",
    "make dev    # set up everything": "the commands themselves: CI runs `make test`",
    "export AWS_ENDPOINT_URL_DYNAMODB": "tests/integration/test_keys_e2e.py",
    "-m llama_cpp.server": "tests/integration/test_openai_upstream_real.py",
    'import OpenAI from "openai"': "tests/integration/test_browser.py (the SDK in Chromium)",
    "make sam-local": "tests/integration/test_sam_local.py (SAM's start-api, the openai "
                      "provider relaying, as make sam-local runs it)",
    "export ANTHROPIC_BASE_URL": "tests/integration/test_claude_code.py (Claude Code against "
                                 "the embedded model, with this block's route and context)",
    "/v1/embeddings": "tests/integration/test_embeddings_model.py (with the embedding model)",
    "embeddings.create(": "tests/integration/test_embeddings_model.py",
    "OpenAIEmbeddings(": "tests/integration/test_embeddings_model.py",
    "OTEL_EXPORTER_OTLP_HEADERS=": "tests/functional/test_tracing.py (the dev server process "
                                   "with these variables, exporting to a receiver)",
    "jaegertracing/jaeger": "tests/unit/test_otlp.py (the exporter's default endpoint is "
                            "localhost:4318, Jaeger's OTLP/HTTP port)",
}


def _covered(body: str) -> bool:
    return any(k in body for k in COVERED_ELSEWHERE)


def _blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block that calls or starts the dev server."""
    return [(lang, body) for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, re.S)
            if URL in body or "make dev" in body]


def _commands(block: str) -> list[str]:
    """The shell commands of a block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def server(local_provider: Provider) -> Iterator[str]:
    """The dev server as `make dev` runs it."""
    app = App(load_settings({}, provider="local", metrics=False, playground=True),
              local_provider)
    with running_dev_server(app) as url:
        yield url


def test_every_dev_server_example_is_run_here_or_covered_elsewhere() -> None:
    blocks = _blocks()
    assert len(blocks) >= 8
    for lang, body in blocks:
        covered = [k for k in COVERED_ELSEWHERE if k in body]
        runnable = lang == "python" or any(
            c.startswith(("curl ", "make dev CORS_ORIGINS=")) for c in _commands(body))
        assert covered or runnable, f"README example not tested:\n{body}"


def test_the_python_examples_stream_an_answer(server: str) -> None:
    ran = 0
    for lang, body in _blocks():
        if lang != "python" or _covered(body):
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(body.replace(URL, server), "README.md", "exec"), {})
        assert len(printed.getvalue().strip()) > 100, body
        ran += 1
    assert ran == 3  # the OpenAI SDK, requests and the Agents SDK


def test_the_curl_examples_do_what_the_readme_says(server: str) -> None:
    ran = 0
    for _, body in _blocks():
        for command in _commands(body):
            if not command.startswith("curl ") or "$KEY" in command or _covered(body):
                continue
            done = subprocess.run(["bash", "-c", command.replace(URL, server)],
                                  capture_output=True, text=True, timeout=300, check=False)
            assert done.returncode == 0, (command, done.stderr)
            if "origin: https://evil.example" in command:  # the Origin rule
                assert '"code":"origin_not_allowed"' in done.stdout, done.stdout
                assert "Requests from the origin 'https://evil.example'" in done.stdout
            elif "/v1/messages" in command:  # Anthropic's Messages API
                assert done.stdout.startswith("event: message_start\n"), done.stdout[:300]
                assert done.stdout.endswith("event: message_stop\n"
                                            'data: {"type":"message_stop"}\n\n'), done.stdout
                assert '"type":"text_delta"' in done.stdout
            else:
                assert done.stdout.endswith("data: [DONE]\n\n"), (command, done.stdout[-300:])
                assert '"content":' in done.stdout
            ran += 1
    assert ran == 4


def test_make_dev_passes_cors_origins_to_the_dev_server() -> None:
    ran = 0
    for _, body in _blocks():
        for command in _commands(body):
            if not command.startswith("make dev CORS_ORIGINS="):
                continue
            origins = command.split("=", 1)[1].strip("'")
            dry = subprocess.run(["bash", "-c", command.replace("make ", "make -n ", 1)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=60,
                                 check=False)
            assert dry.returncode == 0, dry.stderr
            assert f"--cors-origins '{origins}'" in dry.stdout, dry.stdout
            ran += 1
    assert ran == 3
