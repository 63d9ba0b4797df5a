"""Real browsers: headless Chromium (Debian's package) driven by playwright-core.

- The playground (GET / on the dev server) with the embedded model: text arrives in many DOM
  updates before the end, usage and speed are shown, Stop ends the stream and frees the model,
  and our errors (400, 401, 429, an in-band error event) are rendered as errors, not as text.
- A page on another origin: ``fetch`` and the official ``openai`` SDK's browser build stream
  through CORS when the origin is allowed and are refused when it is not; what the SDK's
  preflight asks for is all in our CORS list; and a "simple" POST a page sends without a
  preflight (text/plain, a form) is refused 403 without running anything.

The browser, Playwright and the SDK come from ``browser/setup.py`` (``make test`` runs it
first); where Chromium cannot be installed these tests skip and say why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from streamgate import cors
from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.errors import UpstreamError
from streamgate.handler import App
from streamgate.providers import Delta, Finish, Provider, TextDelta, Usage
from streamgate.validation import ChatRequest
from tests.conftest import close_model, running_dev_server
from tests.fake_dynamodb import moto_server
from tests.helpers import ScriptedProvider
from tests.integration.browser import setup

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "browser"
MODEL = "gemma-3-270m"
SCREENSHOT = os.environ.get("STREAMGATE_PLAYGROUND_SCREENSHOT")


# -- the browser ------------------------------------------------------------------------------

class Browser:
    """One Chromium for the session, behind tests/integration/browser/driver.mjs."""

    def __init__(self, chromium: str, node_modules: Path) -> None:
        env = {**os.environ, "STREAMGATE_CHROMIUM": chromium,
               "STREAMGATE_NODE_MODULES": str(node_modules)}
        # Its stderr goes to a file, never a pipe that can fill; closed in close().
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self._proc = subprocess.Popen([setup.node(), str(HERE / "driver.mjs")], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, text=True, bufsize=1)
        self._next = 0

    def call(self, op: str, timeout: float = 60, **args: Any) -> Any:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._next += 1
        self._proc.stdin.write(json.dumps({"id": self._next, "op": op, "args": args}) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the browser driver did not answer {op} within {timeout} s: "
                               f"{self._stderr()}")
        answer = json.loads(line)
        assert answer["id"] == self._next
        if not answer["ok"]:
            raise AssertionError(f"{op} failed in the browser: {answer['error']}")
        return answer["value"]

    def open(self, url: str | None = None) -> None:
        self.call("open", url=url)

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        return self.call("evaluate", timeout=timeout, expression=expression)

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        return self.call("waitFor", timeout=timeout + 5, expression=expression,
                         ms=timeout * 1000)

    def _stderr(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:] or "(nothing on stderr)"

    def close(self) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._log.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    try:
        chromium = setup.chromium()
        modules = setup.node_modules()
    except setup.Unavailable as e:
        pytest.skip(f"no browser for the browser tests: {e}")
    driver = Browser(chromium, modules)
    try:
        driver.call("open", timeout=120)  # Chromium's first start
        yield driver
    finally:
        driver.close()


# -- what skips the tier, and what fails it --------------------------------------------------

def test_an_install_that_fails_is_a_failure_not_a_skip(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # GIVEN a lock file npm cannot read, and an empty package cache
    broken = tmp_path / "packages"
    broken.mkdir()
    (broken / "package.json").write_text("{}")
    (broken / "package-lock.json").write_text("{ not json")
    monkeypatch.setattr(setup, "HERE", broken)
    monkeypatch.setattr(setup, "LOCK", broken / "package-lock.json")
    monkeypatch.setenv("STREAMGATE_BROWSER_CACHE", str(tmp_path / "cache"))
    # WHEN the packages are installed, THEN `npm ci` fails, and that is a SetupError (the
    # tests' failure), never the Unavailable that skips the tier
    with pytest.raises(setup.SetupError, match="npm ci"):
        setup.node_modules()
    assert not issubclass(setup.SetupError, setup.Unavailable)


def test_only_what_cannot_be_installed_here_makes_the_tier_unavailable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a process that is not root
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    # WHEN a missing package would have to be installed, THEN the tier is unavailable
    with pytest.raises(setup.Unavailable, match="needs root"):
        setup.apt_install(["nodejs", "npm"], "Node.js")


# -- servers ----------------------------------------------------------------------------------

@dataclass
class Counting:
    """A provider that counts the requests reaching it, around another."""

    inner: Provider
    calls: list[ChatRequest] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capabilities(self) -> frozenset[str]:
        return self.inner.capabilities

    def default_model(self) -> str:
        return self.inner.default_model()

    def models(self) -> list[str]:
        return self.inner.models()

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        self.calls.append(request)
        return self.inner.stream(request, model, deadline)


@contextmanager
def dev_server(provider: Provider, **settings: Any) -> Iterator[str]:
    """The dev server as `make dev` runs it (playground on), with these settings."""
    app = App(load_settings({}, provider="local", playground=True, metrics=False, **settings),
              provider)
    with running_dev_server(app) as url:
        yield url


class _Static(BaseHTTPRequestHandler):
    """The other origin: its page, and the openai SDK's browser build from node_modules."""

    root: Path
    types = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript",
             ".js": "text/javascript", ".json": "application/json"}

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?", 1)[0]
        if path == "/":
            file = HERE / "client.html"
        elif path.startswith("/openai/"):
            file = (self.root / "openai" / path[len("/openai/"):]).resolve()
            if not file.is_relative_to(self.root / "openai"):
                file = self.root / "missing"
        else:
            file = self.root / "missing"
        if not file.is_file():
            self.send_error(404)
            return
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("content-type", self.types.get(file.suffix, "application/octet-stream"))
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def other_origin() -> Iterator[str]:
    """A static server on another port: another origin than any dev server's."""
    try:
        modules = setup.node_modules()
    except setup.Unavailable as e:
        pytest.skip(f"no node_modules for the browser tests: {e}")
    handler = type("Static", (_Static,), {"root": modules})
    with serving(handler) as url:
        yield url


@pytest.fixture(scope="module")
def model() -> Iterator[Provider]:
    from streamgate.providers import local

    provider = local.create(load_settings({}, provider="local"))
    yield provider
    close_model(provider)  # never under a dev-server thread still generating with it


@dataclass
class Released:
    """A provider around another that records how each of its streams ended: ``closed`` by
    the server (its client left), or ``finished``; and when the stream let go of the model
    (the inner stream's own close frees it)."""

    inner: Provider
    streams: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capabilities(self) -> frozenset[str]:
        return self.inner.capabilities

    def default_model(self) -> str:
        return self.inner.default_model()

    def models(self) -> list[str]:
        return self.inner.models()

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        record: dict[str, Any] = {"deltas": 0, "ended": None, "released_at": None}
        self.streams.append(record)
        inner = self.inner.stream(request, model, deadline)
        try:
            for delta in inner:
                record["deltas"] += 1
                yield delta
            record["ended"] = "finished"
        except GeneratorExit:
            record["ended"] = "closed"
            raise
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()
            record["released_at"] = time.monotonic()


# -- the playground ---------------------------------------------------------------------------

WATCH = """(() => {
  window.__updates = [];
  new MutationObserver(() => {
    const texts = document.querySelectorAll('.msg.assistant .text');
    const last = texts[texts.length - 1];
    window.__updates.push({ t: performance.now(), n: last ? last.textContent.length : 0,
                            state: document.body.dataset.state });
  }).observe(document.getElementById('transcript'),
             { subtree: true, childList: true, characterData: true });
  return true;
})()"""
ANSWER = "(() => { const t = document.querySelectorAll('.msg.assistant .text'); " \
         "return t.length ? t[t.length - 1].textContent : null; })()"
ERRORS = "[...document.querySelectorAll('.error-card')].map(c => ({status: c.dataset.status, " \
         "inBand: c.dataset.inBand, text: c.innerText}))"


def _state(browser: Browser) -> str:
    return str(browser.evaluate("document.body.dataset.state"))


def _open_playground(browser: Browser, url: str) -> None:
    browser.open(f"{url}/")
    browser.wait_for("document.getElementById('model').dataset.loaded === 'true'")


def _ask(browser: Browser, prompt: str, **fields: str) -> None:
    for name, value in fields.items():
        browser.call("fill", selector=f"#{name.replace('_', '-')}", value=value)
    browser.call("fill", selector="#prompt", value=prompt)
    browser.call("click", selector="#send")


def _assert_clean(browser: Browser, url: str, *, statuses: tuple[int, ...] = ()) -> None:
    """Nothing refused by the CSP, no script error, and not one request off the server
    (Chromium logs each error status it receives, ``statuses``, as a console error)."""
    seen = browser.call("seen")
    assert browser.evaluate("window.__cspViolations") == []
    assert seen["errors"] == []
    expected = {f"Failed to load resource: the server responded with a status of {s} "
                for s in statuses}
    assert [m for m in seen["console"] if m["type"] == "error"
            and not any(m["text"].startswith(e) for e in expected)] == []
    assert all(r["url"].startswith(f"{url}/") for r in seen["requests"]), seen["requests"]


def test_the_playground_streams_the_embedded_model_token_by_token(
        browser: Browser, model: Provider) -> None:
    with dev_server(model) as url:
        # GIVEN the playground, as `make dev` serves it
        _open_playground(browser, url)
        assert browser.evaluate("document.getElementById('model').value") == MODEL
        browser.evaluate(WATCH)
        # WHEN a user asks the seed's question (64 tokens, to keep the test short)
        _ask(browser, "Explain streaming APIs", max_tokens="64")
        browser.wait_for("document.body.dataset.state === 'done'", timeout=120)
        updates = browser.evaluate("window.__updates")
        text = browser.evaluate(ANSWER)
        stats = {k: browser.evaluate(f"document.getElementById('{k}').textContent")
                 for k in ("ttft", "tps", "usage", "chunks", "finish")}
        if SCREENSHOT:
            browser.call("screenshot", path=SCREENSHOT)
        _assert_clean(browser, url)
    # THEN the text grew in many steps while it streamed, not at once at the end
    growing = sorted({u["n"] for u in updates if u["state"] == "streaming" and u["n"]})
    assert len(growing) >= 20, growing
    streaming = [u["t"] for u in updates if u["state"] == "streaming" and u["n"]]
    assert streaming[-1] - streaming[0] > 200  # ms: spread over the generation
    assert text and not text[0].isspace()  # the answer starts with text
    # AND the page shows time to first token, speed, usage and the finish reason
    assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", stats["ttft"]), stats
    assert re.fullmatch(r"\d+\.\d tokens/s", stats["tps"]), stats
    assert re.fullmatch(r"\d+ in · 64 out · \d+ total", stats["usage"]), stats
    assert int(stats["chunks"]) >= 20 and stats["finish"] == "length"


def test_stop_ends_the_stream_and_frees_the_model(
        browser: Browser, model: Provider, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streamgate")
    released = Released(model)
    with dev_server(released) as url:
        _open_playground(browser, url)
        # GIVEN a long answer streaming (1,000 tokens: a minute or more of generation)
        _ask(browser, "Explain streaming APIs", max_tokens="1000", min_tokens="1000")
        browser.wait_for("(document.querySelector('.msg.assistant .text') || {}).textContent"
                         "?.length > 40", timeout=60)
        # WHEN the user presses Stop
        browser.call("click", selector="#stop")
        stopped = time.monotonic()
        browser.wait_for("document.body.dataset.state === 'stopped'", timeout=10)
        at_stop = browser.evaluate(ANSWER)
        # THEN the server sees the client leave: it closes the stream, which lets go of the
        # model, within a few tokens of the Stop, long before the answer would have ended
        [stream] = released.streams
        deadline = time.monotonic() + 15
        while stream["released_at"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stream["ended"] == "closed", stream
        assert stream["released_at"] - stopped < 15, stream
        assert stream["deltas"] < 1000, stream
        # AND nothing more arrives, and the page says it stopped
        time.sleep(0.5)
        assert browser.evaluate(ANSWER) == at_stop
        assert browser.evaluate("document.querySelector('.msg.assistant .note').textContent") \
            == "Stopped."
        assert browser.evaluate("document.getElementById('send').disabled") is False
        # AND the model answers the next question
        _ask(browser, "What is an API?", max_tokens="8", min_tokens="")
        browser.wait_for("document.body.dataset.state === 'done'", timeout=60)
        _assert_clean(browser, url)
    # AND the request log says the client left the first stream (no finish reason, no error)
    records = [r for r in caplog.records if r.getMessage() == "request"
               and getattr(r, "path", None) == "/v1/chat/completions"]
    outcomes = [(r.status, r.disconnected, r.finish_reason)  # type: ignore[attr-defined]
                for r in records]
    assert outcomes[0] == (200, True, None), outcomes
    assert len(outcomes) == 2 and outcomes[1][:2] == (200, False), outcomes
    assert [s["ended"] for s in released.streams] == ["closed", "finished"]


def test_a_400_is_rendered_as_an_error_and_the_turn_can_be_edited(
        browser: Browser, model: Provider) -> None:
    counting = Counting(model)
    with dev_server(counting) as url:
        _open_playground(browser, url)
        # WHEN the user asks for more tokens than the server allows
        _ask(browser, "Explain streaming APIs", max_tokens="99999")
        browser.wait_for("document.body.dataset.state === 'error'")
        errors = browser.evaluate(ERRORS)
        # THEN the page shows our 400 as an error card, not as model text
        assert len(errors) == 1 and errors[0]["status"] == "400", errors
        assert "invalid_request_error" in errors[0]["text"]
        assert "param max_tokens" in errors[0]["text"]
        assert "'max_tokens' must be at most 4096" in errors[0]["text"]
        assert browser.evaluate(ANSWER) is None
        # AND the question goes back into the box to edit; the model never ran
        assert browser.evaluate("document.getElementById('prompt').value") == \
            "Explain streaming APIs"
        assert browser.evaluate("document.querySelector('.msg.user').classList.contains("
                                "'unsent')") is True
        assert counting.calls == []
        _assert_clean(browser, url, statuses=(400,))


def test_an_in_band_error_ends_the_stream_as_an_error_after_the_text(browser: Browser) -> None:
    # GIVEN a model that fails after some text (as a backend does mid-stream)
    provider = ScriptedProvider([TextDelta("Streaming APIs send "), 0.05,
                                 TextDelta("data as it is produced"), 0.05,
                                 UpstreamError("The model backend failed mid-stream")])
    with dev_server(provider) as url:
        _open_playground(browser, url)
        _ask(browser, "Explain streaming APIs")
        browser.wait_for("document.body.dataset.state === 'error'")
        errors = browser.evaluate(ERRORS)
        text = browser.evaluate(ANSWER)
        _assert_clean(browser, url)
    # THEN the text so far stays, and the error event is shown as an error after it
    assert text == "Streaming APIs send data as it is produced"
    assert len(errors) == 1 and errors[0]["inBand"] == "true", errors
    assert "error during the stream" in errors[0]["text"]
    assert "upstream_error" in errors[0]["text"]
    assert "The model backend failed mid-stream" in errors[0]["text"]


def test_a_429_is_rendered_with_its_retry_after(browser: Browser) -> None:
    # GIVEN a dev server whose two stream slots are both taken once the page has loaded (two,
    # so that the page's own parallel loads of /health and /v1/models always fit)
    provider = ScriptedProvider([TextDelta("busy"), 3.0, Finish("stop"), Usage(1, 1)])
    app = App(load_settings({}, provider="local", playground=True, metrics=False), provider)
    with running_dev_server(app, max_streams=2) as url:
        _open_playground(browser, url)
        holders = [threading.Thread(target=requests.post, args=(f"{url}/v1/chat/completions",),
                                    kwargs={"json": {"prompt": "hold", "stream": True},
                                            "timeout": 30}) for _ in range(2)]
        for holder in holders:
            holder.start()
        try:
            time.sleep(0.5)
            # WHEN the page asks
            _ask(browser, "Explain streaming APIs")
            browser.wait_for("document.body.dataset.state === 'error'")
            errors = browser.evaluate(ERRORS)
        finally:
            for holder in holders:
                holder.join()
    # THEN it shows the 429 and when to retry
    assert len(errors) == 1 and errors[0]["status"] == "429", errors
    assert "rate_limit_error" in errors[0]["text"] and "Retry after 1 s." in errors[0]["text"]


def test_api_key_mode_a_401_until_a_key_is_given_and_the_key_stays_in_memory(
        browser: Browser, monkeypatch: pytest.MonkeyPatch) -> None:
    with moto_server() as endpoint:
        env = {"AWS_ENDPOINT_URL_DYNAMODB": endpoint, "STREAMGATE_KEYS_TABLE": "streamgate-keys",
               "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
               "AWS_DEFAULT_REGION": "us-east-1"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        tool = [sys.executable, "-m", "streamgate.keys"]
        tool_env = {**os.environ, "PYTHONPATH": str(ROOT / "functions" / "streamgate")}
        subprocess.run([*tool, "init"], env=tool_env, check=True, capture_output=True,
                       timeout=60)
        created = subprocess.run([*tool, "create", "browser"], env=tool_env, check=True,
                                 capture_output=True, text=True, timeout=60)
        key = created.stdout.strip().splitlines()[-1]
        provider = ScriptedProvider()
        with dev_server(provider, auth="api_key", keys_table="streamgate-keys") as url:
            # GIVEN the playground of a server that needs a key, opened without one
            browser.open(f"{url}/")
            browser.wait_for("document.querySelectorAll('.error-card').length === 1")
            first = browser.evaluate(ERRORS)
            # WHEN the user enters the key
            browser.call("fill", selector="#api-key", value=key)
            browser.evaluate("document.getElementById('api-key').dispatchEvent("
                             "new Event('change'))")
            browser.wait_for("document.getElementById('model').dataset.loaded === 'true'")
            _ask(browser, "Hi")
            browser.wait_for("document.body.dataset.state === 'done'")
            text = browser.evaluate(ANSWER)
            stored = browser.evaluate("[localStorage.length, sessionStorage.length, "
                                      "document.cookie, location.href]")
            seen = browser.call("seen")
    # THEN the 401 was shown as an error asking for a key
    assert first[0]["status"] == "401" and "missing_api_key" in first[0]["text"]
    assert "enter it under Access" in first[0]["text"]
    # AND with the key the models loaded and the answer streamed
    assert text == "Hello, world!" and len(provider.requests) == 1
    # AND the key went only in the Authorization header: no URL, no storage, no cookie
    assert stored == [0, 0, "", f"{url}/"]
    assert all(key not in r["url"] for r in seen["requests"])
    chats = [r for r in seen["requests"] if r["url"].endswith("/v1/chat/completions")]
    assert chats[-1]["headers"]["authorization"] == f"Bearer {key}"


def test_the_playground_page_has_a_strict_policy_of_its_own() -> None:
    with dev_server(ScriptedProvider()) as url:
        page = requests.get(f"{url}/", timeout=10)
        api = requests.get(f"{url}/health", timeout=10)
    policy = page.headers["content-security-policy"]
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    assert api.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"


# -- another origin ---------------------------------------------------------------------------

def _client_page(browser: Browser, origin: str) -> None:
    browser.open(f"{origin}/")
    browser.wait_for("window.ready === true")


def _call(fn: str, *args: Any) -> str:
    return f"window.{fn}({', '.join(json.dumps(a) for a in args)})"


def test_fetch_from_an_allowed_origin_streams_through_cors(
        browser: Browser, model: Provider, other_origin: str) -> None:
    # GIVEN a dev server that allows the page's origin
    with dev_server(model, cors_origins=(other_origin,)) as url:
        _client_page(browser, other_origin)
        # WHEN the page streams with fetch
        result = browser.evaluate(_call("streamWithFetch", f"{url}/v1/chat/completions",
                                        {"prompt": "Explain streaming APIs", "stream": True,
                                         "max_tokens": 48}), timeout=120)
    # THEN it reads the stream piece by piece, and the exposed request id
    assert result.get("thrown") is None, result
    assert result["status"] == 200 and result["done"] and result["error"] is None
    assert len(result["pieces"]) >= 10 and result["times"][-1] > result["times"][0]
    assert result["requestId"]


def test_the_openai_sdk_from_an_allowed_origin_streams_through_cors(
        browser: Browser, model: Provider, other_origin: str) -> None:
    with dev_server(model, cors_origins=(other_origin,)) as url:
        _client_page(browser, other_origin)
        # WHEN the page uses the official SDK's browser build, organization and project set
        result = browser.evaluate(_call(
            "streamWithSdk", f"{url}/v1",
            {"model": MODEL, "max_tokens": 48,
             "messages": [{"role": "user", "content": "Explain streaming APIs"}]},
            {"organization": "org-local", "project": "proj-local"}), timeout=120)
    # THEN its preflight passed and the stream arrived in pieces, with usage
    assert "error" not in result, result
    assert len(result["pieces"]) >= 10 and result["times"][-1] > result["times"][0]
    assert result["usage"]["completion_tokens"] == 48 and result["finish"] == "length"
    assert result["requestId"]


def test_fetch_and_the_sdk_from_an_origin_not_allowed_are_refused_and_run_nothing(
        browser: Browser, model: Provider, other_origin: str,
        caplog: pytest.LogCaptureFixture) -> None:
    counting = Counting(model)
    caplog.set_level(logging.INFO, logger="streamgate.devserver")
    # GIVEN a dev server that allows some other origin only
    with dev_server(counting, cors_origins=("https://app.example",)) as url:
        _client_page(browser, other_origin)
        fetched = browser.evaluate(_call("streamWithFetch", f"{url}/v1/chat/completions",
                                         {"prompt": "Explain streaming APIs", "stream": True}))
        sdk = browser.evaluate(_call("streamWithSdk", f"{url}/v1", {
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}))
    # THEN the browser refuses both (their preflights were answered 403), and nothing ran
    assert fetched == {"thrown": "TypeError: Failed to fetch"}
    assert sdk["error"]["name"] == "APIConnectionError", sdk
    assert counting.calls == []
    refused = [r.getMessage() for r in caplog.records if '"OPTIONS /v1/chat/completions' in
               r.getMessage()]
    assert len(refused) == 2 and all(m.endswith(" 403 -") for m in refused), refused


@pytest.mark.parametrize("how", ["text/plain", "application/x-www-form-urlencoded", "form"])
def test_a_simple_cross_origin_post_from_a_page_is_refused_and_runs_nothing(
        browser: Browser, model: Provider, other_origin: str, how: str,
        caplog: pytest.LogCaptureFixture) -> None:
    counting = Counting(model)
    caplog.set_level(logging.INFO, logger="streamgate.devserver")
    body = json.dumps({"prompt": "Spend your model on me", "stream": True})
    # GIVEN an unauthenticated dev server, and a page of another origin
    with dev_server(counting) as url:
        _client_page(browser, other_origin)
        target = f"{url}/v1/chat/completions"
        # WHEN the page sends a POST the browser sends without asking (no preflight)
        if how == "form":  # text/plain form encoding spells JSON: name + "=" + value
            sent = browser.evaluate(_call("formPost", target, body[:-1] + ', "x": "', '"}'))
        else:
            sent = browser.evaluate(_call("simplePost", target, body, how))
        deadline = time.monotonic() + 10
        while not any('"POST /v1/chat/completions' in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the request never reached the server"
            time.sleep(0.05)
    # THEN the browser did send it, the server refused it 403, and the model never ran
    assert sent in ("opaque", "loaded")
    posts = [r.getMessage() for r in caplog.records if '"POST /v1/chat/completions' in
             r.getMessage()]
    assert len(posts) == 1 and posts[0].endswith(" 403 -"), posts
    assert counting.calls == []


class _Preflights(BaseHTTPRequestHandler):
    """Answers any preflight with what it asks for, and records what it asked."""

    asked: list[str] = []

    def do_OPTIONS(self) -> None:  # noqa: N802
        asked = self.headers.get("access-control-request-headers", "")
        self.asked.append(asked)
        self.send_response(204)
        self.send_header("access-control-allow-origin", "*")
        self.send_header("access-control-allow-methods", "POST, GET")
        self.send_header("access-control-allow-headers", asked)
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        self.send_response(400)
        self.send_header("access-control-allow-origin", "*")
        self.send_header("content-type", "application/json")
        body = b'{"error": {"message": "recorded", "type": "invalid_request_error"}}'
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def test_the_openai_sdk_preflight_asks_only_for_headers_we_allow(
        browser: Browser, other_origin: str) -> None:
    # GIVEN a server that records what a preflight asks for
    _Preflights.asked = []
    with serving(_Preflights) as url:
        _client_page(browser, other_origin)
        # WHEN the SDK calls it, with and without organization and project
        for options in ({}, {"organization": "org-1", "project": "proj-1"}):
            browser.evaluate(_call("streamWithSdk", f"{url}/v1", {
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}, options))
    # THEN every header it asks for is on our list (the Function URL's and the dev server's)
    asked = {h.strip() for line in _Preflights.asked for h in line.split(",") if h.strip()}
    print(f"the openai SDK's preflight asks for: {', '.join(sorted(asked))}")
    assert {"x-stainless-lang", "x-stainless-retry-count", "openai-organization",
            "openai-project"} <= asked
    assert asked <= set(cors.ALLOW_HEADERS), asked - set(cors.ALLOW_HEADERS)

