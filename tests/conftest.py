"""Fixtures shared by the tiers: dev servers on ephemeral loopback ports, the embedded model;
and the browser tier's duration in the summary (it must stay reasonable for CI)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from streamgate.config import load_settings
from streamgate.devserver import serve
from streamgate.handler import App
from streamgate.providers import Provider

# Dev-server threads still running when their server was closed (a provider that did not
# stop): while any lives, no model may be freed under it.
_UNFINISHED: list[threading.Thread] = []


@contextmanager
def running_dev_server(app: App, *, max_streams: int = 32, request_timeout_s: float = 60,
                       header_timeout_s: float = 10, timeout_s: float = 300,
                       max_connections: int = 256, close_timeout_s: float = 10) -> Iterator[str]:
    """The dev server on 127.0.0.1:<ephemeral>; yields its base URL and always shuts it down:
    its open connections are ended and their threads waited for (``close_timeout_s``), so no
    request of this server is still running, or still writing its log record, afterwards.
    Threads still running then fail the test. Its CORS origins are the app's
    (``make_app(cors_origins=...)``)."""
    server = serve("127.0.0.1", 0, app, max_streams=max_streams,
                   request_timeout_s=request_timeout_s, header_timeout_s=header_timeout_s,
                   timeout_s=timeout_s, max_connections=max_connections,
                   close_timeout_s=close_timeout_s)
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        if server.unfinished:
            _UNFINISHED.extend(server.unfinished)
            raise AssertionError(
                f"{len(server.unfinished)} request threads of the dev server still ran "
                f"{close_timeout_s:g} s after it closed their connections: the provider did "
                "not stop when its stream was closed")


def close_model(provider: Provider) -> None:
    """Free the embedded model, unless a dev-server thread that may still be generating with
    it is alive: freeing a llama.cpp model under a running generation kills the process
    (SIGSEGV) before pytest can report anything. Then the teardown fails, saying so."""
    running = [t.name for t in _UNFINISHED if t.is_alive()]
    if running:
        pytest.fail(f"the embedded model was left open: dev-server threads {running} may "
                    "still generate with it")
    close = getattr(provider, "close", None)
    if close is not None:
        close()


@pytest.fixture(scope="session")
def local_provider() -> Iterator[Provider]:
    """The real embedded model, loaded once for the whole run."""
    from streamgate.providers import local

    provider = local.create(load_settings({}, provider="local"))
    yield provider
    close_model(provider)


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
