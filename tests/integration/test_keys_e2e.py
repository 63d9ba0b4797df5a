"""The local api_key set-up of docs/operating.md, for real: moto in server mode as the
table's endpoint, the key tool as a separate process, the dev server, and the official
OpenAI SDK as the client."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pytest

from streamgate.config import load_settings
from streamgate.handler import App
from tests.conftest import running_dev_server
from tests.fake_dynamodb import moto_server
from tests.helpers import ScriptedProvider

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """``moto_server`` on a loopback port, and the variables docs/operating.md exports for it."""
    with moto_server() as url:
        env = {"AWS_ENDPOINT_URL_DYNAMODB": url,
               "STREAMGATE_KEYS_TABLE": "streamgate-keys", "AWS_ACCESS_KEY_ID": "local",
               "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield env


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The key tool as a separate process, in ``env`` (default: this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "streamgate.keys", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=60,
        env={**(os.environ if env is None else env),
             "PYTHONPATH": str(ROOT / "functions" / "streamgate")})


def _keys(*args: str) -> str:
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_openai_sdk_with_keys_and_limits_through_the_dev_server(
        local_table: dict[str, str]) -> None:
    # GIVEN a local table and a key with 2 requests per minute, made with the key tool
    assert "Created table streamgate-keys" in _keys("init")
    key = _keys("create", "laptop", "--rpm", "2").strip().splitlines()[-1]
    app = App(load_settings({}, provider="local", auth="api_key",
                            keys_table="streamgate-keys"), ScriptedProvider())
    if time.time() % 60 > 50:  # keep the three requests inside one clock minute
        time.sleep(61 - time.time() % 60)
    with running_dev_server(app) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="sgk_" + "x" * 43,
                          max_retries=0) as wrong:
        # WHEN the right key streams, THEN it works
        stream = client.chat.completions.create(
            model="scripted-1", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            "Hello, world!"
        # a wrong key is an AuthenticationError
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="scripted-1",
                                          messages=[{"role": "user", "content": "hi"}])
        # the second request is the last one this minute
        raw = client.chat.completions.with_raw_response.create(
            model="scripted-1", messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        # and the third is a RateLimitError carrying the retry hint
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="scripted-1",
                                           messages=[{"role": "user", "content": "hi"}])
    headers = info.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert info.value.code == "rate_limit_exceeded"
    # and the key tool reports the two requests served
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    usage = _keys("usage", key, "--since", yesterday).splitlines()
    assert usage[-1].split()[:2] == ["total", "2"]
    assert usage[-1].split()[-2:] == ["0", "0"]  # nothing unsettled, nothing still reserved


def test_the_key_tool_process_names_what_is_wrong_with_a_status_per_cause(
        local_table: dict[str, str], tmp_path: Path) -> None:
    # GIVEN docs/operating.md's local set-up, with nothing else of AWS in the environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(local_table, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "absent"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "absent"))

    # WHEN the table does not exist yet, THEN a command says so (6)
    result = _run("list", env=env)
    assert (result.returncode, result.stdout, result.stderr) == (
        6, "", "streamgate.keys: keys table streamgate-keys does not exist in us-east-1; check "
               "--table (or STREAMGATE_KEYS_TABLE) and the region; for a local table run init "
               "first\n")

    # WHEN init runs twice, THEN the second run finds the template's table and succeeds
    assert _run("init", env=env).stdout == "Created table streamgate-keys\n"
    result = _run("init", env=env)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"Table streamgate-keys already exists and matches {ROOT / 'template.yaml'}\n", "")

    # WHEN no region is configured, THEN it says so (3)
    no_region = {k: v for k, v in env.items() if k not in ("AWS_DEFAULT_REGION", "AWS_REGION")}
    result = _run("list", env=no_region)
    assert (result.returncode, result.stdout, result.stderr) == (
        3, "", "streamgate.keys: no AWS region configured: set AWS_REGION or "
               "AWS_DEFAULT_REGION (or a region in the AWS profile)\n")

    # WHEN there are no credentials, THEN it says so (4)
    no_credentials = {k: v for k, v in env.items()
                      if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    result = _run("list", env=no_credentials)
    assert (result.returncode, result.stdout, result.stderr) == (
        4, "", "streamgate.keys: no AWS credentials found: set AWS_PROFILE, or "
               "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY\n")

    # and a key that is not there is still 1
    result = _run("show", "0123456789abcdef", env=env)
    assert (result.returncode, result.stderr) == (1, "streamgate.keys: no key 0123456789abcdef\n")
