"""The runtime loop against a Runtime API that misbehaves: deadlines that are not numbers or
are already past, request ids an HTTP client refuses, events too large or not JSON, replies cut
short, /error answering 500, a connection reset mid-stream, a peer that stops reading. After
init, no failure of one invocation may end the loop: each is answered or reported, logged, and
the next invocation is served."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from streamgate.config import load_settings
from streamgate.credentials import ApiKey
from streamgate.handler import App
from streamgate.httpclient import Upstream
from streamgate.providers import Finish, TextDelta, Usage
from streamgate.providers.openai import OpenAIProvider
from streamgate.runtime import run
from tests.fake_openai import FakeUpstream, Reply, chunk, sse
from tests.fake_runtime_api import FakeRuntimeAPI, Invoke, Posted
from tests.helpers import ScriptedProvider, chat_event, make_app, sse_json

NULS = b"\x00" * 8
CHAT = chat_event({"prompt": "hi", "stream": True})


def _env(api: FakeRuntimeAPI) -> dict[str, str]:
    return {"AWS_LAMBDA_RUNTIME_API": api.address, "AWS_LAMBDA_FUNCTION_NAME": "streamgate"}


def _serve(app: App, events: list[Any], **kwargs: Any) -> tuple[int, FakeRuntimeAPI]:
    api = FakeRuntimeAPI(events, **kwargs)
    code = run(app, environ=_env(api))
    api.close()
    return code, api


def _prelude(posted: Posted) -> tuple[dict[str, Any], bytes]:
    first = posted.chunks[0][1]
    assert first.endswith(NULS)
    return json.loads(first[: -len(NULS)]), b"".join(data for _, data in posted.chunks[1:])


def _responses(api: FakeRuntimeAPI) -> list[Posted]:
    return [p for p in api.posted if p.path.endswith("/response")]


@pytest.mark.parametrize("deadline", ["soon", "inf", "1e400", "", None,
                                      str(int(time.time() * 1000) - 1000)],
                         ids=["word", "inf", "huge", "empty", "missing", "past"])
def test_an_unreadable_or_past_deadline_starts_no_model_call_and_the_loop_goes_on(
    deadline: str | None,
) -> None:
    # GIVEN an invocation whose deadline is not a usable number (or already over), then a
    # normal one
    provider = ScriptedProvider()
    code, api = _serve(make_app(provider), [
        Invoke(CHAT, headers={"Lambda-Runtime-Deadline-Ms": deadline}), CHAT])
    # THEN the first is answered 504 without admitting it or calling the model, and the
    # second is served as usual
    assert code == 0
    first, second = _responses(api)
    prelude, body = _prelude(first)
    assert prelude["statusCode"] == 504
    assert sse_json(body)[0]["error"]["code"] == "deadline_exceeded"
    assert _prelude(second)[0]["statusCode"] == 200
    assert len(provider.requests) == 1


@pytest.mark.parametrize("request_id", ["req 1", "req\x7f1", "../../init/error", "ä-1"])
def test_a_request_id_an_http_client_refuses_is_carried_percent_encoded(
    request_id: str,
) -> None:
    code, api = _serve(make_app(), [
        Invoke(CHAT, headers={"Lambda-Runtime-Aws-Request-Id": request_id}), CHAT])
    assert code == 0
    first, second = _responses(api)
    assert "/" not in first.path.removeprefix("/2018-06-01/runtime/invocation/").removesuffix(
        "/response")
    assert _prelude(first)[0]["statusCode"] == 200
    assert second.path == "/2018-06-01/runtime/invocation/req-2/response"


@pytest.mark.parametrize("how", ["short", "500"])
def test_a_broken_reply_to_the_response_does_not_end_the_loop(how: str) -> None:
    provider = ScriptedProvider()
    code, api = _serve(make_app(provider), [Invoke(CHAT, response=how), CHAT])
    assert code == 0
    assert len(_responses(api)) == 2
    assert _prelude(_responses(api)[1])[1].endswith(b"data: [DONE]\n\n")
    assert len(provider.requests) == 2


def test_a_reset_mid_stream_frees_the_model_and_records_the_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a long stream, and a Runtime API that drops the connection after 3 chunks
    provider = ScriptedProvider([TextDelta("a"), *[s for _ in range(200)
                                                   for s in (0.005, TextDelta("b"))],
                                 Finish("stop"), Usage(1, 201)])
    code, api = _serve(make_app(provider), [Invoke(CHAT, response="reset-after-3"), CHAT])
    # THEN generation stopped, the request was logged, and the next invocation was served
    assert code == 0
    assert provider.closed.is_set()
    assert len(_responses(api)) == 2
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith('{"level"') and '"message":"request"' in line]
    assert len(records) == 2


def test_an_error_endpoint_answering_500_does_not_end_the_loop() -> None:
    big = b'{"body": "' + b"x" * (17 << 20) + b'"}'  # past the 16 MiB event limit
    code, api = _serve(make_app(), [Invoke(big, error="500"), CHAT])
    assert code == 0
    error, response = api.posted
    assert error.path == "/2018-06-01/runtime/invocation/req-1/error"
    assert error.headers["lambda-runtime-function-error-type"] == "Runtime.InvalidEvent"
    assert _prelude(response)[0]["statusCode"] == 200


def test_an_event_that_is_not_json_is_answered_400() -> None:
    code, api = _serve(make_app(), [Invoke(b"{not json", ), CHAT])
    assert code == 0
    first, second = _responses(api)
    assert _prelude(first)[0]["statusCode"] == 400
    assert _prelude(second)[0]["statusCode"] == 200


def test_the_lambda_deadline_ends_a_stream_an_upstream_keeps_alive() -> None:
    # GIVEN an upstream that sends a token and then only keep-alive comments, and an
    # invocation with 1.5 s left and a 0.5 s margin
    body: list[bytes | float] = [sse(chunk("a", role="assistant"), done=False)]
    body += [0.1, b": keep-alive\n\n"] * 100
    with FakeUpstream([Reply(body=body)]) as fake:
        s = load_settings({}, provider="openai", upstream_base_url=fake.url,
                          upstream_models=("m",), deadline_margin_ms=500)
        provider = OpenAIProvider(s, ApiKey(None, 60), Upstream(fake.url, 5))
        started = time.monotonic()
        code, api = _serve(App(s, provider), [chat_event(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})],
            deadline_in_ms=1500)
        waited = time.monotonic() - started
        provider.close()
    # THEN the stream ends before the deadline with our event and real trailers
    (posted,) = _responses(api)
    assert sse_json(_prelude(posted)[1])[-1]["error"]["code"] == "deadline_exceeded"
    assert posted.trailers["Lambda-Runtime-Function-Error-Type"] == (
        "Function.DeadlineExceededError")
    error = json.loads(base64.b64decode(posted.trailers["Lambda-Runtime-Function-Error-Body"]))
    assert error["errorType"] == "Function.DeadlineExceededError"
    assert waited < 3


def test_a_runtime_api_that_stops_reading_cannot_hold_the_loop_past_the_deadline() -> None:
    # GIVEN a 40 MB answer, a 0.5 s deadline, and a Runtime API that reads nothing after the
    # prelude (the fake sleeps in its chunk reader)
    provider = ScriptedProvider([*(TextDelta("y" * 65536) for _ in range(640)),
                                 Finish("stop"), Usage(1, 1)])
    api = FakeRuntimeAPI([Invoke(CHAT, response="stall-after-1"), CHAT], deadline_in_ms=500)
    started = time.monotonic()
    code = run(make_app(provider, deadline_margin_ms=0), environ=_env(api))
    api.close()
    # THEN the write gives up a few seconds after the deadline and the loop goes on
    assert code == 0
    assert time.monotonic() - started < 20
    assert len(_responses(api)) == 2
