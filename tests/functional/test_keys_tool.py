"""The key tool says what is wrong, with an exit status per kind of cause: run through its
``main()`` as a user runs it (it builds its own client from the environment), against moto's
server on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from streamgate.keys import main as keys_main
from streamgate.keystore import KeyStore
from tests.fake_dynamodb import FAIL, FlakyTable, Rule, client_for, moto_server

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
TABLE = "streamgate-keys"
MISSING = (f"streamgate.keys: keys table {TABLE} does not exist in us-east-1; check --table (or "
           "STREAMGATE_KEYS_TABLE) and the region; for a local table run init first\n")


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's server, and the environment docs/operating.md exports for a local table."""
    with moto_server() as url:
        for name, value in {"AWS_ENDPOINT_URL_DYNAMODB": url, "STREAMGATE_KEYS_TABLE": TABLE,
                            "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        yield url


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = keys_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_on_an_existing_matching_table_says_so_and_succeeds(
        endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a table made by init
    assert _run(capsys, "init", "--template", str(TEMPLATE)) == (
        0, f"Created table {TABLE}\n", "")
    # WHEN init runs again
    # THEN it says the table is there and is the template's, and succeeds
    assert _run(capsys, "init", "--template", str(TEMPLATE)) == (
        0, f"Table {TABLE} already exists and matches {TEMPLATE}\n", "")


def test_init_on_a_table_that_differs_says_how_and_exits_7(
        endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a table of that name with another key schema and no index
    client_for(endpoint).create_table(
        TableName=TABLE, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "N"}])
    # WHEN init runs
    # THEN it says how the table differs, and fails with 7
    assert _run(capsys, "init", "--template", str(TEMPLATE)) == (
        7, "", f"streamgate.keys: table {TABLE} exists but differs from {TEMPLATE}: key schema "
               "is pk (HASH), the template's is pk (HASH), sk (RANGE); index by-kind is "
               "missing; attribute pk is of type N, the template's is S\n")


@pytest.mark.parametrize("command", [
    ["list"], ["create", "someone"], ["show", "0123456789abcdef"],
    ["usage", "0123456789abcdef"], ["revoke", "0123456789abcdef"]])
def test_commands_on_a_missing_table_say_so_and_exit_6(
        endpoint: str, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    # GIVEN no table; WHEN a command needs it; THEN it says the table does not exist
    assert _run(capsys, *command) == (6, "", MISSING)


def test_no_region_configured_is_named_and_exits_3(
        endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN no region in the environment or an AWS config file
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent"))
    # WHEN the tool runs; THEN it says no region is configured
    assert _run(capsys, "list") == (
        3, "", "streamgate.keys: no AWS region configured: set AWS_REGION or "
               "AWS_DEFAULT_REGION (or a region in the AWS profile)\n")


def test_no_credentials_is_named_and_exits_4(
        endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN no credentials anywhere boto3 looks (environment, files, instance metadata)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    boto3.setup_default_session()  # forget credentials an earlier test's session found
    # WHEN the tool runs; THEN it says no credentials were found
    assert _run(capsys, "init") == (
        4, "", "streamgate.keys: no AWS credentials found: set AWS_PROFILE, or "
               "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY\n")


def test_a_failing_table_exits_8_and_says_to_try_again(
        endpoint: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a table that answers every query with a 500
    KeyStore(TABLE, client=client_for(endpoint)).create_table(
        {"KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"},
                       {"AttributeName": "sk", "KeyType": "RANGE"}],
         "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"},
                                  {"AttributeName": "sk", "AttributeType": "S"}],
         "BillingMode": "PAY_PER_REQUEST"})
    with FlakyTable(endpoint, [Rule("Query", "", FAIL)]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", proxy.url)
        # WHEN the tool lists keys; THEN it blames the table, not the user
        assert _run(capsys, "list") == (
            8, "", f"streamgate.keys: keys table {TABLE} failed Query: InternalServerError; "
                   "try again shortly\n")


def test_help_documents_every_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    from streamgate.keys import EXIT_STATUS

    with pytest.raises(SystemExit) as info:
        keys_main(["--help"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    documented = {int(line.split()[0]) for line in lines[lines.index("exit status:") + 1:]
                  if line.startswith("  ") and line.split()[0].isdigit()}
    assert documented == {0, 1, 2, *EXIT_STATUS.values()}


def test_a_bad_argument_still_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        keys_main(["create", "x", "--rpm", "0"])
    assert info.value.code == 2
