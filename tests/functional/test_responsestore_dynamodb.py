"""Stored responses on DynamoDB (streamgate/responsestore_dynamodb.py), on a table created from
template.yaml's own definition: under moto (``mock_aws``) for what the store keeps and who sees
it, and behind real sockets (moto's server, a proxy that fails the calls a rule picks, an
endpoint that never answers) for how it fails."""

from __future__ import annotations

import base64
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamgate.config import load_settings
from streamgate.deadline import NO_DEADLINE, Deadline
from streamgate.errors import DeadlineExceededError, ServiceUnavailableError
from streamgate.keystore import TABLE_MISSING, UNAVAILABLE
from streamgate.responsestore import StoredResponse, create_store, encode
from streamgate.responsestore_dynamodb import INCONSISTENT, DynamoStore, ResponseStoreError
from tests.fake_dynamodb import (
    FAIL,
    PARTIAL,
    FlakyTable,
    Rule,
    client_for,
    create_responses_table,
    hanging_endpoint,
    moto_server,
)

ROOT = Path(__file__).resolve().parents[2]
TABLE = "streamgate-responses"
NOW = 1_795_262_430.0  # 2026-11-21 12:00:30 UTC
TTL_S = 30 * 86_400.0
MIB = 1 << 20
DYNAMODB_ITEM_LIMIT = 400 * 1024  # "The maximum item size in DynamoDB is 400 KB"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _settings(**overrides: Any) -> Any:
    return load_settings({}, provider="local", responses_store="dynamodb",
                         responses_table=TABLE, **overrides)


def _record(text: str, owner: str = "key-a") -> StoredResponse:
    return StoredResponse(
        response={"id": "resp_1", "object": "response", "status": "completed",
                  "output": [{"type": "message", "id": "msg_2", "role": "assistant",
                              "content": [{"type": "output_text", "text": text}]}]},
        input_items=({"id": "msg_1", "type": "message", "role": "user",
                      "content": [{"type": "input_text", "text": "hi"}]},),
        owner=owner)


def _incompressible(size: int) -> str:
    """Random base64 text: compresses to about three quarters of its length."""
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()


def create_table(client: Any) -> None:
    create_responses_table(client, TABLE)


def _items(client: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": TABLE}
    while True:
        page = client.scan(**kwargs)
        items += page["Items"]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _dynamodb_size(item: dict[str, Any]) -> int:
    """An item's size by DynamoDB's rules: attribute names and values, binary as its bytes,
    strings as UTF-8, numbers at most 21 bytes."""
    size = 0
    for name, value in item.items():
        (kind, content), = value.items()
        size += len(name.encode()) + (len(content) if kind == "B" else 21 if kind == "N"
                                      else len(content.encode()))
    return size


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)


@pytest.fixture
def table(aws_env: None) -> Iterator[Any]:
    """The table under moto; yields a client to look into it."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("dynamodb")
        create_table(client)
        yield client


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(table: Any, clock: Clock) -> DynamoStore:
    return DynamoStore(_settings(), clock=clock)


# -- what the store keeps ------------------------------------------------------------------


def test_the_table_comes_from_the_template(table: Any) -> None:
    described = table.describe_table(TableName=TABLE)["Table"]
    assert described["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    ttl = table.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "expires")


def test_create_store_builds_the_dynamodb_store_from_the_environment(table: Any) -> None:
    # GIVEN the variables template.yaml sets
    settings = load_settings({"STREAMGATE_RESPONSES_STORE": "dynamodb",
                              "STREAMGATE_RESPONSES_TABLE": TABLE,
                              "STREAMGATE_RESPONSES_TTL_S": "3600"}, provider="local")
    # WHEN the configured store is built
    store = create_store(settings)
    # THEN it is this table's, with the settings' bounds
    assert isinstance(store, DynamoStore)
    assert (store.table, store.ttl_s, store.max_bytes) == (TABLE, 3600.0, 4 * MIB)
    store.put("resp_1", encode(_record("hello")), "key-a", NO_DEADLINE)
    assert store.get("resp_1", "key-a", NO_DEADLINE) == _record("hello")


def test_a_small_record_round_trips_as_one_item(store: DynamoStore, table: Any) -> None:
    # GIVEN a record as the dialect encodes it
    record = _record("Hello! How can I help?")
    # WHEN it is stored and read back by its owner
    store.put("resp_1", encode(record), "key-a", NO_DEADLINE)
    found = store.get("resp_1", "key-a", NO_DEADLINE)
    # THEN it is the same record, kept in one item that expires TTL_S from now
    assert found == record
    (item,) = _items(table)
    assert item["pk"] == {"S": "R#resp_1"}
    assert item["expires"] == {"N": str(math.ceil(NOW + TTL_S))}


def test_a_record_of_3_9_mib_round_trips_in_items_of_at_most_400_kb(
        store: DynamoStore, table: Any) -> None:
    # GIVEN a record whose compressed form is 3.9 MiB or more (random text barely compresses)
    record = _record(_incompressible(5_400_000))
    blob = encode(record)
    assert 3.9 * MIB <= len(blob) <= store.max_bytes
    # WHEN it is stored and read back
    store.put("resp_1", blob, "key-a", NO_DEADLINE)
    found = store.get("resp_1", "key-a", NO_DEADLINE)
    # THEN it is the same record, split over a head and parts that each fit DynamoDB's limit,
    # every one of them expiring at the same time
    assert found == record
    items = _items(table)
    assert len(items) == 1 + math.ceil(len(blob) / store.part_bytes) == 12
    assert max(_dynamodb_size(item) for item in items) <= DYNAMODB_ITEM_LIMIT
    assert {item["expires"]["N"] for item in items} == {str(math.ceil(NOW + TTL_S))}


def test_another_owners_record_does_not_exist_for_them(store: DynamoStore) -> None:
    # GIVEN a record of key-a, and one stored without authentication (owner "")
    store.put("resp_1", encode(_record("for a")), "key-a", NO_DEADLINE)
    store.put("resp_2", encode(_record("for anyone", owner="")), "", NO_DEADLINE)
    # WHEN others read or delete them
    # THEN for them they do not exist, exactly like an id never stored
    assert store.get("resp_1", "key-b", NO_DEADLINE) is None
    assert store.get("resp_1", "", NO_DEADLINE) is None
    assert store.get("resp_2", "key-a", NO_DEADLINE) is None
    assert store.delete("resp_1", "key-b", NO_DEADLINE) is False
    assert store.delete("resp_2", "key-a", NO_DEADLINE) is False
    assert store.delete("resp_9", "key-b", NO_DEADLINE) is False
    # AND their owners still have them
    assert store.get("resp_1", "key-a", NO_DEADLINE) == _record("for a")
    assert store.get("resp_2", "", NO_DEADLINE) == _record("for anyone", owner="")


def test_an_expired_record_is_absent_before_dynamodb_deletes_it(
        store: DynamoStore, table: Any, clock: Clock) -> None:
    # GIVEN a small and a split record, read back fine until the last second of their TTL
    store.put("resp_1", encode(_record("small")), "key-a", NO_DEADLINE)
    store.put("resp_2", encode(_record(_incompressible(600_000))), "key-a", NO_DEADLINE)
    clock.now = NOW + TTL_S - 1
    assert store.get("resp_1", "key-a", NO_DEADLINE) == _record("small")
    assert store.get("resp_2", "key-a", NO_DEADLINE) is not None
    stored = len(_items(table))
    # WHEN their TTL passes (DynamoDB deletes expired items lazily, within days)
    clock.now = NOW + TTL_S + 1
    # THEN they are absent for their owner too, and cannot be deleted
    assert store.get("resp_1", "key-a", NO_DEADLINE) is None
    assert store.get("resp_2", "key-a", NO_DEADLINE) is None
    assert store.delete("resp_1", "key-a", NO_DEADLINE) is False
    assert store.delete("resp_2", "key-a", NO_DEADLINE) is False
    # AND their items are all still there, left to DynamoDB's TTL
    assert len(_items(table)) == stored == 1 + 1 + 2


def test_delete_removes_the_record_and_every_part(store: DynamoStore, table: Any) -> None:
    # GIVEN a split record and a small one
    store.put("resp_1", encode(_record(_incompressible(1_200_000))), "key-a", NO_DEADLINE)
    store.put("resp_2", encode(_record("keep me")), "key-a", NO_DEADLINE)
    assert len(_items(table)) == 1 + 3 + 1
    # WHEN its owner deletes the split one
    assert store.delete("resp_1", "key-a", NO_DEADLINE) is True
    # THEN it is gone, head and parts, and the other record stays
    assert store.get("resp_1", "key-a", NO_DEADLINE) is None
    assert [item["pk"]["S"] for item in _items(table)] == ["R#resp_2"]
    assert store.delete("resp_1", "key-a", NO_DEADLINE) is False
    # AND a small record is deleted as well
    assert store.delete("resp_2", "key-a", NO_DEADLINE) is True
    assert _items(table) == []


def test_an_overwrite_replaces_the_record_and_drops_the_old_parts(
        store: DynamoStore, table: Any) -> None:
    first, second = _record(_incompressible(900_000)), _record(_incompressible(1_300_000))
    # GIVEN a split record
    store.put("resp_1", encode(first), "key-a", NO_DEADLINE)
    # WHEN the same id is stored again, split differently, then small
    store.put("resp_1", encode(second), "key-a", NO_DEADLINE)
    # THEN each read gives the latest record, and only its items remain
    assert store.get("resp_1", "key-a", NO_DEADLINE) == second
    assert len(_items(table)) == 1 + 3
    store.put("resp_1", encode(_record("small now")), "key-a", NO_DEADLINE)
    assert store.get("resp_1", "key-a", NO_DEADLINE) == _record("small now")
    assert len(_items(table)) == 1


def test_ids_no_record_can_have_are_absent_without_asking_the_table(aws_env: None) -> None:
    from moto import mock_aws

    # GIVEN a store whose table does not exist (any call would fail)
    with mock_aws():
        store = DynamoStore(_settings())
        # WHEN ids that cannot be keys are asked for: empty, over 256 bytes, not UTF-8
        # THEN they are absent, and storing under one is refused
        for bad in ("", "x" * 257, "resp_\ud800"):
            assert store.get(bad, "key-a", NO_DEADLINE) is None
            assert store.delete(bad, "key-a", NO_DEADLINE) is False
            with pytest.raises(ValueError, match="response id"):
                store.put(bad, b"blob", "key-a", NO_DEADLINE)


def test_a_record_over_max_bytes_is_refused_before_anything_is_written(
        table: Any, clock: Clock) -> None:
    store = DynamoStore(_settings(responses_max_bytes=1_000), clock=clock)
    blob = encode(_record(_incompressible(2_000)))
    with pytest.raises(ValueError, match="at most 1000 bytes"):
        store.put("resp_1", blob, "key-a", NO_DEADLINE)
    assert _items(table) == []


def test_a_reader_racing_writers_never_decodes_a_mixed_record(table: Any) -> None:
    # GIVEN two records of 40-odd parts each (small parts, so that a read spans many writes)
    store = DynamoStore(_settings(), part_bytes=1_000)
    a, b = _record(_incompressible(40_000)), _record(_incompressible(44_000))
    store.put("resp_1", encode(a), "key-a", NO_DEADLINE)
    stop = threading.Event()
    seen: list[StoredResponse | None] = []
    failures: list[BaseException] = []
    overtaken = []

    def write(record: StoredResponse, other: StoredResponse) -> None:
        blobs = encode(record), encode(other)
        n = 0
        while not stop.is_set():
            store.put("resp_1", blobs[n % 2], "key-a", NO_DEADLINE)
            n += 1

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(store.get("resp_1", "key-a", NO_DEADLINE))
            except ResponseStoreError as e:
                if e.cause != INCONSISTENT:
                    raise
                overtaken.append(e)  # overtaken at both reads: a 503, never a mixed record
            except BaseException as e:
                failures.append(e)
                raise

    # WHEN two writers overwrite it with one and the other while three readers read it
    threads = [threading.Thread(target=write, args=(a, b)),
               threading.Thread(target=write, args=(b, a))]
    threads += [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(30)
    # THEN every read gave one whole record or the other, and both were seen
    assert failures == []
    assert all(record in (a, b) for record in seen)
    assert a in seen and b in seen
    assert len(seen) > 5 * len(overtaken)
    # AND the table holds exactly the last record's items: every replaced write's parts are gone
    last = store.get("resp_1", "key-a", NO_DEADLINE)
    assert last is not None
    assert len(_items(table)) == 1 + math.ceil(len(encode(last)) / 1_000)


# -- how it fails ----------------------------------------------------------------------------


@pytest.fixture
def served(aws_env: None) -> Iterator[Any]:
    """The table on moto's server, reached directly (to set up and inspect it)."""
    with moto_server() as url:
        client = client_for(url)
        create_table(client)
        yield client


@pytest.fixture
def proxy(served: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyTable]:
    """The proxy the store reaches the table through (``AWS_ENDPOINT_URL_DYNAMODB``)."""
    with FlakyTable(served.meta.endpoint_url) as flaky:
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", flaky.url)
        yield flaky


def _calls(store: DynamoStore, deadline: Deadline) -> dict[str, Any]:
    blob = encode(_record("text that must not reach a log"))
    return {"put": lambda: store.put("resp_1", blob, "key-a", deadline),
            "get": lambda: store.get("resp_1", "key-a", deadline),
            "delete": lambda: store.delete("resp_1", "key-a", deadline)}


@pytest.mark.parametrize("operation", ["put", "get", "delete"])
def test_a_table_that_never_answers_is_a_503_by_the_deadline(
        operation: str, aws_env: None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    with hanging_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", url)
        # GIVEN a table that accepts connections and never answers, a budget of 3 s and a
        # request with 0.5 s left
        store = DynamoStore(_settings(), timeout_s=3.0)
        assert store.client is not None  # built before the clock starts
        deadline = Deadline.after(0.5)
        # WHEN the store is called
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError) as raised:
            _calls(store, deadline)[operation]()
        took = time.monotonic() - started
    # THEN it gives up at the deadline with a 503 naming the cause, and logs no record text
    assert 0.45 <= took <= 0.5 + 0.25, took
    error = raised.value
    assert isinstance(error, ResponseStoreError)
    assert (error.status, error.cause) == (503, UNAVAILABLE)
    assert "did not answer" in error.detail
    assert "must not reach" not in caplog.text and error.detail in caplog.text


def test_a_table_that_never_answers_is_a_503_within_the_time_budget(
        aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with hanging_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", url)
        # GIVEN a hanging table, a budget of 0.6 s and no deadline
        store = DynamoStore(_settings(), timeout_s=0.6)
        assert store.client is not None
        started = time.monotonic()
        # WHEN a record is read
        with pytest.raises(ResponseStoreError) as raised:
            store.get("resp_1", "key-a", NO_DEADLINE)
        # THEN it fails within the budget (a read timeout, a second try, its timeout)
        assert time.monotonic() - started <= 0.6 + 0.25
        assert raised.value.cause == UNAVAILABLE


def test_a_request_past_its_deadline_asks_nothing(proxy: FlakyTable) -> None:
    store = DynamoStore(_settings())
    for call in _calls(store, Deadline(time.monotonic() - 1)).values():
        with pytest.raises(DeadlineExceededError):
            call()
    assert proxy.calls == []


def test_a_failed_call_is_tried_once_more(proxy: FlakyTable) -> None:
    # GIVEN a table that answers the first GetItem with a 500
    store = DynamoStore(_settings(), timeout_s=5.0)
    store.put("resp_1", encode(_record("hello")), "key-a", NO_DEADLINE)
    proxy.rules.append(Rule("GetItem", "", FAIL, times=1))
    # WHEN the record is read, THEN the second try reads it
    assert store.get("resp_1", "key-a", NO_DEADLINE) == _record("hello")
    assert [c.action for c in proxy.calls_of("GetItem")] == [FAIL, "forward"]


@pytest.mark.parametrize("operation", ["PutItem", "GetItem", "DeleteItem"])
def test_a_table_that_keeps_failing_is_a_503_after_two_tries(
        operation: str, proxy: FlakyTable) -> None:
    # GIVEN a table that answers every call of one kind with a 500
    store = DynamoStore(_settings(), timeout_s=5.0)
    store.put("resp_1", encode(_record("hello")), "key-a", NO_DEADLINE)
    proxy.rules.append(Rule(operation, "", FAIL))
    proxy.calls.clear()
    # WHEN the store makes that call, THEN it tries twice and fails with a 503
    with pytest.raises(ResponseStoreError) as raised:
        _calls(store, NO_DEADLINE)[operation.removesuffix("Item").lower()]()
    assert raised.value.cause == UNAVAILABLE
    assert "InternalServerError" in raised.value.detail
    assert [c.operation for c in proxy.calls] == [operation, operation]


def test_a_missing_table_is_a_503_tried_once(proxy: FlakyTable, served: Any) -> None:
    served.delete_table(TableName=TABLE)
    store = DynamoStore(_settings())
    with pytest.raises(ResponseStoreError) as raised:
        store.get("resp_1", "key-a", NO_DEADLINE)
    assert raised.value.cause == TABLE_MISSING
    assert TABLE in raised.value.detail
    assert len(proxy.calls) == 1


def test_throttled_batch_requests_are_sent_once_more(proxy: FlakyTable, served: Any) -> None:
    # GIVEN a table that processes only the first request of the first batch of each kind
    store = DynamoStore(_settings(), timeout_s=5.0)
    record = _record(_incompressible(1_200_000))  # three parts
    proxy.rules += [Rule("BatchWriteItem", "", PARTIAL, times=1),
                    Rule("BatchGetItem", "", PARTIAL, times=1)]
    # WHEN a split record is stored and read
    store.put("resp_1", encode(record), "key-a", NO_DEADLINE)
    found = store.get("resp_1", "key-a", NO_DEADLINE)
    # THEN what was left unprocessed was sent again, and the record is whole
    assert found == record
    assert [len(c.body["RequestItems"][TABLE]) for c in proxy.calls_of("BatchWriteItem")] == [
        3, 2]
    assert [len(c.body["RequestItems"][TABLE]["Keys"])
            for c in proxy.calls_of("BatchGetItem")] == [3, 2]


def test_a_batch_throttled_twice_is_a_503_and_leaves_no_record(
        proxy: FlakyTable, served: Any) -> None:
    # GIVEN a table that keeps leaving batch writes unprocessed
    store = DynamoStore(_settings(), timeout_s=5.0)
    proxy.rules.append(Rule("BatchWriteItem", "", PARTIAL))
    # WHEN a split record is stored
    with pytest.raises(ResponseStoreError) as raised:
        store.put("resp_1", encode(_record(_incompressible(1_200_000))), "key-a", NO_DEADLINE)
    # THEN the store fails without writing the head: no record exists
    assert raised.value.cause == UNAVAILABLE
    assert "unprocessed" in raised.value.detail
    assert proxy.calls_of("PutItem") == []
    assert store.get("resp_1", "key-a", NO_DEADLINE) is None
