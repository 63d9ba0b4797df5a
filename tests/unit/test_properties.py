"""Property-based tests (hypothesis): the request path never answers 500 to bad input, and SSE
frames survive any content. Bounded example counts keep them inside `make test`'s budget."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamgate import sse
from streamgate.dialects.chat import ChunkBuilder
from tests.helpers import ScriptedProvider, body_bytes, chat_event, make_app

BOUNDED = settings(max_examples=300, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])

# Text JSON can carry but UTF-8 cannot: lone surrogates ("\ud800"), among ordinary characters.
any_text = st.lists(st.sampled_from(["\ud800", "\udfff", "\udc00", "\ud83d", "a", "é", " "]),
                    min_size=1, max_size=6).map("".join)


def _json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """JSON values with awkward numbers (big, negative) and the given text in strings and
    keys."""
    return st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False) | text,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
            text.map(lambda t: t[:12]), inner, max_size=4),
        max_leaves=20)


# Any JSON a client may send, lone surrogates included; and JSON with text UTF-8 can carry.
json_values = _json_values(st.text(max_size=40) | any_text)
utf8_values = _json_values(st.text(max_size=40))

message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"])},
    optional={"content": json_values | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "audio"])},
        optional={"text": json_values, "image_url": json_values}), max_size=3),
        "tool_calls": json_values, "tool_call_id": json_values, "name": json_values})
good_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "developer"]),
                                      "content": st.text(min_size=1, max_size=30) | any_text})


def _either(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values, sometimes anything at all."""
    return st.one_of(good, good, json_values)


# Chat requests with any value in any field: plausible enough to pass validation often, so the
# whole pipeline runs, and wrong enough to reach every refusal.
chat_bodies = st.builds(
    lambda messages, extra: {"messages": messages, **extra},
    st.lists(st.one_of(good_message, good_message, message), min_size=1, max_size=3)
    | json_values,
    st.fixed_dictionaries({}, optional={
        "model": _either(st.sampled_from(["scripted-1", "gemma-3-270m", "unknown"]) | any_text),
        "stream": _either(st.booleans()),
        "stream_options": _either(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "max_tokens": _either(st.integers(-3, 5_000)),
        "max_completion_tokens": _either(st.integers(-3, 5_000)),
        "temperature": _either(st.floats(-1, 3)),
        "top_p": _either(st.floats(-0.5, 1.5)),
        "stop": _either(st.lists(st.text(max_size=5), max_size=5) | st.text(max_size=5)),
        "seed": _either(st.integers(-(2**64), 2**64)),
        "user": _either(st.text(max_size=10) | any_text),
        "n": _either(st.integers(0, 3)),
        "tools": json_values, "tool_choice": json_values, "parallel_tool_calls": json_values,
        "response_format": _either(st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object"])})),
        "logprobs": json_values, "frequency_penalty": _either(st.floats(-3, 3))}))

APP = make_app(ScriptedProvider(models=["gemma-3-270m", "scripted-1"]))


def _check_answer(event: dict[str, Any]) -> None:
    response = APP.handle(event)
    raw = body_bytes(response)
    response.close()
    assert response.status < 500, raw
    if response.status >= 400:
        doc = json.loads(raw[len(b"data: "):] if raw.startswith(b"data: ") else raw)
        assert set(doc["error"]) == {"message", "type", "param", "code"}
        assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    else:
        assert raw.endswith(b"data: [DONE]\n\n") or json.loads(raw)["object"] == \
            "chat.completion"


@BOUNDED
@given(chat_bodies)
def test_any_chat_shaped_body_is_answered_or_refused_with_a_4xx(body: dict[str, Any]) -> None:
    _check_answer(chat_event(body, headers={"accept": "application/json"}))


@BOUNDED
@given(json_values)
def test_any_json_document_is_answered_or_refused_with_a_4xx(body: Any) -> None:
    _check_answer(chat_event(None, raw=json.dumps(body)))


@BOUNDED
@given(st.binary(max_size=200))
def test_any_bytes_are_answered_or_refused_with_a_4xx(body: bytes) -> None:
    import base64

    event = chat_event(None)
    event.update(body=base64.b64encode(body).decode(), isBase64Encoded=True)
    _check_answer(event)


@BOUNDED
@given(st.lists(utf8_values, min_size=1, max_size=5), st.integers(1, 7))
def test_encoded_events_decode_back_to_the_same_objects(objects: list[Any], cut: int) -> None:
    stream = b"".join(sse.data_event(o) for o in objects) + sse.DONE
    decoder = sse.Decoder()
    events = []
    for i in range(0, len(stream), cut):  # in arbitrary slices, splitting characters too
        events += decoder.feed(stream[i:i + cut])
    events += decoder.end()
    assert [e.data for e in events[:-1]] == [sse.dumps(o) for o in objects]
    assert [json.loads(e.data) for e in events[:-1]] == objects
    assert events[-1].data == "[DONE]"


@BOUNDED
@given(st.text())
def test_no_model_text_can_inject_a_frame(text: str) -> None:
    # Whatever the model writes (newlines, "data:", CRs, "\n\ndata: [DONE]"), it is one event.
    builder = ChunkBuilder("m")
    frame = sse.data_event(builder.text(text))
    assert frame.count(b"\n") == 2 and b"\r" not in frame and frame.endswith(b"\n\n")
    (event,) = sse.Decoder().feed(frame)
    assert json.loads(event.data)["choices"][0]["delta"]["content"] == text
