"""One JSON log record and one set of EMF metrics per request, on stdout as CloudWatch gets
them, for success and for every failure path."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from streamgate.errors import RateLimitError, UpstreamError
from streamgate.handler import App
from streamgate.providers import Finish, TextDelta, Usage
from tests.helpers import ScriptedProvider, body_bytes, chat_event, make_app


class Emitted:
    def __init__(self, out: str) -> None:
        docs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        self.logs = [d for d in docs if d.get("message") == "request"]
        self.emf = [d for d in docs if "_aws" in d]
        self.raw = out

    @property
    def log(self) -> dict[str, Any]:
        (record,) = self.logs
        return record

    def metrics(self) -> dict[str, Any]:
        """The request's main metric blob: metric name -> value."""
        (blob,) = [d for d in self.emf if "Requests" in d]
        directive = blob["_aws"]["CloudWatchMetrics"][0]
        assert directive["Namespace"] == "Streamgate"
        assert directive["Dimensions"] == [["service"]]
        values = {m["Name"]: blob[m["Name"]] for m in directive["Metrics"]}
        return {name: v[0] if isinstance(v, list) and len(v) == 1 else v
                for name, v in values.items()}

    def dimensioned(self, name: str) -> list[dict[str, Any]]:
        return [{k: v for k, v in d.items() if k not in ("_aws", name)} for d in self.emf
                if name in d]


def _run(capsys: pytest.CaptureFixture[str], app: App, body: Any = None, *,
         read: int | None = None, context: Any = None) -> Emitted:
    capsys.readouterr()
    response = app.handle(chat_event({"prompt": "hi", "stream": True} if body is None
                                     else body), context)
    if read is None:
        body_bytes(response)
    else:
        for _ in range(read):
            next(response.body)
    response.close()
    return Emitted(capsys.readouterr().out)


def test_a_stream_is_logged_and_counted_without_its_text(
        capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, make_app())
    log = out.log
    assert log["level"] == "INFO" and log["service"] == "streamgate"
    assert {k: log.get(k) for k in ("request_id", "method", "path", "status", "provider", "model",
                                "stream", "prompt_tokens", "completion_tokens",
                                "finish_reason", "error_type", "error_code", "key_id",
                                "disconnected")} == {
        "request_id": "6f1c0e5a-0000-4000-8000-000000000001", "method": "POST",
        "path": "/v1/chat/completions", "status": 200, "provider": "local",
        "model": "scripted-1", "stream": True, "prompt_tokens": 5, "completion_tokens": 4,
        "finish_reason": "stop", "error_type": None, "error_code": None, "key_id": None,
        "disconnected": False}
    assert 0 <= log["ttft_ms"] <= log["duration_ms"]
    metrics = out.metrics()
    assert {k: metrics[k] for k in ("Requests", "InputTokens", "OutputTokens", "Errors",
                                    "Throttles", "Disconnects")} == {
        "Requests": 1.0, "InputTokens": 5.0, "OutputTokens": 4.0, "Errors": 0.0,
        "Throttles": 0.0, "Disconnects": 0.0}
    assert metrics["TimeToFirstToken"] >= 0 and metrics["TokensPerSecond"] > 0
    assert out.dimensioned("Responses") == [{"service": "streamgate", "Status": "200"}]
    assert out.dimensioned("ErrorsByType") == []
    # neither the prompt nor the completion is written anywhere
    assert "Hello" not in out.raw and '"hi"' not in out.raw


def test_content_is_logged_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    log = _run(capsys, make_app(log_content=True)).log
    assert (log["prompt"], log["completion"]) == ("hi", "Hello, world!")


def test_a_stream_that_fails_mid_way_is_logged_as_an_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    provider = ScriptedProvider([TextDelta("partial"), UpstreamError("model crashed")])
    out = _run(capsys, make_app(provider))
    assert (out.log["level"], out.log["status"], out.log["error_code"]) == (
        "ERROR", 200, "upstream_error")
    assert out.metrics()["Errors"] == 1.0
    assert out.dimensioned("ErrorsByType") == [{"service": "streamgate",
                                                "ErrorType": "upstream_error"}]
    assert out.dimensioned("Responses") == [{"service": "streamgate", "Status": "200"}]


def test_the_deadline_is_logged_and_counted(capsys: pytest.CaptureFixture[str]) -> None:
    class Context:
        aws_request_id = "lambda-req-9"

        def get_remaining_time_in_millis(self) -> int:
            return 200

    provider = ScriptedProvider([TextDelta("slow"), 0.4, TextDelta("er"), Finish("stop"),
                                 Usage(1, 2)])
    out = _run(capsys, make_app(provider, deadline_margin_ms=0), context=Context())
    assert (out.log["request_id"], out.log["error_code"]) == ("lambda-req-9", "deadline_exceeded")
    assert out.dimensioned("ErrorsByType")[0]["ErrorType"] == "deadline_exceeded"


def test_throttles_and_refusals_are_counted_by_status(
        capsys: pytest.CaptureFixture[str]) -> None:
    throttled = _run(capsys, make_app(ScriptedProvider([RateLimitError("slow down",
                                                                       retry_after=2)])))
    assert (throttled.log["status"], throttled.metrics()["Throttles"]) == (429, 1.0)
    assert throttled.dimensioned("Responses")[0]["Status"] == "429"
    bad = _run(capsys, make_app(), {"messages": "nope"})
    assert (bad.log["status"], bad.log["error_type"], bad.log["level"]) == (
        400, "invalid_request_error", "INFO")
    assert bad.dimensioned("ErrorsByType")[0]["ErrorType"] == "invalid_request_error"
    assert "TimeToFirstToken" not in bad.metrics()


def test_a_client_that_leaves_is_counted_as_a_disconnect(
        capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, make_app(), read=1)
    assert out.log["disconnected"] is True and "finish_reason" not in out.log
    assert (out.metrics()["Disconnects"], out.metrics()["Errors"]) == (1.0, 0.0)


def test_module_loggers_write_json_through_powertools(
        capsys: pytest.CaptureFixture[str]) -> None:
    provider = ScriptedProvider([TextDelta("x"), KeyError("/var/task/secret.py")])
    out = _run(capsys, make_app(provider))
    (crash,) = [json.loads(line) for line in out.raw.splitlines()
                if line.startswith("{") and "unhandled error" in line]
    assert crash["level"] == "ERROR" and crash["name"] == "streamgate.handler"
    assert "KeyError" in crash["exception"]  # the trace is in the log, never in the body


def test_the_lambda_loop_flushes_after_a_stream_that_failed(
        capsys: pytest.CaptureFixture[str]) -> None:
    from streamgate.runtime import run
    from tests.fake_runtime_api import FakeRuntimeAPI

    provider = ScriptedProvider([TextDelta("part"), UpstreamError("gone")])
    capsys.readouterr()
    with FakeRuntimeAPI([chat_event({"prompt": "hi", "stream": True})]) as api:
        assert run(make_app(provider), environ={"AWS_LAMBDA_RUNTIME_API": api.address}) == 0
    out = Emitted(capsys.readouterr().out)
    assert (out.log["request_id"], out.log["error_code"]) == ("req-1", "upstream_error")
    assert out.metrics()["Errors"] == 1.0


def test_a_metrics_flush_that_fails_loses_nothing_else_and_doubles_nothing_later(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    # GIVEN stdout that refuses the first EMF blob written to it (a full pipe, say)
    real = sys.stdout

    class Refusing:
        refused = 0

        def write(self, text: str) -> int:
            if '"_aws"' in text and Refusing.refused == 0:
                Refusing.refused += 1
                raise OSError("stdout is gone")
            return real.write(text)

        def flush(self) -> None:
            real.flush()

    app = make_app(metrics=True)
    monkeypatch.setattr(sys, "stdout", Refusing())
    # WHEN one request's flush fails, THEN the request still completes and is logged
    failed = _run(capsys, app)
    assert Refusing.refused == 1
    assert failed.log["status"] == 200
    # AND the next request's metrics are its own, not the failed request's as well
    later = _run(capsys, app)
    assert later.metrics()["Requests"] == 1.0


# -- every line about a request carries its id, from the threads it starts too ------------------

def _lines_of_one_invocation(capsys: pytest.CaptureFixture[str], app: App) -> list[dict[str, Any]]:
    """The JSON lines written while the Lambda loop (one worker) serves one streamed chat
    invocation, req-1, with its trace header."""
    import logging

    from streamgate.runtime import run
    from tests.fake_runtime_api import FakeRuntimeAPI, Invoke

    trace = "Root=1-5759e988-bd862e3fe1be46a994270001;Parent=53995c3f42cd8ad1;Sampled=1"
    streamgate_logger = logging.getLogger("streamgate")
    level = streamgate_logger.level
    streamgate_logger.setLevel(logging.DEBUG)
    capsys.readouterr()
    try:
        with FakeRuntimeAPI([Invoke(chat_event({"prompt": "hi", "stream": True}),
                                    headers={"Lambda-Runtime-Trace-Id": trace})]) as api:
            assert run(app, environ={"AWS_LAMBDA_RUNTIME_API": api.address}) == 0
        # A Bedrock reader thread logs its end once its request has stopped reading it, which
        # may be just after the invocation was answered.
        for thread in threading.enumerate():
            if thread.name == "bedrock-stream":
                thread.join(10)
    finally:
        streamgate_logger.setLevel(level)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]


def _about_req_1(line: dict[str, Any]) -> None:
    assert line["function_request_id"] == "req-1"
    assert line["xray_trace_id"] == "1-5759e988-bd862e3fe1be46a994270001"


def test_the_watchdogs_line_about_a_request_carries_its_id_and_trace(
        capsys: pytest.CaptureFixture[str]) -> None:
    import socket
    import time

    from streamgate.config import load_settings
    from streamgate.credentials import ApiKey
    from streamgate.httpclient import Upstream
    from streamgate.providers.openai import OpenAIProvider
    from tests.fake_http import RawPeer, read_request

    # GIVEN an upstream that trickles its status line a byte every 100 ms (every recv returns
    # in time: only the watchdog can end the wait), and a first-token timeout of 0.5 s
    def trickle(sock: socket.socket) -> None:
        read_request(sock)
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
            sock.sendall(bytes([byte]))
            time.sleep(0.1)

    with RawPeer(trickle) as peer:
        s = load_settings({}, provider="openai", upstream_base_url=peer.url,
                          upstream_models=("m",), upstream_first_token_timeout_s=0.5,
                          upstream_max_attempts=1)
        provider = OpenAIProvider(s, ApiKey(None, 60, value=""),
                                  Upstream(peer.url, s.upstream_connect_timeout_s))
        # WHEN the Lambda loop serves an invocation that waits on it
        try:
            lines = _lines_of_one_invocation(capsys, App(s, provider))
        finally:
            provider.close()
    # THEN the watchdog's line (written by its own thread) names the invocation and its trace
    (cut,) = [line for line in lines if line.get("name") == "streamgate.deadline"]
    assert cut["message"] == "a wait reached its time limit: its socket is shut down"
    _about_req_1(cut)
    (record,) = [line for line in lines if line.get("message") == "request"]
    assert record["error_code"] == "upstream_timeout"


def test_the_bedrock_readers_line_about_a_request_carries_its_id_and_trace(
        capsys: pytest.CaptureFixture[str]) -> None:
    from streamgate.config import load_settings
    from streamgate.providers.bedrock import BedrockProvider
    from tests.fake_bedrock import FakeBedrock, Reply, start_event

    # GIVEN Bedrock starting a stream and then sending no content for 3 s, and a first-token
    # timeout of 0.5 s
    with FakeBedrock([Reply(frames=[start_event(), 3.0])]) as fake:
        s = load_settings({}, provider="bedrock", bedrock_first_token_timeout_s=0.5,
                          bedrock_max_attempts=1)
        # WHEN the Lambda loop serves an invocation that reads it
        lines = _lines_of_one_invocation(capsys, App(s, BedrockProvider(s, fake.client())))
    # THEN the reader thread's last line names the invocation and its trace
    (ended,) = [line for line in lines if line.get("name") == "streamgate.providers.bedrock"]
    assert ended["message"] == "the Bedrock reader has ended, after its request stopped reading"
    _about_req_1(ended)
    (record,) = [line for line in lines if line.get("message") == "request"]
    assert record["error_code"] == "upstream_timeout"


def test_a_thread_started_for_a_request_keeps_its_id_after_the_request_ends(
        capsys: pytest.CaptureFixture[str]) -> None:
    import contextvars
    import logging

    from streamgate import telemetry

    # GIVEN a thread started (with the request's context, as the Bedrock reader is) while a
    # request is bound, that logs only once told to
    go = threading.Event()

    def later() -> None:
        go.wait(10)
        logging.getLogger("streamgate.providers.bedrock").warning("the reader has ended")

    capsys.readouterr()
    telemetry.bind_request("req-9")
    thread = threading.Thread(target=contextvars.copy_context().run, args=(later,))
    thread.start()
    # WHEN the request ends first (its driver unbinds it), and only then the thread logs
    telemetry.bind_request(None)
    go.set()
    thread.join(10)
    # THEN the thread's line still names the request, and the driver's own lines no longer do
    logging.getLogger("streamgate").warning("between requests")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    (ended,) = [line for line in lines if line["message"] == "the reader has ended"]
    (between,) = [line for line in lines if line["message"] == "between requests"]
    assert ended["function_request_id"] == "req-9"
    assert "function_request_id" not in between
