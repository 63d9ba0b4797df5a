"""Fixtures shared by the tiers: dev servers on ephemeral loopback ports, the embedded model;
and the browser tier's duration in the summary (it must stay reasonable for CI)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from streamgate.config import load_settings
from streamgate.devserver import serve
from streamgate.handler import App
from streamgate.providers import Provider


@contextmanager
def running_dev_server(app: App, *, max_streams: int = 32, request_timeout_s: float = 60,
                       header_timeout_s: float = 10, timeout_s: float = 300,
                       max_connections: int = 256) -> Iterator[str]:
    """The dev server on 127.0.0.1:<ephemeral>; yields its base URL and always shuts it down.
    Its CORS origins are the app's (``make_app(cors_origins=...)``)."""
    server = serve("127.0.0.1", 0, app, max_streams=max_streams,
                   request_timeout_s=request_timeout_s, header_timeout_s=header_timeout_s,
                   timeout_s=timeout_s, max_connections=max_connections)
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def local_provider() -> Iterator[Provider]:
    """The real embedded model, loaded once for the whole run."""
    from streamgate.providers import local

    provider = local.create(load_settings({}, provider="local"))
    yield provider
    provider.close()


@pytest.fixture(scope="session")
def model_server(local_provider: Provider) -> Iterator[str]:
    """The dev server with the real embedded model, as `make dev` runs it."""
    app = App(load_settings({}, provider="local"), local_provider)
    with running_dev_server(app) as url:
        yield url


_BROWSER_TIER: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "browser" in report.keywords:
        _BROWSER_TIER[report.nodeid] = _BROWSER_TIER.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _BROWSER_TIER:
        terminalreporter.write_line(
            f"browser tier: {len(_BROWSER_TIER)} tests, {sum(_BROWSER_TIER.values()):.1f} s "
            "(setup, calls and teardown)")
