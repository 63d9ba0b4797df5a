"""Fixtures shared by the tiers: dev servers on ephemeral loopback ports, the embedded model;
garbage collected after every test, so that a resource left unclosed fails the test that left
it; and the browser tier's count and duration in the summary (it must stay reasonable for CI).

``STREAMGATE_NO_SKIPS=1`` (set by ``.ci/run``) makes a skipped test fail the run: in CI every
tier must really run. Expected failures (``xfail``) are not skips and stay allowed."""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

from streamgate.config import load_settings
from streamgate.credentials import ApiKey
from streamgate.devserver import DevServer, serve
from streamgate.handler import App
from streamgate.httpclient import Upstream
from streamgate.providers import Provider
from streamgate.providers.openai import OpenAIProvider

# The switch under which any skipped test fails the run (docs/contributing.md, Tests).
NO_SKIPS = "STREAMGATE_NO_SKIPS"
# Dev-server threads still running when their server was closed (a provider that did not
# stop): while any lives, no model may be freed under it.
_UNFINISHED: list[threading.Thread] = []
# Every dev server the tests started, for the end of each test to wait for.
_SERVERS: weakref.WeakSet[DevServer] = weakref.WeakSet()


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
    _SERVERS.add(server)
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


def dev_servers() -> list[DevServer]:
    """The dev servers running_dev_server started that are still referenced."""
    return list(_SERVERS)


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


def pytest_collection_finish(session: pytest.Session) -> None:
    """What exists once the tests are collected (modules, the tests themselves) lives for the
    whole run: frozen out of every later collection, so that collecting after each test scans
    only what tests made (a full collection of the whole heap takes about a second here)."""
    gc.collect()
    gc.freeze()


_SDK_CLIENTS: list[Any] = []
_Client = TypeVar("_Client")


def sdk_client(client: _Client) -> _Client:
    """An SDK client (openai's, anthropic's) closed when the test that made it ends: its pooled
    sockets would otherwise be finalised by whatever collection comes next, failing that test
    with a ResourceWarning that is not its own."""
    _SDK_CLIENTS.append(client)
    return client


def openai_app(url: str, *, key: str = "sk-test-key", **settings: Any) -> App:
    """The app with the OpenAI-compatible provider in front of the upstream at ``url``
    (``upstream_models`` defaults to ``upstream-model``, retries wait 10 ms), its pooled
    connections closed when the test ends."""
    s = load_settings({}, provider="openai", upstream_base_url=url,
                      **{"upstream_models": ("upstream-model",), "upstream_backoff_s": 0.01,
                         **settings})
    provider = sdk_client(OpenAIProvider(s, ApiKey(None, 60, value=key),
                                         Upstream(url, s.upstream_connect_timeout_s,
                                                  max_idle_s=s.upstream_max_idle_s)))
    return App(s, provider)


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """After each test (its other fixtures' teardown included): wait (10 s at most) for the
    requests it left to the dev servers still running (the session's model server) to end,
    so that their log records land in this test's capture rather than in pytest's output (an
    SDK stops reading at ``data: [DONE]``, before the request is recorded); then collect
    garbage: a socket, file or generator left unclosed is finalised now, and its
    ResourceWarning (an error under ``filterwarnings = error``) fails this test, not a later
    one or nobody at exit."""
    yield
    for server in list(_SERVERS):
        server.wait_idle(10)
    while _SDK_CLIENTS:
        _SDK_CLIENTS.pop().close()
    gc.collect()


def pytest_unconfigure(config: pytest.Config) -> None:
    """llama-cpp-python opens two /dev/null files when it is imported and keeps them for the
    life of the process (llama_cpp/_utils.py, for silencing llama.cpp while a model loads).
    Every model is loaded and freed by now: close them, so that the interpreter's exit does
    not report them as unclosed files after the summary."""
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        file = getattr(utils, name, None)
        if file is not None:
            file.close()


# -- CI: no tier may skip ---------------------------------------------------------------------

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Iterator[None]:
    """With ``STREAMGATE_NO_SKIPS=1``, a skip is reported as a failure that gives its reason."""
    report: pytest.TestReport = yield
    if (report.skipped and not hasattr(report, "wasxfail")
            and os.environ.get(NO_SKIPS) == "1"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped, which {NO_SKIPS}=1 (CI) does not allow: every tier must "
                           f"run here. {reason}")
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "browser" in report.keywords:
        _count_browser_phase(report)


# -- the browser tier's summary ---------------------------------------------------------------

_BROWSER_SECONDS: dict[str, float] = {}
_BROWSER_OUTCOME: dict[str, str] = {}


def _count_browser_phase(report: pytest.TestReport) -> None:
    """One outcome per test: skipped (in any phase, before it ran), failed (in any phase), or
    passed (its call passed); seconds of setup, call and teardown summed."""
    _BROWSER_SECONDS[report.nodeid] = _BROWSER_SECONDS.get(report.nodeid, 0.0) + report.duration
    before = _BROWSER_OUTCOME.get(report.nodeid)
    if report.skipped and not hasattr(report, "wasxfail"):
        outcome = "skipped" if before in (None, "setup", "skipped") else before
    elif report.failed:
        outcome = "failed"
    elif report.when == "call":
        outcome = "xfailed" if hasattr(report, "wasxfail") else "passed"
    else:
        outcome = before or "setup"
    _BROWSER_OUTCOME[report.nodeid] = outcome


def browser_summary() -> str | None:
    """``browser tier: N ran (P passed, F failed), S skipped, T s``: the tests that ran, and
    the time all of them took (setup, calls and teardown, skips included)."""
    if not _BROWSER_OUTCOME:
        return None
    outcomes = list(_BROWSER_OUTCOME.values())
    counts = {name: outcomes.count(name) for name in ("passed", "failed", "xfailed")}
    skipped = outcomes.count("skipped")
    ran = ", ".join(f"{n} {name}" for name, n in counts.items() if n or name != "xfailed")
    return (f"browser tier: {len(outcomes) - skipped} ran ({ran}), {skipped} skipped, "
            f"{sum(_BROWSER_SECONDS.values()):.1f} s (setup, calls and teardown)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    line = browser_summary()
    if line is not None:
        terminalreporter.write_line(line)
