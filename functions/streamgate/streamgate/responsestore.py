"""Stored responses for the Responses API (``store``, ``previous_response_id``, ``GET`` and
``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``).

A stored response is what a later request needs to continue from it and what the retrieval
endpoints return: the ``Response`` object as the client received it, the input items that led
to it (the whole conversation, ``previous_response_id`` chains already expanded, each item with
an id), and its owner (the key id or IAM principal that created it; "" when nothing
authenticates). A response is visible only to its owner: to anyone else it does not exist.

Records hold prompt and completion text. They expire ``responses_ttl_s`` after they were
written, and one record is at most ``responses_max_bytes`` as compressed JSON: the dialect
refuses to store more (a 400 before any model call).

Backends (``STREAMGATE_RESPONSES_STORE``): ``memory`` (the dev server's default: this process
only, at most ``responses_memory_items`` records, oldest dropped first), ``sqlite`` (a database
file, ``STREAMGATE_RESPONSES_FILE``, with the same bound: every process on the machine that
opens it sees the same records; the dev server's ``--workers`` share one this way),
``dynamodb`` (a table, ``STREAMGATE_RESPONSES_TABLE``; every container and invocation sees the
same records) and ``off`` (nothing is stored; a request that needs a stored response is a 400).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from streamgate.config import RESPONSE_STORES
from streamgate.errors import ConfigError, ServiceUnavailableError

if TYPE_CHECKING:
    import sqlite3

    from streamgate.config import Settings
    from streamgate.deadline import Deadline

logger = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: Mapping[str, Any]  # the Response object, as the client received it
    input_items: tuple[Mapping[str, Any], ...]  # the whole input, each item with an id
    owner: str


def encode(record: StoredResponse) -> bytes:
    """A record as compressed JSON (what the size bound counts)."""
    doc = {"response": record.response, "input_items": list(record.input_items),
           "owner": record.owner}
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return zlib.compress(text.encode("utf-8", "surrogatepass"), 6)


def decode(blob: bytes) -> StoredResponse:
    doc = json.loads(zlib.decompress(blob).decode("utf-8", "surrogatepass"))
    return StoredResponse(doc["response"], tuple(doc["input_items"]), doc["owner"])


class ResponseStore(Protocol):
    """Where responses are kept. Every call ends by ``deadline``; a store that fails raises
    :class:`~streamgate.errors.ServiceUnavailableError` (503) naming what failed."""

    max_bytes: int

    def put(self, response_id: str, blob: bytes, owner: str, deadline: Deadline) -> None:
        """Keep ``blob`` (:func:`encode`'s, at most ``max_bytes``) under ``response_id``."""
        ...

    def get(self, response_id: str, owner: str, deadline: Deadline) -> StoredResponse | None:
        """The record, or None if there is none, it expired, or ``owner`` is not its owner."""
        ...

    def delete(self, response_id: str, owner: str, deadline: Deadline) -> bool:
        """Remove the record; False if ``owner`` has no such record."""
        ...


class MemoryStore:
    """Records in this process: at most ``max_items``, the oldest dropped first, each for
    ``ttl_s``."""

    def __init__(self, *, max_items: int, ttl_s: float, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._max_items = max_items
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()

    def put(self, response_id: str, blob: bytes, owner: str, deadline: Deadline) -> None:
        with self._lock:
            self._items[response_id] = (self._clock() + self._ttl_s, owner, blob)
            self._items.move_to_end(response_id)
            while len(self._items) > self._max_items:
                self._items.popitem(last=False)

    def get(self, response_id: str, owner: str, deadline: Deadline) -> StoredResponse | None:
        with self._lock:
            found = self._items.get(response_id)
            if found is None:
                return None
            expires, item_owner, blob = found
            if self._clock() >= expires:
                del self._items[response_id]
                return None
        if item_owner != owner:
            return None
        return decode(blob)

    def delete(self, response_id: str, owner: str, deadline: Deadline) -> bool:
        with self._lock:
            found = self._items.get(response_id)
            if found is None or found[1] != owner or self._clock() >= found[0]:
                return False
            del self._items[response_id]
            return True


class SqliteStore:
    """Records in a SQLite database file, shared by every process that opens it: at most
    ``max_items``, the oldest written dropped first, each for ``ttl_s`` of wall-clock time.

    One connection per store, used under a lock. Every call is bounded by its deadline and by
    ``timeout_s``: the wait for the lock, and SQLite's own wait for another process's write
    (its busy timeout). What fails is a 503 (the cause logged, not shown)."""

    def __init__(self, path: str, *, max_items: int, ttl_s: float, max_bytes: int,
                 timeout_s: float = 3.0, clock: Callable[[], float] = time.time) -> None:
        import sqlite3  # only this backend needs it

        self.max_bytes = max_bytes
        self._max_items = max_items
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._errors: tuple[type[Exception], ...] = (sqlite3.Error,)
        try:
            self._db: sqlite3.Connection = sqlite3.connect(
                path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
            # WAL: readers do not wait for a writer, and a write is one append.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, expires REAL NOT NULL, "
                "blob BLOB NOT NULL)")
        except sqlite3.Error as e:
            raise ConfigError(f"STREAMGATE_RESPONSES_FILE {path!r} cannot be used as a "
                              f"response store: {e}") from None

    def put(self, response_id: str, blob: bytes, owner: str, deadline: Deadline) -> None:
        if len(blob) > self.max_bytes:
            raise ValueError(f"A stored response is at most {self.max_bytes} bytes, "
                             f"got {len(blob)}")
        expires = self._clock() + self._ttl_s

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")  # waits (busy_timeout) for another process's write
            try:
                db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
                db.execute("INSERT INTO responses (id, owner, expires, blob) VALUES (?, ?, ?, ?)",
                           (response_id, owner, expires, blob))
                db.execute("DELETE FROM responses WHERE seq <= (SELECT seq FROM responses "
                           "ORDER BY seq DESC LIMIT 1 OFFSET ?)", (self._max_items,))
                db.execute("DELETE FROM responses WHERE expires <= ?", (self._clock(),))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        self._run("put", write, deadline)

    def get(self, response_id: str, owner: str, deadline: Deadline) -> StoredResponse | None:
        row = self._run("get", lambda db: db.execute(
            "SELECT owner, expires, blob FROM responses WHERE id = ?", (response_id,)
        ).fetchone(), deadline)
        if row is None or row[0] != owner or self._clock() >= row[1]:
            return None
        return decode(row[2])

    def delete(self, response_id: str, owner: str, deadline: Deadline) -> bool:
        now = self._clock()
        deleted: int = self._run("delete", lambda db: db.execute(
            "DELETE FROM responses WHERE id = ? AND owner = ? AND expires > ?",
            (response_id, owner, now)).rowcount, deadline)
        return deleted > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, what: str, call: Callable[[sqlite3.Connection], Any],
             deadline: Deadline) -> Any:
        wait = deadline.cap(self._timeout_s)
        if not self._lock.acquire(timeout=wait):
            logger.warning("response store (sqlite): %s waited %.3g s for its connection",
                           what, wait)
            raise ServiceUnavailableError("Stored responses are unavailable; try again shortly",
                                          retry_after=1)
        try:
            # Another process's write makes this one wait at most what the call has left.
            busy_ms = max(1, int(deadline.cap(self._timeout_s) * 1000))
            self._db.execute(f"PRAGMA busy_timeout = {busy_ms}")
            return call(self._db)
        except self._errors as e:
            logger.warning("response store (sqlite): %s failed: %s", what, e)
            raise ServiceUnavailableError("Stored responses are unavailable; try again shortly",
                                          retry_after=1) from None
        finally:
            self._lock.release()


def create_store(settings: Settings) -> ResponseStore | None:
    """The configured store (None when storage is off)."""
    kind = settings.responses_store
    if kind == "off":
        return None
    if kind == "memory":
        return MemoryStore(max_items=settings.responses_memory_items,
                           ttl_s=settings.responses_ttl_s,
                           max_bytes=settings.responses_max_bytes)
    if kind == "sqlite":
        return SqliteStore(settings.responses_file, max_items=settings.responses_memory_items,
                           ttl_s=settings.responses_ttl_s,
                           max_bytes=settings.responses_max_bytes)
    if kind == "dynamodb":
        from streamgate.responsestore_dynamodb import DynamoStore

        return DynamoStore(settings)
    raise ConfigError(f"STREAMGATE_RESPONSES_STORE must be one of {', '.join(RESPONSE_STORES)}, "
                      f"got {kind!r}")
