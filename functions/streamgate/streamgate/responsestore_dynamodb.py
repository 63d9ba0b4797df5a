"""Stored responses on a DynamoDB table (``STREAMGATE_RESPONSES_STORE=dynamodb``,
``STREAMGATE_RESPONSES_TABLE``): the :class:`~streamgate.responsestore.ResponseStore` Lambda
uses, so every container and invocation sees the same records.

Items; the table's only key is the string ``pk`` (template.yaml's ``ResponsesTable``):

==================================== ==========================================================
``pk``                               holds
==================================== ==========================================================
``R#<response id>``                  the head: ``owner``, ``size`` (the record's bytes) and
                                     either the record itself (``data``, when it fits in one
                                     item) or ``write`` and ``parts``, which name its parts
``P#<response id>#<write>#<nnnn>``   part ``nnnn`` (from 0000) of the record that ``write``
                                     wrote: ``data``, at most :data:`PART_BYTES` of it
==================================== ==========================================================

Every item carries ``expires`` (epoch seconds, the table's TTL attribute): now plus
``responses_ttl_s`` when it was written. DynamoDB deletes expired items lazily (within days),
so a head whose ``expires`` has passed is absent here already.

Why parts have partitions of their own rather than being sort keys under one: a record may be
``responses_max_bytes`` (4 MiB) and an item at most 400 KB, so a big record takes 11 items.
One partition key takes at most 1,000 write units (1 KB each) a second, which would throttle
a 4 MiB record's writes for four seconds, and a Query returns at most 1 MB a page, so one item
collection could not be read in one call anyway. Spread over keys, a record is written with one
``BatchWriteItem`` and one ``PutItem``, and read with one ``GetItem`` and one ``BatchGetItem``
(consistent reads). A record that fits in one item (almost all) is one ``PutItem`` and one
``GetItem``.

Nobody sees half a record, or parts of two. A head is the only way in: a write stores its parts
first, under a write id of its own (random) that no other write uses, and then the head naming
that id and the part count; parts never change. A reader takes the head, then exactly the parts
it names. An overwrite replaces the head in one ``PutItem`` and then deletes the old write's
parts; a delete removes the head (only the owner's, only while unexpired: one conditional
``DeleteItem``) and then its parts. A reader that finds parts missing was overtaken by one of
those, and reads the head once more. A put or delete that fails after its head was written or
removed leaves unreachable parts, which expire with their TTL.

Owners: a head names its owner; to anyone else the record does not exist (``get`` answers
None and ``delete`` False, exactly as for an id never stored).

Failure policy, as keystore.py's: a call (``put``, ``get``, ``delete``) has one time budget,
``timeout_s``, ended earlier by the request's :class:`~streamgate.deadline.Deadline`; the client
waits at most half of ``timeout_s`` to connect and half for each read, and the caller waits no
longer than the budget for any answer (a request past it is left to its socket timeouts in a
worker thread, its answer dropped). A request is tried a second time only after a transient
failure (a timeout, a dropped connection, throttling, a 5xx, items a batch left unprocessed)
while the budget lasts. What still fails is a :class:`ResponseStoreError` (503) naming its
cause; neither it nor the log carries record text. boto3 is imported when the table is first
used, and clients are built through :mod:`streamgate.aws`.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from streamgate.errors import ConfigError, ServiceUnavailableError, relayed
from streamgate.keystore import (
    _CREDENTIAL_CODES,
    _TRANSIENT_CODES,
    ACCESS_DENIED,
    CREDENTIALS_REJECTED,
    FAILED,
    NO_CREDENTIALS,
    NO_REGION,
    TABLE_MISSING,
    UNAVAILABLE,
    _api_name,
)
from streamgate.responsestore import StoredResponse, decode

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from streamgate.config import Settings
    from streamgate.deadline import Deadline

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0  # the time budget of one call, its retry included
TTL_ATTRIBUTE = "expires"  # template.yaml's TimeToLiveSpecification names it too
# DynamoDB's item limit is 400 KB (409,600 bytes: attribute names and values); stay under it.
ITEM_BYTES = 400_000
MAX_ID_BYTES = 256  # a longer response id is no record of ours
# A part's key (at most 2 + 256 + 1 + 16 + 1 + 4 bytes), its attribute names and ``expires``
# take well under 1,000 bytes of the item.
PART_BYTES = ITEM_BYTES - 1_000
INCONSISTENT = "inconsistent"  # a record that changed under every read (ResponseStoreError)
_ATTEMPTS = 2
_RETRY_WAIT_S = 0.05  # longest pause before the second attempt (full jitter)
_READS = 2  # a record overtaken while being read is read once more
_WRITE_BATCH = 25  # BatchWriteItem's most requests
_READ_BATCH = 40  # BatchGetItem takes 100 keys but answers at most 16 MB: 40 parts
_WORKERS = 64  # threads waiting on the table at once; more calls queue (and time out)
# Attribute names, in expressions always through ExpressionAttributeNames ("owner", "size"
# and "data" are DynamoDB reserved words).
_NAMES = {"#owner": "owner", "#expires": TTL_ATTRIBUTE}


class ResponseStoreError(ServiceUnavailableError):
    """The responses table could not do what was asked. The client sees only the 503 message;
    ``cause`` (keystore.py's ``NO_REGION`` ... ``FAILED``, or :data:`INCONSISTENT`) and
    ``detail`` are for logs."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__("Stored responses are unavailable; try again shortly", retry_after=1)
        self.cause = cause
        self.detail = detail


class _ConditionFailed(Exception):
    """A conditional write found the item not as the condition wanted it."""


class DynamoStore:
    """The stored responses of ``settings.responses_table`` (see the module docstring)."""

    def __init__(self, settings: Settings, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 part_bytes: int = PART_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        """``timeout_s``: each call's time budget; ``part_bytes``: the most record bytes one
        item holds (smaller only in tests, to split small records); ``clock``: epoch seconds,
        for the TTL."""
        if not settings.responses_table:
            raise ConfigError("STREAMGATE_RESPONSES_STORE=dynamodb needs "
                              "STREAMGATE_RESPONSES_TABLE")
        if not settings.responses_ttl_s > 0:
            raise ConfigError("STREAMGATE_RESPONSES_TTL_S must be more than 0")
        if not settings.responses_max_bytes > 0:
            raise ConfigError("STREAMGATE_RESPONSES_MAX_BYTES must be more than 0")
        if not timeout_s > 0:
            raise ConfigError("The responses table's timeout must be more than 0")
        if not 0 < part_bytes <= PART_BYTES:
            raise ValueError(f"part_bytes must be 1 to {PART_BYTES}")
        self.table = settings.responses_table
        self.max_bytes = settings.responses_max_bytes
        self.ttl_s = settings.responses_ttl_s
        self.timeout_s = timeout_s
        self.part_bytes = part_bytes
        self.clock = clock
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- the three calls -------------------------------------------------------------------

    def put(self, response_id: str, blob: bytes, owner: str, deadline: Deadline) -> None:
        pk = _head_key(response_id)
        if pk is None:
            raise ValueError(f"A response id is 1 to {MAX_ID_BYTES} bytes of UTF-8")
        if len(blob) > self.max_bytes:
            raise ValueError(f"A stored response is at most {self.max_bytes} bytes, "
                             f"this one {len(blob)}")
        deadline.check()
        until = deadline.until(time.monotonic() + self.timeout_s)
        expires = {"N": str(math.ceil(self.clock() + self.ttl_s))}
        head: dict[str, Any] = {"pk": {"S": pk}, "owner": {"S": owner},
                                "size": {"N": str(len(blob))}, TTL_ATTRIBUTE: expires}
        if _item_bytes(head) > ITEM_BYTES - 100:  # room for "write" and "parts"
            raise ValueError("The owner's name does not fit in an item")
        if _item_bytes(head) + len("data") + len(blob) <= self.part_bytes:
            head["data"] = {"B": blob}
        else:
            write = secrets.token_hex(8)
            starts = range(0, len(blob), self.part_bytes)
            self._write_batches(until, [{"PutRequest": {"Item": {
                "pk": {"S": _part_key(response_id, write, n)},
                "data": {"B": blob[start:start + self.part_bytes]}, TTL_ATTRIBUTE: expires}}}
                for n, start in enumerate(starts)])
            head["write"] = {"S": write}
            head["parts"] = {"N": str(len(starts))}
        old = self._call(until, "put_item", Item=head, ReturnValues="ALL_OLD").get("Attributes")
        if old and "write" in old:  # the record this one replaced had parts: drop them
            self._drop_parts(until, response_id, old)

    def get(self, response_id: str, owner: str, deadline: Deadline) -> StoredResponse | None:
        pk = _head_key(response_id)
        if pk is None:
            return None
        deadline.check()
        until = deadline.until(time.monotonic() + self.timeout_s)
        for _ in range(_READS):
            head = self._call(until, "get_item", Key={"pk": {"S": pk}},
                              ConsistentRead=True).get("Item")
            if (head is None or head["owner"]["S"] != owner
                    or int(head[TTL_ATTRIBUTE]["N"]) <= self.clock()):
                return None
            blob = head["data"]["B"] if "data" in head else self._read_parts(
                until, response_id, head)
            if blob is not None and len(blob) == int(head["size"]["N"]):
                return decode(blob)
        raise self._fail(ResponseStoreError(
            INCONSISTENT, f"responses table {self.table}: the parts of response {response_id} "
                          "were missing at every read"))

    def delete(self, response_id: str, owner: str, deadline: Deadline) -> bool:
        pk = _head_key(response_id)
        if pk is None:
            return False
        deadline.check()
        until = deadline.until(time.monotonic() + self.timeout_s)
        try:
            old = self._call(
                until, "delete_item", Key={"pk": {"S": pk}},
                ConditionExpression="#owner = :owner AND #expires > :now",
                ExpressionAttributeNames=_NAMES,
                ExpressionAttributeValues={":owner": {"S": owner},
                                           ":now": {"N": str(math.floor(self.clock()))}},
                ReturnValues="ALL_OLD")["Attributes"]
        except _ConditionFailed:  # none, another owner's, or expired: all look the same
            return False
        if "write" in old:
            self._drop_parts(until, response_id, old)
        return True

    # -- parts -----------------------------------------------------------------------------

    def _read_parts(self, until: float, response_id: str, head: Mapping[str, Any]) -> bytes | None:
        """The parts ``head`` names, joined; None if any is missing (the record was overwritten
        or deleted since the head was read)."""
        keys = [_part_key(response_id, head["write"]["S"], n)
                for n in range(int(head["parts"]["N"]))]
        found: dict[str, bytes] = {}
        for i in range(0, len(keys), _READ_BATCH):
            pending: list[dict[str, Any]] = [{"pk": {"S": k}} for k in keys[i:i + _READ_BATCH]]
            for attempt in range(1, _ATTEMPTS + 1):
                answer = self._call(until, "batch_get_item", on_table=False,
                                    attempts=_ATTEMPTS + 1 - attempt, RequestItems={
                                        self.table: {"Keys": pending, "ConsistentRead": True}})
                for item in answer.get("Responses", {}).get(self.table, []):
                    found[item["pk"]["S"]] = item["data"]["B"]
                pending = answer.get("UnprocessedKeys", {}).get(self.table, {}).get("Keys", [])
                if not pending:
                    break
                self._pause_or_fail(until, attempt, "BatchGetItem", len(pending))
        if len(found) < len(keys):
            return None
        return b"".join(found[k] for k in keys)

    def _drop_parts(self, until: float, response_id: str, head: Mapping[str, Any]) -> None:
        """Delete the parts ``head`` named (its record is unreachable already). What cannot be
        deleted now expires with its TTL: logged, not raised, as the call itself succeeded."""
        keys = [_part_key(response_id, head["write"]["S"], n)
                for n in range(int(head["parts"]["N"]))]
        try:
            self._write_batches(until, [{"DeleteRequest": {"Key": {"pk": {"S": k}}}}
                                        for k in keys])
        except ResponseStoreError as e:
            logger.warning("responses table %s: %d parts of a replaced or deleted response "
                           "remain until their TTL (%s)", self.table, len(keys), e.detail,
                           extra={"cause": e.cause})

    def _write_batches(self, until: float, requests: list[dict[str, Any]]) -> None:
        for i in range(0, len(requests), _WRITE_BATCH):
            pending = requests[i:i + _WRITE_BATCH]
            for attempt in range(1, _ATTEMPTS + 1):
                answer = self._call(until, "batch_write_item", on_table=False,
                                    attempts=_ATTEMPTS + 1 - attempt,
                                    RequestItems={self.table: pending})
                pending = answer.get("UnprocessedItems", {}).get(self.table, [])
                if not pending:
                    break
                self._pause_or_fail(until, attempt, "BatchWriteItem", len(pending))

    def _pause_or_fail(self, until: float, attempt: int, api: str, left: int) -> None:
        """A batch left ``left`` requests unprocessed (throttled): pause before sending them
        again, or fail if that was the second try or the budget is spent."""
        wait = random.uniform(0, _RETRY_WAIT_S)
        if attempt == _ATTEMPTS or time.monotonic() + wait >= until:
            raise self._fail(ResponseStoreError(
                UNAVAILABLE, f"responses table {self.table} left {left} requests of {api} "
                             "unprocessed (throttled)"))
        time.sleep(wait)

    # -- one table call --------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from streamgate.keystore import build_client

                    self._client = build_client(self.timeout_s)
        return self._client

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._pool = ThreadPoolExecutor(_WORKERS, "streamgate-responses")
        return self._pool

    def _call(self, until: float, operation: str, *, on_table: bool = True,
              attempts: int = _ATTEMPTS, **kwargs: Any) -> dict[str, Any]:
        """One table request, answered by monotonic time ``until`` (see the module docstring):
        a failed condition is :class:`_ConditionFailed`, any other failure a
        :class:`ResponseStoreError`."""
        from concurrent.futures import TimeoutError as WaitTimeout

        from botocore.exceptions import BotoCoreError, ClientError

        if on_table:
            kwargs["TableName"] = self.table
        api = _api_name(operation)
        method = getattr(self.client, operation)
        for attempt in range(1, attempts + 1):
            wait = until - time.monotonic()
            failure: Exception | None = None
            if wait <= 0:
                raise self._fail(ResponseStoreError(
                    UNAVAILABLE, f"responses table {self.table}: no time left for {api}"))
            future = self._workers().submit(method, **kwargs)
            try:
                result: dict[str, Any] = future.result(timeout=wait)
                return result
            except WaitTimeout:
                future.cancel()  # still queued: never sent; sent: its answer is dropped
                fault, transient = ResponseStoreError(
                    UNAVAILABLE, f"responses table {self.table} did not answer {api} within "
                                 f"{wait:.2f} s"), True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                    raise _ConditionFailed() from None
                failure = e
                fault, transient = self._refused(api, e.response)
            except BotoCoreError as e:
                failure = e
                fault, transient = self._unreached(api, e)
            pause = random.uniform(0, _RETRY_WAIT_S)
            if attempt == attempts or not transient or time.monotonic() + pause >= until:
                raise self._fail(fault) from failure
            logger.debug("%s; trying again", fault.detail)
            time.sleep(pause)
        raise AssertionError("unreachable")

    def _refused(self, api: str, response: Mapping[str, Any]) -> tuple[ResponseStoreError, bool]:
        """The cause of an error answer, and whether trying again may help."""
        error = response.get("Error", {})
        code, message = error.get("Code", "unknown"), error.get("Message", "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        table = self.table
        if code == "ResourceNotFoundException":
            return ResponseStoreError(TABLE_MISSING,
                                      f"responses table {table} does not exist"), False
        if code == "AccessDeniedException":
            return ResponseStoreError(ACCESS_DENIED, f"not allowed to call {api} on responses "
                                                     f"table {table}: {message}"), False
        if code in _CREDENTIAL_CODES:
            return ResponseStoreError(CREDENTIALS_REJECTED, f"AWS rejected the credentials "
                                                            f"({code}): {message}"), False
        if code in _TRANSIENT_CODES or status >= 500:
            return ResponseStoreError(UNAVAILABLE,
                                      f"responses table {table} failed {api}: {code}"), True
        return ResponseStoreError(FAILED, f"responses table {table} refused {api}: {code}: "
                                          f"{relayed(message)}"), False

    def _unreached(self, api: str, error: Exception) -> tuple[ResponseStoreError, bool]:
        """The cause of a request that got no answer, and whether trying again may help."""
        from botocore.exceptions import (
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            NoRegionError,
            PartialCredentialsError,
        )

        if isinstance(error, NoRegionError):
            return ResponseStoreError(NO_REGION, "no AWS region configured: set AWS_REGION or "
                                                 "AWS_DEFAULT_REGION"), False
        if isinstance(error, NoCredentialsError | PartialCredentialsError):
            return ResponseStoreError(NO_CREDENTIALS, "no AWS credentials found"), False
        name = type(error).__name__
        if isinstance(error, ConnectionError | HTTPClientError):
            return ResponseStoreError(UNAVAILABLE, f"responses table {self.table} did not "
                                                   f"answer {api} ({name}: {error})"), True
        return ResponseStoreError(FAILED, f"responses table {self.table}: {api} failed "
                                          f"({name})"), False

    def _fail(self, error: ResponseStoreError) -> ResponseStoreError:
        logger.warning("%s", error.detail, extra={"cause": error.cause})
        return error


def _head_key(response_id: str) -> str | None:
    """The head's key, or None for an id no record can have (empty, too long, not UTF-8)."""
    try:
        size = len(response_id.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: no string key can hold it
        return None
    return f"R#{response_id}" if 0 < size <= MAX_ID_BYTES else None


def _part_key(response_id: str, write: str, n: int) -> str:
    return f"P#{response_id}#{write}#{n:04d}"


def _item_bytes(item: Mapping[str, Mapping[str, Any]]) -> int:
    """An item's size as DynamoDB counts it, for the attribute types the store writes (a
    number is counted by its digits, a little more than DynamoDB counts)."""
    size = 0
    for name, value in item.items():
        size += len(name.encode("utf-8"))
        for kind, content in value.items():
            size += len(content) if kind in ("B", "N") else len(content.encode("utf-8"))
    return size
