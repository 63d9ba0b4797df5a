"""The shared mechanisms that keep the service bounded and honest: the one Retry-After parser,
the retry rule, the Retry-After we send, the text we relay from a backend, the SSE decoder's
cost and size limit, and the socket guard that a trickling peer cannot outwait."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from streamgate import sse
from streamgate.deadline import Deadline, guard
from streamgate.errors import (
    RETRY_AFTER_CAP_S,
    RateLimitError,
    UpstreamUnavailableError,
    relayed,
)
from streamgate.retry import parse_retry_after, with_retries

NOW = 1_795_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30", 30.0), ("0", 0.0), ("1.5", 1.5), (" 7 ", 7.0), ("-5", 0.0),
     ("inf", RETRY_AFTER_CAP_S), ("Infinity", RETRY_AFTER_CAP_S), ("1e400", RETRY_AFTER_CAP_S),
     ("99999999999999999999", RETRY_AFTER_CAP_S), ("nan", None), ("soon", None), ("", None),
     (None, None),
     (format_datetime(datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=120),
                      usegmt=True), 120.0),
     (format_datetime(datetime.fromtimestamp(NOW, UTC) - timedelta(seconds=120),
                      usegmt=True), 0.0),
     ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_CAP_S),
     ("Mon, 99 Foo 2026 99:99:99 GMT", None)],
)
def test_retry_after_is_finite_non_negative_and_capped(value: str | None,
                                                       seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize("wait", [math.inf, 1e300, -1.0, math.nan, 40 * 86_400.0])
def test_an_error_can_always_build_its_retry_after_headers(wait: float) -> None:
    headers = RateLimitError("slow down", retry_after=wait).headers()
    if math.isnan(wait):
        assert headers == {}
        return
    seconds = int(headers["retry-after"])
    assert 1 <= seconds <= 32 * 86_400
    assert int(headers["retry-after-ms"]) <= 32 * 86_400_000


def _flaky(*failures: Exception) -> tuple[list[float], Iterator[str]]:
    """An attempt that fails with each of ``failures`` in turn, then yields "ok"."""
    calls: list[float] = []
    pending = list(failures)

    def attempt() -> Iterator[str]:
        calls.append(time.monotonic())
        if pending:
            raise pending.pop(0)
        yield "ok"

    return calls, with_retries(attempt, attempts=3, backoff_s=0.05,
                               deadline=Deadline.after(5), upstream="test")


def test_a_short_wait_is_retried() -> None:
    calls, items = _flaky(UpstreamUnavailableError("busy", retry_after=0.1, transient=True))
    assert list(items) == ["ok"]
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.1


def test_a_wait_longer_than_the_backoff_cap_is_not_slept_out() -> None:
    calls, items = _flaky(UpstreamUnavailableError("busy", retry_after=3600, transient=True))
    with pytest.raises(UpstreamUnavailableError):
        list(items)
    assert len(calls) == 1


def test_a_wait_that_would_end_past_the_deadline_is_not_taken() -> None:
    calls: list[float] = []

    def attempt() -> Iterator[str]:
        calls.append(time.monotonic())
        raise UpstreamUnavailableError("busy", retry_after=0.3, transient=True)
        yield "never"

    items = with_retries(attempt, attempts=3, backoff_s=1, deadline=Deadline.after(0.2),
                         upstream="test")
    with pytest.raises(UpstreamUnavailableError):
        list(items)
    assert len(calls) == 1


# -- relayed text ------------------------------------------------------------------------------

KEY = "sk-proj-AbCdEf0123456789GhIjKl"


@pytest.mark.parametrize("text", [
    f"Incorrect API key provided: {KEY}",
    f"Authorization: Bearer {KEY}",
    f"key {KEY[:10]}***{KEY[-4:]} rejected",
    f"fragment {KEY[8:20]} seen",
    "AWS key AKIAIOSFODNN7EXAMPLE in the request",
    "bearer abc.def.ghi",
])
def test_relayed_text_never_carries_a_secret(text: str) -> None:
    out = relayed(text, [KEY])
    assert KEY not in out and KEY[8:20] not in out and "AKIAIOSFODNN7EXAMPLE" not in out
    assert "abc.def.ghi" not in out
    assert "[redacted]" in out


def test_relayed_text_drops_control_characters_and_is_capped() -> None:
    out = relayed("a\x1b[31mred\x00" + "z" * 10_000)
    assert "\x1b" not in out and "\x00" not in out
    assert len(out) <= 500


def test_relayed_text_keeps_an_ordinary_message() -> None:
    message = "This model's maximum context length is 4096 tokens (got 5000)."
    assert relayed(message, [KEY]) == message


# -- the SSE decoder's cost and limit -----------------------------------------------------------

def test_decoding_is_linear_in_the_size_of_an_event() -> None:
    # One 16 MB event fed in 64 KB reads: the old decoder re-scanned its buffer on every read
    # (about 20 s for 16 MB); a linear one takes a fraction of a second. The bound is generous.
    piece = b"x" * 65536
    decoder = sse.Decoder(max_event_chars=32 << 20)
    started = time.process_time()
    decoder.feed(b"data: ")
    for _ in range(256):
        assert decoder.feed(piece) == []
    events = decoder.feed(b"\n\n")
    assert time.process_time() - started < 3
    assert len(events) == 1 and len(events[0].data) == 256 * 65536


@pytest.mark.parametrize("stream", [
    [b"data: " + b"x" * 600, b"y" * 600],  # one line that never ends
    [b": " + b"c" * 1500],  # an endless comment
    [b"data: " + b"x" * 300 + b"\n"] * 5,  # many data lines of one event
], ids=["line", "comment", "data-lines"])
def test_an_event_past_the_limit_is_refused(stream: list[bytes]) -> None:
    decoder = sse.Decoder(max_event_chars=1000)
    with pytest.raises(sse.EventTooLargeError):
        for piece in stream:
            decoder.feed(piece)


def test_the_limit_is_per_event() -> None:
    decoder = sse.Decoder(max_event_chars=1000)
    events = []
    for _ in range(50):
        events += decoder.feed(b"data: " + b"x" * 900 + b"\n\n")
    assert len(events) == 50


def test_a_crlf_split_across_reads_ends_one_line() -> None:
    decoder = sse.Decoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r") == [sse.Event("a")]
    assert decoder.feed(b"\ndata: b\n\n") == [sse.Event("b")]


def test_a_lone_surrogate_in_output_becomes_a_replacement_character() -> None:
    assert sse.data_event({"content": "a\ud800b"}) == 'data: {"content":"a\ufffdb"}\n\n'.encode()


# -- the socket guard --------------------------------------------------------------------------

def test_a_guard_ends_a_read_a_trickling_peer_keeps_alive() -> None:
    # GIVEN a peer that sends a byte every 50 ms, never a newline, and a reader whose socket
    # timeout (1 s) each byte resets
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            try:
                theirs.sendall(b"x")
            except OSError:
                return
            time.sleep(0.05)

    threading.Thread(target=trickle, daemon=True).start()
    ours.settimeout(1.0)
    reader = ours.makefile("rb")
    started = time.monotonic()
    g = guard(ours, time.monotonic() + 0.5)
    # WHEN it reads a line THEN the guard ends the read at its limit
    line = reader.readline(1 << 20)
    waited = time.monotonic() - started
    stop.set()
    g.cancel()
    reader.close()
    ours.close()
    theirs.close()
    assert g.fired
    assert not line.endswith(b"\n")
    assert 0.4 < waited < 2


def test_a_guard_moved_later_or_cancelled_does_not_fire() -> None:
    ours, theirs = socket.socketpair()
    moved = guard(ours, time.monotonic() + 0.2)
    moved.move(time.monotonic() + 30)
    cancelled = guard(theirs, time.monotonic() + 0.1)
    cancelled.cancel()
    time.sleep(0.4)
    assert not moved.fired and not cancelled.fired
    theirs.sendall(b"still open")
    assert ours.recv(64) == b"still open"
    moved.cancel()
    ours.close()
    theirs.close()


def test_a_deadline_caps_every_wait_and_says_when_it_has_passed() -> None:
    deadline = Deadline.after(10)
    assert deadline.cap(60) <= 10 and deadline.cap(1) == 1
    assert Deadline().cap(60) == 60 and not Deadline().expired()
    past = Deadline.after(-1)
    assert past.cap(60) == 0 and past.expired()
    with pytest.raises(Exception, match="time limit"):
        past.check()
