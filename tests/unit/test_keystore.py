"""Key store decisions that need no table: what a failure is caused by and whether it is worth
a second attempt, how an existing table differs from the template, and the client's budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamgate import keystore
from streamgate.errors import ConfigError
from streamgate.keystore import KeyStore, table_definition, table_differences

ROOT = Path(__file__).resolve().parents[2]


def _answer(code: str, status: int = 400, **extra: Any) -> dict[str, Any]:
    return {"Error": {"Code": code, "Message": "because"},
            "ResponseMetadata": {"HTTPStatusCode": status}, **extra}


@pytest.mark.parametrize(("answer", "cause", "transient"), [
    (_answer("ResourceNotFoundException"), keystore.TABLE_MISSING, False),
    (_answer("ResourceInUseException"), keystore.TABLE_EXISTS, False),
    (_answer("AccessDeniedException"), keystore.ACCESS_DENIED, False),
    (_answer("UnrecognizedClientException"), keystore.CREDENTIALS_REJECTED, False),
    (_answer("ExpiredTokenException"), keystore.CREDENTIALS_REJECTED, False),
    (_answer("ThrottlingException"), keystore.UNAVAILABLE, True),
    (_answer("ProvisionedThroughputExceededException"), keystore.UNAVAILABLE, True),
    (_answer("TransactionConflictException"), keystore.UNAVAILABLE, True),
    (_answer("InternalServerError", 500), keystore.UNAVAILABLE, True),
    (_answer("Whatever", 503), keystore.UNAVAILABLE, True),
    (_answer("TransactionCanceledException", CancellationReasons=[
        {"Code": "None"}, {"Code": "TransactionConflict"}]), keystore.UNAVAILABLE, True),
    (_answer("TransactionCanceledException", CancellationReasons=[
        {"Code": "ValidationError"}]), keystore.FAILED, False),
    (_answer("ValidationException"), keystore.FAILED, False),
])
def test_an_error_answer_names_its_cause_and_whether_to_try_again(
        answer: dict[str, Any], cause: str, transient: bool) -> None:
    fault, retry = KeyStore("t", client=object())._refused("update_item", answer)
    assert (fault.cause, retry) == (cause, transient)
    assert fault.status == 503 and fault.code == "service_unavailable"
    assert fault.message == "The key store is unavailable; try again shortly"  # for clients


def test_a_call_that_got_no_answer_names_its_cause() -> None:
    from botocore.exceptions import (
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        ReadTimeoutError,
    )

    store = KeyStore("t", client=object())
    cases = [(NoRegionError(), keystore.NO_REGION, False),
             (NoCredentialsError(), keystore.NO_CREDENTIALS, False),
             (ReadTimeoutError(endpoint_url="http://x"), keystore.UNAVAILABLE, True),
             (EndpointConnectionError(endpoint_url="http://x"), keystore.UNAVAILABLE, True)]
    for error, cause, transient in cases:
        fault, retry = store._unreached("get_item", error)
        assert (fault.cause, retry) == (cause, transient), error


def test_the_template_table_matches_itself() -> None:
    definition = table_definition(ROOT / "template.yaml")
    described = {k: definition[k] for k in ("KeySchema", "GlobalSecondaryIndexes")}
    described["AttributeDefinitions"] = definition["AttributeDefinitions"]
    assert table_differences(definition, described) == []


def test_a_table_without_the_index_or_with_another_projection_differs() -> None:
    definition = table_definition(ROOT / "template.yaml")
    (index,) = definition["GlobalSecondaryIndexes"]
    other = {**index, "IndexName": "by-name", "Projection": {"ProjectionType": "ALL"}}
    assert table_differences(definition, {
        "KeySchema": definition["KeySchema"], "GlobalSecondaryIndexes": [other]}) == [
        "index by-kind is missing", "index by-name is not in the template"]
    changed = {**index, "Projection": {"ProjectionType": "KEYS_ONLY"}}
    assert table_differences(definition, {
        "KeySchema": definition["KeySchema"], "GlobalSecondaryIndexes": [changed]}) == [
        f"index by-kind projects KEYS_ONLY, the template's projects "
        f"{index['Projection']['ProjectionType']}"]


def test_the_client_spends_half_the_budget_per_attempt_and_retries_nothing_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    config = keystore.build_client(1.5).meta.config
    assert (config.connect_timeout, config.read_timeout) == (0.75, 0.75)
    assert config.retries["total_max_attempts"] == 1


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan")])
def test_a_time_budget_must_be_positive(timeout: float) -> None:
    with pytest.raises(ConfigError):
        KeyStore("t", timeout_s=timeout)
