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
``USAGE#<YYYY-MM-DD>#<model>``  requests, prompt and completion tokens and errors of one day
                                and model: the usage record, kept
=============================== ===========================================================

Keys are ``sgk_`` followed by 43 URL-safe characters (256 random bits). Only their SHA-256 is
stored; the key id is the hash's first 16 hex digits, so the request path finds a key with one
``GetItem``. A fast hash is right here: with 256 random bits there is nothing to brute-force,
unlike a password.

Every counter moves with one ``UpdateItem`` whose condition carries the limit, so concurrent
Lambda instances cannot both take the last unit (DynamoDB serialises writes to an item). boto3 is
imported when the table is first used.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
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
                 clock: Callable[[], float] = time.time) -> None:
        if not table:
            raise ConfigError("No keys table: set STREAMGATE_KEYS_TABLE")
        self.table = table
        self.clock = clock
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = build_client()
        return self._client

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """One table call; failures other than a failed condition mean the store is down, and
        the request path fails closed (503) rather than serving without its checks."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result: dict[str, Any] = getattr(self.client, operation)(TableName=self.table,
                                                                    **kwargs)
            return result
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise LimitReached(_numbers(e.response.get("Item") or {})) from None
            logger.error("keys table %s failed: %s", operation,
                         e.response.get("Error", {}).get("Code", "unknown"))
            raise ServiceUnavailableError("The key store is unavailable; try again shortly",
                                          retry_after=1) from None
        except BotoCoreError as e:
            logger.error("keys table %s failed: %s", operation, type(e).__name__)
            raise ServiceUnavailableError("The key store is unavailable; try again shortly",
                                          retry_after=1) from None

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
            self._call("put_item", Item=item, ConditionExpression="attribute_not_exists(pk)")
        except LimitReached:  # a 64-bit id collision: astronomically unlikely, never overwrite
            raise ConfigError("Key id collision; run create again") from None
        return key, record

    def get(self, key_id: str) -> KeyRecord | None:
        if _ID_SHAPE.fullmatch(key_id) is None:
            return None
        item = self._call("get_item", Key=_key(key_id, KEY_SK)).get("Item")
        return _record(item) if item else None

    def list_keys(self) -> list[KeyRecord]:
        records: list[KeyRecord] = []
        kwargs: dict[str, Any] = {"IndexName": KIND_INDEX,
                                  "KeyConditionExpression": "kind = :key",
                                  "ExpressionAttributeValues": {":key": {"S": "key"}}}
        while True:
            page = self._call("query", **kwargs)
            records += [_record(item) for item in page.get("Items", [])]
            if "LastEvaluatedKey" not in page:
                return records
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def revoke(self, key_id: str) -> KeyRecord | None:
        if _ID_SHAPE.fullmatch(key_id) is None:
            return None
        try:
            result = self._call("update_item", Key=_key(key_id, KEY_SK),
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
        result = self._call(
            "update_item", Key=_key(key_id, f"MIN#{minute}"),
            UpdateExpression="ADD requests :one, tokens :reserve SET expires = :expires",
            ExpressionAttributeValues=values, ReturnValues="UPDATED_NEW",
            ReturnValuesOnConditionCheckFailure="ALL_OLD", **kwargs)
        return _numbers(result.get("Attributes", {}))

    def take_budget(self, key_id: str, month: str, *, reserve: int, budget: int,
                    expires: int) -> int:
        """Reserve tokens from this month's budget; the tokens charged so far, after it."""
        result = self._call(
            "update_item", Key=_key(key_id, f"MONTH#{month}"),
            UpdateExpression="ADD tokens :reserve SET expires = :expires",
            ConditionExpression="attribute_not_exists(tokens) OR tokens <= :room",
            ExpressionAttributeValues={":reserve": {"N": str(reserve)},
                                       ":room": {"N": str(budget - reserve)},
                                       ":expires": {"N": str(expires)}},
            ReturnValues="UPDATED_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD")
        return _numbers(result.get("Attributes", {})).get("tokens", 0)

    def adjust_window(self, key_id: str, minute: int, tokens: int) -> None:
        self._call("update_item", Key=_key(key_id, f"MIN#{minute}"),
                   UpdateExpression="ADD tokens :n",
                   ExpressionAttributeValues={":n": {"N": str(tokens)}})

    def settle(self, key_id: str, *, day: str, model: str, prompt_tokens: int,
               completion_tokens: int, error: bool, window: tuple[int, int] | None,
               month: tuple[str, int] | None) -> None:
        """One transaction: the day's usage record, and the reserved window and budget
        tokens corrected to what was really used (``(minute or month, correction)``)."""
        usage = {"Update": {
            "TableName": self.table, "Key": _key(key_id, f"USAGE#{day}#{model}"),
            "UpdateExpression": ("ADD requests :one, prompt_tokens :p, completion_tokens :c, "
                                 "errors :e SET model = :m, #day = :d"),
            "ExpressionAttributeNames": {"#day": "day"},
            "ExpressionAttributeValues": {
                ":one": {"N": "1"}, ":p": {"N": str(prompt_tokens)},
                ":c": {"N": str(completion_tokens)}, ":e": {"N": "1" if error else "0"},
                ":m": {"S": model}, ":d": {"S": day}}}}
        items = [usage]
        if window is not None:
            items.append(_add_tokens(self.table, key_id, f"MIN#{window[0]}", window[1]))
        if month is not None:
            items.append(_add_tokens(self.table, key_id, f"MONTH#{month[0]}", month[1]))
        try:
            self.client.transact_write_items(TransactItems=items)
        except Exception as e:  # noqa: BLE001 - logged with what is needed to reconcile
            logger.error("could not record usage for key %s (%s): day=%s model=%s prompt=%d "
                         "completion=%d error=%s", key_id, type(e).__name__, day, model,
                         prompt_tokens, completion_tokens, error)

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
            page = self._call("query", **kwargs)
            for item in page.get("Items", []):
                n = _numbers(item)
                rows.append(UsageRow(day=item["day"]["S"], model=item["model"]["S"],
                                     requests=n.get("requests", 0),
                                     prompt_tokens=n.get("prompt_tokens", 0),
                                     completion_tokens=n.get("completion_tokens", 0),
                                     errors=n.get("errors", 0)))
            if "LastEvaluatedKey" not in page:
                return rows
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def month_tokens(self, key_id: str, month: str) -> int:
        item = self._call("get_item", Key=_key(key_id, f"MONTH#{month}")).get("Item") or {}
        return _numbers(item).get("tokens", 0)

    # -- the table itself (local development) ----------------------------------------------

    def create_table(self, definition: Mapping[str, Any]) -> None:
        """Create the table from the template's definition (see :func:`table_definition`)."""
        ttl = definition.get("TimeToLiveSpecification")
        kwargs = {k: v for k, v in definition.items()
                  if k in ("AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes",
                           "BillingMode")}
        self._call("create_table", **kwargs)
        self.client.get_waiter("table_exists").wait(TableName=self.table)
        if ttl:
            self.client.update_time_to_live(TableName=self.table, TimeToLiveSpecification=ttl)


def table_definition(template: Path) -> dict[str, Any]:
    """The keys table's properties as ``template.yaml`` declares them, so tests and
    ``keys init`` create exactly the table a deployed stack has."""
    properties: dict[str, Any] = load_template(template)["Resources"]["KeysTable"]["Properties"]
    return properties


def load_template(template: Path) -> dict[str, Any]:
    """A CloudFormation template as data; ``!Ref x`` becomes ``{"Ref": x}``, ``!Sub`` becomes
    ``{"Fn::Sub": ...}`` and so on, as CloudFormation's JSON form has them."""
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
        return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}

    _Loader.add_multi_constructor("!", _tag)
    doc: dict[str, Any] = yaml.load(template.read_text(), Loader=_Loader)  # noqa: S506
    return doc


def build_client() -> Any:
    """A DynamoDB client with short timeouts (the request path waits on it). The standard
    ``AWS_ENDPOINT_URL_DYNAMODB`` variable points it at a local table."""
    import boto3
    from botocore.config import Config

    return boto3.client("dynamodb", config=Config(
        connect_timeout=2, read_timeout=5,
        retries={"mode": "standard", "total_max_attempts": 3}))


def _key(key_id: str, sk: str) -> dict[str, Any]:
    return {"pk": {"S": f"KEY#{key_id}"}, "sk": {"S": sk}}


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
