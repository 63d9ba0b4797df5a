"""How many invocations at once: AWS_LAMBDA_MAX_CONCURRENCY as the runtime loop reads it, the
per-thread trace header, and boto3 clients sized and built for that many threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from streamgate import aws
from streamgate.config import load_lambda_environment, set_trace_id, trace_id

API = {"AWS_LAMBDA_RUNTIME_API": "127.0.0.1:9001"}


@pytest.mark.parametrize(
    ("raw", "workers"),
    [(None, 1), ("", 1), ("1", 1), ("8", 8), (" 64 ", 64), ("1600", 1600), ("0", 1),
     ("-4", 1), ("1601", 1), ("eight", 1), ("8.5", 1), ("inf", 1), ("1e3", 1),
     # digits str.isdigit() and int() accept or refuse beyond ASCII: never a crash at init
     ("\u00b2", 1), ("\u0661\u0662", 1), ("\u096716", 1), ("9" * 5000, 1)],
)
def test_max_concurrency_is_a_whole_number_from_1_to_1600_else_1(
    raw: str | None, workers: int,
) -> None:
    environ = {**API} if raw is None else {**API, "AWS_LAMBDA_MAX_CONCURRENCY": raw}
    assert load_lambda_environment(environ).max_concurrency == workers


@pytest.mark.parametrize("raw", ["\u00b2", "9" * 5000, "-1", "512.5"])
def test_an_unreadable_memory_size_is_unknown_not_a_crash(raw: str) -> None:
    environ = {**API, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": raw}
    assert load_lambda_environment(environ).memory_limit_in_mb == 0


def test_each_thread_has_its_own_trace_header_and_only_process_wide_ones_reach_the_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("_X_AMZN_TRACE_ID", raising=False)
    seen: dict[str, str | None] = {}
    barrier = threading.Barrier(2, timeout=5)

    def invocation(name: str) -> None:
        set_trace_id(f"Root=1-{name}", process_wide=False)
        barrier.wait()  # both have set theirs before either reads
        seen[name] = trace_id()

    threads = [threading.Thread(target=invocation, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert seen == {"a": "Root=1-a", "b": "Root=1-b"}
    assert "_X_AMZN_TRACE_ID" not in os.environ

    def classic() -> None:
        set_trace_id("Root=1-c")
        seen["c"] = trace_id()

    thread = threading.Thread(target=classic)
    thread.start()
    thread.join(5)
    assert seen["c"] == os.environ["_X_AMZN_TRACE_ID"] == "Root=1-c"
    set_trace_id(None)  # leaves the process as it found it


@pytest.fixture
def concurrency() -> Iterator[None]:
    yield
    aws.expect_concurrency(1)


def test_boto3_clients_keep_a_connection_per_concurrent_invocation(concurrency: None) -> None:
    assert aws.client("dynamodb", region_name="us-east-1").meta.config.max_pool_connections == 10
    aws.expect_concurrency(64)
    from botocore.config import Config

    built = aws.client("dynamodb", region_name="us-east-1", config=Config(connect_timeout=2))
    assert (built.meta.config.max_pool_connections, built.meta.config.connect_timeout) == (64, 2)


def test_boto3_clients_built_from_many_threads_at_once_all_work(concurrency: None) -> None:
    barrier = threading.Barrier(12, timeout=10)
    built: list[str] = []
    failed: list[BaseException] = []

    def build(service: str) -> None:
        try:
            barrier.wait()
            built.append(aws.client(service, region_name="us-east-1").meta.service_model
                         .service_name)
        except BaseException as e:  # noqa: BLE001 - the assertion below reports it
            failed.append(e)

    services = ["dynamodb", "bedrock-runtime", "secretsmanager", "ssm"] * 3
    threads = [threading.Thread(target=build, args=(s,)) for s in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failed == [] and sorted(built) == sorted(services)
