"""API keys, per-key limits and usage records on one DynamoDB table.

Items, all under the partition ``pk = "KEY#<key id>"``:

=============================== ===========================================================
``sk``                          holds
=============================== ===========================================================
``#KEY``                        the key: SHA-256 hash, display prefix, name, created,
                                revoked, models, rpm, tpm, budget; ``kind = "key"`` puts it
                                in the ``by-kind`` index that ``list`` reads
``MIN#<epoch minute>``          requests and tokens of one clock minute; expires by TTL
``MONTH#<YYYY-MM>``             tokens charged against the monthly budget; expires by TTL
``USAGE#<YYYY-MM-DD>#<model>``  the usage record of one day and model, kept: ``requests``
                                (counted at admission), ``prompt_tokens``,
                                ``completion_tokens`` and ``errors`` (added when a request
                                settles), and ``unsettled`` and ``reserved_tokens``: the
                                admitted requests not settled yet and what they reserved
=============================== ===========================================================

Keys are ``sgk_`` followed by 43 URL-safe characters (256 random bits). Only their SHA-256 is
stored; the key id is the hash's first 16 hex digits, so the request path finds a key with one
``GetItem``. A fast hash is right here: with 256 random bits there is nothing to brute-force,
unlike a password.

Every counter moves with one ``UpdateItem`` whose condition carries the limit, so concurrent
Lambda instances cannot both take the last unit (DynamoDB serialises writes to an item). boto3 is
imported when the table is first used.

Failure policy. A call has one time budget (``timeout_s``; ``STREAMGATE_KEYS_TIMEOUT_S`` on the
request path): each attempt waits at most half of it to connect and half for each read, and a
call is tried a second time only after a transient failure (a timeout, a dropped connection,
throttling, a 5xx, a transaction conflict) while the budget is not spent. What still fails is a
:class:`KeyStoreError` naming its cause; the request path fails closed on it (503).

What a retry can count twice: an ``UpdateItem`` whose response was lost (a read timeout or a
connection dropped after the request was sent) may have been applied, and its retry applies it
again. Those are the additions made at admission (:meth:`KeyStore.take_window`,
:meth:`KeyStore.take_budget`, :meth:`KeyStore.open_usage`), so the error is always an
over-count: a request's reservation held twice in its minute or month, a request counted twice
(and left looking unsettled). Never an under-count: the writes that give tokens back or correct
them (:meth:`KeyStore.settle`, :meth:`KeyStore.give_back`) are transactions with a
``ClientRequestToken`` derived from the request, which DynamoDB applies once however often they
are retried within 10 minutes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streamgate.errors import ConfigError, ServiceUnavailableError

if TYPE_CHECKING:  # only the key tool's paths need these; the request path stays lean
    from datetime import date
    from pathlib import Path

logger = logging.getLogger(__name__)

KEY_PREFIX = "sgk_"
_KEY_SHAPE = re.compile(r"sgk_[A-Za-z0-9_-]{43}")
_ID_SHAPE = re.compile(r"[0-9a-f]{16}")
DISPLAY_CHARS = 12  # "sgk_" and the first 8 random characters: enough to recognise a key
KEY_SK = "#KEY"
KIND_INDEX = "by-kind"
# Counters outlive their window a little, so a late settle still finds them.
MINUTE_TTL_S = 3_600
MONTH_TTL_S = 100 * 86_400  # after the month ends; the USAGE items keep the record
DEFAULT_TIMEOUT_S = 3.0  # the time budget of one call, its retry included
_ATTEMPTS = 2
_RETRY_WAIT_S = 0.05  # longest pause before the second attempt (full jitter)

# Why the table could not be used (KeyStoreError.cause).
NO_REGION = "no_region"
NO_CREDENTIALS = "no_credentials"
CREDENTIALS_REJECTED = "credentials_rejected"
ACCESS_DENIED = "access_denied"
TABLE_MISSING = "table_missing"
TABLE_EXISTS = "table_exists"
UNAVAILABLE = "unavailable"  # transient: timeouts, dropped connections, throttling, 5xx
FAILED = "failed"  # the table refused the call for another reason
_CREDENTIAL_CODES = frozenset({
    "UnrecognizedClientException", "InvalidSignatureException", "IncompleteSignatureException",
    "ExpiredTokenException", "ExpiredToken", "MissingAuthenticationTokenException",
    "InvalidClientTokenId", "SignatureDoesNotMatch"})
_TRANSIENT_CODES = frozenset({
    "ThrottlingException", "ProvisionedThroughputExceededException", "RequestLimitExceeded",
    "InternalServerError", "ServiceUnavailable", "TransactionConflictException",
    "TransactionInProgressException"})
# A cancelled transaction is worth retrying when no item failed for a reason of its own.
_TRANSIENT_REASONS = frozenset({"None", "TransactionConflict", "ThrottlingError",
                                "ProvisionedThroughputExceeded"})


def generate_key() -> str:
    import secrets

    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def looks_like_key(key: str) -> bool:
    """Cheap shape check that spares the table a lookup for obvious garbage."""
    return _KEY_SHAPE.fullmatch(key) is not None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    prefix: str
    created: str  # ISO 8601, UTC
    digest: str = field(repr=False)
    revoked: bool = False
    models: tuple[str, ...] = ()  # empty: every model
    rpm: int | None = None  # requests per minute; None: unlimited
    tpm: int | None = None  # tokens per minute
    budget: int | None = None  # tokens per calendar month (UTC)

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(self.digest, key_digest(key))

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models

    def summary(self) -> dict[str, Any]:
        """Everything but the hash, for the key tool's output."""
        return {"id": self.id, "name": self.name, "prefix": self.prefix,
                "created": self.created, "revoked": self.revoked,
                "models": list(self.models), "rpm": self.rpm, "tpm": self.tpm,
                "budget": self.budget}


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    unsettled: int = 0  # admitted, never settled: still running, or its process died
    reserved_tokens: int = 0  # what the unsettled requests reserved


class KeyStoreError(ServiceUnavailableError):
    """The keys table could not do what was asked. The client sees only the 503 message;
    ``cause`` (``NO_REGION`` ... ``FAILED`` above) and ``detail`` are for logs and the key
    tool."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__("The key store is unavailable; try again shortly", retry_after=1)
        self.cause = cause
        self.detail = detail


class LimitReached(Exception):
    """A conditional update found the counter at its limit; ``old`` is the item as it was."""

    def __init__(self, old: dict[str, int]) -> None:
        super().__init__("limit reached")
        self.old = old


def minute_of(now: float) -> int:
    return int(now // 60)


def month_of(now: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(now))


def day_of(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def next_month_start(now: float) -> float:
    import calendar

    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


class KeyStore:
    """The table's operations: the request path's reads and counters, and the key tool's."""

    def __init__(self, table: str, *, client: Any = None,
                 clock: Callable[[], float] = time.time,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not table:
            raise ConfigError("No keys table: set STREAMGATE_KEYS_TABLE")
        if not timeout_s > 0:
            raise ConfigError("The keys table's timeout (STREAMGATE_KEYS_TIMEOUT_S) must be "
                              "more than 0")
        self.table = table
        self.clock = clock
        self.timeout_s = timeout_s
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = build_client(self.timeout_s)
        return self._client

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """One table call within the time budget (see the module docstring); a failed condition
        is :class:`LimitReached`, any other failure a :class:`KeyStoreError`."""
        from botocore.exceptions import BotoCoreError, ClientError

        give_up_at = time.monotonic() + self.timeout_s
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                result: dict[str, Any] = getattr(self.client, operation)(**kwargs)
                return result
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                    raise LimitReached(_numbers(e.response.get("Item") or {})) from None
                failure: Exception = e
                fault, transient = self._refused(operation, e.response)
            except BotoCoreError as e:
                failure = e
                fault, transient = self._unreached(operation, e)
            wait = random.uniform(0, _RETRY_WAIT_S)
            if attempt == _ATTEMPTS or not transient or time.monotonic() + wait >= give_up_at:
                raise fault from failure
            logger.debug("%s; trying again", fault.detail)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _on_table(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        return self._call(operation, TableName=self.table, **kwargs)

    def _refused(self, operation: str, response: Mapping[str, Any]) -> tuple[KeyStoreError, bool]:
        """The cause of an error answer, and whether trying again may help."""
        error = response.get("Error", {})
        code, message = error.get("Code", "unknown"), error.get("Message", "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        api, table = _api_name(operation), self.table
        if code == "ResourceNotFoundException":
            return KeyStoreError(TABLE_MISSING,
                                 f"keys table {table} does not exist{self._where()}"), False
        if code == "ResourceInUseException":
            return KeyStoreError(TABLE_EXISTS,
                                 f"keys table {table} already exists{self._where()}"), False
        if code == "AccessDeniedException":
            return KeyStoreError(ACCESS_DENIED, f"not allowed to call {api} on keys table "
                                                f"{table}: {message}"), False
        if code in _CREDENTIAL_CODES:
            return KeyStoreError(CREDENTIALS_REJECTED,
                                 f"AWS rejected the credentials ({code}): {message}"), False
        reasons = {str(r.get("Code")) for r in response.get("CancellationReasons") or ()}
        if (code in _TRANSIENT_CODES or status >= 500
                or (code == "TransactionCanceledException" and reasons <= _TRANSIENT_REASONS)):
            return KeyStoreError(UNAVAILABLE, f"keys table {table} failed {api}: {code}"), True
        return KeyStoreError(FAILED, f"keys table {table} refused {api}: {code}: {message}"), False

    def _unreached(self, operation: str, error: Exception) -> tuple[KeyStoreError, bool]:
        """The cause of a call that got no answer, and whether trying again may help."""
        from botocore.exceptions import (
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            NoRegionError,
            PartialCredentialsError,
        )

        if isinstance(error, NoRegionError):
            return KeyStoreError(NO_REGION, "no AWS region configured: set AWS_REGION or "
                                            "AWS_DEFAULT_REGION (or a region in the AWS "
                                            "profile)"), False
        if isinstance(error, NoCredentialsError | PartialCredentialsError):
            return KeyStoreError(NO_CREDENTIALS, "no AWS credentials found: set AWS_PROFILE, "
                                                 "or AWS_ACCESS_KEY_ID and "
                                                 "AWS_SECRET_ACCESS_KEY"), False
        api = _api_name(operation)
        if isinstance(error, ConnectionError | HTTPClientError):
            return KeyStoreError(UNAVAILABLE, f"keys table {self.table} did not answer {api} "
                                              f"({type(error).__name__}: {error})"), True
        return KeyStoreError(FAILED, f"keys table {self.table}: {api} failed "
                                     f"({type(error).__name__}: {error})"), False

    def _where(self) -> str:
        region = getattr(getattr(self._client, "meta", None), "region_name", None)
        return f" in {region}" if isinstance(region, str) else ""

    # -- keys ------------------------------------------------------------------------------

    def create(self, name: str, *, models: tuple[str, ...] = (), rpm: int | None = None,
               tpm: int | None = None, budget: int | None = None) -> tuple[str, KeyRecord]:
        """A new key and its record; the key itself exists only in the return value."""
        for label, value in (("rpm", rpm), ("tpm", tpm), ("budget", budget)):
            if value is not None and value < 1:
                raise ValueError(f"{label} must be at least 1")
        key = generate_key()
        digest = key_digest(key)
        created = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(self.clock()))
        record = KeyRecord(id=digest[:16], name=name, prefix=key[:DISPLAY_CHARS],
                           created=created, digest=digest, models=tuple(models), rpm=rpm,
                           tpm=tpm, budget=budget)
        item: dict[str, Any] = {
            "pk": {"S": f"KEY#{record.id}"}, "sk": {"S": KEY_SK}, "kind": {"S": "key"},
            "name": {"S": name}, "prefix": {"S": record.prefix}, "created": {"S": created},
            "hash": {"S": digest}, "revoked": {"BOOL": False},
            "models": {"L": [{"S": m} for m in models]},
        }
        for label, value in (("rpm", rpm), ("tpm", tpm), ("budget", budget)):
            if value is not None:
                item[label] = {"N": str(value)}
        try:
            self._on_table("put_item", Item=item, ConditionExpression="attribute_not_exists(pk)")
        except LimitReached:  # a 64-bit id collision: astronomically unlikely, never overwrite
            raise ConfigError("Key id collision; run create again") from None
        return key, record

    def get(self, key_id: str) -> KeyRecord | None:
        if _ID_SHAPE.fullmatch(key_id) is None:
            return None
        item = self._on_table("get_item", Key=_key(key_id, KEY_SK)).get("Item")
        return _record(item) if item else None

    def list_keys(self) -> list[KeyRecord]:
        records: list[KeyRecord] = []
        kwargs: dict[str, Any] = {"IndexName": KIND_INDEX,
                                  "KeyConditionExpression": "kind = :key",
                                  "ExpressionAttributeValues": {":key": {"S": "key"}}}
        while True:
            page = self._on_table("query", **kwargs)
            records += [_record(item) for item in page.get("Items", [])]
            if "LastEvaluatedKey" not in page:
                return records
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def revoke(self, key_id: str) -> KeyRecord | None:
        if _ID_SHAPE.fullmatch(key_id) is None:
            return None
        try:
            result = self._on_table("update_item", Key=_key(key_id, KEY_SK),
                                UpdateExpression="SET revoked = :yes",
                                ConditionExpression="attribute_exists(pk)",
                                ExpressionAttributeValues={":yes": {"BOOL": True}},
                                ReturnValues="ALL_NEW")
        except LimitReached:
            return None
        return _record(result["Attributes"])

    # -- counters (the request path) -------------------------------------------------------

    def take_window(self, key_id: str, minute: int, *, reserve: int, rpm: int | None,
                    tpm: int | None) -> dict[str, int]:
        """Count one request and reserve tokens in this minute, unless that would pass a
        limit (then :class:`LimitReached` with the counts as they were)."""
        conditions = []
        values: dict[str, Any] = {":one": {"N": "1"}, ":reserve": {"N": str(reserve)},
                                  ":expires": {"N": str((minute + 1) * 60 + MINUTE_TTL_S)}}
        if rpm is not None:
            conditions.append("(attribute_not_exists(requests) OR requests < :rpm)")
            values[":rpm"] = {"N": str(rpm)}
        if tpm is not None:
            conditions.append("(attribute_not_exists(tokens) OR tokens <= :room)")
            values[":room"] = {"N": str(tpm - reserve)}
        kwargs: dict[str, Any] = {}
        if conditions:
            kwargs["ConditionExpression"] = " AND ".join(conditions)
        result = self._on_table(
            "update_item", Key=_key(key_id, f"MIN#{minute}"),
            UpdateExpression="ADD requests :one, tokens :reserve SET expires = :expires",
            ExpressionAttributeValues=values, ReturnValues="UPDATED_NEW",
            ReturnValuesOnConditionCheckFailure="ALL_OLD", **kwargs)
        return _numbers(result.get("Attributes", {}))

    def take_budget(self, key_id: str, month: str, *, reserve: int, budget: int,
                    expires: int) -> int:
        """Reserve tokens from this month's budget; the tokens charged so far, after it."""
        result = self._on_table(
            "update_item", Key=_key(key_id, f"MONTH#{month}"),
            UpdateExpression="ADD tokens :reserve SET expires = :expires",
            ConditionExpression="attribute_not_exists(tokens) OR tokens <= :room",
            ExpressionAttributeValues={":reserve": {"N": str(reserve)},
                                       ":room": {"N": str(budget - reserve)},
                                       ":expires": {"N": str(expires)}},
            ReturnValues="UPDATED_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD")
        return _numbers(result.get("Attributes", {})).get("tokens", 0)

    def open_usage(self, key_id: str, *, day: str, model: str, reserved: int) -> None:
        """Count an admitted request in its day's usage record, as unsettled with the tokens
        it reserved; :meth:`settle` closes it. A request whose process dies stays so."""
        self._on_table(
            "update_item", Key=_key(key_id, _usage_sk(day, model)),
            UpdateExpression=("ADD requests :one, unsettled :one, reserved_tokens :r "
                              "SET model = :m, #day = :d"),
            ExpressionAttributeNames={"#day": "day"},
            ExpressionAttributeValues={":one": {"N": "1"}, ":r": {"N": str(reserved)},
                                       ":m": {"S": model}, ":d": {"S": day}})

    def give_back(self, key_id: str, *, window: tuple[int, int] | None,
                  month: tuple[str, int] | None, token: str) -> None:
        """Return reserved tokens to a minute window and a month's budget (``(minute or month,
        tokens)``), in one transaction that ``token`` makes safe to retry."""
        items = []
        if window is not None:
            items.append(_add_tokens(self.table, key_id, f"MIN#{window[0]}", -window[1]))
        if month is not None:
            items.append(_add_tokens(self.table, key_id, f"MONTH#{month[0]}", -month[1]))
        if items:
            self._call("transact_write_items", TransactItems=items, ClientRequestToken=token)

    def settle(self, key_id: str, *, day: str, model: str, prompt_tokens: int,
               completion_tokens: int, error: bool, reserved: int,
               window: tuple[int, int] | None, month: tuple[str, int] | None,
               token: str) -> None:
        """One transaction, which ``token`` makes safe to retry: the request leaves the
        unsettled count of the usage record it was admitted in (``day``) and adds its real
        tokens and error there, and the window and budget reservations are corrected to what
        was really used (``(minute or month, correction)``)."""
        usage = {"Update": {
            "TableName": self.table, "Key": _key(key_id, _usage_sk(day, model)),
            "UpdateExpression": ("ADD unsettled :minus_one, reserved_tokens :unreserve, "
                                 "prompt_tokens :p, completion_tokens :c, errors :e "
                                 "SET model = :m, #day = :d"),
            "ExpressionAttributeNames": {"#day": "day"},
            "ExpressionAttributeValues": {
                ":minus_one": {"N": "-1"}, ":unreserve": {"N": str(-reserved)},
                ":p": {"N": str(prompt_tokens)}, ":c": {"N": str(completion_tokens)},
                ":e": {"N": "1" if error else "0"}, ":m": {"S": model}, ":d": {"S": day}}}}
        items = [usage]
        if window is not None:
            items.append(_add_tokens(self.table, key_id, f"MIN#{window[0]}", window[1]))
        if month is not None:
            items.append(_add_tokens(self.table, key_id, f"MONTH#{month[0]}", month[1]))
        self._call("transact_write_items", TransactItems=items, ClientRequestToken=token)

    # -- reports ---------------------------------------------------------------------------

    def usage(self, key_id: str, since: date, until: date) -> list[UsageRow]:
        rows: list[UsageRow] = []
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk AND sk BETWEEN :lo AND :hi",
            "ExpressionAttributeValues": {
                ":pk": {"S": f"KEY#{key_id}"}, ":lo": {"S": f"USAGE#{since.isoformat()}"},
                # "~" sorts after every model name character.
                ":hi": {"S": f"USAGE#{until.isoformat()}#~"}}}
        while True:
            page = self._on_table("query", **kwargs)
            for item in page.get("Items", []):
                n = _numbers(item)
                rows.append(UsageRow(day=item["day"]["S"], model=item["model"]["S"],
                                     requests=n.get("requests", 0),
                                     prompt_tokens=n.get("prompt_tokens", 0),
                                     completion_tokens=n.get("completion_tokens", 0),
                                     errors=n.get("errors", 0),
                                     unsettled=n.get("unsettled", 0),
                                     reserved_tokens=n.get("reserved_tokens", 0)))
            if "LastEvaluatedKey" not in page:
                return rows
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def month_tokens(self, key_id: str, month: str) -> int:
        item = self._on_table("get_item", Key=_key(key_id, f"MONTH#{month}")).get("Item") or {}
        return _numbers(item).get("tokens", 0)

    # -- the table itself (local development) ----------------------------------------------

    def create_table(self, definition: Mapping[str, Any]) -> None:
        """Create the table from the template's definition (see :func:`table_definition`);
        a :class:`KeyStoreError` with cause ``TABLE_EXISTS`` if there is one already."""
        from botocore.exceptions import WaiterError

        ttl = definition.get("TimeToLiveSpecification")
        kwargs = {k: v for k, v in definition.items()
                  if k in ("AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes",
                           "BillingMode")}
        self._on_table("create_table", **kwargs)
        try:
            self.client.get_waiter("table_exists").wait(
                TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        except WaiterError as e:
            raise KeyStoreError(UNAVAILABLE, f"keys table {self.table} was created but did not "
                                             "become ACTIVE within 2 minutes") from e
        if ttl:
            self._on_table("update_time_to_live", TimeToLiveSpecification=ttl)

    def describe(self) -> dict[str, Any]:
        """The table as DynamoDB describes it (``DescribeTable``'s ``Table``)."""
        table: dict[str, Any] = self._on_table("describe_table")["Table"]
        return table


def table_differences(definition: Mapping[str, Any], described: Mapping[str, Any]) -> list[str]:
    """How an existing table differs from the template's definition in what the code relies
    on: its key schema, the types of its key attributes and its secondary indexes."""
    wanted_types = {a["AttributeName"]: a["AttributeType"]
                    for a in definition.get("AttributeDefinitions", [])}
    found_types = {a["AttributeName"]: a["AttributeType"]
                   for a in described.get("AttributeDefinitions", [])}
    differences = []
    want, have = _schema(definition.get("KeySchema", [])), _schema(described.get("KeySchema", []))
    if want != have:
        differences.append(f"key schema is {have or 'none'}, the template's is {want}")
    wanted = {i["IndexName"]: i for i in definition.get("GlobalSecondaryIndexes", [])}
    found = {i["IndexName"]: i for i in described.get("GlobalSecondaryIndexes", [])}
    for name in sorted(wanted.keys() - found.keys()):
        differences.append(f"index {name} is missing")
    for name in sorted(found.keys() - wanted.keys()):
        differences.append(f"index {name} is not in the template")
    for name in sorted(wanted.keys() & found.keys()):
        want, have = _schema(wanted[name]["KeySchema"]), _schema(found[name]["KeySchema"])
        if want != have:
            differences.append(f"index {name} key schema is {have}, the template's is {want}")
        want = wanted[name].get("Projection", {}).get("ProjectionType", "")
        have = found[name].get("Projection", {}).get("ProjectionType", "")
        if want != have:
            differences.append(f"index {name} projects {have}, the template's projects {want}")
    key_names = {k["AttributeName"] for k in described.get("KeySchema", [])} | {
        k["AttributeName"] for i in found.values() for k in i["KeySchema"]}
    for name in sorted(key_names & wanted_types.keys()):
        if found_types.get(name, wanted_types[name]) != wanted_types[name]:
            differences.append(f"attribute {name} is of type {found_types[name]}, the "
                               f"template's is {wanted_types[name]}")
    return differences


def table_definition(template: Path) -> dict[str, Any]:
    """The keys table's properties as ``template.yaml`` declares them, so tests and
    ``keys init`` create exactly the table a deployed stack has."""
    properties: dict[str, Any] = load_template(template)["Resources"]["KeysTable"]["Properties"]
    return properties


def load_template(template: Path) -> dict[str, Any]:
    """A CloudFormation template as data; ``!Ref x`` becomes ``{"Ref": x}``, ``!Sub`` becomes
    ``{"Fn::Sub": ...}``, ``!GetAtt a.b`` ``{"Fn::GetAtt": ["a", "b"]}`` and so on, as
    CloudFormation's JSON form has them."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
        value: Any
        if isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)  # type: ignore[arg-type]
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)  # !GetAtt A.B is ["A", "B"] in the JSON form
        return {suffix if suffix in ("Ref", "Condition") else f"Fn::{suffix}": value}

    _Loader.add_multi_constructor("!", _tag)
    doc: dict[str, Any] = yaml.load(template.read_text(), Loader=_Loader)  # noqa: S506
    return doc


def build_client(timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """A DynamoDB client for one call's time budget: at most half of it to connect and half
    for each read, and no retries of its own (:meth:`KeyStore._call` makes the second attempt,
    within the budget). The standard ``AWS_ENDPOINT_URL_DYNAMODB`` variable points it at a
    local table."""
    from botocore.config import Config

    from streamgate import aws

    return aws.client("dynamodb", config=Config(
        connect_timeout=timeout_s / 2, read_timeout=timeout_s / 2,
        retries={"mode": "standard", "total_max_attempts": 1}))


def _key(key_id: str, sk: str) -> dict[str, Any]:
    return {"pk": {"S": f"KEY#{key_id}"}, "sk": {"S": sk}}


def _usage_sk(day: str, model: str) -> str:
    return f"USAGE#{day}#{model}"


def _api_name(operation: str) -> str:
    """``get_item`` -> ``GetItem``, as AWS names the call."""
    return "".join(part.title() for part in operation.split("_"))


def _schema(keys: list[Mapping[str, str]]) -> str:
    return ", ".join(f"{k['AttributeName']} ({k['KeyType']})" for k in keys)


def _add_tokens(table: str, key_id: str, sk: str, tokens: int) -> dict[str, Any]:
    return {"Update": {"TableName": table, "Key": _key(key_id, sk),
                       "UpdateExpression": "ADD tokens :n",
                       "ExpressionAttributeValues": {":n": {"N": str(tokens)}}}}


def _numbers(item: Mapping[str, Any]) -> dict[str, int]:
    return {name: int(value["N"]) for name, value in item.items()
            if isinstance(value, Mapping) and "N" in value}


def _record(item: Mapping[str, Any]) -> KeyRecord:
    n = _numbers(item)
    return KeyRecord(
        id=item["pk"]["S"].removeprefix("KEY#"), name=item["name"]["S"],
        prefix=item["prefix"]["S"], created=item["created"]["S"], digest=item["hash"]["S"],
        revoked=item.get("revoked", {}).get("BOOL", False),
        models=tuple(m["S"] for m in item.get("models", {}).get("L", [])),
        rpm=n.get("rpm"), tpm=n.get("tpm"), budget=n.get("budget"))
