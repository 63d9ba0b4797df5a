"""Every example of README.md and docs/**/*.md that talks to the dev server, run against it
(with the embedded model), so that what a new user copies works. An example this test does not
run must name the test that covers it in ``COVERED_ELSEWHERE``: a new example cannot go
untested unnoticed. A block repeated verbatim on several pages is run once."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
from collections.abc import Iterator

import pytest

from streamgate.config import load_settings
from streamgate.handler import App
from streamgate.providers import Provider
from tests.conftest import running_dev_server
from tests.docs_text import ROOT, code_blocks

pytestmark = pytest.mark.model

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
    "Streamgate dev server on http": "tests/functional/test_devserver_console.py (what the dev "
                                     "server says at start)",
    "STREAMGATE_LOG_FORMAT=json make dev": "tests/functional/test_devserver_console.py (the "
                                           "dev server as make dev runs it, with this "
                                           "variable)",
    "jaegertracing/jaeger": "tests/unit/test_otlp.py (the exporter's default endpoint is "
                            "localhost:4318, Jaeger's OTLP/HTTP port)",
}


def _covered(body: str) -> bool:
    return any(k in body for k in COVERED_ELSEWHERE)


def _blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the docs that calls or starts the dev server."""
    return [(lang, body) for _, lang, body in code_blocks() if URL in body or "make dev" in body]


def _commands(block: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, and lines joined while a quote
    is open (a JSON body written over several lines); comments dropped."""
    commands, pending = [], ""
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        command = pending.split("  #")[0]  # a comment, unless the "  #" is quoted
        try:
            shlex.split(command)
        except ValueError:
            command = pending
        command = command.strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def _python_examples() -> list[str]:
    return [body for lang, body in _blocks() if lang == "python" and not _covered(body)]


def _curl_commands() -> list[str]:
    return [command for _, body in _blocks() if not _covered(body)
            for command in _commands(body) if command.startswith("curl ")
            and "$KEY" not in command]


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
        assert covered or runnable, f"example not tested:\n{body}"
    # the OpenAI SDK on Chat Completions and on Responses, the Anthropic SDK, requests, the
    # Agents SDK and LangChain; curl on chat (the README), min_tokens, Responses, Messages, the
    # Origin rule
    assert len(_python_examples()) == 6
    assert len(_curl_commands()) == 5


def _name(example: str) -> str:
    """A test id for a Python example: its client and the API it calls."""
    client = re.search(r"^(?:from|import) (\w+)", example, re.M)
    api = re.search(r"\.(chat\.completions|responses|messages|embeddings)\.|/v1/(\w+)|Runner",
                    example)
    return "-".join(filter(None, [client.group(1) if client else "python",
                                  api.group(0).strip("./") if api else None]))


# An example streams up to the default max_tokens from the embedded model: a minute or two on
# two cores, several on a machine shared with other test runs.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("body", _python_examples(), ids=_name)
def test_the_python_examples_stream_an_answer(server: str, body: str) -> None:
    from agents.exceptions import ModelBehaviorError

    printed = io.StringIO()
    names: dict[str, object] = {}
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(body.replace(URL, server), "docs", "exec"), names)
    except ModelBehaviorError as e:
        # What the Agents SDK example's comment says: a base model that has not ended its
        # answer by max_output_tokens gets `response.incomplete`, which the SDK raises. The
        # wiring held (the SDK read our answer, typed); anything else is a failure.
        assert "reason='max_output_tokens'" in str(e), e
        assert "max_output_tokens" in body and "response.incomplete" in body
        return
    finally:
        _close_clients(names)
    assert len(printed.getvalue().strip()) > 100, body


def _close_clients(names: dict[str, object]) -> None:
    """The HTTP clients an example left open (a user's process would exit instead)."""
    import anthropic
    import openai

    for value in names.values():
        if isinstance(value, (openai.OpenAI, anthropic.Anthropic)):
            value.close()


@pytest.mark.parametrize("command", _curl_commands(), ids=lambda c: c.split()[2][:48])
def test_the_curl_examples_do_what_the_docs_say(server: str, command: str) -> None:
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
    elif "/v1/responses" in command:  # OpenAI's Responses API
        assert done.stdout.startswith("event: response.created\n"), done.stdout[:300]
        # completed, or incomplete when the base model wrote up to the default max_tokens
        terminal = re.findall(r"^event: (response\.\w+)\n", done.stdout, re.M)[-1]
        assert terminal in ("response.completed", "response.incomplete"), done.stdout[-300:]
        assert '"type":"response.output_text.delta"' in done.stdout
    else:
        assert done.stdout.endswith("data: [DONE]\n\n"), (command, done.stdout[-300:])
        assert '"content":' in done.stdout


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
