"""The SQLite response store (``STREAMGATE_RESPONSES_STORE=sqlite``): what every process that
opens the file sees, its bounds, and its waits."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.errors import ConfigError, ServiceUnavailableError
from streamgate.responsestore import SqliteStore, StoredResponse, create_store, encode

_OPENED: list[SqliteStore] = []


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()


def record(text: str, owner: str = "alice") -> bytes:
    return encode(StoredResponse({"id": text, "output_text": text}, ({"content": text},), owner))


def store(path: Path, *, max_items: int = 100, ttl_s: float = 3600,
          clock: object = time.time) -> SqliteStore:
    opened = SqliteStore(str(path), max_items=max_items, ttl_s=ttl_s, max_bytes=1 << 20,
                         clock=clock)  # type: ignore[arg-type]
    _OPENED.append(opened)
    return opened


def test_two_stores_on_one_file_see_each_others_records_and_only_their_owners(
        tmp_path: Path) -> None:
    # GIVEN two stores on the same file (as two dev server workers have)
    one, two = store(tmp_path / "r.db"), store(tmp_path / "r.db")
    soon = Deadline.after(5)
    # WHEN one keeps a record
    one.put("resp_1", record("hello"), "alice", soon)
    # THEN the other reads it back whole, for its owner only
    found = two.get("resp_1", "alice", soon)
    assert found is not None and found.response["output_text"] == "hello"
    assert found.input_items == ({"content": "hello"},)
    assert two.get("resp_1", "mallory", soon) is None
    # AND only its owner deletes it, after which neither finds it
    assert two.delete("resp_1", "mallory", soon) is False
    assert two.delete("resp_1", "alice", soon) is True
    assert one.get("resp_1", "alice", soon) is None
    assert one.delete("resp_1", "alice", soon) is False


def test_writing_an_id_again_replaces_its_record(tmp_path: Path) -> None:
    one = store(tmp_path / "r.db")
    soon = Deadline.after(5)
    one.put("resp_1", record("first"), "alice", soon)
    one.put("resp_1", record("second"), "alice", soon)
    found = one.get("resp_1", "alice", soon)
    assert found is not None and found.response["output_text"] == "second"


def test_past_max_items_the_oldest_written_go_first(tmp_path: Path) -> None:
    one = store(tmp_path / "r.db", max_items=3)
    soon = Deadline.after(5)
    for i in range(5):
        one.put(f"resp_{i}", record(str(i)), "alice", soon)
    one.put("resp_2", record("rewritten"), "alice", soon)  # now the newest
    one.put("resp_5", record("5"), "alice", soon)
    kept = [i for i in range(6) if one.get(f"resp_{i}", "alice", soon) is not None]
    assert kept == [2, 4, 5]


def test_a_record_expires_after_its_ttl(tmp_path: Path) -> None:
    now = [1_000.0]
    one = store(tmp_path / "r.db", ttl_s=60, clock=lambda: now[0])
    soon = Deadline.after(5)
    one.put("resp_1", record("hello"), "alice", soon)
    now[0] += 59
    assert one.get("resp_1", "alice", soon) is not None
    now[0] += 2
    assert one.get("resp_1", "alice", soon) is None
    assert one.delete("resp_1", "alice", soon) is False


def test_a_write_locked_by_another_process_waits_no_longer_than_the_deadline(
        tmp_path: Path) -> None:
    # GIVEN a store, and another connection holding the file's write lock
    one = store(tmp_path / "r.db")
    other = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        # WHEN a record is written with 0.3 s left
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError) as caught:
            one.put("resp_1", record("hello"), "alice", Deadline.after(0.3))
        # THEN it fails as a 503 once that time is spent, not after SQLite's own timeout
        waited = time.monotonic() - started
        assert 0.2 < waited < 2.5
        assert caught.value.status == 503
        # AND reads still work under the other's write (WAL)
        assert one.get("resp_1", "alice", Deadline.after(1)) is None
    finally:
        other.execute("ROLLBACK")
        other.close()
    # AND once the lock is gone, writing works again
    one.put("resp_1", record("hello"), "alice", Deadline.after(5))
    assert one.get("resp_1", "alice", Deadline.after(5)) is not None


def test_the_sqlite_store_is_configured_by_its_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="STREAMGATE_RESPONSES_FILE"):
        load_settings({"STREAMGATE_RESPONSES_STORE": "sqlite"})
    settings = load_settings({"STREAMGATE_RESPONSES_STORE": "sqlite",
                              "STREAMGATE_RESPONSES_FILE": str(tmp_path / "r.db")})
    made = create_store(settings)
    assert isinstance(made, SqliteStore)
    made.close()
    unusable = load_settings({"STREAMGATE_RESPONSES_STORE": "sqlite",
                              "STREAMGATE_RESPONSES_FILE": str(tmp_path / "no" / "r.db")})
    with pytest.raises(ConfigError, match="cannot be used"):
        create_store(unusable)
