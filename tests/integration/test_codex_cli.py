"""Codex CLI (npm ``@openai/codex``, pinned in clients/package.json) against the dev server: a
custom model provider with ``wire_api = "responses"`` in a temporary CODEX_HOME, ``codex exec``
through reasoning, text and a patch (Codex's freeform ``apply_patch``, a custom tool), then a
shell command (its ``exec_command``, a function tool) from a scripted model, exiting 0 with the
model's final text.

What Codex sends is recorded and asserted: the request fields, the tools and their types, the
headers. Every answer the dev server sent is checked against openai-python's types as it went
out (tests/responses_check.py). Codex comes from clients/setup.py (``make test`` runs it
first); where it cannot be installed these tests skip and say why. No network is needed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamgate.deadline import Deadline
from streamgate.providers import Delta, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from streamgate.validation import CAP_TOOLS, ChatRequest, ToolCall
from tests import responses_check as check
from tests.conftest import running_dev_server
from tests.docs_text import page
from tests.helpers import ScriptedProvider, make_app, replay
from tests.integration.clients import setup
from tests.recording import recording

pytestmark = pytest.mark.clients

CODEX_VERSION = "0.171.0"
MODEL = "scripted-codex"
ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-streamgate-codex-test"
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello from codex\n*** End Patch\n"
FINAL = "hello.txt says: hello from codex"
CODEX_TIMEOUT_S = 120
# What Codex knows of a model it has no metadata for comes from a model catalog: this one says
# our model takes Codex's freeform apply_patch tool (Codex's own models all do) and low effort.
CATALOG = {"models": [{
    "slug": MODEL, "display_name": MODEL, "description": "Streamgate's scripted test model",
    "default_reasoning_level": "low",
    "supported_reasoning_levels": [{"effort": "low", "description": "Low"}],
    "shell_type": "shell_command", "visibility": "list", "supported_in_api": True,
    "priority": 1, "base_instructions": "You are a coding agent in a test.",
    "supports_reasoning_summaries": False, "default_reasoning_summary": "none",
    "support_verbosity": False, "default_verbosity": None, "apply_patch_tool_type": "freeform",
    "truncation_policy": {"mode": "tokens", "limit": 10_000},
    "supports_parallel_tool_calls": True, "context_window": 32_000,
    "effective_context_window_percent": 95, "experimental_supported_tools": [],
    "input_modalities": ["text"], "supports_search_tool": False}]}


@pytest.fixture(scope="module")
def codex() -> Path:
    try:
        return setup.codex()
    except setup.Unavailable as e:
        pytest.skip(str(e))


class CodexTask(ScriptedProvider):
    """The model of one task: add hello.txt with a patch, read it back with a command, then
    say what it holds (only if the command's output, as Codex sent it back, holds it)."""

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        self.requests.append((request, model))
        outputs = [m.content for m in request.messages if m.role == "tool"]
        if not outputs:
            script: list[Any] = [ReasoningDelta("The file does not exist yet."),
                                 TextDelta("Adding hello.txt."),
                                 ToolCallDelta(0, "", "call_patch", "apply_patch"),
                                 ToolCallDelta(0, json.dumps({"input": PATCH})),
                                 Finish("tool_calls")]
        elif len(outputs) == 1:
            script = [ToolCallDelta(0, json.dumps({"cmd": "cat hello.txt"}), "call_cat",
                                    "exec_command"), Finish("tool_calls")]
        else:
            said = "hello from codex" in outputs[-1]
            script = [TextDelta(FINAL if said else "the command's output was lost")]
            script += [Finish("stop")]
        return replay([*script, Usage(100, 10)], deadline)


def _run_codex(codex: Path, url: str, home: Path, work: Path,
               prompt: str) -> subprocess.CompletedProcess[str]:
    (home / "catalog.json").write_text(json.dumps(CATALOG))
    # docs/clients.md's config.toml, pointed at this server, plus what a test needs on top: no
    # approvals, no update check or analytics, and a model catalog that makes apply_patch
    # Codex's freeform (custom) tool.
    shown = re.search(r"```toml\n(.*?)```", page("clients.md"), re.S)
    assert shown is not None, "docs/clients.md shows no Codex config.toml"
    config = shown.group(1).replace("http://127.0.0.1:8080", url)
    assert 'model = "gemma-3-270m"\n' in config
    config = config.replace('model = "gemma-3-270m"\n', f'model = "{MODEL}"\n', 1)
    (home / "config.toml").write_text(f"""approval_policy = "never"
model_catalog_json = "{home / 'catalog.json'}"
check_for_update_on_startup = false
""" + config + """
[analytics]
enabled = false
""")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home),
           "STREAMGATE_API_KEY": KEY, "LANG": "C.UTF-8"}
    # The scripted model decides every action, in a directory of its own: no sandbox needed.
    return subprocess.run(
        [str(codex), "exec", "--dangerously-bypass-approvals-and-sandbox",
         "--skip-git-repo-check", "--ephemeral", "--color", "never", "-C", str(work), prompt],
        env=env, capture_output=True, text=True, timeout=CODEX_TIMEOUT_S,
        stdin=subprocess.DEVNULL, check=False)


def test_codex_exec_patches_runs_a_command_and_answers_through_the_responses_api(
        codex: Path, tmp_path: Path) -> None:
    provider = CodexTask(capabilities=frozenset({CAP_TOOLS}), models=[MODEL])
    app = recording(make_app(provider))
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    # WHEN Codex runs a task against the dev server
    with running_dev_server(app) as url:
        done = _run_codex(codex, url, home, work, "Create hello.txt and show what it says")
    # THEN it exits 0 with the model's final text, having applied the patch and run the command
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == FINAL, done.stdout[-2000:]
    assert (work / "hello.txt").read_text() == "hello from codex\n"
    assert f"OpenAI Codex v{CODEX_VERSION}" in done.stderr

    # AND every answer was a valid Responses stream, ending in response.completed
    assert [e.status for e in app.exchanges] == [200, 200, 200]
    for exchange in app.exchanges:
        assert check.check_stream(exchange.answer).terminal == "response.completed"

    # AND this is what Codex sent, three times: the fields ...
    bodies = [e.body for e in app.exchanges]
    for body in bodies:
        assert sorted(body) == ["client_metadata", "include", "input", "model",
                                "parallel_tool_calls", "prompt_cache_key", "reasoning",
                                "store", "stream", "tool_choice", "tools"]
        assert (body["model"], body["stream"], body["store"], body["include"],
                body["reasoning"], body["tool_choice"], body["parallel_tool_calls"]) == (
            MODEL, True, False, ["reasoning.encrypted_content"], {"effort": "low"}, "auto",
            True)
        assert all(isinstance(v, str) for v in body["client_metadata"].values())
        # ... the tools (their types: function, and custom for apply_patch with a Lark grammar;
        # by default Codex adds a namespace tool, multi_agent_v1, and the hosted web_search)
        assert [(t["type"], t["name"]) for t in body["tools"]] == [
            ("function", "exec_command"), ("function", "write_stdin"),
            ("function", "request_user_input"), ("custom", "apply_patch"),
            ("function", "view_image"), ("function", "get_goal"), ("function", "create_goal"),
            ("function", "update_goal")]
        (patch_tool,) = [t for t in body["tools"] if t["type"] == "custom"]
        assert patch_tool["format"]["type"] == "grammar"
        assert patch_tool["format"]["syntax"] == "lark"
        # ... the input items: developer and user messages, no instructions field
        assert [(i["type"], i.get("role")) for i in body["input"][:4]] == [
            ("message", "developer"), ("message", "developer"), ("message", "user"),
            ("message", "user")]
    # ... each turn's calls and outputs sent back with the ids we gave them
    assert [i["type"] for i in bodies[2]["input"][4:]] == [
        "reasoning", "message", "custom_tool_call", "custom_tool_call_output", "function_call",
        "function_call_output"]
    reasoning, message, patch_call = bodies[2]["input"][4:7]
    # (our reasoning item comes back with its text, and encrypted_content null)
    assert (reasoning["content"], reasoning["encrypted_content"]) == (
        [{"type": "reasoning_text", "text": "The file does not exist yet."}], None)
    assert message["role"] == "assistant" and message["content"][0]["text"] == (
        "Adding hello.txt.")
    assert (patch_call["call_id"], patch_call["name"], patch_call["input"]) == (
        "call_patch", "apply_patch", PATCH)
    # ... and the headers
    for headers in (e.headers for e in app.exchanges):
        assert headers["authorization"] == f"Bearer {KEY}"
        assert headers["accept"] == "text/event-stream"
        assert headers["content-type"] == "application/json"
        assert headers["originator"] == "codex_exec"
        assert headers["user-agent"].startswith(f"codex_exec/{CODEX_VERSION} ")
        assert {"session-id", "thread-id", "x-client-request-id", "x-codex-window-id",
                "x-codex-turn-metadata", "x-codex-beta-features",
                "accept-encoding"} <= set(headers)
        assert json.loads(headers["x-codex-turn-metadata"])["model"] == MODEL

    # AND the backend got the patch back as the assistant's call, its input exactly
    second = provider.requests[1][0]
    (call,) = [m for m in second.messages if m.tool_calls][0].tool_calls
    assert call == ToolCall("call_patch", "apply_patch",
                            json.dumps({"input": PATCH}, ensure_ascii=False,
                                       separators=(",", ":")))
