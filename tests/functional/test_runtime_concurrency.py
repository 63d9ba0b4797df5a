"""The runtime loop with AWS_LAMBDA_MAX_CONCURRENCY > 1 (Lambda Managed Instances): worker
threads in one process, each holding its own GET next poll, serving concurrent streams against
a fake Runtime API that hands several invocations out at the same moment."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from streamgate import runtime, telemetry
from streamgate.config import LambdaEnvironment, trace_id
from streamgate.deadline import Deadline
from streamgate.errors import UpstreamError
from streamgate.handler import App, LambdaContext, Response
from streamgate.providers import Delta, Finish, TextDelta, Usage
from streamgate.runtime import run
from streamgate.runtime_api import Invocation
from streamgate.validation import ChatRequest
from tests.fake_runtime_api import FakeRuntimeAPI, Invoke, Posted
from tests.helpers import ScriptedProvider, Step, chat_event, make_app, replay, sse_json

NULS = b"\x00" * 8


def _env(api: FakeRuntimeAPI, workers: int) -> dict[str, str]:
    return {"AWS_LAMBDA_RUNTIME_API": api.address, "AWS_LAMBDA_FUNCTION_NAME": "streamgate",
            "AWS_LAMBDA_MAX_CONCURRENCY": str(workers)}


def _chat(prompt: str) -> dict[str, Any]:
    return chat_event({"prompt": prompt, "stream": True,
                       "stream_options": {"include_usage": True}})


class ByPrompt(ScriptedProvider):
    """A script per prompt, so each concurrent request streams its own words and fate."""

    def __init__(self, scripts: Mapping[str, list[Step]]) -> None:
        super().__init__()
        self.scripts = dict(scripts)
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0  # the most streams ever in the provider at once

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        prompt = request.messages[-1].content
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            yield from replay(self.scripts[prompt], deadline)
        finally:
            with self.lock:
                self.active -= 1


def _paced(words: list[str], pause: float = 0.05) -> list[Step]:
    """Words ``pause`` apart, as a model streams, then stop and usage."""
    steps: list[Step] = []
    for word in words:
        steps += [pause, TextDelta(word)]
    return [*steps, Finish("stop"), Usage(3, len(words))]


def _split(posted: Posted) -> tuple[dict[str, Any], list[bytes]]:
    first = posted.chunks[0][1]
    assert first.endswith(NULS) and first.count(b"\x00") == 8
    return json.loads(first[: -len(NULS)]), [data for _, data in posted.chunks[1:]]


def _normalised(raw: bytes) -> bytes:
    """The stream with its completion id and creation time (random per request) fixed."""
    raw = re.sub(rb'"id":"chatcmpl-[^"]+"', b'"id":"chatcmpl-X"', raw)
    return re.sub(rb'"created":\d+', b'"created":0', raw)


def _reference(app: App, event: dict[str, Any]) -> bytes:
    """What the pipeline writes for ``event`` alone, one request at a time."""
    response = app.handle(event)
    try:
        return b"".join(response.body)
    finally:
        response.close()


def test_workers_hold_several_polls_and_stream_side_by_side_byte_exact() -> None:
    # GIVEN four requests, each streaming its own words 50 ms apart, and a Runtime API that
    # hands out nothing until four GET next polls are open at once
    words = {f"p{i}": [f"w{i}.{j} " for j in range(12)] for i in range(4)}
    provider = ByPrompt({p: _paced(w) for p, w in words.items()})
    app = make_app(provider)
    api = FakeRuntimeAPI([_chat(p) for p in words], hold_until_polls=4)
    # WHEN four workers serve them
    started = time.monotonic()
    assert run(app, environ=_env(api, 4)) == 0
    took = time.monotonic() - started
    api.close()
    # THEN four polls were open together and the four streams ran at the same time
    assert api.max_waiting >= 4
    assert provider.most_active == 4
    assert took < 4 * 12 * 0.05  # less than one after the other would take
    responses = [api.response_of(f"req-{i}") for i in range(1, 5)]
    spans = [(p.chunks[0][0], p.chunks[-1][0]) for p in responses]
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans  # overlapping in time
    # AND their chunks arrived interleaved, not one stream after another
    order = sorted((t, n) for n, p in enumerate(responses) for t, _ in p.chunks)
    switches = sum(1 for a, b in zip(order, order[1:], strict=False) if a[1] != b[1])
    assert switches >= 3 * len(responses), switches
    for posted in responses:
        prelude, events = _split(posted)
        assert prelude["statusCode"] == 200
        # AND each stream is incremental: one event per chunk, spread over the stream's time
        assert all(e.startswith(b"data: ") and e.count(b"data: ") == 1 for e in events)
        times = [t for t, _ in posted.chunks[1:]]
        assert times[-1] - times[0] >= 10 * 0.05 * 0.8
        # AND byte-exact: what the pipeline writes for that request alone
        prompt = json.loads(api_event_body(posted, api))["prompt"]
        assert _normalised(b"".join(events)) == _normalised(
            _reference(make_app(ByPrompt({prompt: _paced(words[prompt], 0.0)})),
                       _chat(prompt)))
        assert posted.trailers == {}


def api_event_body(posted: Posted, api: FakeRuntimeAPI) -> str:
    """The request body of the invocation ``posted`` answers."""
    request_id = posted.path.split("/")[-2]
    return str(api._invokes[request_id].event["body"])


def test_a_failure_in_one_stream_leaves_the_others_intact_each_with_its_own_trailers() -> None:
    # GIVEN three concurrent requests: one whose model fails mid-stream, one that runs into
    # its deadline (2 s left, a 1 s margin, a model needing 3 s), and one that goes well
    scripts = {
        "fails": [TextDelta("partial"), 0.3, UpstreamError("model went away")],
        "slow": [TextDelta("a"), *[s for _ in range(30) for s in (0.1, TextDelta("b"))],
                 Finish("stop"), Usage(1, 31)],
        "fine": _paced([f"word{j} " for j in range(20)]),
    }
    provider = ByPrompt(scripts)
    app = make_app(provider, deadline_margin_ms=1000)
    deadline = str(int(time.time() * 1000) + 2000)
    api = FakeRuntimeAPI([
        _chat("fails"),
        Invoke(_chat("slow"), headers={"Lambda-Runtime-Deadline-Ms": deadline}),
        _chat("fine")], hold_until_polls=3)
    # WHEN three workers serve them side by side
    assert run(app, environ=_env(api, 3)) == 0
    api.close()
    assert provider.most_active == 3
    failed, late, fine = (api.response_of(f"req-{i}") for i in (1, 2, 3))
    # THEN the failing stream ends with its error event and its own trailers
    _, events = _split(failed)
    assert sse_json(b"".join(events))[-1]["error"]["message"] == "model went away"
    assert failed.trailers["Lambda-Runtime-Function-Error-Type"] == "Function.UpstreamError"
    body = json.loads(base64.b64decode(failed.trailers["Lambda-Runtime-Function-Error-Body"]))
    assert body["errorMessage"] == "model went away"
    # AND the late one with the deadline's event and trailers
    _, events = _split(late)
    assert sse_json(b"".join(events))[-1]["error"]["code"] == "deadline_exceeded"
    assert late.trailers["Lambda-Runtime-Function-Error-Type"] == (
        "Function.DeadlineExceededError")
    # AND the third is whole, byte for byte, without trailers
    _, events = _split(fine)
    assert _normalised(b"".join(events)) == _normalised(_reference(
        make_app(ByPrompt({"fine": _paced([f"word{j} " for j in range(20)], 0.0)})),
        _chat("fine")))
    assert fine.trailers == {}


def test_every_request_is_logged_and_counted_once_with_its_own_ids(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN 24 requests for 8 workers, each group of 8 finishing at the same moment (so their
    # log records and metrics are written side by side)
    barrier = threading.Barrier(8, timeout=10)

    class Together(ScriptedProvider):
        def stream(self, request: ChatRequest, model: str,
                   deadline: Deadline) -> Iterator[Delta]:
            yield TextDelta(request.messages[-1].content)
            barrier.wait()
            yield Finish("stop")
            yield Usage(2, int(request.messages[-1].content.removeprefix("n")))

    app = make_app(Together(), metrics=True)
    api = FakeRuntimeAPI([_chat(f"n{i}") for i in range(1, 25)], hold_until_polls=8)
    capsys.readouterr()
    # WHEN eight workers serve them
    assert run(app, environ=_env(api, 8)) == 0
    api.close()
    out = capsys.readouterr().out
    # THEN every line is one whole JSON document: no record or blob spliced into another
    lines = [line for line in out.splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]
    records = [d for d in docs if d.get("message") == "request"]
    blobs = [d for d in docs if "_aws" in d and "Requests" in d]
    statuses = [d for d in docs if "_aws" in d and "Responses" in d]
    expected = {f"req-{i}" for i in range(1, 25)}
    # AND exactly one request record per invocation, none lost or doubled, each with its own
    # request id, trace id and output tokens
    assert sorted(r["request_id"] for r in records) == sorted(expected)
    for record in records:
        n = int(record["request_id"].removeprefix("req-"))
        assert record["function_request_id"] == record["request_id"]
        assert record["xray_trace_id"] == f"1-5759e988-bd862e3fe1be46a99427{n:04d}"
    # AND exactly one metric set per invocation, each with that request's numbers alone
    assert sorted(b["request_id"] for b in blobs) == sorted(expected)
    for blob in blobs:
        # the fake hands the events out in order: req-<k> asked "n<k>" and used k tokens
        k = float(blob["request_id"].removeprefix("req-"))
        assert (blob["Requests"], blob["InputTokens"], blob["OutputTokens"]) == (
            [1.0], [2.0], [k])
    assert len(statuses) == 24


def test_each_invocation_sees_its_own_trace_id_and_none_is_process_wide() -> None:
    # GIVEN two invocations that are inside the handler at the same moment
    barrier = threading.Barrier(2, timeout=10)
    seen: dict[str, tuple[str | None, str | None]] = {}

    class Recording(App):
        def handle(self, event: Mapping[str, Any], context: LambdaContext | None = None,
                   **kwargs: Any) -> Response:
            assert context is not None
            barrier.wait()  # both requests are being served now
            seen[context.aws_request_id] = (trace_id(), os.environ.get("_X_AMZN_TRACE_ID"))
            barrier.wait()
            return super().handle(event, context, **kwargs)

    api = FakeRuntimeAPI([_chat("a"), _chat("b")], hold_until_polls=2)
    # WHEN two workers serve them
    assert run(Recording(make_app().settings, ScriptedProvider()),
               environ=_env(api, 2)) == 0
    api.close()
    # THEN each read its own invocation's trace header, and the process-wide variable is unset
    assert seen == {
        "req-1": ("Root=1-5759e988-bd862e3fe1be46a994270001;Sampled=1", None),
        "req-2": ("Root=1-5759e988-bd862e3fe1be46a994270002;Sampled=1", None)}


def test_the_runtime_api_saying_stop_lets_a_stream_in_flight_finish() -> None:
    # GIVEN three workers: one serving a slow stream, two waiting in GET next
    provider = ByPrompt({"slow": _paced([f"w{j} " for j in range(10)], 0.1)})
    api = FakeRuntimeAPI([_chat("slow")])
    api.hold_when_empty.clear()
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(run(make_app(provider),
                                                             environ=_env(api, 3))))
    loop.start()
    assert api.wait_for_chunks(2, request_id="req-1")
    # WHEN the Runtime API tells the waiting two to stop (410) while the stream runs
    api.hold_when_empty.set()
    loop.join(20)
    api.close()
    # THEN the loop ends with status 0, and the stream in flight was not cut: it ran to [DONE]
    assert not loop.is_alive() and result == [0]
    _, events = _split(api.response_of("req-1"))
    assert events[-1] == b"data: [DONE]\n\n"
    assert len(events) == 13  # ten words, finish, usage, [DONE]


def test_next_breaking_in_one_worker_stops_all_after_the_streams_in_flight() -> None:
    # GIVEN three workers: one serving a slow stream, two waiting in GET next for events that
    # never come; then the Runtime API breaks (it answers the next poll with garbage)
    provider = ByPrompt({"slow": _paced([f"w{j} " for j in range(10)], 0.1)})
    api = FakeRuntimeAPI([_chat("slow")])
    api.hold_when_empty.clear()
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(run(make_app(provider),
                                                             environ=_env(api, 3))))
    loop.start()
    assert api.wait_for_chunks(2, request_id="req-1")
    api.broken = True
    # WHEN the streaming worker finishes and polls again, into the broken API
    loop.join(20)
    api.close()
    # THEN the loop ended with status 1 within seconds: the two waiting polls were cut, not
    # waited out (the fake holds them 30 s)
    assert not loop.is_alive() and result == [1]
    # AND the stream that was in flight is whole
    _, events = _split(api.response_of("req-1"))
    assert events[-1] == b"data: [DONE]\n\n"


def test_an_init_failure_is_reported_once_and_no_worker_starts() -> None:
    with FakeRuntimeAPI([_chat("x")]) as api:
        code = run(environ={**_env(api, 8), "STREAMGATE_PROVIDER": "nonsense"})
    assert code == 1
    assert [p.path for p in api.posted] == ["/2018-06-01/runtime/init/error"]
    assert api.next_times == []


def test_a_stop_never_drops_an_invocation_whose_answer_has_begun_to_arrive() -> None:
    # GIVEN eight workers and seven invocations handed out together, each answer held after
    # its status line; the eighth poll is answered 410 once all seven have begun to arrive
    release = threading.Event()
    api = FakeRuntimeAPI([Invoke(_chat(f"p{i}"), rest_after=release) for i in range(7)],
                         hold_until_polls=8)
    api.hold_when_empty.clear()
    loop, result = _running(make_app(), api, workers=8)
    assert api.wait_for_begun(7)
    # WHEN the 410 stops every worker while the seven answers are arriving
    api.hold_when_empty.set()
    time.sleep(1)  # the stop reaches every client: whatever it would cut, it has cut
    release.set()
    loop.join(20)
    api.close()
    # THEN the loop ended with 0, and every invocation whose answer had begun got its response
    assert not loop.is_alive() and result == [0]
    assert sorted(p.path.split("/")[-2] for p in api.posted) == sorted(api.begun)
    assert len(api.begun) == 7
    assert all(p.path.endswith("/response") for p in api.posted)


def test_another_workers_failed_poll_does_not_cut_an_answer_caught_arriving() -> None:
    # GIVEN two workers: one's poll has read the status line of an invocation's answer (the
    # headers and event held back), the other's poll is waiting
    release = threading.Event()
    api = FakeRuntimeAPI([Invoke(_chat("held"), rest_after=release)])
    api.hold_when_empty.clear()
    loop, result = _running(make_app(), api, workers=2)
    assert api.wait_for_begun(1)
    # WHEN the other poll fails (the Runtime API answers it with garbage), which stops every
    # worker, and only then the rest of the first answer arrives
    api.broken = True
    api.hold_when_empty.set()
    time.sleep(1)  # the stop reaches every client: whatever it would cut, it has cut
    release.set()
    loop.join(20)
    api.close()
    # THEN the loop exits 1 (next broke), and the invocation that was arriving was served
    assert not loop.is_alive() and result == [1]
    _, events = _split(api.response_of("req-1"))
    assert events[-1] == b"data: [DONE]\n\n"


def test_an_exception_escaping_one_workers_loop_stops_all_after_the_streams_in_flight(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN three workers: one streaming slowly, one whose invocation meets a SystemExit (a
    # library calling sys.exit(): not an Exception, so no invocation's handling catches it),
    # one waiting in GET next
    provider = ByPrompt({"slow": _paced([f"w{j} " for j in range(10)], 0.1),
                         "exits": [SystemExit(3)]})
    api = FakeRuntimeAPI([_chat("slow"), _chat("exits")], hold_until_polls=3)
    api.hold_when_empty.clear()
    capsys.readouterr()
    # WHEN the loop runs (an exception escaping a thread would fail this test: pytest turns
    # it into an error)
    started = time.monotonic()
    loop, result = _running(make_app(provider), api, workers=3)
    loop.join(20)
    api.close()
    # THEN the loop ended with status 1 within seconds: the waiting poll was cut, not waited
    # out (the fake holds it 30 s)
    assert not loop.is_alive() and result == [1]
    assert time.monotonic() - started < 10
    # AND the invocation that met it got its /error, naming the exception and no more
    (error,) = [p for p in api.posted if p.path.endswith("/error")]
    assert error.path == "/2018-06-01/runtime/invocation/req-2/error"
    assert json.loads(error.body) == {
        "errorType": "Function.SystemExit",
        "errorMessage": "SystemExit (details in the function's log)", "stackTrace": []}
    # AND the stream in flight ran to its end
    _, events = _split(api.response_of("req-1"))
    assert events[-1] == b"data: [DONE]\n\n"
    # AND the log says which worker failed, and why
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("{")]
    (failed,) = [r for r in records if r.get("message", "").startswith("runtime worker")]
    assert failed["level"] == "ERROR" and "SystemExit" in failed["exception"]


def test_an_exit_mid_stream_still_ends_that_body_with_trailers_then_stops_the_loop() -> None:
    # GIVEN two workers: one invocation whose model call meets a SystemExit after its first
    # words (its 200 committed), the other worker waiting in GET next
    provider = ByPrompt({"exits": [TextDelta("partial"), 0.05, SystemExit(3)]})
    api = FakeRuntimeAPI([_chat("exits")])
    api.hold_when_empty.clear()
    # WHEN the loop runs
    loop, result = _running(make_app(provider), api, workers=2)
    loop.join(20)
    api.close()
    # THEN the body was ended properly, with trailers saying it failed, and the loop ended 1
    assert not loop.is_alive() and result == [1]
    posted = api.response_of("req-1")
    prelude, events = _split(posted)
    assert prelude["statusCode"] == 200 and b"partial" in b"".join(events)
    assert posted.trailers["Lambda-Runtime-Function-Error-Type"] == "Runtime.ResponseFailed"
    assert not [p for p in api.posted if p.path.endswith("/error")]


def test_one_workers_response_failing_leaves_the_other_streams_whole_and_the_loop_serving(
) -> None:
    # GIVEN three streams side by side, the Runtime API resetting the second one's /response
    # after 3 chunks, and a fourth invocation after them
    words = {f"p{i}": [f"w{i}.{j} " for j in range(12)] for i in range(4)}
    provider = ByPrompt({p: _paced(w) for p, w in words.items()})
    api = FakeRuntimeAPI([_chat("p0"), Invoke(_chat("p1"), response="reset-after-3"),
                          _chat("p2"), _chat("p3")], hold_until_polls=3)
    # WHEN three workers serve them
    assert run(make_app(provider), environ=_env(api, 3)) == 0
    api.close()
    # THEN the reset stream was cut short, its model call closed, and it got no /error (its
    # response had begun)
    assert len(api.response_of("req-2").chunks) == 3
    assert provider.active == 0
    assert not [p for p in api.posted if p.path.endswith("/error")]
    # AND every other stream, the one served after the failure included, is whole and
    # byte-exact
    assert provider.most_active == 3
    for n, prompt in ((1, "p0"), (3, "p2"), (4, "p3")):
        posted = api.response_of(f"req-{n}")
        _, events = _split(posted)
        assert _normalised(b"".join(events)) == _normalised(
            _reference(make_app(ByPrompt({prompt: _paced(words[prompt], 0.0)})),
                       _chat(prompt)))
        assert posted.trailers == {}


def _running(app: App, api: FakeRuntimeAPI, *, workers: int) -> tuple[threading.Thread,
                                                                       list[int]]:
    """The loop, started on a thread of its own; its exit status lands in the list."""
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(run(app, environ=_env(api, workers))))
    loop.start()
    return loop, result


def test_an_oversized_event_is_reported_even_when_a_stop_comes_while_it_arrives() -> None:
    # GIVEN a 16 MiB + 1 event among seven, for eight workers, the eighth poll told to stop
    events: list[Any] = [_chat(f"p{i}") for i in range(7)]
    events.insert(3, Invoke(b"x" * ((16 << 20) + 1)))
    with FakeRuntimeAPI(events, hold_until_polls=8) as api:
        # WHEN the loop runs until the stop
        assert run(make_app(), environ=_env(api, 8)) == 0
        posted = {p.path.split("/")[-2]: p.path.rsplit("/", 1)[-1] for p in api.posted}
    # THEN the oversized one got its /error (it had arrived), the others their responses
    assert posted.pop("req-4") == "error"
    assert sorted(posted.values()) == ["response"] * 7


def test_run_always_returns_when_a_stop_meets_polls_still_connecting() -> None:
    # GIVEN 64 workers whose first poll is answered 410 at once, while the Runtime API holds
    # every other poll for an hour (some of them still connecting when the stop comes)
    class Handler(_CountingPolls):
        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            if self.count() == 1:
                self.send_response(410)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            time.sleep(3600)

    # WHEN the loop runs, eight times
    # THEN it returned every time: no poll connecting at the stop was left waiting
    assert _runs_left_blocked(Handler, workers=64, runs=8) == 0


def test_lines_a_worker_logs_between_invocations_carry_no_earlier_trace_id(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a worker thread that has served a traced invocation
    class Client:
        def stream_response(self, *args: Any, **kwargs: Any) -> None:
            pass

    def worker() -> None:
        telemetry.logger()
        invocation = Invocation(
            "req-1", int(time.time() * 1000) + 60_000, "",
            "Root=1-5759e988-bd862e3fe1be46a994270001;Sampled=1", None, None,
            json.dumps(_chat("a")).encode())
        runtime._invoke(Client(), make_app(), LambdaEnvironment(runtime_api="127.0.0.1:9"),  # type: ignore[arg-type]
                        invocation, concurrent=True)
        # WHEN it logs a line of its own before its next invocation
        logging.getLogger("streamgate.runtime").error("invocation req-2 cannot be served")

    capsys.readouterr()
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    # THEN that line names neither the earlier request nor its trace
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("{")]
    [line] = [r for r in records if r.get("message") == "invocation req-2 cannot be served"]
    assert line.get("xray_trace_id") is None
    assert line.get("function_request_id") is None


def test_a_poll_retried_after_a_cut_short_answer_can_still_be_stopped() -> None:
    # GIVEN two workers and a Runtime API that cuts the first answer short (Content-Length
    # 1000, 7 bytes, closed), answers the other worker's poll 410 half a second later, and
    # holds every later poll for an hour: the retry of the cut poll is waiting at the stop
    class Handler(_CountingPolls):
        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            n = self.count()
            if n == 1:
                self.send_response(200)
                self.send_header("Lambda-Runtime-Aws-Request-Id", "cut")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"a": 1')
                self.close_connection = True
            elif n == 2:
                time.sleep(0.5)
                self.send_response(410)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
            else:
                time.sleep(3600)

    # WHEN the loop runs, three times
    # THEN the 410 stopped the loop every time, the retried poll included
    assert _runs_left_blocked(Handler, workers=2, runs=3) == 0


class _CountingPolls(BaseHTTPRequestHandler):
    """A scripted Runtime API: ``count()`` numbers this GET next among the run's polls."""

    protocol_version = "HTTP/1.1"
    polls = 0
    lock = threading.Lock()

    def count(self) -> int:
        cls = type(self)
        with cls.lock:
            cls.polls += 1
            return cls.polls

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def _runs_left_blocked(handler: type[_CountingPolls], workers: int, runs: int) -> int:
    """In how many of ``runs`` runs of the loop against a Runtime API answering with
    ``handler`` (its ``polls`` count reset each run) ``run()`` had not returned within 10 s."""
    blocked = 0
    for _ in range(runs):
        handler.polls = 0
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = {"AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{server.server_port}",
               "AWS_LAMBDA_MAX_CONCURRENCY": str(workers)}
        loop = threading.Thread(target=lambda env=env: run(make_app(), environ=env),
                                daemon=True)
        loop.start()
        loop.join(10)
        blocked += loop.is_alive()
        server.shutdown()
        server.server_close()
    return blocked
