"""SSE encoding and chunk building as exact bytes (table-driven, as sse-starlette tests do)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamgate import sse
from streamgate.dialects.chat import ChunkBuilder
from streamgate.providers import Usage


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"a": 1}, b'data: {"a":1}\n\n'),
        ({"t": "line\nbreak\r\n"}, b'data: {"t":"line\\nbreak\\r\\n"}\n\n'),
        ({"t": "caf\u00e9 \u2028"}, 'data: {"t":"café \u2028"}\n\n'.encode()),
        ({"t": "data: [DONE]\n\n"}, b'data: {"t":"data: [DONE]\\n\\n"}\n\n'),
        ([None, True, 1.5], b"data: [null,true,1.5]\n\n"),
    ],
    ids=["compact", "newlines-escaped", "utf8-not-escaped", "no-frame-injection", "array"],
)
def test_data_event_bytes(obj: Any, expected: bytes) -> None:
    assert sse.data_event(obj) == expected


def test_done_marker_bytes() -> None:
    assert sse.DONE == b"data: [DONE]\n\n"


def test_nan_is_refused_rather_than_sent_as_invalid_json() -> None:
    with pytest.raises(ValueError):
        sse.data_event({"x": float("nan")})


def test_chunks_share_id_created_model_and_role_comes_first() -> None:
    b = ChunkBuilder("m", completion_id="chatcmpl-1", created=1700000000)
    first, second, last = b.text("Hel"), b.text("lo"), b.finish("stop")
    assert first == {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"},
                     "logprobs": None, "finish_reason": None}],
    }
    assert second["choices"][0]["delta"] == {"content": "lo"}
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": "stop"}
    assert {c["id"] for c in (first, second, last)} == {"chatcmpl-1"}


def test_finish_without_text_still_carries_the_role() -> None:
    b = ChunkBuilder("m")
    assert b.finish("length")["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_usage_chunk_has_empty_choices_and_other_chunks_have_null_usage() -> None:
    b = ChunkBuilder("m", include_usage=True, completion_id="chatcmpl-1", created=1)
    assert b.text("x")["usage"] is None
    assert b.usage(Usage(3, 4)) == {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    assert "usage" not in ChunkBuilder("m").text("x")


def test_chunk_encodes_to_exact_bytes() -> None:
    b = ChunkBuilder("gemma-3-270m", completion_id="chatcmpl-abc", created=1)
    assert sse.data_event(b.text("Hi")) == (
        b'data: {"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1,'
        b'"model":"gemma-3-270m","choices":[{"index":0,"delta":{"role":"assistant",'
        b'"content":"Hi"},"logprobs":null,"finish_reason":null}]}\n\n'
    )


def test_completion_object_matches_openai() -> None:
    b = ChunkBuilder("m", completion_id="chatcmpl-1", created=2)
    doc = b.completion("Hello", "stop", Usage(1, 2))
    assert json.loads(sse.dumps(doc)) == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 2, "model": "m",
        "choices": [{"index": 0,
                     "message": {"role": "assistant", "content": "Hello", "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
