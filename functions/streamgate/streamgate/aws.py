"""boto3 clients, built one at a time, each with a connection pool for the whole concurrency.

A boto3 client is thread-safe once built; building one is not: ``boto3.client`` uses boto3's
default session, and sessions are not thread-safe (boto3's guide, "Multithreading or
multiprocessing with clients"; boto/boto3#1592: clients built at once in several threads fail
inside botocore). With the runtime loop's workers (Lambda Managed Instances), the first
Bedrock call and the first key lookup may come at the same moment from two threads, so every
client is built here, under one lock.

botocore keeps at most 10 connections per client (``max_pool_connections``); the 11th
concurrent call opens a connection of its own and throws it away afterwards, with a warning.
Clients built here keep as many as there may be concurrent invocations.
"""

from __future__ import annotations

import threading
from typing import Any

# botocore's own default for max_pool_connections.
_BOTOCORE_POOL = 10
_lock = threading.Lock()
_concurrency = 1


def expect_concurrency(invocations: int) -> None:
    """How many invocations may use one client at once (the runtime loop's workers); for
    clients built from now on."""
    global _concurrency
    _concurrency = max(1, invocations)


def client(service: str, *, session: Any = None, config: Any = None, **kwargs: Any) -> Any:
    """``session.client(service, config=config, **kwargs)`` (boto3's default session when
    ``session`` is None), built under the lock, its pool large enough for the expected
    concurrency."""
    import boto3
    from botocore.config import Config

    pool = Config(max_pool_connections=max(_BOTOCORE_POOL, _concurrency))
    with _lock:
        return (session or boto3).client(
            service, config=pool if config is None else config.merge(pool), **kwargs)
