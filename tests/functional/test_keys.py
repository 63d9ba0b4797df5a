"""API keys, limits and usage records on the keys table, under moto (``mock_aws``), with the
table created from template.yaml's own definition."""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from streamgate.auth import Gate
from streamgate.config import load_settings
from streamgate.errors import UpstreamError
from streamgate.handler import App, Response
from streamgate.keys import main as keys_main
from streamgate.keystore import KeyStore, looks_like_key, table_definition
from streamgate.providers import Finish, TextDelta, Usage
from tests.helpers import ScriptedProvider, body_bytes, chat_event, sse_json

ROOT = Path(__file__).resolve().parents[2]
TABLE = "streamgate-keys"
# 2026-11-21 12:00:30 UTC: mid-month, half-way through a minute.
NOON = 1_795_262_430.0


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> Iterator[KeyStore]:
    from moto import mock_aws

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    with mock_aws():
        store = KeyStore(TABLE, clock=clock)
        store.create_table(table_definition(ROOT / "template.yaml"))
        yield store


def _app(store: KeyStore, clock: Clock, provider: ScriptedProvider | None = None,
         **settings: Any) -> App:
    base = load_settings({}, provider="local", auth="api_key", keys_table=TABLE,
                         key_cache_ttl_s=0, **settings)
    return App(base, provider or ScriptedProvider(), gate=Gate(base, store, clock=clock))


def _call(app: App, key: str | None, body: Any = None, *, path: str = "/v1/chat/completions",
          method: str = "POST", close: bool = True) -> tuple[Response, bytes]:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    response = app.handle(chat_event({"prompt": "hi", "stream": True} if body is None else body,
                                     path=path, method=method, headers=headers))
    if not close:
        return response, b""
    raw = body_bytes(response)
    response.close()
    return response, raw


def _error(raw: bytes) -> dict[str, Any]:
    """The error object of a JSON or an SSE (``data: {...}``) error response."""
    doc = sse_json(raw)[0] if raw.startswith(b"data: ") else json.loads(raw)
    error: dict[str, Any] = doc["error"]
    return error


def _item(store: KeyStore, key_id: str, sk: str) -> dict[str, int]:
    item = store.client.get_item(TableName=TABLE, Key={"pk": {"S": f"KEY#{key_id}"},
                                                       "sk": {"S": sk}}).get("Item", {})
    return {k: int(v["N"]) for k, v in item.items() if "N" in v}


def _usage(store: KeyStore, key_id: str) -> list[tuple[str, int, int, int, int]]:
    return [(r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.errors)
            for r in store.usage(key_id, date(2026, 11, 1), date(2026, 11, 30))]


def _open(store: KeyStore, key_id: str) -> list[tuple[str, str, int, int]]:
    """Per usage record: day, model, and the requests still unsettled and their reservation."""
    return [(r.day, r.model, r.unsettled, r.reserved_tokens)
            for r in store.usage(key_id, date(2026, 11, 1), date(2026, 11, 30))]


# -- the table and the key tool -----------------------------------------------------------


def test_table_comes_from_the_template(store: KeyStore) -> None:
    described = store.client.describe_table(TableName=TABLE)["Table"]
    assert {k["AttributeName"]: k["KeyType"] for k in described["KeySchema"]} == {
        "pk": "HASH", "sk": "RANGE"}
    assert described["GlobalSecondaryIndexes"][0]["IndexName"] == "by-kind"
    ttl = store.client.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "expires")


def test_key_lifecycle_through_the_key_tool(store: KeyStore, clock: Clock,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # WHEN a key is created with limits
    assert keys_main(["--table", TABLE, "create", "ci bot", "--rpm", "60", "--tpm", "9000",
                      "--budget", "100000", "--models", "scripted-1"], store=store) == 0
    out = capsys.readouterr().out
    key = out.strip().splitlines()[-1]
    key_id = out.split()[2]

    # THEN the last line is the key alone, and only its hash is stored
    assert looks_like_key(key) and key.startswith("sgk_") and len(key) == 47
    scanned = json.dumps(store.client.scan(TableName=TABLE)["Items"])
    assert key not in scanned and key[4:] not in scanned
    assert key[:12] in scanned  # the display prefix
    # listed, shown and usable
    assert keys_main(["--table", TABLE, "list", "--json"], store=store) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed == {"id": key_id, "name": "ci bot", "prefix": key[:12],
                      "created": "2026-11-21T12:00:30+00:00", "revoked": False,
                      "models": ["scripted-1"], "rpm": 60, "tpm": 9000, "budget": 100000}
    app = _app(store, clock)
    response, raw = _call(app, key)
    assert response.status == 200 and raw.endswith(b"data: [DONE]\n\n")
    capsys.readouterr()  # the request's log and metrics
    assert keys_main(["--table", TABLE, "show", key, "--json"], store=store) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["id"], shown["budget_used"]) == (key_id, 9)  # 5 prompt + 4 completion

    # WHEN it is revoked (by id), THEN it is refused with 401
    assert keys_main(["--table", TABLE, "revoke", key_id], store=store) == 0
    assert f"Revoked key {key_id}" in capsys.readouterr().out
    response, raw = _call(app, key)
    assert response.status == 401
    assert json.loads(raw)["error"]["code"] == "revoked_api_key"
    assert keys_main(["--table", TABLE, "revoke", "0" * 16], store=store) == 1


def test_usage_command_reports_days_and_models(store: KeyStore, clock: Clock,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    key, record = store.create("reporting")
    app = _app(store, clock)
    _call(app, key)
    _call(app, key, {"model": "scripted-2", "prompt": "hi"})
    clock.now += 86_400
    _call(app, key)
    capsys.readouterr()  # the requests' logs and metrics
    assert keys_main(["--table", TABLE, "usage", record.id, "--since", "2026-11-01",
                      "--until", "2026-11-30", "--json"], store=store) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["day"], r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"],
             r["unsettled"], r["reserved_tokens"])
            for r in rows] == [("2026-11-21", "scripted-1", 1, 5, 4, 0, 0),
                               ("2026-11-21", "scripted-2", 1, 5, 4, 0, 0),
                               ("2026-11-22", "scripted-1", 1, 5, 4, 0, 0)]
    assert keys_main(["--table", TABLE, "usage", record.id, "--since", "2026-11-01"],
                     store=store) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DAY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "ERRORS",
                                "UNSETTLED", "RESERVED"]
    assert lines[-1].split() == ["total", "3", "15", "12", "0", "0", "0"]


def test_the_key_tool_reports_a_missing_table_clearly(
        store: KeyStore, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a table name that does not exist
    # WHEN the key tool lists its keys
    code = keys_main(["--table", "nope", "list"], store=KeyStore("nope", client=store.client))
    # THEN it says so, not that the store is unavailable, with the status for a missing table
    assert code == 6
    assert capsys.readouterr().err == (
        "streamgate.keys: keys table nope does not exist in us-east-1; check --table (or "
        "STREAMGATE_KEYS_TABLE) and the region; for a local table run init first\n")


# -- authentication and authorisation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "code"),
    [(None, "missing_api_key"), ("Basic dXNlcjpwYXNz", "missing_api_key"),
     ("Bearer ", "missing_api_key"), ("Bearer sk-not-ours", "invalid_api_key"),
     ("Bearer sgk_" + "A" * 43, "invalid_api_key")],
)
def test_missing_or_unknown_key_is_401_before_anything_else(
    store: KeyStore, clock: Clock, header: str | None, code: str
) -> None:
    provider = ScriptedProvider()
    app = _app(store, clock, provider)
    headers = {} if header is None else {"authorization": header}
    # An invalid body too: the key is checked first.
    response = app.handle(chat_event(None, raw="{not json", headers=headers))
    doc = json.loads(body_bytes(response))
    assert response.status == 401
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["code"] == code
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "sgk_AAAA" not in doc["error"]["message"]  # the key is never echoed
    assert provider.requests == []


def test_key_not_allowed_the_model_is_403_and_models_list_is_filtered(
        store: KeyStore, clock: Clock) -> None:
    key, _ = store.create("narrow", models=("scripted-2",))
    provider = ScriptedProvider()
    app = _app(store, clock, provider)
    response, raw = _call(app, key, {"model": "scripted-1", "prompt": "hi"})
    assert response.status == 403
    assert json.loads(raw)["error"] == {
        "message": "This API key may not use the model `scripted-1`.",
        "type": "permission_error", "param": "model", "code": "model_not_allowed"}
    assert provider.requests == []
    response, raw = _call(app, key, None, path="/v1/models", method="GET")
    assert [m["id"] for m in json.loads(raw)["data"]] == ["scripted-2"]
    response, _ = _call(app, None, None, path="/v1/models", method="GET")
    assert response.status == 401
    response, _ = _call(app, None, None, path="/health", method="GET")
    assert response.status == 200


def test_key_store_down_fails_closed_with_503(store: KeyStore, clock: Clock) -> None:
    import boto3
    from botocore.config import Config

    dead = KeyStore(TABLE, clock=clock, client=boto3.client(
        "dynamodb", endpoint_url="http://127.0.0.1:9",
        config=Config(connect_timeout=1, retries={"total_max_attempts": 1})))
    provider = ScriptedProvider()
    base = load_settings({}, provider="local", auth="api_key", keys_table=TABLE)
    app = App(base, provider, gate=Gate(base, dead, clock=clock))
    response, raw = _call(app, "sgk_" + "B" * 43)
    assert response.status == 503
    assert json.loads(raw)["error"]["code"] == "service_unavailable"
    assert provider.requests == []


# -- limits ---------------------------------------------------------------------------------


def test_requests_per_minute_at_the_boundary(store: KeyStore, clock: Clock) -> None:
    key, record = store.create("rpm", rpm=3)
    provider = ScriptedProvider()
    app = _app(store, clock, provider)
    remaining = []
    for _ in range(3):
        response, _raw = _call(app, key)
        assert response.status == 200
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    assert response.headers["x-ratelimit-limit-requests"] == "3"
    assert response.headers["x-ratelimit-reset-requests"] == "30s"

    # the fourth request in the same minute is refused, before the model is called
    clock.now += 29
    response, raw = _call(app, key)
    assert response.status == 429
    assert _error(raw)["code"] == "rate_limit_exceeded"
    assert (response.headers["retry-after"], response.headers["retry-after-ms"]) == ("1", "1000")
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(provider.requests) == 3
    assert _item(store, record.id, f"MIN#{int(clock.now // 60)}")["requests"] == 3

    # the next minute starts afresh
    clock.now += 1
    response, _raw = _call(app, key)
    assert (response.status, response.headers["x-ratelimit-remaining-requests"]) == (200, "2")


def test_tokens_per_minute_reserve_then_settle_to_real_usage(store: KeyStore,
                                                             clock: Clock) -> None:
    # "hi" is estimated at 1 + 4 tokens; with max_tokens 40 a request reserves 45.
    key, record = store.create("tpm", tpm=100)
    app = _app(store, clock)
    body = {"prompt": "hi", "stream": True, "max_tokens": 40}
    minute = f"MIN#{int(clock.now // 60)}"
    first, _ = _call(app, key, body, close=False)
    second, _ = _call(app, key, body, close=False)
    assert (first.status, second.status) == (200, 200)
    assert second.headers["x-ratelimit-remaining-tokens"] == "10"
    assert _item(store, record.id, minute)["tokens"] == 90

    # a third in flight would pass 100 tokens: refused
    third, raw = _call(app, key, body)
    assert third.status == 429 and "100 tokens per minute" in _error(raw)["message"]

    # once one ends, its reservation becomes its real usage (5 + 4) and room opens up
    body_bytes(first)
    first.close()
    assert _item(store, record.id, minute)["tokens"] == 45 + 9
    third, _ = _call(app, key, body)
    assert third.status == 200
    body_bytes(second)
    second.close()
    assert _item(store, record.id, minute)["tokens"] == 27


def test_request_that_can_never_fit_the_limit_is_400(store: KeyStore, clock: Clock) -> None:
    key, _ = store.create("small", tpm=50)
    response, raw = _call(_app(store, clock), key,
                          {"prompt": "hi", "stream": True, "max_tokens": 100})
    error = _error(raw)
    assert response.status == 400
    assert (error["param"], error["code"]) == ("max_tokens", "request_too_large_for_limit")


def test_monthly_budget_runs_out_mid_month_and_renews(store: KeyStore, clock: Clock) -> None:
    key, record = store.create("budget", budget=100, tpm=1_000)
    app = _app(store, clock)
    body = {"prompt": "hi", "max_tokens": 30}  # reserves 35, really uses 9
    for _ in range(7):  # 7 x 9 = 63 charged
        assert _call(app, key, body)[0].status == 200
    assert store.month_tokens(record.id, "2026-11") == 63

    response, raw = _call(app, key, body)  # 63 + 35 would be 98: still fits
    assert response.status == 200
    response, raw = _call(app, key, body)  # 72 + 35 > 100
    error = json.loads(raw)["error"]
    assert response.status == 429
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "28 tokens left" in error["message"]
    # Retry-After points at 2026-12-01 00:00 UTC
    assert int(response.headers["retry-after"]) == 1_796_083_200 - int(NOON)
    # the refused request's minute reservation was given back
    assert _item(store, record.id, f"MIN#{int(clock.now // 60)}")["tokens"] == 72

    clock.now = 1_796_083_200 + 5  # December
    assert _call(app, key, body)[0].status == 200
    assert store.month_tokens(record.id, "2026-12") == 9


# -- usage records --------------------------------------------------------------------------


def test_usage_of_a_stream_that_ends_normally(store: KeyStore, clock: Clock) -> None:
    key, record = store.create("u", tpm=2_000, budget=10_000)
    _call(_app(store, clock), key)
    assert _usage(store, record.id) == [("scripted-1", 1, 5, 4, 0)]
    assert _item(store, record.id, f"MIN#{int(clock.now // 60)}")["tokens"] == 9
    assert store.month_tokens(record.id, "2026-11") == 9


def test_usage_of_a_stream_that_ends_in_an_upstream_error(store: KeyStore,
                                                          clock: Clock) -> None:
    key, record = store.create("u", budget=10_000)
    provider = ScriptedProvider([TextDelta("Hello there, "), TextDelta("friend"),
                                 UpstreamError("connection reset")])
    response, raw = _call(_app(store, clock, provider), key)
    assert response.status == 200 and "connection reset" in sse_json(raw)[-1]["error"]["message"]
    # no usage from the provider: the estimated prompt (5) and what was produced
    # (19 characters in 2 deltas: 5 tokens) are charged, and the error counted
    assert _usage(store, record.id) == [("scripted-1", 1, 5, 5, 1)]
    assert store.month_tokens(record.id, "2026-11") == 10


def test_a_request_that_fails_before_any_output_is_charged_nothing(store: KeyStore,
                                                                   clock: Clock) -> None:
    key, record = store.create("u", tpm=2_000)
    provider = ScriptedProvider([UpstreamError("model unavailable")])
    response, _ = _call(_app(store, clock, provider), key)
    assert response.status == 502
    assert response.headers["x-ratelimit-limit-tokens"] == "2000"
    assert _usage(store, record.id) == [("scripted-1", 1, 0, 0, 1)]
    assert _item(store, record.id, f"MIN#{int(clock.now // 60)}")["tokens"] == 0


def test_usage_of_a_stream_the_deadline_cut(store: KeyStore, clock: Clock) -> None:
    key, record = store.create("u")
    provider = ScriptedProvider([TextDelta("tick "), 0.3, TextDelta("tock "), 0.3,
                                 TextDelta("never"), Finish("stop"), Usage(5, 3)])

    class Context:
        aws_request_id = "req-1"

        def get_remaining_time_in_millis(self) -> int:
            return 500  # with a 0 ms margin: generation must stop after ~0.5 s

    app = _app(store, clock, provider, deadline_margin_ms=0)
    response = app.handle(chat_event({"prompt": "hi", "stream": True},
                                     headers={"authorization": f"Bearer {key}"}), Context())
    raw = body_bytes(response)
    response.close()
    assert sse_json(raw)[-1]["error"]["code"] == "deadline_exceeded"
    # two deltas of 10 characters: ceil(10 / 4) = 3 tokens
    assert _usage(store, record.id) == [("scripted-1", 1, 5, 3, 1)]


def test_usage_of_a_stream_the_client_abandoned(store: KeyStore, clock: Clock) -> None:
    key, record = store.create("u")
    provider = ScriptedProvider([TextDelta("one "), TextDelta("two "), TextDelta("three"),
                                 Finish("stop"), Usage(5, 3)])
    response, _ = _call(_app(store, clock, provider), key, close=False)
    next(response.body)  # the client reads one event, then goes away
    response.close()
    assert provider.closed.is_set()
    assert _usage(store, record.id) == [("scripted-1", 1, 5, 1, 0)]


def test_a_request_whose_process_dies_stays_in_usage_as_unsettled_with_its_reservation(
        store: KeyStore, clock: Clock, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a key with a minute and a monthly limit, and a request admitted under it
    # ("hi" and max_tokens 40 reserve 5 + 40 = 45 tokens)
    key, record = store.create("killed", tpm=1_000, budget=10_000)
    app = _app(store, clock)
    response, _ = _call(app, key, {"prompt": "hi", "stream": True, "max_tokens": 40},
                        close=False)
    assert response.status == 200
    next(response.body)  # it has started streaming

    # WHEN its process dies: the response is never closed, so it never settles
    del response
    gc.collect()

    # THEN the day's usage shows the request, unsettled, with what it reserved
    (row,) = store.usage(record.id, date(2026, 11, 1), date(2026, 11, 30))
    assert (row.day, row.model, row.requests, row.unsettled, row.reserved_tokens) == (
        "2026-11-21", "scripted-1", 1, 1, 45)
    assert (row.prompt_tokens, row.completion_tokens, row.errors) == (0, 0, 0)
    # and the key keeps paying its reservation: the minute's tokens and the month's budget
    assert _item(store, record.id, f"MIN#{int(clock.now // 60)}")["tokens"] == 45
    assert store.month_tokens(record.id, "2026-11") == 45
    # and the key tool shows it
    capsys.readouterr()
    assert keys_main(["--table", TABLE, "usage", record.id, "--json"], store=store) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert (shown["unsettled"], shown["reserved_tokens"]) == (1, 45)


def test_a_request_that_ends_normally_leaves_nothing_unsettled(store: KeyStore,
                                                               clock: Clock) -> None:
    # GIVEN a key
    key, record = store.create("normal", tpm=1_000, budget=10_000)
    # WHEN a request is admitted, streamed to the end and closed
    _call(_app(store, clock), key, {"prompt": "hi", "stream": True, "max_tokens": 40})
    # THEN its usage record is closed: counted once, nothing unsettled or reserved
    assert _usage(store, record.id) == [("scripted-1", 1, 5, 4, 0)]
    assert _open(store, record.id) == [("2026-11-21", "scripted-1", 0, 0)]


def test_a_stream_crossing_midnight_settles_in_the_day_it_was_admitted(
        store: KeyStore, clock: Clock) -> None:
    # GIVEN a request admitted one second before midnight (UTC)
    key, record = store.create("late")
    clock.now = 1_795_305_599.0  # 2026-11-21 23:59:59
    response, _ = _call(_app(store, clock), key, close=False)
    assert _open(store, record.id) == [("2026-11-21", "scripted-1", 1, 1_029)]
    # WHEN it ends the next day
    clock.now += 2
    body_bytes(response)
    response.close()
    # THEN it closes the record it opened, and opens none on the new day
    assert _open(store, record.id) == [("2026-11-21", "scripted-1", 0, 0)]
    assert _usage(store, record.id) == [("scripted-1", 1, 5, 4, 0)]


# -- concurrency ----------------------------------------------------------------------------


@pytest.fixture
def serialised_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    """DynamoDB applies each write to an item atomically; moto's backend does not lock, so
    it is given one lock around each write call, which is what DynamoDB guarantees."""
    from moto.dynamodb.models import DynamoDBBackend

    lock = threading.RLock()
    for name in ("update_item", "put_item", "transact_write_items"):
        original = getattr(DynamoDBBackend, name)

        def locked(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with lock:
                return _original(*args, **kwargs)

        monkeypatch.setattr(DynamoDBBackend, name, locked)


def _hammer(app: App, key: str, threads: int) -> list[int]:
    barrier = threading.Barrier(threads)
    statuses: list[int] = []

    def one() -> None:
        barrier.wait()
        response, _ = _call(app, key, {"prompt": "hi", "max_tokens": 10})
        statuses.append(response.status)

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    return statuses


def test_concurrent_requests_never_pass_the_rpm_limit(
        store: KeyStore, clock: Clock, serialised_moto: None) -> None:
    key, record = store.create("busy", rpm=20)
    provider = ScriptedProvider()
    statuses = _hammer(_app(store, clock, provider), key, threads=48)
    assert sorted(statuses) == [200] * 20 + [429] * 28
    assert len(provider.requests) == 20
    assert _item(store, record.id, f"MIN#{int(clock.now // 60)}")["requests"] == 20
    assert _usage(store, record.id) == [("scripted-1", 20, 100, 80, 0)]


def test_concurrent_requests_never_pass_the_token_limit(
        store: KeyStore, clock: Clock, serialised_moto: None) -> None:
    # each reserves 5 + 10 = 15 tokens, so 100 tokens admit 6 at once, whatever the
    # interleaving; the admitted ones are held in the provider until every thread is answered
    key, record = store.create("busy", tpm=100)
    release = threading.Event()
    entered: list[int] = []

    class Held(ScriptedProvider):
        def stream(self, request: Any, model: str, deadline: Any) -> Iterator[Any]:
            entered.append(1)
            release.wait(30)
            yield from super().stream(request, model, deadline)

    app = _app(store, clock, Held())
    threads = 24
    refused: list[int] = []
    statuses: list[int] = []

    def one() -> None:
        response, _ = _call(app, key, {"prompt": "hi", "max_tokens": 10})
        statuses.append(response.status)
        if response.status == 429:
            refused.append(1)

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 30
    while len(entered) + len(refused) < threads and time.monotonic() < deadline:
        time.sleep(0.01)
    in_flight = len(entered)
    release.set()
    for w in workers:
        w.join(timeout=60)
    assert in_flight == 6
    assert sorted(statuses) == [200] * 6 + [429] * 18
    assert _item(store, record.id, f"MIN#{int(clock.now // 60)}")["tokens"] == 6 * 9


def test_the_harness_catches_a_read_then_write_race(store: KeyStore,
                                                    serialised_moto: None) -> None:
    """The concurrency tests can fail: counting with a read and then a write, under the same
    threads and the same moto, goes past the limit."""
    client = store.client
    item = {"pk": {"S": "KEY#race"}, "sk": {"S": "MIN#1"}}
    barrier = threading.Barrier(16)
    admitted: list[bool] = []

    def naive() -> None:
        barrier.wait()
        got = client.get_item(TableName=TABLE, Key=item).get("Item", {})
        count = int(got.get("requests", {"N": "0"})["N"])
        if count < 5:
            time.sleep(0.01)
            client.put_item(TableName=TABLE, Item={**item, "requests": {"N": str(count + 1)}})
            admitted.append(True)

    workers = [threading.Thread(target=naive) for _ in range(16)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert len(admitted) > 5


def test_logs_name_the_key_id_never_the_key(store: KeyStore, clock: Clock,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    key, record = store.create("logged")
    capsys.readouterr()
    _call(_app(store, clock), key)
    _call(_app(store, clock), "sgk_" + "Z" * 43)
    out = capsys.readouterr().out
    logs = [json.loads(line) for line in out.splitlines() if '"message":"request"' in line]
    assert [(log["status"], log.get("key_id")) for log in logs] == [(200, record.id),
                                                                    (401, None)]
    assert key not in out and key[4:] not in out and "Z" * 43 not in out
