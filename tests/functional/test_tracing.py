"""Traces on OpenTelemetry, read back by an OTLP/HTTP receiver that decodes the real protobuf
(tests/otlp_receiver.py): the spans of a streamed answer, a mid-stream failure, a fallback, the
deadline and a client that leaves, through the dev server and through the Lambda loop; the W3C
and X-Ray trace contexts; Managed Instances invocations side by side; collectors that hang or
refuse; SigV4 for X-Ray's endpoint, checked with botocore's own signer."""

from __future__ import annotations

import http.client
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.errors import UpstreamError
from streamgate.handler import App
from streamgate.providers import Delta, Finish, TextDelta, Usage
from streamgate.runtime import run
from streamgate.validation import CAP_SEED, ChatRequest
from tests.conftest import running_dev_server
from tests.fake_openai import FakeUpstream, error_reply, text_stream
from tests.fake_openai import Reply as UpstreamReply
from tests.fake_runtime_api import FakeRuntimeAPI, Invoke
from tests.helpers import ScriptedProvider, chat_event, make_app, sse_data, sse_json
from tests.otlp_receiver import OtlpReceiver, Span

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
DRIVERS = ["devserver", "lambda"]
PROMPT = "purple elephant in the room"
XRAY_ROOT = "1-5759e988-bd862e3fe1be46a994272793"
XRAY_TRACE = "5759e988bd862e3fe1be46a994272793"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver
           ) -> Iterator[Callable[..., App]]:
    """``traced(provider, **settings)``: an app with tracing on, exporting to ``receiver``
    (batches leave 50 ms after their first span); every one shut down afterwards."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS",
                 "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_SERVICE_NAME",
                 "OTEL_TRACES_SAMPLER", "STREAMGATE_TRACING_SIGV4_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    apps: list[App] = []

    def make(provider: Any = None, **settings: Any) -> App:
        if isinstance(provider, App):
            app = provider
        else:
            app = make_app(provider, tracing=True, metrics=False, **settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.telemetry.shutdown()
        app.router.close()


def serve(driver: str, app: App, body: dict[str, Any], *, headers: dict[str, str] | None = None,
          leave_after: int | None = None, timeout_s: float | None = None,
          lambda_trace_id: str | None = None) -> bytes:
    """One request through a driver; the bytes the client got. ``leave_after``: the client
    goes away after that many SSE events (on Lambda, the Runtime API's connection is reset);
    ``timeout_s``: the request's time limit (the dev server's, or the Lambda deadline)."""
    if driver == "devserver":
        with running_dev_server(app, timeout_s=timeout_s or 300) as url:
            conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]),
                                              timeout=10)
            conn.request("POST", CHAT, body=json.dumps(body).encode(),
                         headers={"content-type": "application/json", **(headers or {})})
            response = conn.getresponse()
            if leave_after is None:
                got = response.read()
            else:
                got = b""
                while got.count(b"\n\n") < leave_after:
                    got += response.read1(65536)
            conn.close()
            return got
    invoke = Invoke(chat_event(body, headers=headers),
                    headers={"Lambda-Runtime-Trace-Id": lambda_trace_id},
                    response=f"reset-after-{leave_after}" if leave_after else "ok")
    deadline_ms = int(timeout_s * 1000) if timeout_s is not None else 60_000
    with FakeRuntimeAPI([invoke], deadline_in_ms=deadline_ms) as api:
        assert run(app, environ={"AWS_LAMBDA_RUNTIME_API": api.address,
                                 "AWS_LAMBDA_FUNCTION_NAME": "streamgate"}) == 0
        raw = b"".join(chunk for _, chunk in api.posted[0].chunks)
        return raw.split(b"\x00" * 8, 1)[1]  # the body after the prelude


def split(spans: list[Span]) -> tuple[Span, list[Span]]:
    """(the request's span, its provider calls' spans in start order)."""
    (server,) = [s for s in spans if s.kind == "SERVER"]
    calls = sorted((s for s in spans if s.kind != "SERVER"), key=lambda s: s.start_ns)
    return server, calls


def _stream(**extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True},
            **extra}


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_streamed_answer_is_a_server_span_over_a_genai_client_span(
        driver: str, traced: Callable[..., App], receiver: OtlpReceiver) -> None:
    # GIVEN a traced app
    app = traced(ScriptedProvider(capabilities=frozenset({CAP_SEED})))
    # WHEN a client streams an answer with sampling parameters
    got = serve(driver, app, _stream(max_tokens=20, temperature=0.5, top_p=0.9, seed=7))
    # THEN two spans arrive, the provider call's under the request's, in one trace
    server, (call,) = split(receiver.wait_for(2))
    assert call.trace_id == server.trace_id and call.parent_span_id == server.span_id
    assert server.parent_span_id == ""
    assert (server.name, server.status) == ("POST /v1/chat/completions", "UNSET")
    assert {k: server.attributes[k] for k in (
        "http.request.method", "http.route", "url.path", "http.response.status_code",
        "streamgate.model", "streamgate.backend")} == {
        "http.request.method": "POST", "http.route": CHAT, "url.path": CHAT,
        "http.response.status_code": 200, "streamgate.model": "scripted-1",
        "streamgate.backend": "scripted"}
    # AND the call is named and attributed per the GenAI conventions
    assert (call.name, call.kind, call.status) == ("chat scripted-1", "CLIENT", "UNSET")
    chunk_id = sse_json(got)[0]["id"]
    assert {k: v for k, v in call.attributes.items() if k != "gen_ai.response.time_to_first_chunk"
            } == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "scripted",
        "gen_ai.request.model": "scripted-1", "gen_ai.request.max_tokens": 20,
        "gen_ai.request.temperature": 0.5, "gen_ai.request.top_p": 0.9,
        "gen_ai.request.seed": 7, "gen_ai.request.stream": True,
        "streamgate.target": "scripted", "gen_ai.response.model": "scripted-1",
        "gen_ai.response.id": chunk_id, "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 4}
    ttft = call.attributes["gen_ai.response.time_to_first_chunk"]
    assert 0 <= ttft <= (call.end_ns - call.start_ns) / 1e9
    assert server.start_ns <= call.start_ns <= call.end_ns <= server.end_ns
    assert server.resource["service.name"] == "streamgate"
    # AND no prompt or completion text leaves in any span
    assert not any(PROMPT in r.body.decode("latin-1") or b"world" in r.body
                   for r in receiver.requests)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_stream_that_fails_mid_way_ends_both_spans_in_error(
        driver: str, traced: Callable[..., App], receiver: OtlpReceiver) -> None:
    # GIVEN a provider that fails after some text
    app = traced(ScriptedProvider([TextDelta("partial"), UpstreamError("model crashed")]))
    # WHEN a client streams
    got = serve(driver, app, _stream())
    assert "error" in json.loads(sse_data(got)[-1])
    # THEN the call's span and the request's say so
    server, (call,) = split(receiver.wait_for(2))
    assert (call.status, call.attributes["error.type"],
            call.attributes["gen_ai.response.finish_reasons"]) == (
        "ERROR", "upstream_error", ["error"])
    assert (server.status, server.attributes["error.type"],
            server.attributes["http.response.status_code"]) == ("ERROR", "upstream_error", 200)


@pytest.mark.parametrize("driver", DRIVERS)
def test_each_fallback_attempt_is_its_own_span_and_each_upstream_gets_its_traceparent(
        driver: str, traced: Callable[..., App], receiver: OtlpReceiver) -> None:
    # GIVEN a route whose first upstream is unavailable and whose second answers
    with FakeUpstream([error_reply(503, "overloaded")]) as first, \
            FakeUpstream([UpstreamReply(body=[text_stream("Hi", "!")])]) as second:
        doc = json.dumps({"routes": {"m": {"targets": [
            {"name": "first", "kind": "openai", "base_url": first.url, "model": "one",
             "api_key": "sk-test-0123456789", "max_attempts": 1},
            {"name": "second", "kind": "openai", "base_url": second.url, "model": "two",
             "api_key": "sk-test-0123456789", "max_attempts": 1}]}}})
        app = traced(App(load_settings({}, provider="routes", routes=doc, tracing=True,
                                       metrics=False)))
        # WHEN a client streams from it
        got = serve(driver, app, _stream(model="m"))
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in sse_json(got)
                       if c["choices"]) == "Hi!"
        sent = [first.requests[-1][1].get("traceparent"),
                second.requests[-1][1].get("traceparent")]
    # THEN the request has two provider-call spans: the failed attempt, ended in error, and
    # the one that answered
    server, (failed, answered) = split(receiver.wait_for(3))
    assert (failed.name, failed.status, failed.attributes["error.type"]) == (
        "chat one", "ERROR", "upstream_unavailable")
    assert failed.attributes["server.address"] == "127.0.0.1"
    assert (answered.name, answered.status) == ("chat two", "UNSET")
    assert answered.attributes["gen_ai.provider.name"] == "openai"
    assert failed.end_ns <= answered.start_ns
    assert {failed.parent_span_id, answered.parent_span_id} == {server.span_id}
    assert server.attributes["streamgate.fallbacks"] == ["first: upstream_unavailable"]
    assert server.attributes["streamgate.backend"] == "second"
    # AND each upstream was sent the traceparent of its own call's span (sampled; the SDK
    # also sets W3C level 2's random-trace-id flag)
    assert sent == [f"00-{server.trace_id}-{s.span_id}-{s.flags & 0xFF:02x}"
                    for s in (failed, answered)]
    assert all(s.flags & 0x01 for s in (failed, answered))


class _Stalls(ScriptedProvider):
    """Some text, then a silence that only the deadline ends."""

    def __init__(self) -> None:
        super().__init__([TextDelta("slow"), 5.0, TextDelta("er"), Finish("stop"),
                          Usage(1, 2)])


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_deadline_ends_the_spans_in_error(
        driver: str, traced: Callable[..., App], receiver: OtlpReceiver) -> None:
    # GIVEN a provider that stalls past the request's time limit
    app = traced(_Stalls(), deadline_margin_ms=0)
    # WHEN a client streams with half a second to go
    got = serve(driver, app, _stream(), timeout_s=0.5)
    assert json.loads(sse_data(got)[-1])["error"]["code"] == "deadline_exceeded"
    # THEN both spans end in error with the deadline as the error type
    server, (call,) = split(receiver.wait_for(2))
    assert (call.status, call.attributes["error.type"]) == ("ERROR", "deadline_exceeded")
    assert (server.status, server.attributes["error.type"]) == ("ERROR", "deadline_exceeded")


class _Talkative(ScriptedProvider):
    def __init__(self) -> None:
        super().__init__([TextDelta("x"), *[s for _ in range(100)
                                            for s in (0.05, TextDelta("y"))],
                          Finish("stop"), Usage(1, 1)])


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_client_that_leaves_ends_the_spans_as_a_disconnect(
        driver: str, traced: Callable[..., App], receiver: OtlpReceiver) -> None:
    # GIVEN a provider that would talk for five seconds
    provider = _Talkative()
    app = traced(provider)
    # WHEN the client goes away after two events (on Lambda: the Runtime API's connection
    # breaks, which is what Lambda shows a function of a client that left)
    serve(driver, app, _stream(), leave_after=2)
    # THEN the spans end without a finish reason, marked as a disconnect, not as errors
    server, (call,) = split(receiver.wait_for(2))
    assert not provider.finished.is_set()
    assert (call.status, call.attributes["gen_ai.response.finish_reasons"]) == (
        "UNSET", ["error"])
    assert call.attributes["streamgate.disconnected"] is True
    assert server.attributes["streamgate.disconnected"] is True
    assert "error.type" not in server.attributes and server.status == "UNSET"


def test_a_clients_traceparent_continues_its_trace_and_the_lambda_trace_is_linked(
        traced: Callable[..., App], receiver: OtlpReceiver) -> None:
    # GIVEN a traced app on the Lambda loop, a sampled X-Ray trace header from Lambda
    app = traced()
    xray = f"Root={XRAY_ROOT};Parent=53995c3f42cd8ad8;Sampled=1"
    # WHEN a client sends its own W3C trace context
    serve("lambda", app, _stream(), lambda_trace_id=xray, headers={
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=abc"})
    # THEN the request's span is a child of the client's, in the client's trace
    server, (call,) = split(receiver.wait_for(2))
    assert (server.trace_id, server.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert server.flags & 0x300 == 0x300  # its parent came from another process
    assert call.trace_id == CLIENT_TRACE and server.trace_state == "vendor=abc"
    # AND Lambda's X-Ray trace is linked to it
    assert [(link["trace_id"], link["span_id"]) for link in server.links] == [
        (XRAY_TRACE, "53995c3f42cd8ad8")]


@pytest.mark.parametrize(("sampled", "parented"), [("1", True), ("0", False)])
def test_without_a_traceparent_a_sampled_xray_trace_is_continued_and_any_other_linked(
        sampled: str, parented: bool, traced: Callable[..., App],
        receiver: OtlpReceiver) -> None:
    # GIVEN a traced app on the Lambda loop
    app = traced()
    # WHEN Lambda hands over its trace header, sampled or not, and the client sends none
    serve("lambda", app, _stream(),
          lambda_trace_id=f"Root={XRAY_ROOT};Parent=53995c3f42cd8ad8;Sampled={sampled}")
    # THEN a sampled X-Ray trace is continued (its trace id, under its parent), and an
    # unsampled one linked from a trace of our own, sampled all the same
    server, _ = split(receiver.wait_for(2))
    if parented:
        assert (server.trace_id, server.parent_span_id, server.links) == (
            XRAY_TRACE, "53995c3f42cd8ad8", [])
    else:
        assert server.trace_id != XRAY_TRACE and server.parent_span_id == ""
        assert [link["trace_id"] for link in server.links] == [XRAY_TRACE]


def test_two_concurrent_managed_instances_invocations_keep_their_traces_apart(
        traced: Callable[..., App], receiver: OtlpReceiver) -> None:
    # GIVEN two workers and a provider that holds both calls open until both are in it
    barrier = threading.Barrier(2, timeout=10)

    class Both(ScriptedProvider):
        def stream(self, request: ChatRequest, model: str,
                   deadline: Deadline) -> Iterator[Delta]:
            yield TextDelta("x")
            barrier.wait()
            yield Finish("stop")
            yield Usage(1, 1)

    app = traced(Both())
    events = [Invoke(chat_event({"model": f"scripted-{i}", "prompt": "hi", "stream": True}),
                     headers={"Lambda-Runtime-Trace-Id": f"Root=1-5759e988-bd862e3fe1be46a99427000"
                                                         f"{i};Parent=53995c3f42cd8ad{i};"
                                                         "Sampled=1"})
              for i in (1, 2)]
    # WHEN the two invocations are served at the same time
    with FakeRuntimeAPI(events, hold_until_polls=2) as api:
        assert run(app, environ={"AWS_LAMBDA_RUNTIME_API": api.address,
                                 "AWS_LAMBDA_MAX_CONCURRENCY": "2"}) == 0
    # THEN each request's spans are in its own invocation's trace, its call under its request
    spans = receiver.wait_for(4)
    for i in (1, 2):
        trace_id = f"5759e988bd862e3fe1be46a99427000{i}"
        server, (call,) = split([s for s in spans if s.trace_id == trace_id])
        assert server.parent_span_id == f"53995c3f42cd8ad{i}"
        assert call.parent_span_id == server.span_id
        assert call.attributes["gen_ai.request.model"] == f"scripted-{i}"


def test_content_goes_into_spans_only_when_content_logging_is_on(
        traced: Callable[..., App], receiver: OtlpReceiver) -> None:
    # GIVEN STREAMGATE_LOG_CONTENT (debugging)
    app = traced(log_content=True)
    # WHEN a client streams
    serve("devserver", app, {"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": PROMPT}],
                             "stream": True})
    # THEN the call's span carries the messages in the conventions' schema
    _, (call,) = split(receiver.wait_for(2))
    assert json.loads(call.attributes["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}]
    assert json.loads(call.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Hello, world!"}],
         "finish_reason": "stop"}]


@pytest.mark.parametrize("collector", ["hang", "503", "closed"])
def test_a_collector_that_hangs_or_refuses_neither_fails_nor_holds_the_lambda_loop(
        collector: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        ) -> None:
    # GIVEN a collector that never answers, one that answers 503, or no collector at all;
    # a flush limit of 300 ms
    with OtlpReceiver("ok" if collector == "closed" else collector) as sink:
        url = sink.url
        if collector == "closed":
            sink.close()  # the port refuses connections from now on
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "20000")
        monkeypatch.setenv("STREAMGATE_TRACING_FLUSH_TIMEOUT_MS", "300")
        app = make_app(tracing=True, metrics=False)
        try:
            events = [chat_event(_stream()) for _ in range(3)]
            # WHEN three invocations are served one after another
            started = time.monotonic()
            with FakeRuntimeAPI(events) as api, caplog.at_level(logging.WARNING):
                assert run(app, environ={"AWS_LAMBDA_RUNTIME_API": api.address}) == 0
            took = time.monotonic() - started
            # THEN every answer is whole, each delivered before its spans were waited for
            assert [sse_data(b"".join(c for _, c in p.chunks).split(b"\x00" * 8)[1])[-1]
                    for p in api.posted] == ["[DONE]"] * 3
            # AND the loop waited for a hanging collector once at most (300 ms), not per
            # invocation, nor for the exporter's own 20 s timeout
            assert took < 2.5, took
            if collector != "hang":
                # AND the failure is logged once until exports work again
                failures = [r for r in caplog.records if "trace export" in r.getMessage()]
                assert len(failures) == 1, [r.getMessage() for r in failures]
        finally:
            app.telemetry.shutdown()


def test_a_hanging_collector_does_not_slow_the_dev_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a collector that never answers, an export that waits 60 s for it, and batches that
    # leave at once
    with OtlpReceiver("hang") as sink:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", sink.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "60000")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "1")
        app = make_app(tracing=True, metrics=False)
        try:
            with running_dev_server(app) as url:
                port = int(url.rsplit(":", 1)[1])
                # WHEN five requests follow one another
                started = time.monotonic()
                for _ in range(5):
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    conn.request("POST", CHAT, body=json.dumps(_stream()).encode())
                    assert sse_data(conn.getresponse().read())[-1] == "[DONE]"
                    conn.close()
                # THEN none of them waited for an export: together they take a fraction of
                # one export's wait (a bound loose enough for a machine under load)
                assert time.monotonic() - started < 20.0
                assert sink.requests  # the exporter did try
        finally:
            app.telemetry.shutdown()


def test_exports_to_xray_are_signed_with_sigv4_as_botocore_signs(
        monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver) -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    # GIVEN the function's credentials, X-Ray signing for us-east-1 (what an
    # https://xray.us-east-1.amazonaws.com endpoint sets) and gzip, towards our receiver
    credentials = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret",
                   "AWS_SESSION_TOKEN": "session-token"}
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
    monkeypatch.setenv("STREAMGATE_TRACING_SIGV4_REGION", "us-east-1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    app = make_app(tracing=True, metrics=False)
    try:
        # WHEN a request's spans are exported
        response = app.handle(chat_event(_stream()))
        b"".join(response.body)
        response.close()
        app.telemetry.flush(5)
    finally:
        app.telemetry.shutdown()
    (received,) = receiver.requests
    # THEN the request carries a SigV4 signature for xray in us-east-1 over the bytes sent
    authorization = received.headers["authorization"]
    scheme, _, fields = authorization.partition(" ")
    parts = dict(p.strip().split("=", 1) for p in fields.split(","))
    date = received.headers["x-amz-date"]
    assert scheme == "AWS4-HMAC-SHA256"
    assert parts["Credential"] == f"AKIDEXAMPLE/{date[:8]}/us-east-1/xray/aws4_request"
    signed = parts["SignedHeaders"].split(";")
    assert {"host", "content-type", "content-encoding", "x-amz-date",
            "x-amz-security-token"} <= set(signed)
    assert received.headers["x-amz-security-token"] == "session-token"
    # AND botocore's own signer, given the request as it arrived, computes the same signature
    request = AWSRequest(method="POST", url=receiver.url, data=received.body,
                         headers={h: received.headers[h] for h in signed})
    request.context["timestamp"] = date
    signer = SigV4Auth(Credentials("AKIDEXAMPLE", "secret", "session-token"), "xray",
                       "us-east-1")
    canonical = signer.canonical_request(request)
    assert signer.signed_headers(signer.headers_to_sign(request)) == parts["SignedHeaders"]
    assert signer.signature(signer.string_to_sign(request, canonical), request) == \
        parts["Signature"]
    assert received.headers["content-type"] == "application/x-protobuf"


_IMPORTS = """
import json, sys
from tests.helpers import body_bytes, chat_event, make_app
app = make_app(tracing=sys.argv[1] == "on", metrics=False)
response = app.handle(chat_event({"prompt": "hi", "stream": True}))
body_bytes(response)
response.close()
app.telemetry.shutdown()
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules if m.startswith("opentelemetry")}
                        | {m for m in sys.modules if m in ("streamgate.tracing",
                                                           "streamgate.otlp")})))
"""


@pytest.mark.parametrize(("tracing", "loaded"), [
    ("off", []), ("on", ["opentelemetry", "streamgate.otlp", "streamgate.tracing"])])
def test_nothing_of_opentelemetry_is_imported_when_tracing_is_off(
        tracing: str, loaded: list[str]) -> None:
    # GIVEN a process serving one request, tracing off (or on, for contrast)
    # WHEN it has answered
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS, tracing], capture_output=True, text=True, timeout=60,
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'functions/streamgate'}"
                       f":{ROOT}", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/"})
    assert done.returncode == 0, done.stderr[-2000:]
    # THEN OpenTelemetry (and our modules using it) were imported only with tracing on
    assert json.loads(done.stdout.strip().splitlines()[-1]) == loaded


def test_the_docs_any_otlp_backend_example_exports_with_its_headers(
        receiver: OtlpReceiver) -> None:
    import re

    from tests.docs_text import page
    from tests.fake_openai import FakeUpstream

    # GIVEN docs/operating.md's example for any OTLP backend: its variables, the endpoint ours
    block = next(b for b in re.findall(r"```bash\n(.*?)```", page("operating.md"), re.S)
                 if "OTEL_EXPORTER_OTLP_HEADERS=" in b)
    variables = dict(re.findall(r"^(\w+)=(\S+)", block, re.M))
    assert variables["OTEL_EXPORTER_OTLP_ENDPOINT"] == "https://api.honeycomb.io"
    variables["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url.removesuffix("/v1/traces")
    # WHEN the dev server runs with them (as `make dev` runs it; an upstream in place of the
    # embedded model) and answers a request
    with FakeUpstream([UpstreamReply(body=[text_stream("Hi")])]) as upstream:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'functions/streamgate'}",
               "STREAMGATE_PROVIDER": "openai", "STREAMGATE_UPSTREAM_BASE_URL": upstream.url,
               "OTEL_BSP_SCHEDULE_DELAY": "50", **variables}
        process = subprocess.Popen([sys.executable, "-m", "streamgate.devserver", "--port", "0"],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            port = int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))  # type: ignore[union-attr]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", CHAT, body=json.dumps(_stream(model="upstream-model")))
            assert sse_data(conn.getresponse().read())[-1] == "[DONE]"
            conn.close()
            # THEN its spans reach the endpoint with the backend's header
            spans = receiver.wait_for(2)
        finally:
            process.terminate()
            process.wait(10)
            assert process.stdout is not None
            process.stdout.close()
    assert receiver.requests[0].headers["x-honeycomb-team"] == "YOUR_KEY"
    assert {s.kind for s in spans} == {"SERVER", "CLIENT"}
    assert spans[0].resource["service.name"] == "streamgate"


_EXITS = """
from tests.helpers import body_bytes, chat_event, make_app
app = make_app(tracing=True, metrics=False)
response = app.handle(chat_event({"prompt": "hi", "stream": True}))
body_bytes(response)
response.close()
"""


def test_spans_still_queued_leave_when_the_process_exits(receiver: OtlpReceiver) -> None:
    # GIVEN a process whose batches would leave only after a minute
    # WHEN it answers one request and exits (the dev server stopped with Ctrl-C, say)
    done = subprocess.run(
        [sys.executable, "-c", _EXITS], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'functions/streamgate'}:{ROOT}",
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url,
             "OTEL_BSP_SCHEDULE_DELAY": "60000"})
    assert done.returncode == 0, done.stderr[-2000:]
    # THEN its spans were exported on the way out
    assert {s.kind for s in receiver.wait_for(2, timeout=1)} == {"SERVER", "CLIENT"}


def test_a_responses_api_answer_is_traced_as_a_chat_call_with_the_response_id(
        traced: Callable[..., App], receiver: OtlpReceiver) -> None:
    # GIVEN a traced app
    app = traced()
    # WHEN a client streams an answer through the Responses API
    response = app.handle(chat_event({"input": PROMPT, "stream": True},
                                     path="/v1/responses"))
    events = [json.loads(d) for d in sse_data(b"".join(response.body))]
    response.close()
    app.telemetry.flush(5)
    # THEN the request and its provider call are traced like a chat completion's, the call's
    # response id the one the client got
    server, (call,) = split(receiver.wait_for(2))
    (completed,) = [e for e in events if e["type"] == "response.completed"]
    assert server.name == "POST /v1/responses"
    assert (call.name, call.attributes["gen_ai.operation.name"]) == ("chat scripted-1", "chat")
    assert call.attributes["gen_ai.response.id"] == completed["response"]["id"]
    assert call.attributes["gen_ai.response.finish_reasons"] == ["stop"]


def test_an_embeddings_request_is_traced_as_an_embeddings_call_with_its_usage(
        traced: Callable[..., App], receiver: OtlpReceiver) -> None:
    from streamgate.routes import Router
    from tests.functional.test_embeddings import CountingEmbedder

    # GIVEN a traced app whose embedding backend counts 42 tokens
    settings = load_settings({}, provider="local", tracing=True, metrics=False)
    app = traced(App(settings, router=Router(settings, ScriptedProvider(),
                                              embedder=CountingEmbedder(42))))
    # WHEN a client embeds two inputs
    response = app.handle(chat_event({"model": "counted", "input": ["a", "b"]},
                                     path="/v1/embeddings"))
    assert response.status == 200
    b"".join(response.body)
    response.close()
    app.telemetry.flush(5)
    # THEN the call is an embeddings span with the backend's usage and no chat attributes
    server, (call,) = split(receiver.wait_for(2))
    assert server.name == "POST /v1/embeddings"
    assert (call.name, call.attributes["gen_ai.operation.name"]) == (
        "embeddings counted", "embeddings")
    assert call.attributes["gen_ai.usage.input_tokens"] == 42
    assert "gen_ai.response.finish_reasons" not in call.attributes
    assert "gen_ai.request.stream" not in call.attributes
