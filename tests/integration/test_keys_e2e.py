"""The README's local api_key set-up, for real: moto in server mode as the table's endpoint, the
key tool as a separate process, the dev server, and the official OpenAI SDK as the client."""

from __future__ import annotations

import os
import socket
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
from tests.helpers import ScriptedProvider

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def local_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """``moto_server`` on a loopback port, and the variables the README exports for it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL_DYNAMODB": f"http://127.0.0.1:{port}",
           "STREAMGATE_KEYS_TABLE": "streamgate-keys", "AWS_ACCESS_KEY_ID": "local",
           "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        yield env
    finally:
        server.stop()


def _keys(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "streamgate.keys", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "functions" / "streamgate")})
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
    with running_dev_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        # WHEN the right key streams, THEN it works
        stream = client.chat.completions.create(
            model="scripted-1", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            "Hello, world!"
        # a wrong key is an AuthenticationError
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sgk_" + "x" * 43, max_retries=0)
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
