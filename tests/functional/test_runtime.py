"""The runtime loop against a fake Runtime API that records bytes, arrival times and trailers."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from streamgate.deadline import Deadline
from streamgate.errors import UpstreamError
from streamgate.handler import SECURITY_HEADERS, App, LambdaContext, Response
from streamgate.providers import Delta, Finish, TextDelta, Usage
from streamgate.runtime import run
from streamgate.validation import ChatRequest
from tests.fake_runtime_api import FakeRuntimeAPI, Posted
from tests.helpers import ScriptedProvider, chat_event, load_event, make_app, sse_json

NULS = b"\x00" * 8


def _env(api: FakeRuntimeAPI, **extra: str) -> dict[str, str]:
    return {"AWS_LAMBDA_RUNTIME_API": api.address, "AWS_LAMBDA_FUNCTION_NAME": "streamgate",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1024", "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/x",
            "AWS_LAMBDA_LOG_STREAM_NAME": "2026/11/21/[$LATEST]abc", **extra}


def _serve(app: App, events: list[dict[str, Any]], **kwargs: Any) -> FakeRuntimeAPI:
    api = FakeRuntimeAPI(events, **kwargs)
    assert run(app, environ=_env(api)) == 0  # ends when the fake answers 410
    api.close()
    return api


def _split(posted: Posted) -> tuple[dict[str, Any], list[bytes]]:
    first = posted.chunks[0][1]
    assert first.endswith(NULS) and first.count(b"\x00") == 8
    return json.loads(first[: -len(NULS)]), [data for _, data in posted.chunks[1:]]


def test_streamed_response_has_streaming_headers_prelude_and_one_event_per_chunk() -> None:
    api = _serve(make_app(ScriptedProvider(models=["gemma-3-270m"])),
                 [load_event("function-url-chat-stream.json")])
    (posted,) = api.posted
    assert posted.path == "/2018-06-01/runtime/invocation/req-1/response"
    assert posted.headers["lambda-runtime-function-response-mode"] == "streaming"
    assert posted.headers["transfer-encoding"] == "chunked"
    assert posted.headers["content-type"] == "application/vnd.awslambda.http-integration-response"
    assert posted.headers["trailer"] == (
        "Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body")
    prelude, events = _split(posted)
    assert prelude == {"statusCode": 200, "cookies": [], "headers": {
        "content-type": "text/event-stream", "cache-control": "no-cache",
        "x-accel-buffering": "no", **SECURITY_HEADERS, "x-request-id": "req-1",
        "x-streamgate-backend": "scripted"}}
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") and e.count(b"data: ") == 1
               for e in events)
    assert len(events) == 7  # 4 texts, finish, usage, [DONE]
    assert events[-1] == b"data: [DONE]\n\n"
    assert posted.trailers == {}


def test_events_reach_the_runtime_api_before_the_next_is_produced() -> None:
    # GIVEN a provider that waits for the fake Runtime API to have received each event
    api = FakeRuntimeAPI([chat_event({"prompt": "hi", "stream": True})])

    class Lockstep(ScriptedProvider):
        def stream(self, request: ChatRequest, model: str,
                   deadline: Deadline) -> Iterator[Delta]:
            for i, word in enumerate(["one", "two", "three"]):
                yield TextDelta(word)
                # prelude is chunk 1, so "one" is chunk 2, ...
                assert api.wait_for_chunks(i + 2), f"event {i} was buffered, not streamed"
            yield Finish("stop")

    # WHEN the loop streams it, THEN it completes (each wait above saw its chunk arrive)
    assert run(make_app(Lockstep()), environ=_env(api)) == 0
    api.close()
    _, events = _split(api.posted[0])
    assert events[-1] == b"data: [DONE]\n\n"
    times = [t for t, _ in api.posted[0].chunks]
    assert times == sorted(times)


def test_failure_mid_stream_sends_an_error_event_and_real_trailers() -> None:
    provider = ScriptedProvider([TextDelta("partial"), UpstreamError("model went away")])
    api = _serve(make_app(provider), [chat_event({"prompt": "hi", "stream": True})])
    (posted,) = api.posted
    _, events = _split(posted)
    assert sse_json(b"".join(events))[-1]["error"]["message"] == "model went away"
    assert b"[DONE]" not in b"".join(events)
    assert posted.trailers["Lambda-Runtime-Function-Error-Type"] == "Function.UpstreamError"
    body = json.loads(base64.b64decode(posted.trailers["Lambda-Runtime-Function-Error-Body"]))
    assert body == {"errorType": "Function.UpstreamError", "errorMessage": "model went away",
                    "stackTrace": []}


def test_error_response_before_the_first_byte_is_a_prelude_status_without_trailers() -> None:
    api = _serve(make_app(), [chat_event({"prompt": "", "stream": True})])
    (posted,) = api.posted
    prelude, events = _split(posted)
    assert prelude["statusCode"] == 400
    assert sse_json(b"".join(events))[0]["error"]["message"] == "Prompt cannot be empty"
    assert posted.trailers == {}


def test_handler_crash_before_any_byte_goes_to_the_error_endpoint() -> None:
    class Broken(App):
        def handle(self, event: Mapping[str, Any],
                   context: LambdaContext | None = None) -> Response:
            raise MemoryError("/var/task/streamgate/secret.py exploded")

    api = _serve(Broken(make_app().settings, ScriptedProvider()), [chat_event({"prompt": "x"})])
    (posted,) = api.posted
    assert posted.path == "/2018-06-01/runtime/invocation/req-1/error"
    assert posted.headers["lambda-runtime-function-error-type"] == "Function.MemoryError"
    body = json.loads(posted.body)
    assert body["errorType"] == "Function.MemoryError" and body["stackTrace"] == []
    assert "/var/task" not in body["errorMessage"]


def test_init_failure_goes_to_init_error_and_exits_non_zero() -> None:
    with FakeRuntimeAPI([chat_event({"prompt": "x"})]) as api:
        code = run(environ=_env(api, STREAMGATE_PROVIDER="nonsense"))
    assert code == 1
    (posted,) = api.posted
    assert posted.path == "/2018-06-01/runtime/init/error"
    assert posted.headers["lambda-runtime-function-error-type"] == "Runtime.ConfigError"
    assert "STREAMGATE_PROVIDER must be one of" in json.loads(posted.body)["errorMessage"]


@pytest.mark.parametrize(
    ("extra", "refused"),
    [({}, True), ({"STREAMGATE_AUTH": "none"}, True),
     ({"STREAMGATE_ALLOW_UNAUTHENTICATED": "true"}, False),
     ({"AWS_SAM_LOCAL": "true"}, False)],
)
def test_lambda_refuses_to_serve_without_auth_unless_told_to(
    extra: dict[str, str], refused: bool
) -> None:
    with FakeRuntimeAPI([chat_event({"prompt": "x"})]) as api:
        code = run(environ=_env(api, STREAMGATE_PROVIDER="openai",
                                STREAMGATE_UPSTREAM_BASE_URL="http://127.0.0.1:9/v1",
                                STREAMGATE_UPSTREAM_MODELS="m", **extra), max_invocations=0)
    assert code == (1 if refused else 0)
    if refused:
        (posted,) = api.posted
        assert posted.path == "/2018-06-01/runtime/init/error"
        assert "STREAMGATE_ALLOW_UNAUTHENTICATED=true" in json.loads(posted.body)["errorMessage"]
    else:
        assert api.posted == []


def test_generation_stops_before_the_deadline_with_an_explicit_error() -> None:
    # GIVEN 1.5 s until the deadline, a 1 s margin and a provider that needs 3 s
    provider = ScriptedProvider([TextDelta("a"), *[s for _ in range(30)
                                                   for s in (0.1, TextDelta("b"))],
                                 Finish("stop"), Usage(1, 31)])
    app = make_app(provider, deadline_margin_ms=1000)
    api = _serve(app, [chat_event({"prompt": "hi", "stream": True})], deadline_in_ms=1500)
    (posted,) = api.posted
    _, events = _split(posted)
    # THEN the stream ends early with a deadline error event and trailers, the provider closed
    assert sse_json(b"".join(events))[-1]["error"]["code"] == "deadline_exceeded"
    assert posted.trailers["Lambda-Runtime-Function-Error-Type"] == (
        "Function.DeadlineExceededError")
    assert provider.closed.is_set() and not provider.finished.is_set()
    assert len(events) < 15


def test_context_fields_and_trace_id_reach_the_handler() -> None:
    seen: dict[str, Any] = {}

    class Recording(App):
        def handle(self, event: Mapping[str, Any],
                   context: LambdaContext | None = None) -> Response:
            seen.update(vars(context))
            assert context is not None
            seen["remaining"] = context.get_remaining_time_in_millis()
            seen["trace"] = os.environ.get("_X_AMZN_TRACE_ID")
            return super().handle(event, context)

    _serve(Recording(make_app().settings, ScriptedProvider()), [chat_event({"prompt": "x"})],
           deadline_in_ms=30_000)
    assert seen["aws_request_id"] == "req-1"
    assert seen["invoked_function_arn"] == (
        "arn:aws:lambda:us-east-1:123456789012:function:streamgate")
    assert (seen["function_name"], seen["memory_limit_in_mb"]) == ("streamgate", 1024)
    assert (seen["log_group_name"], seen["log_stream_name"]) == (
        "/aws/x", "2026/11/21/[$LATEST]abc")
    assert 25_000 < seen["remaining"] <= 30_000
    assert seen["trace"].startswith("Root=1-5759e988-")


def test_several_invocations_are_served_in_turn() -> None:
    api = _serve(make_app(), [chat_event({"prompt": "a", "stream": True}),
                              chat_event({"prompt": "b"})])
    assert [p.path for p in api.posted] == [
        "/2018-06-01/runtime/invocation/req-1/response",
        "/2018-06-01/runtime/invocation/req-2/response"]
    _, events = _split(api.posted[1])
    assert json.loads(b"".join(events))["object"] == "chat.completion"


def test_sam_local_mode_posts_a_buffered_proxy_response() -> None:
    api = FakeRuntimeAPI([chat_event({"prompt": "hi", "stream": True})])
    assert run(make_app(), environ=_env(api, AWS_SAM_LOCAL="true")) == 0
    api.close()
    (posted,) = api.posted
    assert "transfer-encoding" not in posted.headers
    doc = json.loads(posted.body)
    assert doc["statusCode"] == 200
    assert doc["headers"]["content-type"] == "text/event-stream"
    assert doc["body"].endswith("data: [DONE]\n\n")
    assert sse_json(doc["body"].encode())[0]["choices"][0]["delta"]["content"] == "Hello"


def test_context_is_accepted_by_powertools_inject_lambda_context(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a handler decorated as Powertools users do, run by our loop's context object
    from aws_lambda_powertools import Logger

    logger = Logger(service="streamgate-test")
    seen: dict[str, Any] = {}

    class Logged(App):
        def handle(self, event: Mapping[str, Any],
                   context: LambdaContext | None = None) -> Response:
            @logger.inject_lambda_context
            def decorated(event: Mapping[str, Any], context: Any) -> Response:
                logger.info("inside")
                return super(Logged, self).handle(event, context)

            return decorated(event, context)  # type: ignore[no-any-return]

    # WHEN an invocation runs
    _serve(Logged(make_app().settings, ScriptedProvider()), [chat_event({"prompt": "x"})])
    # THEN Powertools logged the context's fields
    record = json.loads([line for line in capsys.readouterr().out.splitlines()
                         if '"inside"' in line][0])
    seen.update(record)
    assert seen["function_request_id"] == "req-1"
    assert seen["function_name"] == "streamgate"
    assert seen["function_memory_size"] == 1024
    assert seen["function_arn"].endswith(":function:streamgate")
