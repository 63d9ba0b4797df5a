"""The relay's short paths (issue 25) give exactly what the general paths give: a text chunk's
event encoded around a frame built once, an upstream chunk mapped without the general walk,
and LF-only SSE text split at once."""

from __future__ import annotations

from typing import Any

import pytest

from streamgate import sse
from streamgate.dialects.chat import ChunkBuilder
from streamgate.errors import StreamgateError
from streamgate.providers import malformed_is_upstream_error
from streamgate.providers.openai import WHO, _Chunks

TEXTS = ["word", "", " ", "é—中文🙂", 'quote " and \\ backslash', "line\nbreak\r\n",
         "\x00\x1f control", "\ud800 lone surrogate", "\u2028\u2029", "</script>",
         "\ue000streamgate\ue001"]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("model", ["m", "é model \"quoted\"", "\ue000streamgate\ue001"])
def test_a_text_event_has_the_same_bytes_as_the_chunk_built_as_a_dict(
        include_usage: bool, model: str) -> None:
    # GIVEN two builders of the same completion
    fast = ChunkBuilder(model, include_usage=include_usage, completion_id="chatcmpl-1",
                        created=7)
    slow = ChunkBuilder(model, include_usage=include_usage, completion_id="chatcmpl-1",
                        created=7)
    # WHEN one encodes texts on its short path and the other builds and encodes each dict
    for text in TEXTS:
        # THEN every event is byte for byte the same (the first one carries the role)
        assert fast.text_event(text) == sse.data_event(slow.text(text))


CHUNKS: list[Any] = [
    {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"delta": {"content": None}}]},
    {"choices": [{"delta": {}}]},
    {"choices": [{"delta": {"content": 0}}]},
    {"choices": [{"delta": {"content": 5}}]},
    {"choices": [{"delta": {"content": ["x"]}}]},
    {"choices": [{"delta": {"content": "x", "reasoning_content": "r"}}]},
    {"choices": [{"delta": {"content": "x", "reasoning": 3}}]},
    {"choices": [{"delta": {"content": "x", "tool_calls": "nope"}}]},
    {"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}]},
    {"choices": [{"delta": {"content": "x"}, "finish_reason": "weird"}]},
    {"choices": [{"delta": {"content": "x"}}], "usage": {"prompt_tokens": 1,
                                                        "completion_tokens": 2}},
    {"choices": [{"delta": {"content": "x"}}], "error": {"message": "boom"}},
    {"choices": [{"delta": {"content": "x"}}], "error": None},
    {"choices": [{"delta": "x"}]},
    {"choices": ["x"]},
    {"choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b"}}]},
    {"choices": []},
    {"choices": None},
    {"choices": {"0": {}}},
    [],
    "text",
    None,
]


@pytest.mark.parametrize("chunk", CHUNKS, ids=[str(i) for i in range(len(CHUNKS))])
def test_an_upstream_chunk_maps_to_what_the_general_walk_gives(chunk: Any) -> None:
    # WHEN the same chunk is mapped by deltas() (short path first) and by the general walk
    def outcome(f: Any) -> Any:
        try:
            return f()
        except StreamgateError as e:
            return (type(e), e.message)

    fast = outcome(lambda: _Chunks().deltas(chunk))
    general = outcome(lambda: malformed_is_upstream_error(_Chunks()._deltas(chunk), WHO))
    # THEN the deltas, or the upstream error, are the same
    assert fast == general


STREAM = ("data: {\"a\": 1}\n\n: comment\nevent: x\ndata: two\ndata: lines\nid: 7\n\n"
          "data:no-space\n\ndata\n\nretry: 5\ndata: é🙂\n\n").encode()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_lf_only_text_decodes_as_the_general_path_decodes_its_crlf_twin(size: int) -> None:
    # GIVEN the same stream with LF (the short path) and with CRLF (the general one), fed in
    # pieces of ``size`` bytes
    def decode(raw: bytes) -> list[sse.Event]:
        decoder = sse.Decoder()
        events = [e for i in range(0, len(raw), size) for e in decoder.feed(raw[i:i + size])]
        return events + decoder.end()

    # THEN both give the same events
    assert decode(STREAM) == decode(STREAM.replace(b"\n", b"\r\n"))
    assert [e.data for e in decode(STREAM)] == ['{"a": 1}', "two\nlines", "no-space", "",
                                                "é🙂"]


def test_an_lf_only_event_past_the_limit_is_refused() -> None:
    # GIVEN a decoder that takes events of 10 characters at most
    decoder = sse.Decoder(max_event_chars=10)
    # WHEN an event's data lines add up to more, THEN it is refused
    with pytest.raises(sse.EventTooLargeError):
        decoder.feed(b"data: 12345\ndata: 67890\n")


EVENTS = ['{"a": 1}', ' {"a": 1}', '{"a": 1} ', '{"a": 1}{"b": 2}', '{"a": 1} x', "\ufeff{}",
          "[1, 2]", '"text"', "NaN", "1e400", "", " ", "{", '{"a": "\ud800"}', "[" * 100_000,
          "null", "true false"]


@pytest.mark.parametrize("data", EVENTS, ids=[str(i) for i in range(len(EVENTS))])
def test_an_event_parses_as_json_loads_parses_it(data: str) -> None:
    import json
    import math

    from streamgate.errors import UpstreamError
    from streamgate.providers.openai import _json

    # WHEN an event's data is parsed on the short path and by json.loads
    try:
        expected: Any = json.loads(data)
    except (ValueError, RecursionError):
        expected = UpstreamError
    try:
        got: Any = _json(data)
    except UpstreamError:
        got = UpstreamError
    # THEN both accept the same documents, equal, and refuse the same ones
    if isinstance(expected, float) and math.isnan(expected):
        assert isinstance(got, float) and math.isnan(got)
    else:
        assert got == expected
