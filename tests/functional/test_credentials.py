"""The upstream API key from Secrets Manager and SSM Parameter Store, under moto."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from streamgate.config import load_settings
from streamgate.credentials import ApiKey, api_key
from streamgate.errors import ConfigError
from streamgate.handler import App
from streamgate.providers import openai as openai_provider
from streamgate.runtime import run
from tests.fake_openai import FakeUpstream, Reply, completion_reply
from tests.fake_runtime_api import FakeRuntimeAPI
from tests.helpers import body_bytes, chat_event

KEY = "sk-live-0123456789abcdef"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_REGION", raising=False)
    with mock_aws():
        yield


@pytest.mark.parametrize(
    "secret", [KEY, json.dumps({"api_key": KEY, "note": "rotated monthly"})],
    ids=["plain", "json"])
def test_key_from_secrets_manager_by_name_or_arn(aws: None, secret: str) -> None:
    arn = boto3.client("secretsmanager").create_secret(
        Name="streamgate/upstream", SecretString=secret)["ARN"]
    for ref in ("streamgate/upstream", arn):
        assert api_key(load_settings({}, upstream_api_key_secret=ref)).get() == KEY


def test_key_from_an_ssm_secure_string(aws: None) -> None:
    boto3.client("ssm").put_parameter(Name="/streamgate/upstream-key", Value=KEY,
                                      Type="SecureString")
    settings = load_settings({}, upstream_api_key_parameter="/streamgate/upstream-key")
    assert api_key(settings).get() == KEY


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"upstream_api_key_secret": "streamgate/missing"},
      "Secrets Manager secret 'streamgate/missing' does not exist"),
     ({"upstream_api_key_parameter": "/streamgate/missing"},
      "SSM parameter '/streamgate/missing' does not exist"),
     ({"upstream_api_key_secret": "a", "upstream_api_key": "b"},
      "Set only one of STREAMGATE_UPSTREAM_API_KEY_SECRET, STREAMGATE_UPSTREAM_API_KEY")],
)
def test_a_missing_or_ambiguous_key_fails_clearly(aws: None, setting: dict[str, str],
                                                   message: str) -> None:
    with pytest.raises(ConfigError) as info:
        api_key(load_settings({}, **setting))
    assert info.value.message == message


def test_missing_secret_is_a_lambda_init_error(aws: None) -> None:
    with FakeRuntimeAPI([chat_event({"prompt": "x"})]) as api:
        code = run(environ={
            "AWS_LAMBDA_RUNTIME_API": api.address, "STREAMGATE_PROVIDER": "openai",
            "STREAMGATE_ALLOW_UNAUTHENTICATED": "true",
            "STREAMGATE_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
            "STREAMGATE_UPSTREAM_API_KEY_SECRET": "streamgate/missing"})
    assert code == 1
    (posted,) = api.posted
    assert posted.path == "/2018-06-01/runtime/init/error"
    assert json.loads(posted.body)["errorMessage"] == (
        "Secrets Manager secret 'streamgate/missing' does not exist")


def test_the_key_is_cached_for_its_ttl_and_re_read_after_rejection() -> None:
    now = [0.0]
    reads: list[str] = []

    def fetch() -> str:
        reads.append("read")
        return f"key-{len(reads)}"

    key = ApiKey(fetch, 300, clock=lambda: now[0])
    assert [key.get(), key.get()] == ["key-1", "key-1"]
    now[0] = 301
    assert key.get() == "key-2"
    key.invalidate()
    assert key.get() == "key-3"


def test_a_failed_refresh_keeps_the_previous_key() -> None:
    now = [0.0]
    answers: list[str | Exception] = ["key-1", ConfigError("throttled")]

    def fetch() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    key = ApiKey(fetch, 10, clock=lambda: now[0])
    assert key.get() == "key-1"
    now[0] = 11
    assert key.get() == "key-1"


def test_while_one_thread_refreshes_the_key_the_others_go_on_with_the_current_one() -> None:
    # GIVEN a cached key whose refresh hangs until released (Secrets Manager being slow)
    now = [0.0]
    refreshing, release = threading.Event(), threading.Event()
    reads: list[str] = []

    def fetch() -> str:
        reads.append("read")
        if len(reads) > 1:
            refreshing.set()
            release.wait(10)
        return f"key-{len(reads)}"

    key = ApiKey(fetch, 10, clock=lambda: now[0])
    assert key.get() == "key-1"
    now[0] = 11
    refreshed: list[str] = []
    refresher = threading.Thread(target=lambda: refreshed.append(key.get()))
    refresher.start()
    assert refreshing.wait(5)
    # WHEN other invocations need the key meanwhile
    started = time.monotonic()
    meanwhile = [key.get() for _ in range(3)]
    # THEN they get the current key at once rather than queue behind the refresh
    assert meanwhile == ["key-1"] * 3 and time.monotonic() - started < 1
    release.set()
    refresher.join(5)
    assert refreshed == ["key-2"] and key.get() == "key-2" and len(reads) == 2


def test_the_key_reaches_the_upstream_and_never_the_logs(
    aws: None, caplog: pytest.LogCaptureFixture
) -> None:
    boto3.client("secretsmanager").create_secret(Name="up", SecretString=KEY)
    with FakeUpstream([Reply(401, [json.dumps({"error": {
            "message": f"Incorrect API key provided: {KEY}"}}).encode()],
            {"content-type": "application/json"})]) as fake:
        settings = load_settings({}, provider="openai", upstream_base_url=fake.url,
                                 upstream_api_key_secret="up", upstream_models=("m",),
                                 upstream_max_attempts=1)
        caplog.set_level(logging.DEBUG)
        provider = openai_provider.create(settings)
        response = App(settings, provider).handle(chat_event({"model": "m", "messages": [
            {"role": "user", "content": "hi"}]}))
        body = body_bytes(response)
        provider.close()
    assert fake.requests[0][1]["authorization"] == f"Bearer {KEY}"
    assert response.status == 502 and b"upstream_auth_failed" in body
    assert KEY not in body.decode()
    assert KEY not in caplog.text
    assert KEY not in repr(load_settings({}, upstream_api_key=KEY))


def test_the_key_can_be_given_directly_for_local_use() -> None:
    with FakeUpstream([completion_reply("ok")]) as fake:
        settings = load_settings({"STREAMGATE_UPSTREAM_API_KEY": "sk-local"}, provider="openai",
                                 upstream_base_url=fake.url, upstream_models=("m",))
        provider = openai_provider.create(settings)
        App(settings, provider).handle(chat_event({"model": "m", "prompt": "hi"}))
        provider.close()
    assert fake.requests[0][1]["authorization"] == "Bearer sk-local"
