"""The OpenAI-compatible upstream provider against a scripted upstream: relay fidelity, the
request it forwards, and every error row (status before the first byte, event after it)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from streamgate import deadline
from streamgate.config import load_settings
from streamgate.credentials import ApiKey
from streamgate.deadline import Deadline
from streamgate.errors import DeadlineExceededError
from streamgate.handler import App
from streamgate.providers.openai import OpenAIProvider, Upstream
from tests.fake_http import start_server
from tests.fake_openai import (
    FakeUpstream,
    Reply,
    chunk,
    completion_reply,
    error_reply,
    sse,
    text_stream,
)
from tests.helpers import body_bytes, chat_event, sse_json

JSON = {"accept": "application/json"}
USER = [{"role": "user", "content": "hi"}]
_providers: list[OpenAIProvider] = []


@pytest.fixture(autouse=True)
def _close_providers() -> Iterator[None]:
    yield
    while _providers:
        _providers.pop().close()  # pooled keep-alive connections


def _app(fake: FakeUpstream | str, *, key: str = "sk-test-key", **settings: Any) -> App:
    url = fake if isinstance(fake, str) else fake.url
    s = load_settings({}, provider="openai", upstream_base_url=url,
                      **{"upstream_backoff_s": 0.01, **settings})
    provider = OpenAIProvider(s, ApiKey(None, 60, value=key),
                              Upstream(url, s.upstream_connect_timeout_s))
    _providers.append(provider)
    return App(s, provider)


def _stream(app: App, body: dict[str, Any]) -> tuple[int, bytes]:
    response = app.handle(chat_event({**body, "stream": True}))
    return response.status, body_bytes(response)


def _deltas(raw: bytes) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in sse_json(raw) if c.get("choices")]


def test_text_stream_is_re_emitted_as_our_chunks() -> None:
    with FakeUpstream([Reply(body=[text_stream("Hel", "lo")])]) as fake:
        status, raw = _stream(_app(fake, upstream_models=("fast=upstream-model",)),
                              {"model": "fast", "messages": USER,
                               "stream_options": {"include_usage": True}})
    chunks = sse_json(raw)
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} != {"chatcmpl-upstream"}
    assert {c["model"] for c in chunks} == {"fast"}  # our name, not the upstream's
    assert _deltas(raw) == [{"role": "assistant", "content": "Hel"}, {"content": "lo"}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3,
                                   "total_tokens": 10}
    assert fake.chat_requests()[0]["model"] == "upstream-model"


def test_only_contract_parameters_are_forwarded() -> None:
    with FakeUpstream([Reply(body=[text_stream("ok")])]) as fake:
        _app(fake).handle(chat_event({
            "model": "upstream-model", "stream": True,
            "messages": [{"role": "system", "content": "Be brief."}, *USER],
            "max_completion_tokens": 20, "temperature": 0.2, "top_p": 0.9, "stop": "END",
            "seed": 3, "user": "u-1", "frequency_penalty": 0.1, "presence_penalty": 0.2,
            "tools": [{"type": "function", "function": {"name": "f", "strict": True}}],
            "tool_choice": "required", "parallel_tool_calls": False,
            "metadata": {"not": "forwarded"}, "store": True}))
        path, headers, sent = fake.requests[-1]
    assert path == "/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-test-key"
    assert sent == {
        "model": "upstream-model",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "hi"}],
        "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": 20, "temperature": 0.2, "top_p": 0.9, "stop": ["END"], "seed": 3,
        "user": "u-1", "frequency_penalty": 0.1, "presence_penalty": 0.2,
        "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "f", "strict": True}}],
        "tool_choice": "required",
    }


def test_tool_history_and_images_are_forwarded_in_openai_form() -> None:
    history = [
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "look", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
    ]
    with FakeUpstream([completion_reply("A cat.")]) as fake:
        _app(fake).handle(chat_event({"model": "upstream-model", "messages": history,
                                      "tools": [{"type": "function",
                                                 "function": {"name": "look"}}],
                                      "tool_choice": {"type": "function",
                                                      "function": {"name": "look"}}}))
    sent = fake.chat_requests()[0]
    assert sent["messages"] == history
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "look"}}


def test_tool_calls_keep_their_index_and_name_arrives_once() -> None:
    def fragment(index: int, arguments: str) -> dict[str, Any]:
        # like some servers, repeat id and name on every fragment
        return {"index": index, "id": f"call_{index}", "type": "function",
                "function": {"name": "get_weather", "arguments": arguments}}
    body = sse(chunk(role="assistant", tool_calls=[fragment(0, "")]),
               chunk(tool_calls=[fragment(0, '{"city":')]),
               chunk(tool_calls=[fragment(0, ' "Oslo"}')]),
               chunk(tool_calls=[fragment(1, '{"city": "Rome"}')]),
               chunk(finish="tool_calls"))
    with FakeUpstream([Reply(body=[body])]) as fake:
        status, raw = _stream(_app(fake), {"model": "upstream-model", "messages": USER})
    assert _deltas(raw) == [
        {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                              "function": {"name": "get_weather",
                                                           "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]},
        {"tool_calls": [{"index": 1, "id": "call_1", "type": "function",
                         "function": {"name": "get_weather",
                                      "arguments": '{"city": "Rome"}'}}]},
        {},
    ]
    assert sse_json(raw)[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_non_streaming_request_is_relayed_as_one_completion() -> None:
    reply = completion_reply(
        "Answer.", finish="length", reasoning_content="Think.",
        tool_calls=[{"id": "call_9", "type": "function",
                     "function": {"name": "f", "arguments": '{"a": 1}'}}],
        usage={"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
               "prompt_tokens_details": {"cached_tokens": 3}})
    with FakeUpstream([reply]) as fake:
        doc = json.loads(body_bytes(_app(fake).handle(chat_event(
            {"model": "upstream-model", "messages": USER}))))
    assert fake.chat_requests()[0]["stream"] is False
    assert "stream_options" not in fake.chat_requests()[0]
    assert doc["id"] != "chatcmpl-upstream"
    assert doc["choices"][0]["message"] == {
        "role": "assistant", "content": "Answer.", "refusal": None,
        "reasoning_content": "Think.",
        "tool_calls": [{"id": "call_9", "type": "function",
                        "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                            "prompt_tokens_details": {"cached_tokens": 3}}


def test_missing_usage_is_never_invented() -> None:
    with FakeUpstream([Reply(body=[text_stream("x", usage=None)]),
                       completion_reply("x")]) as fake:
        app = _app(fake)
        _, raw = _stream(app, {"model": "upstream-model", "messages": USER,
                               "stream_options": {"include_usage": True}})
        doc = json.loads(body_bytes(app.handle(chat_event(
            {"model": "upstream-model", "messages": USER}))))
    assert all("usage" not in c or c["usage"] is None for c in sse_json(raw))
    assert "usage" not in doc


@pytest.mark.parametrize("eol", ["\r", "\r\n", "\n"], ids=["cr", "crlf", "lf"])
def test_any_spec_line_ending_and_multi_line_data_are_decoded(eol: str) -> None:
    # One JSON object split over two data: lines (joined with LF, still valid JSON), a
    # comment line, and pieces cut at arbitrary byte boundaries.
    split = json.dumps(chunk("Hello")).replace(', "choices"', f'{eol}data: , "choices"', 1)
    raw_body = (f": keep-alive{eol}" + f"data: {split}{eol}{eol}").encode() + sse(
        chunk(" world"), chunk(finish="stop"), eol=eol)
    pieces: list[bytes | float] = [raw_body[i:i + 7] for i in range(0, len(raw_body), 7)]
    with FakeUpstream([Reply(body=pieces)]) as fake:
        status, raw = _stream(_app(fake), {"model": "upstream-model", "messages": USER})
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    assert "".join(d.get("content", "") for d in _deltas(raw)) == "Hello world"


@pytest.mark.parametrize(
    ("reply", "status", "code", "message"),
    [(error_reply(429, "Rate limit reached", headers={"retry-after": "30"}), 429,
      "rate_limit_exceeded", "Upstream: Rate limit reached"),
     (error_reply(500, "boom"), 502, "upstream_error", "Upstream: boom"),
     (error_reply(502, "bad gateway"), 502, "upstream_error", "Upstream: bad gateway"),
     (error_reply(503, "loading"), 503, "upstream_unavailable", "Upstream: loading"),
     (error_reply(401, "Incorrect API key provided: sk-tes***key"), 502,
      "upstream_auth_failed", "The upstream rejected the gateway's credentials (HTTP 401)"),
     (error_reply(400, "This model's maximum context length is 4096 tokens",
                  code="context_length_exceeded", param="messages"), 400,
      "context_length_exceeded", "Upstream: This model's maximum context length is 4096 tokens"),
     (error_reply(404, "model 'x' not found"), 404, "model_not_found",
      "Upstream: model 'x' not found"),
     (Reply(422, [b'{"detail": "field required"}'], {"content-type": "application/json"}),
      400, None, "Upstream: field required")],
    ids=["429", "500", "502", "503", "401", "400", "404", "422-fastapi"],
)
def test_upstream_http_errors_keep_their_status_class(
    reply: Reply, status: int, code: str | None, message: str
) -> None:
    with FakeUpstream([reply]) as fake:
        response = _app(fake, upstream_max_attempts=1).handle(chat_event(
            {"model": "upstream-model", "messages": USER, "stream": True}, headers=JSON))
        body = json.loads(body_bytes(response))
    assert response.status == status
    assert (body["error"]["code"], body["error"]["message"]) == (code, message)
    assert "sk-" not in json.dumps(body)
    if status == 429:
        assert response.headers["retry-after"] == "30"


def test_transient_failures_are_retried_before_the_first_byte() -> None:
    replies = [error_reply(500, "boom"), error_reply(429, "slow", headers={"retry-after": "0"}),
               Reply(body=[text_stream("fine")])]
    with FakeUpstream(replies) as fake:
        status, raw = _stream(_app(fake), {"model": "upstream-model", "messages": USER})
    assert status == 200 and _deltas(raw)[0]["content"] == "fine"
    assert len(fake.chat_requests()) == 3


def test_a_long_retry_after_is_passed_to_the_client_instead_of_waited_out() -> None:
    with FakeUpstream([error_reply(429, "slow", headers={"retry-after": "60"}),
                       completion_reply("x")]) as fake:
        response = _app(fake).handle(chat_event({"model": "upstream-model", "messages": USER}))
    assert (response.status, response.headers["retry-after"]) == (429, "60")
    assert len(fake.chat_requests()) == 1


def test_unreachable_upstream_is_a_502_after_retries() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    s_url = f"http://127.0.0.1:{port}/v1"
    response = _app(s_url, upstream_models=("m",)).handle(
        chat_event({"model": "m", "messages": USER}))
    body = json.loads(body_bytes(response))
    assert response.status == 502
    assert body["error"]["message"] == f"Could not reach the upstream at 127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("body", "message"),
    [([sse(chunk("partial"), done=False)], "The upstream stream ended before [DONE]"),
     ([sse(chunk("partial"), "not json {", chunk(finish="stop"))],
      "The upstream sent an event that is not valid JSON"),
     ([sse(chunk("partial"), '{"error": {"message": "CUDA out of memory"}}')],
      "Upstream: CUDA out of memory"),
     ([sse(chunk("partial"), chunk(finish="eos"))],
      "The upstream stopped with an unknown reason ('eos')"),
     ([sse(chunk("partial"), done=False), b'data: {"id": "chatcm'],
      "The connection to the upstream broke mid-stream")],
    ids=["no-done", "garbage", "error-event", "unknown-finish", "cut"],
)
def test_failures_after_the_first_byte_are_one_error_event(
    body: list[bytes | float], message: str
) -> None:
    cut = "broke" in message
    with FakeUpstream([Reply(body=body, cut=cut)]) as fake:
        status, raw = _stream(_app(fake), {"model": "upstream-model", "messages": USER})
    assert status == 200
    assert _deltas(raw)[0]["content"] == "partial"
    assert sse_json(raw)[-1]["error"]["message"] == message
    assert b"data: [DONE]" not in raw
    assert len(fake.chat_requests()) == 1


def test_garbage_before_any_content_is_a_real_502() -> None:
    with FakeUpstream([Reply(body=[b"data: <html>\n\n"])]) as fake:
        response = _app(fake, upstream_max_attempts=1).handle(chat_event(
            {"model": "upstream-model", "messages": USER, "stream": True}, headers=JSON))
    assert response.status == 502


def test_slow_first_token_is_a_504_and_a_stall_is_an_error_event() -> None:
    slow = Reply(body=[b": waiting\n\n", 1.5, text_stream("late")])
    stall = Reply(body=[sse(chunk("early"), done=False), 1.5, text_stream("late")])
    with FakeUpstream([slow, stall]) as fake:
        app = _app(fake, upstream_first_token_timeout_s=0.3, upstream_idle_timeout_s=0.3)
        started = time.monotonic()
        response = app.handle(chat_event({"model": "upstream-model", "messages": USER,
                                          "stream": True}, headers=JSON))
        assert response.status == 504
        assert json.loads(body_bytes(response))["error"]["message"] == (
            "The upstream sent no output within 0.3 s")
        status, raw = _stream(app, {"model": "upstream-model", "messages": USER})
        assert time.monotonic() - started < 2.5
    assert status == 200
    assert sse_json(raw)[-1]["error"] == {"message": "The upstream sent no output for 0.3 s",
                                          "type": "upstream_error", "param": None,
                                          "code": "upstream_timeout"}


def test_client_disconnect_closes_the_upstream_connection() -> None:
    body: list[bytes | float] = [sse(chunk("a"), done=False)]
    body += [0.05, sse(chunk("more"), done=False)] * 100
    with FakeUpstream([Reply(body=body)]) as fake:
        response = _app(fake).handle(chat_event(
            {"model": "upstream-model", "messages": USER, "stream": True}))
        next(response.body)
        response.close()
        assert fake.aborted.wait(3.0)


def test_connections_are_reused_across_requests() -> None:
    with FakeUpstream([completion_reply("a"), Reply(body=[text_stream("b")])]) as fake:
        app = _app(fake)
        for stream in (False, True):
            response = app.handle(chat_event({"model": "upstream-model", "messages": USER,
                                              "stream": stream}))
            assert response.status == 200
            body_bytes(response)
    assert len(fake.connections) == 1


def test_models_come_from_the_upstream_when_not_configured() -> None:
    with FakeUpstream(models=("llama3.2:3b", "qwen3:8b")) as fake:
        app = _app(fake)
        listed = json.loads(body_bytes(app.handle(chat_event(None, method="GET",
                                                             path="/v1/models"))))
        unknown = app.handle(chat_event({"model": "gpt-9", "messages": USER}))
    assert [m["id"] for m in listed["data"]] == ["llama3.2:3b", "qwen3:8b"]
    assert unknown.status == 404
    assert fake.chat_requests() == []
    assert fake.requests[0][1]["authorization"] == "Bearer sk-test-key"


# -- the model list and the host's name: no wait outlasts the request --------------------------

class _SlowModels:
    """An upstream whose ``/models`` answers only while ``release`` is set (it is, at first),
    counting the fetches."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.release.set()
        self.fetches = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                fake.fetches += 1
                fake.release.wait(10)
                body = b'{"object": "list", "data": [{"id": "m1", "object": "model"}]}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = start_server(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_models() -> Iterator[_SlowModels]:
    fake = _SlowModels()
    yield fake
    fake.close()


def _provider(url: str, **settings: Any) -> OpenAIProvider:
    s = load_settings({}, provider="openai", upstream_base_url=url, **settings)
    provider = OpenAIProvider(s, ApiKey(None, 60, value=""),
                              Upstream(url, s.upstream_connect_timeout_s))
    _providers.append(provider)
    return provider


def test_when_the_model_list_expires_one_request_refreshes_it_and_the_others_do_not_wait(
        slow_models: _SlowModels) -> None:
    # GIVEN a list fetched once and expired since, and an upstream now slow to list its models
    provider = _provider(slow_models.url, upstream_api_key_ttl_s=0.2)
    assert provider.models() == ["m1"]
    time.sleep(0.3)
    slow_models.release.clear()
    # WHEN 20 requests want the list at once
    took: list[float] = []

    def ask() -> None:
        started = time.monotonic()
        assert provider.models() == ["m1"]
        took.append(time.monotonic() - started)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    answered_at_once = len(took)
    slow_models.release.set()
    for thread in threads:
        thread.join(10)
    # THEN 19 had their answer at once, the list they had, while one refreshed it (one fetch)
    assert answered_at_once == 19
    assert len(took) == 20
    assert slow_models.fetches == 2


def test_the_first_fetch_of_the_model_list_ends_at_the_requests_deadline(
        slow_models: _SlowModels) -> None:
    # GIVEN an upstream that takes 10 s to list its models (first-token timeout 60 s)
    slow_models.release.clear()
    provider = _provider(slow_models.url)
    # WHEN a request with 0.3 s left needs the list
    started = time.monotonic()
    with deadline.bound(Deadline.after(0.3)), pytest.raises(DeadlineExceededError):
        provider.models()
    # THEN it ends at its deadline, not at the upstream's pace
    assert time.monotonic() - started < 1.5


def test_a_request_waiting_for_another_ones_first_fetch_of_the_list_ends_at_its_deadline(
        slow_models: _SlowModels) -> None:
    # GIVEN a request fetching the list from an upstream that is slow to answer
    slow_models.release.clear()
    provider = _provider(slow_models.url)
    first: list[list[str]] = []
    fetching = threading.Thread(target=lambda: first.append(provider.models()))
    fetching.start()
    end = time.monotonic() + 5
    while slow_models.fetches == 0 and time.monotonic() < end:
        time.sleep(0.01)
    # WHEN another request with 0.3 s left needs it
    started = time.monotonic()
    with deadline.bound(Deadline.after(0.3)), pytest.raises(DeadlineExceededError):
        provider.models()
    waited = time.monotonic() - started
    slow_models.release.set()
    fetching.join(10)
    # THEN it stopped at its deadline, without a fetch of its own, and the first got the list
    assert waited < 1.5
    assert slow_models.fetches == 1
    assert first == [["m1"]]


def test_a_resolver_that_hangs_cannot_outlast_a_request_and_holds_one_thread() -> None:
    # GIVEN an upstream known by a name whose resolution hangs until the test says
    release = threading.Event()
    asked: list[str] = []

    def hanging(host: str, port: int) -> list[Any]:
        asked.append(host)
        release.wait(10)
        return socket.getaddrinfo("127.0.0.1", port, 0, socket.SOCK_STREAM)

    with FakeUpstream([Reply(body=[text_stream("hello")])]) as fake:
        url = fake.url.replace("127.0.0.1", "upstream.test")
        s = load_settings({}, provider="openai", upstream_base_url=url,
                          upstream_models=("m",), upstream_max_attempts=1)
        provider = OpenAIProvider(s, ApiKey(None, 60, value=""),
                                  Upstream(url, s.upstream_connect_timeout_s,
                                           resolver=hanging))
        _providers.append(provider)
        app = App(s, provider)
        body = {"model": "m", "messages": USER, "stream": True}
        # WHEN two requests with 0.5 s left each come while the name does not resolve
        for _ in range(2):
            started = time.monotonic()
            response = app.handle(chat_event(body), deadline=Deadline.after(0.5))
            body_bytes(response)
            response.close()
            # THEN each ends at its deadline (504), not when the resolver gives up
            assert response.status == 504
            assert time.monotonic() - started < 1.5
        # AND the name was being resolved once, not once per request
        assert asked == ["upstream.test"]
        # AND once it resolves, requests go through
        release.set()
        time.sleep(0.2)
        status, raw = _stream(app, body)
    assert status == 200 and b"hello" in raw, raw
