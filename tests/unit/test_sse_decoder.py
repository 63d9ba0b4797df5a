"""The upstream SSE decoder against the WHATWG event-stream parsing rules."""

from __future__ import annotations

import pytest

from streamgate.sse import Decoder, Event


def _decode(*chunks: bytes) -> list[Event]:
    decoder = Decoder()
    events = [e for chunk in chunks for e in decoder.feed(chunk)]
    return events + decoder.end()


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"], ids=["lf", "cr", "crlf"])
def test_every_line_ending_ends_lines(eol: bytes) -> None:
    raw = b"data: a" + eol + eol + b"data: b" + eol + eol
    assert [e.data for e in _decode(raw)] == ["a", "b"]


def test_byte_at_a_time_equals_all_at_once_even_across_crlf_and_utf8() -> None:
    raw = "data: é€😀\r\n\r\ndata: x\r\rdata: y\n\n".encode()
    assert _decode(*(raw[i:i + 1] for i in range(len(raw)))) == _decode(raw)
    assert [e.data for e in _decode(raw)] == ["é€😀", "x", "y"]


def test_multi_line_data_is_joined_with_lf_and_comments_are_skipped() -> None:
    raw = b": ping\ndata: {\"a\":\ndata:1}\n: another\n\n"
    assert _decode(raw) == [Event('{"a":\n1}')]


def test_fields_event_id_and_the_single_leading_space() -> None:
    raw = b"event: update\nid: 7\ndata:  two spaces\ndata\nretry: 10\nunknown: x\n\n"
    assert _decode(raw) == [Event(" two spaces\n", "update", "7")]


def test_an_event_without_data_or_without_its_blank_line_is_not_dispatched() -> None:
    assert _decode(b"event: ping\n\n") == []
    assert _decode(b"data: unfinished\n") == []


def test_final_lone_cr_at_end_of_stream_completes_the_event() -> None:
    assert [e.data for e in _decode(b"data: [DONE]\r\r")] == ["[DONE]"]


def test_leading_bom_is_ignored_and_invalid_utf8_is_replaced() -> None:
    assert _decode(b"\xef\xbb\xbfdata: ok\n\n") == [Event("ok")]
    assert _decode(b"data: \xff\n\n") == [Event("\ufffd")]
