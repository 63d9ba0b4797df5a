"""The key tool: ``python -m streamgate.keys init|create|list|revoke|show|usage``.

Works against the deployed table (``STREAMGATE_KEYS_TABLE``, the stack's ``KeysTableName``
output) with the usual AWS credentials, or against a local one: the standard
``AWS_ENDPOINT_URL_DYNAMODB`` variable points boto3 at it, and ``init`` creates the table there
from ``template.yaml``'s definition (and, run again, checks the table is still that one).

exit status:
  0  done (init: the table was created, or exists and matches template.yaml)
  1  no such key
  2  usage error: bad arguments, no table name, no template.yaml
  3  no AWS region configured
  4  no AWS credentials found, or AWS rejected them
  5  the credentials may not make that call on the table (AccessDenied)
  6  the keys table does not exist
  7  init: a table of that name exists but differs from template.yaml
  8  the table failed or did not answer (timeout, throttling, 5xx): try again
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from streamgate import keystore
from streamgate.errors import StreamgateError
from streamgate.keystore import (
    KeyRecord,
    KeyStore,
    KeyStoreError,
    key_digest,
    looks_like_key,
    table_definition,
    table_differences,
)

_TEMPLATE_NEXT_TO_PACKAGE = Path(__file__).resolve().parents[3] / "template.yaml"
# A person waits, not a request: each call may take this long, its retry included.
_TIMEOUT_S = 10.0

EXIT_NO_SUCH_KEY = 1
EXIT_USAGE = 2
EXIT_TABLE_DIFFERS = 7
EXIT_STATUS = {  # the cause of a KeyStoreError -> the exit status (see the module docstring)
    keystore.NO_REGION: 3,
    keystore.NO_CREDENTIALS: 4,
    keystore.CREDENTIALS_REJECTED: 4,
    keystore.ACCESS_DENIED: 5,
    keystore.TABLE_MISSING: 6,
    keystore.TABLE_EXISTS: EXIT_TABLE_DIFFERS,  # only init meets it, and checks the table
    keystore.UNAVAILABLE: 8,
    keystore.FAILED: 8,
}
# What to do about it, after the cause's own text.
_HINTS = {
    keystore.TABLE_MISSING: "check --table (or STREAMGATE_KEYS_TABLE) and the region; for a "
                            "local table run init first",
    keystore.UNAVAILABLE: "try again shortly",
}


def main(argv: Sequence[str] | None = None, *, store: KeyStore | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        store = store or KeyStore(args.table, timeout_s=_TIMEOUT_S)
        return int(args.run(store, args) or 0)
    except KeyStoreError as e:
        hint = _HINTS.get(e.cause)
        print(f"streamgate.keys: {e.detail}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return EXIT_STATUS[e.cause]
    except StreamgateError as e:  # configuration: no table name, a bad timeout
        print(f"streamgate.keys: {e.message}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m streamgate.keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default=os.environ.get("STREAMGATE_KEYS_TABLE", ""),
                        help="table name (default: $STREAMGATE_KEYS_TABLE)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init", help="create the table (local development); an existing one is checked "
                     "against the template")
    init.add_argument("--template", type=Path, default=None,
                      help="template.yaml to read the table from (default: the project's)")
    init.set_defaults(run=_init)

    create = commands.add_parser("create", help="issue a key; it is printed once, last")
    create.add_argument("name", help="who or what the key is for")
    create.add_argument("--rpm", type=_positive, help="requests per minute")
    create.add_argument("--tpm", type=_positive, help="tokens per minute")
    create.add_argument("--budget", type=_positive, help="tokens per calendar month (UTC)")
    create.add_argument("--models", default="",
                        help="comma-separated models the key may use (default: all)")
    create.set_defaults(run=_create)

    listing = commands.add_parser("list", help="every key, newest last")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)

    revoke = commands.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("key", help="key id, or the key itself")
    revoke.set_defaults(run=_revoke)

    show = commands.add_parser("show", help="one key, with this month's budget use")
    show.add_argument("key", help="key id, or the key itself")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_show)

    usage = commands.add_parser("usage", help="requests and tokens per day and model")
    usage.add_argument("key", help="key id, or the key itself")
    usage.add_argument("--since", type=date.fromisoformat,
                       help="first day, YYYY-MM-DD (default: the 1st of this month, UTC)")
    usage.add_argument("--until", type=date.fromisoformat,
                       help="last day, YYYY-MM-DD (default: today, UTC)")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(run=_usage)
    return parser


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _init(store: KeyStore, args: argparse.Namespace) -> int:
    template = args.template or next(
        (p for p in (Path.cwd() / "template.yaml", _TEMPLATE_NEXT_TO_PACKAGE) if p.is_file()),
        None)
    if template is None:
        print("streamgate.keys: no template.yaml here; pass --template", file=sys.stderr)
        return EXIT_USAGE
    definition = table_definition(template)
    try:
        store.create_table(definition)
    except KeyStoreError as e:
        if e.cause != keystore.TABLE_EXISTS:
            raise
        differences = table_differences(definition, store.describe())
        if differences:
            print(f"streamgate.keys: table {store.table} exists but differs from {template}: "
                  + "; ".join(differences), file=sys.stderr)
            return EXIT_TABLE_DIFFERS
        print(f"Table {store.table} already exists and matches {template}")
        return 0
    print(f"Created table {store.table}")
    return 0


def _create(store: KeyStore, args: argparse.Namespace) -> int:
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    key, record = store.create(args.name, models=models, rpm=args.rpm, tpm=args.tpm,
                               budget=args.budget)
    print(f"Created key {record.id} ({record.name}): {_limits(record)}")
    print("Store the key now; it is not shown again:")
    print(key)
    return 0


def _list(store: KeyStore, args: argparse.Namespace) -> int:
    records = store.list_keys()
    if args.json:
        print(json.dumps([r.summary() for r in records], indent=2))
        return 0
    print(f"{'ID':16}  {'PREFIX':12}  {'CREATED':25}  {'STATE':7}  NAME / LIMITS")
    for r in records:
        state = "revoked" if r.revoked else "active"
        print(f"{r.id:16}  {r.prefix:12}  {r.created:25}  {state:7}  {r.name} / {_limits(r)}")
    return 0


def _revoke(store: KeyStore, args: argparse.Namespace) -> int:
    record = store.revoke(_key_id(args.key))
    if record is None:
        return _no_such_key(args.key)
    print(f"Revoked key {record.id} ({record.name})")
    return 0


def _show(store: KeyStore, args: argparse.Namespace) -> int:
    record = store.get(_key_id(args.key))
    if record is None:
        return _no_such_key(args.key)
    month = datetime.fromtimestamp(store.clock(), UTC).strftime("%Y-%m")
    doc = {**record.summary(), "month": month,
           "budget_used": store.month_tokens(record.id, month)}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for name, value in doc.items():
            print(f"{name:12} {_text(value)}")
    return 0


def _usage(store: KeyStore, args: argparse.Namespace) -> int:
    key_id = _key_id(args.key)
    if store.get(key_id) is None:
        return _no_such_key(args.key)
    today = datetime.fromtimestamp(store.clock(), UTC).date()
    since, until = args.since or today.replace(day=1), args.until or today
    rows = store.usage(key_id, since, until)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    # UNSETTLED: admitted but never settled (still running, or its process died);
    # RESERVED: the tokens they reserved (still charged to the monthly budget, if any).
    print(f"{'DAY':10}  {'MODEL':32}  {'REQUESTS':>8}  {'PROMPT':>10}  {'COMPLETION':>10}  "
          f"{'ERRORS':>6}  {'UNSETTLED':>9}  {'RESERVED':>10}")
    totals = [0] * 6
    for r in rows:
        numbers = (r.requests, r.prompt_tokens, r.completion_tokens, r.errors, r.unsettled,
                   r.reserved_tokens)
        print(f"{r.day:10}  {r.model:32}  " + _columns(numbers))
        totals = [t + n for t, n in zip(totals, numbers, strict=True)]
    print(f"{'total':10}  {'':32}  " + _columns(totals))
    return 0


def _columns(numbers: Sequence[int]) -> str:
    widths = (8, 10, 10, 6, 9, 10)
    return "  ".join(f"{n:{w}}" for n, w in zip(numbers, widths, strict=True))


def _key_id(given: str) -> str:
    """Accept the key id or the key itself (hashed here, never sent anywhere)."""
    return key_digest(given)[:16] if looks_like_key(given) else given


def _no_such_key(given: str) -> int:
    shown = given if not looks_like_key(given) else given[:12] + "…"
    print(f"streamgate.keys: no key {shown}", file=sys.stderr)
    return EXIT_NO_SUCH_KEY


def _limits(record: KeyRecord) -> str:
    return ", ".join([
        f"rpm {_text(record.rpm)}", f"tpm {_text(record.tpm)}",
        f"budget {_text(record.budget)}",
        f"models {', '.join(record.models) if record.models else 'all'}"])


def _text(value: Any) -> str:
    if value is None:
        return "unlimited"
    if isinstance(value, list):
        return ", ".join(value) or "all"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
