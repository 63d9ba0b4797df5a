"""The keys table failing under a request: hanging, answering 500, losing answers, or missing.
The table is moto's server behind a proxy that fails the calls a rule picks
(``tests/fake_dynamodb.py``), so botocore's sockets, timeouts and error parsing run for real;
the request fails closed (503) in about ``keys_timeout_s``, gives back what it reserved, and
logs what is needed to reconcile anything it could not. However many requests want a key at
once, the table is asked for it once, and each request waits no longer than its deadline."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamgate import deadline
from streamgate.auth import Gate
from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.errors import DeadlineExceededError
from streamgate.events import HttpRequest
from streamgate.handler import App, Response
from streamgate.keystore import KeyStore, table_definition
from tests.fake_dynamodb import (
    FAIL,
    HANG,
    HOLD,
    LOSE,
    FlakyTable,
    Rule,
    client_for,
    hanging_endpoint,
    moto_server,
)
from tests.helpers import ScriptedProvider, body_bytes, chat_event

ROOT = Path(__file__).resolve().parents[2]
TABLE = "streamgate-keys"
NOON = 1_795_262_430.0  # 2026-11-21 12:00:30 UTC
MINUTE = f"MIN#{int(NOON // 60)}"
BUDGET_S = 1.0  # keys_timeout_s in these tests
BODY = {"prompt": "hi", "stream": True, "max_tokens": 40}  # reserves 5 + 40 = 45 tokens


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def table(aws_env: None) -> Iterator[KeyStore]:
    """The keys table on moto's server, reached directly (to set up and inspect it)."""
    with moto_server() as url:
        store = KeyStore(TABLE, client=client_for(url), clock=lambda: NOON)
        store.create_table(table_definition(ROOT / "template.yaml"))
        yield store


@pytest.fixture
def proxy(table: KeyStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyTable]:
    """The proxy the service reaches the table through (``AWS_ENDPOINT_URL_DYNAMODB``)."""
    with FlakyTable(table.client.meta.endpoint_url) as flaky:
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", flaky.url)
        yield flaky


def _app(table: str = TABLE) -> App:
    """The service as deployed: its Gate builds its own key store from the settings."""
    settings = load_settings({}, provider="local", auth="api_key", keys_table=table,
                             key_cache_ttl_s=0, keys_timeout_s=BUDGET_S)
    return App(settings, ScriptedProvider(), gate=Gate(settings, clock=lambda: NOON))


def _call(app: App, key: str) -> tuple[Response, float]:
    started = time.monotonic()
    response = app.handle(chat_event(BODY, headers={"authorization": f"Bearer {key}"}))
    elapsed = time.monotonic() - started
    body_bytes(response)
    response.close()
    return response, elapsed


def _tokens(store: KeyStore, key_id: str, sk: str) -> int:
    item = store.client.get_item(TableName=TABLE, Key={"pk": {"S": f"KEY#{key_id}"},
                                                       "sk": {"S": sk}}).get("Item", {})
    return int(item.get("tokens", {"N": "0"})["N"])


def _usage(store: KeyStore, key_id: str) -> list[tuple[int, int, int, int, int]]:
    from datetime import date

    return [(r.requests, r.prompt_tokens, r.completion_tokens, r.unsettled, r.reserved_tokens)
            for r in store.usage(key_id, date(2026, 11, 1), date(2026, 11, 30))]


def _logs(out: str, message: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()
            if line.startswith("{") and json.loads(line).get("message", "").startswith(message)]


def test_a_hanging_keys_table_fails_the_request_closed_within_its_time_budget(
        aws_env: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a keys table endpoint that accepts connections and never answers
    with hanging_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", url)
        provider = ScriptedProvider()
        settings = load_settings({}, provider="local", auth="api_key", keys_table=TABLE,
                                 keys_timeout_s=BUDGET_S)
        app = App(settings, provider, gate=Gate(settings))
        # WHEN a request comes with a key
        started = time.monotonic()
        response = app.handle(chat_event(BODY, headers={"authorization": "Bearer sgk_" + "B" * 43}))
        elapsed = time.monotonic() - started
        raw = body_bytes(response)
        response.close()
    # THEN it fails closed with 503 in about the budget (two attempts of half of it each),
    # not botocore's 3 x 5 s, and the log says why
    assert response.status == 503 and b"service_unavailable" in raw
    assert BUDGET_S * 0.9 <= elapsed < 3 * BUDGET_S
    assert provider.requests == []
    (log,) = _logs(capsys.readouterr().out, "keys table failed")
    assert "did not answer GetItem (ReadTimeoutError" in log["message"]
    assert log["cause"] == "unavailable"


def test_a_budget_outage_gives_the_minute_window_back(
        table: KeyStore, proxy: FlakyTable, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a key that has used 9 tokens this minute
    key, record = table.create("outage", tpm=1_000, budget=10_000)
    app = _app()
    assert _call(app, key)[0].status == 200
    assert _tokens(table, record.id, MINUTE) == 9
    # WHEN the table fails the budget update (a 500, not a limit reached)
    proxy.rules.append(Rule("UpdateItem", "MONTH#", FAIL))
    response, _ = _call(app, key)
    # THEN the request fails closed, and the minute's tokens are what they were before it
    assert response.status == 503
    assert _tokens(table, record.id, MINUTE) == 9
    assert [c.action for c in proxy.calls_of("UpdateItem") if "MONTH#" in json.dumps(c.body)][
        -2:] == [FAIL, FAIL]  # tried twice
    (log,) = _logs(capsys.readouterr().out, "keys table failed")
    assert log["message"] == (
        "keys table failed, request refused (503): could not take the monthly budget: "
        "keys table streamgate-keys failed UpdateItem: InternalServerError")
    assert (log["cause"], log["key_id"]) == ("unavailable", record.id)


def test_a_hanging_budget_update_fails_closed_in_time_and_gives_the_window_back(
        table: KeyStore, proxy: FlakyTable) -> None:
    # GIVEN a key, and a table that takes the minute window but hangs on the budget
    key, record = table.create("hang", tpm=1_000, budget=10_000)
    proxy.rules.append(Rule("UpdateItem", "MONTH#", HANG))
    # WHEN a request comes
    response, elapsed = _call(_app(), key)
    # THEN it fails closed within the budget (a little over, for the give-back), and the
    # minute keeps none of its tokens
    assert response.status == 503
    assert elapsed < 3 * BUDGET_S
    assert _tokens(table, record.id, MINUTE) == 0


def test_a_usage_record_outage_gives_back_window_and_budget(
        table: KeyStore, proxy: FlakyTable) -> None:
    # GIVEN a key, and a table that fails the write opening the day's usage record
    key, record = table.create("usage", tpm=1_000, budget=10_000)
    proxy.rules.append(Rule("UpdateItem", "USAGE#", FAIL))
    # WHEN a request comes
    response, _ = _call(_app(), key)
    # THEN it fails closed, nothing stays reserved, and no request is recorded
    assert response.status == 503
    assert _tokens(table, record.id, MINUTE) == 0
    assert _tokens(table, record.id, "MONTH#2026-11") == 0
    assert _usage(table, record.id) == []


def test_when_even_the_give_back_fails_the_log_says_what_is_still_held(
        table: KeyStore, proxy: FlakyTable, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a table that fails the budget update, and the transaction giving tokens back
    key, record = table.create("held", tpm=1_000, budget=10_000)
    proxy.rules += [Rule("UpdateItem", "MONTH#", FAIL), Rule("TransactWriteItems", "", FAIL)]
    # WHEN a request comes
    response, _ = _call(_app(), key)
    # THEN it fails closed, and one ERROR record says which tokens are still held
    assert response.status == 503
    assert _tokens(table, record.id, MINUTE) == 45
    (log,) = _logs(capsys.readouterr().out, "reserved tokens not given back")
    assert log["level"] == "ERROR"
    assert {k: log[k] for k in ("key_id", "tokens", "minute", "cause")} == {
        "key_id": record.id, "tokens": 45, "minute": int(NOON // 60), "cause": "unavailable"}


def test_a_settle_that_fails_leaves_the_request_unsettled_and_logs_what_reconciles_it(
        table: KeyStore, proxy: FlakyTable, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a table that fails every transaction (the settle)
    key, record = table.create("settle", tpm=1_000, budget=10_000)
    proxy.rules.append(Rule("TransactWriteItems", "", FAIL))
    capsys.readouterr()
    # WHEN a request streams to its end and is closed
    response, _ = _call(_app(), key)
    assert response.status == 200
    # THEN the day's usage still shows it, unsettled, with its reservation
    assert _usage(table, record.id) == [(1, 0, 0, 1, 45)]
    assert len(proxy.calls_of("TransactWriteItems")) == 2  # tried twice
    # and one ERROR record carries every number needed to reconcile it
    (log,) = _logs(capsys.readouterr().out, "usage not recorded")
    assert log["level"] == "ERROR"
    assert {k: log[k] for k in ("key_id", "day", "model", "prompt_tokens", "completion_tokens",
                                "error", "reserved_tokens", "minute", "minute_correction",
                                "month", "month_correction", "cause")} == {
        "key_id": record.id, "day": "2026-11-21", "model": "scripted-1", "prompt_tokens": 5,
        "completion_tokens": 4, "error": False, "reserved_tokens": 45,
        "minute": int(NOON // 60), "minute_correction": 9 - 45, "month": "2026-11",
        "month_correction": 9 - 45, "cause": "unavailable"}


def test_a_settle_retried_after_a_lost_answer_repeats_its_client_request_token(
        table: KeyStore, proxy: FlakyTable) -> None:
    # GIVEN a table that applies the first settle but loses its answer
    key, _ = table.create("lost", tpm=1_000)
    proxy.rules.append(Rule("TransactWriteItems", "", LOSE, times=1))
    # WHEN two requests are served
    app = _app()
    assert _call(app, key)[0].status == 200
    assert _call(app, key)[0].status == 200
    # THEN the first settle was retried with the same token (DynamoDB applies it once; moto
    # does not implement tokens, so only the token is checked), and each request has its own
    first, retry, second = proxy.calls_of("TransactWriteItems")
    assert (first.action, retry.action, second.action) == (LOSE, "forward", "forward")
    tokens = [c.body.get("ClientRequestToken") for c in (first, retry, second)]
    assert tokens[0] and tokens[0] == tokens[1] != tokens[2]
    assert all(len(t) <= 36 for t in tokens)


def test_the_request_path_names_a_missing_table_in_its_log(
        table: KeyStore, proxy: FlakyTable, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the service configured with a table that does not exist
    app = _app("streamgate-keys-typo")
    # WHEN a request comes with a key
    response, _ = _call(app, "sgk_" + "C" * 43)
    # THEN it fails closed, and the log says the table does not exist
    assert response.status == 503
    (log,) = _logs(capsys.readouterr().out, "keys table failed")
    assert log["message"].endswith(
        "could not look up the key: keys table streamgate-keys-typo does not exist in us-east-1")
    assert log["cause"] == "table_missing"


# -- many requests, one key: one lookup ----------------------------------------------------------

def _slow_gate() -> Gate:
    """A gate whose table calls may take up to 10 s (so a held call is only slow)."""
    return Gate(load_settings({}, provider="local", auth="api_key", keys_table=TABLE,
                              keys_timeout_s=10.0))


def _bearer(key: str) -> HttpRequest:
    return HttpRequest("POST", "/v1/chat/completions", {"authorization": f"Bearer {key}"})


def _until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_many_cold_requests_for_one_key_make_one_table_lookup(
        table: KeyStore, proxy: FlakyTable) -> None:
    # GIVEN a key no request has looked up yet, and a slow table (GetItem answers only when
    # the test says)
    key, record = table.create("busy")
    proxy.rules.append(Rule("GetItem", "#KEY", HOLD))
    gate = _slow_gate()
    ids: list[str] = []
    # WHEN 100 requests with that key come at once, all while the first lookup is under way
    threads = [threading.Thread(target=lambda: ids.append(gate.authenticate(_bearer(key)).id))
               for _ in range(100)]
    for thread in threads:
        thread.start()
    assert _until(lambda: len(proxy.calls_of("GetItem")) >= 1)
    time.sleep(0.5)  # every request is in by now
    proxy.released.set()
    for thread in threads:
        thread.join(20)
    # THEN every request got the key, from one GetItem
    assert ids == [record.id] * 100
    assert len(proxy.calls_of("GetItem")) == 1


def test_a_request_waiting_on_another_ones_lookup_stops_at_its_own_deadline(
        table: KeyStore, proxy: FlakyTable) -> None:
    # GIVEN a request whose lookup of a key is held up by a slow table
    key, record = table.create("slow")
    proxy.rules.append(Rule("GetItem", "#KEY", HOLD))
    gate = _slow_gate()
    first: list[str] = []
    leader = threading.Thread(target=lambda: first.append(gate.authenticate(_bearer(key)).id))
    leader.start()
    assert _until(lambda: len(proxy.calls_of("GetItem")) >= 1)
    # WHEN another request for the same key comes with 0.3 s left
    started = time.monotonic()
    with deadline.bound(Deadline.after(0.3)), pytest.raises(DeadlineExceededError):
        gate.authenticate(_bearer(key))
    waited = time.monotonic() - started
    proxy.released.set()
    leader.join(20)
    # THEN it stopped waiting at its deadline, without a lookup of its own, and the first
    # request still got its answer
    assert 0.25 <= waited < 1.5
    assert len(proxy.calls_of("GetItem")) == 1
    assert first == [record.id]
