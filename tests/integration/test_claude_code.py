"""Claude Code itself (npm ``@anthropic-ai/claude-code``, pinned in clients/package.json),
unmodified, in print mode against the dev server: one tool-use round trip from a scripted
backend, then from Claude on a fake Bedrock (the native path), then from the embedded model as
``make dev`` serves it. What it sent (endpoints, headers) is recorded and checked. It needs no
network: its telemetry, error reporting and update checks are off (the documented variables),
and every wait is bounded."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from streamgate.auth import Gate
from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.handler import App, LambdaContext, Response
from streamgate.keystore import KeyStore, table_definition
from streamgate.providers import Delta, Finish, TextDelta, ToolCallDelta, Usage
from streamgate.providers.bedrock import BedrockProvider
from streamgate.validation import CAP_TOOLS, ChatRequest
from tests.conftest import running_dev_server
from tests.docs_text import page
from tests.fake_bedrock import FakeBedrock, Reply, chunk, claude_end, claude_start, claude_tool
from tests.fake_bedrock import claude_events as bedrock_text
from tests.helpers import ScriptedProvider
from tests.integration.clients.setup import Unavailable, claude

ROOT = Path(__file__).resolve().parents[2]
MODEL = "claude-streamgate"  # Claude Code keeps model names with "claude" in them
CLAUDE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
PROMPT = "Run `echo streamgate-$((40+2))` with the Bash tool and tell me what it printed."
COMMAND = {"command": "echo streamgate-$((40+2))", "description": "Print a word"}
RUN_TIMEOUT_S = 240
# The embedded model reads Claude Code's ~4,500-token prompt, then writes a few hundred tokens,
# for each of Claude Code's requests: minutes on two shared cores.
EMBEDDED_TIMEOUT_S = 900
# docs/clients.md's route giving the embedded model a name Claude Code accepts.
EMBEDDED_ROUTES = '{"routes": {"claude-embedded": {"targets": [{"kind": "local"}]}}}'


@pytest.fixture(scope="module")
def claude_code() -> Path:
    try:
        return claude()
    except Unavailable as e:
        pytest.skip(str(e))


class Recording(App):
    """The app, recording each request's method, path, query and headers."""

    seen: list[dict[str, Any]]

    def handle(self, event: Mapping[str, Any], context: LambdaContext | None = None,
               **kwargs: Any) -> Response:
        self.seen.append({"method": event["requestContext"]["http"]["method"],
                          "path": event["rawPath"], "query": event.get("rawQueryString", ""),
                          "headers": dict(event["headers"]),
                          "body": json.loads(event["body"]) if event.get("body") else None})
        return super().handle(event, context, **kwargs)


def _run(claude_code: Path, url: str, home: Path, model: str, key: str, *,
         timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``claude -p`` as a user runs it with ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": url,
           "ANTHROPIC_AUTH_TOKEN": key, "ANTHROPIC_MODEL": model,
           "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
           "DISABLE_ERROR_REPORTING": "1", "DISABLE_AUTOUPDATER": "1"}
    return subprocess.run([str(claude_code), "-p", PROMPT, "--allowedTools", "Bash(echo:*)"],
                          env=env, cwd=home, capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL, check=False)


class ToolThenAnswer(ScriptedProvider):
    """A backend that asks for the Bash tool, then answers with the tool's output."""

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        self.requests.append((request, model))
        results = [m.content for m in request.messages if m.role == "tool"]
        if not results:
            yield ToolCallDelta(0, "", id="toolu_01", name="Bash")
            yield ToolCallDelta(0, json.dumps(COMMAND))
            yield Finish("tool_calls")
        else:
            yield TextDelta(f"It printed {results[-1].strip()}.")
            yield Finish("stop")
        yield Usage(100, 10)


def _check_what_it_sent(app: Recording, key: str, *, answers: int = 2) -> list[dict[str, Any]]:
    """Every request was POST /v1/messages?beta=true with Anthropic's headers and our key, and
    at least ``answers`` of them were the conversation itself (not a side request); those are
    returned."""
    assert app.seen
    for request in app.seen:
        assert (request["method"], request["path"], request["query"]) == (
            "POST", "/v1/messages", "beta=true"), request
        headers = request["headers"]
        assert headers["authorization"] == f"Bearer {key}"
        assert headers["anthropic-version"] == "2023-06-01"
        assert "claude-code-20250219" in headers["anthropic-beta"].split(",")
        assert headers["x-app"] == "cli"
        body = request["body"]
        assert body["stream"] is True and body["max_tokens"] >= 32_000
        assert body["thinking"]["type"] in ("enabled", "adaptive")
    answered = [r for r in app.seen if not any(
        t.get("defer_loading") for t in r["body"].get("tools", []))]
    assert len(answered) >= answers
    assert len(answered[0]["body"]["tools"]) >= 20
    return answered


def test_claude_code_runs_a_tool_round_trip_through_a_scripted_backend(
        claude_code: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto import mock_aws

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    with mock_aws():
        # GIVEN the dev server with API keys, in front of a backend that calls a tool
        store = KeyStore("keys")
        store.create_table(table_definition(ROOT / "template.yaml"))
        key, _ = store.create("claude-code")
        settings = load_settings({}, provider="local", auth="api_key", keys_table="keys",
                                 metrics=False)
        provider = ToolThenAnswer(capabilities=frozenset({CAP_TOOLS}), models=[MODEL])
        app = Recording(settings, provider, gate=Gate(settings, store))
        app.seen = []
        with running_dev_server(app) as url:
            # WHEN Claude Code is asked to run a command
            done = _run(claude_code, url, tmp_path, MODEL, key)
    # THEN it ran the tool, sent the result back, and printed the backend's final text
    assert done.returncode == 0, done.stdout + done.stderr
    assert "It printed streamgate-42." in done.stdout
    requests = _check_what_it_sent(app, key)
    results = [m for m in provider.requests[-1][0].messages if m.role == "tool"]
    assert [m.content.strip() for m in results] == ["streamgate-42"]
    assert any(m.tool_calls and m.tool_calls[0].name == "Bash"
               for m in provider.requests[-1][0].messages)
    assert requests[-1]["body"]["messages"][-1]["content"][0]["type"] == "tool_result"


def test_claude_code_runs_a_tool_round_trip_with_claude_on_bedrock_natively(
        claude_code: Path, tmp_path: Path) -> None:
    # GIVEN Claude on a fake Bedrock: a Bash call, then the answer
    call = [claude_start(), *claude_tool(0, "toolu_bdrk_01", "Bash", json.dumps(COMMAND)),
            *claude_end("tool_use")]
    with FakeBedrock([Reply(frames=[chunk(e) for e in call]),
                      Reply(frames=bedrock_text("It printed ", "streamgate-42."))]) as fake:
        settings = load_settings({}, provider="bedrock", default_model=CLAUDE, metrics=False,
                                 bedrock_backoff_s=0.01)
        app = Recording(settings, BedrockProvider(settings, fake.client()))
        app.seen = []
        with running_dev_server(app) as url:
            # WHEN Claude Code uses it through the dev server
            done = _run(claude_code, url, tmp_path, CLAUDE, "any-key")
    # THEN the round trip went through InvokeModelWithResponseStream with Anthropic's body
    assert done.returncode == 0, done.stdout + done.stderr
    assert "It printed streamgate-42." in done.stdout
    _check_what_it_sent(app, "any-key")
    assert fake.operations == ["invoke-with-response-stream"] * 2
    first, second = (body for _, body in fake.requests)
    assert first["anthropic_version"] == "bedrock-2023-05-31"
    assert "claude-code-20250219" not in first.get("anthropic_beta", [])
    assert "context_management" not in first and "metadata" not in first
    result = second["messages"][-1]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_bdrk_01"
    assert "streamgate-42" in json.dumps(result["content"])


@pytest.mark.model
@pytest.mark.timeout(EMBEDDED_TIMEOUT_S + 60)
def test_claude_code_gets_an_answer_from_the_embedded_model_as_make_dev_serves_it(
        claude_code: Path, tmp_path: Path) -> None:
    # GIVEN `make dev` with docs/clients.md's route giving the embedded model a Claude name, and
    # a context large enough for Claude Code's system prompt and tools
    clients = page("clients.md")
    assert f"STREAMGATE_ROUTES='{EMBEDDED_ROUTES}'" in clients
    command = " ".join(clients.replace("\\\n", " ").split())  # continuation lines joined
    assert ("STREAMGATE_LOCAL_CONTEXT_TOKENS=32768 STREAMGATE_MAX_TOKENS_CAP=300 "
            "STREAMGATE_LOCAL_DEFAULT_MIN_TOKENS=0 make dev") in command
    settings = load_settings({}, provider="local", routes=EMBEDDED_ROUTES, metrics=False,
                             local_context_tokens=32768, max_tokens_cap=300,
                             local_default_min_tokens=0)
    app = Recording(settings)
    app.seen = []
    try:
        with running_dev_server(app, timeout_s=EMBEDDED_TIMEOUT_S) as url:
            # WHEN Claude Code asks it something (its tools offered under `auto`)
            done = _run(claude_code, url, tmp_path, "claude-embedded", "unused",
                        timeout_s=EMBEDDED_TIMEOUT_S)
    finally:
        app.router.close()
    # THEN Claude Code ends by itself: with the model's text when an answer ended before the
    # cap, or, when every answer was cut there (max_tokens), after asking it to go on a few
    # times, saying so (docs/clients.md): the wiring held either way
    said = done.stdout + done.stderr
    if done.returncode != 0:
        assert "output token maximum" in said, said
    else:
        assert done.stdout.strip()
    # (a small model may answer in prose at once, without the tool: one conversation request)
    _check_what_it_sent(app, "unused", answers=1)
