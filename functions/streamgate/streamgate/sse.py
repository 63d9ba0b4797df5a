"""Server-Sent Events (https://html.spec.whatwg.org/multipage/server-sent-events.html): the
encoder our responses use, and the decoder that reads an upstream's stream.

Compact JSON on one ``data:`` line: JSON escapes CR and LF inside strings, so no field value can
end the line or inject a frame. ``ensure_ascii=False`` keeps non-ASCII text as UTF-8 (smaller,
and what OpenAI sends); ``allow_nan=False`` keeps the output valid JSON.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any, NamedTuple

DONE = b"data: [DONE]\n\n"

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def dumps(obj: Any) -> str:
    """Compact JSON text, the one serialisation used for chunks and bodies."""
    return _encoder.encode(obj)


def json_bytes(obj: Any) -> bytes:
    """Compact JSON as UTF-8. A lone surrogate (which a backend's JSON may carry as
    ``"\\ud800"``) has no UTF-8 form: it becomes U+FFFD rather than failing the response."""
    text = _encoder.encode(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed.encode("utf-8")


# What _encoder uses for a str (C): JSON text of a str, non-ASCII kept. A caller that encodes
# its own result to UTF-8 falls back to text_bytes on UnicodeEncodeError (a lone surrogate).
encode_text = json.encoder.encode_basestring


def text_bytes(text: str) -> bytes:
    """:func:`json_bytes` of a string, without the encoder's Python-level dispatch."""
    try:
        return encode_text(text).encode("utf-8")
    except UnicodeEncodeError:
        return json_bytes(text)


def data_event(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON: ``data: {...}\\n\\n``."""
    return b"data: " + json_bytes(obj) + b"\n\n"


def named_event(name: str, obj: Any) -> bytes:
    """One SSE event with an ``event:`` field (``name`` is ours: plain ASCII, no newline)
    carrying ``obj`` as JSON: ``event: <name>\ndata: {...}\n\n``."""
    return b"event: " + name.encode("ascii") + b"\ndata: " + json_bytes(obj) + b"\n\n"


class Event(NamedTuple):
    data: str
    event: str = "message"
    id: str = ""


# An Event made without a Python-level __new__ call (the decoder makes one per upstream event).
_event = tuple.__new__
_utf8 = codecs.utf_8_decode


class EventTooLargeError(ValueError):
    """An event (or one line of it) grew past the decoder's limit."""


class Decoder:
    """Incremental SSE parser following the WHATWG "event stream interpretation" rules:
    lines end with CRLF, LF or CR alone (also when a CRLF is split across reads); lines
    starting with ``:`` are comments; ``data`` fields accumulate, joined by LF; a blank line
    dispatches the event, unless no data was given; one space after the colon is dropped;
    the stream is UTF-8, decoded with replacement, a leading BOM ignored.

    Linear in its input: each piece of text is scanned once, and a line split across reads is
    kept as a list of pieces, joined when it ends. An event whose data (or whose unfinished
    line) passes ``max_event_chars`` raises :class:`EventTooLargeError`, so an endless line or
    event cannot grow memory without bound.
    """

    def __init__(self, max_event_chars: int = 1 << 20) -> None:
        self._bytes = b""  # the start of a UTF-8 sequence that the next chunk completes
        self._max = max_event_chars
        self._first = True
        self._line: list[str] = []  # pieces of the line not yet ended
        self._skip_lf = False  # the last piece ended with CR: a LF first thing is its CRLF
        self._data: list[str] = []
        self._data_size = 0  # characters of the current event's data
        self._line_size = 0  # characters of the line not yet ended
        self._event = ""
        self._id = ""

    def feed(self, chunk: bytes) -> list[Event]:
        """Events completed by ``chunk`` (which may end mid-line or mid-character)."""
        if self._bytes:
            chunk = self._bytes + chunk
        text, used = _utf8(chunk, "replace", False)
        self._bytes = chunk[used:] if used < len(chunk) else b""
        if "\r" in text or self._first or self._skip_lf:
            return self._lines(text)
        # What upstreams send, nearly always: lines that end with LF, and most often one whole
        # ``data:`` event per read with nothing pending, dispatched here as _lf_lines would.
        if (text.startswith("data: ") and text.find("\n") == len(text) - 2
                and text.endswith("\n\n") and not (self._line or self._data or self._event)):
            if len(text) - 7 > self._max:
                raise EventTooLargeError(f"an event is larger than {self._max} characters")
            return [_event(Event, (text[6:-2], "message", self._id))]
        return self._lf_lines(text)

    def end(self) -> list[Event]:
        """Events completed at the end of the stream. An unfinished line or an event without
        its blank line is dropped, as the spec says."""
        text, _ = _utf8(self._bytes, "replace", True)
        self._bytes = b""
        return self._lines(text)

    def _lines(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._first:
            self._first = False
            text = text.removeprefix("\ufeff")
        if self._skip_lf:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        if "\r" not in text:
            return self._lf_lines(text)
        events: list[Event] = []
        start = 0
        for match in _EOL.finditer(text):
            self._line.append(text[start:match.start()])
            line = "".join(self._line)
            self._line = []
            self._line_size = 0
            event = self._field(line)
            if event is not None:
                events.append(event)
            start = match.end()
        if text.endswith("\r"):
            self._skip_lf = True
        if start < len(text):
            rest = text[start:]
            self._line.append(rest)
            self._line_size += len(rest)
            self._check()
        return events

    def _lf_lines(self, text: str) -> list[Event]:
        """:meth:`_lines` for text whose lines all end with LF (what upstreams send): split
        at once, and the ``data:`` lines, nearly all of them, handled inline."""
        events: list[Event] = []
        lines = text.split("\n")
        rest = lines.pop()  # after the last LF: the start of a line not yet ended
        if lines and self._line:
            self._line.append(lines[0])
            lines[0] = "".join(self._line)
            self._line = []
            self._line_size = 0
        data = self._data
        for line in lines:
            if not line:  # dispatch, as _dispatch does
                if data:
                    events.append(_event(Event, ("\n".join(data), self._event or "message",
                                                 self._id)))
                data = self._data = []
                self._event, self._data_size = "", 0
            elif line.startswith("data: "):
                value = line[6:]
                data.append(value)
                self._data_size += len(value) + 1
                if self._data_size > self._max:
                    raise EventTooLargeError(f"an event is larger than {self._max} characters")
            else:
                self._field(line)
        if rest:
            self._line.append(rest)
            self._line_size += len(rest)
            self._check()
        return events

    def _check(self) -> None:
        if self._data_size + self._line_size > self._max:
            raise EventTooLargeError(f"an event is larger than {self._max} characters")

    def _field(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            self._check()
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None  # "retry" and unknown fields change nothing we use

    def _dispatch(self) -> Event | None:
        data, event = self._data, self._event
        self._data, self._event, self._data_size = [], "", 0
        if not data:
            return None
        return _event(Event, ("\n".join(data), event or "message", self._id))


# A CR not followed by LF in the same piece ends its line at once; ``_skip_lf`` then drops the
# LF of a CRLF split across two reads.
_EOL = re.compile(r"\r\n|\r|\n")
