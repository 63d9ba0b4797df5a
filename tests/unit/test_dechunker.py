"""The chunked-body reader of the upstream client (``httpclient.Dechunker``): the body bytes
whatever the cuts between socket reads, every framing error an ``upstream_error``, and its
lines bounded, so a peer cannot grow memory with a chunk-size line that never ends."""

from __future__ import annotations

import pytest

from streamgate.errors import UpstreamError
from streamgate.httpclient import Dechunker

BODY = [b"data: {\"a\":1}\n\n", b"data: {\"b\":\"\xc3\xa9\"}\n\n", b"x" * 300, b"data: [DONE]\n\n"]


def _framed(parts: list[bytes], *, ext: bytes = b"", trailer: bytes = b"") -> bytes:
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in parts) + b"0\r\n" + \
        trailer + b"\r\n"


def _feed(raw: bytes, cuts: list[int]) -> tuple[bytes, Dechunker]:
    d = Dechunker()
    out, start = [], 0
    for cut in [*cuts, len(raw)]:
        out.append(d.feed(raw[start:cut]))
        start = cut
    return b"".join(out), d


def test_every_cut_between_two_reads_gives_the_same_body() -> None:
    raw = _framed(BODY, ext=b";name=value", trailer=b"X-Checksum: 1\r\n")
    for cut in range(len(raw) + 1):
        body, d = _feed(raw, [cut])
        assert body == b"".join(BODY), cut
        assert d.done and not d.extra


def test_byte_at_a_time_and_bare_lf_lines() -> None:
    raw = _framed(BODY).replace(b"\r\n", b"\n")
    body, d = _feed(raw, list(range(1, len(raw))))
    assert body == b"".join(BODY) and d.done


def test_several_chunks_in_one_read_come_back_together() -> None:
    d = Dechunker()
    assert d.feed(_framed(BODY[:2])[:-5]) == BODY[0] + BODY[1]  # the last chunk not yet in
    assert not d.done


def test_bytes_after_the_end_are_flagged() -> None:
    _, d = _feed(_framed(BODY) + b"HTTP/1.1 200 OK\r\n", [])
    assert d.done and d.extra


@pytest.mark.parametrize("size_line", [
    b"", b"zz", b"-5", b"0x10", b"1_0", b"+5", b"1 0", b"1" * 17, b"\xff",
], ids=repr)
def test_a_malformed_size_line_is_an_upstream_error(size_line: bytes) -> None:
    with pytest.raises(UpstreamError, match="malformed chunked body"):
        Dechunker().feed(size_line + b"\r\nabc\r\n")


def test_data_not_followed_by_its_line_end_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="malformed chunked body"):
        Dechunker().feed(b"3\r\nabcdef\r\n")


@pytest.mark.parametrize("where", ["size line", "trailer"])
def test_an_endless_line_or_trailer_is_cut_with_bounded_memory(where: str) -> None:
    d = Dechunker()
    if where == "trailer":
        d.feed(b"0\r\n")
        with pytest.raises(UpstreamError):
            for _ in range(100):
                d.feed(b"X-Pad: " + b"y" * 1000 + b"\r\n")
    else:
        with pytest.raises(UpstreamError):
            for _ in range(100):
                d.feed(b"1" * 1000)  # hex digits that never end their line
