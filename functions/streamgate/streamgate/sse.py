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
from dataclasses import dataclass
from typing import Any

DONE = b"data: [DONE]\n\n"

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def dumps(obj: Any) -> str:
    """Compact JSON text, the one serialisation used for chunks and bodies."""
    return _encoder.encode(obj)


def data_event(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON: ``data: {...}\\n\\n``."""
    return b"data: " + _encoder.encode(obj).encode("utf-8") + b"\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str = ""


class Decoder:
    """Incremental SSE parser following the WHATWG "event stream interpretation" rules:
    lines end with CRLF, LF or CR alone (also when a CRLF is split across reads); lines
    starting with ``:`` are comments; ``data`` fields accumulate, joined by LF; a blank line
    dispatches the event, unless no data was given; one space after the colon is dropped;
    the stream is UTF-8, decoded with replacement, a leading BOM ignored.
    """

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._first = True
        self._data: list[str] = []
        self._event = ""
        self._id = ""

    def feed(self, chunk: bytes) -> list[Event]:
        """Events completed by ``chunk`` (which may end mid-line or mid-character)."""
        return self._lines(self._text.decode(chunk))

    def end(self) -> list[Event]:
        """At end of stream: a final lone CR ends its line. An event without its blank line
        is dropped, as the spec says."""
        text = self._text.decode(b"", final=True)
        if (self._buffer + text).endswith("\r"):
            text += "\n"
        return self._lines(text)

    def _lines(self, text: str) -> list[Event]:
        if self._first and text:
            self._first = False
            text = text.removeprefix("\ufeff")
        self._buffer += text
        events: list[Event] = []
        while True:
            end = _line_end(self._buffer)
            if end is None:
                return events
            start, after = end
            line, self._buffer = self._buffer[:start], self._buffer[after:]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None  # "retry" and unknown fields change nothing we use

    def _dispatch(self) -> Event | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return Event("\n".join(data), event or "message", self._id)


_EOL = re.compile(r"\r\n|\r|\n")


def _line_end(buffer: str) -> tuple[int, int] | None:
    """(end of the first complete line, start of the next) or None if none is complete. A CR
    at the very end may be the first half of a CRLF, so it waits for more input."""
    match = _EOL.search(buffer)
    if match is None or (match.group() == "\r" and match.end() == len(buffer)):
        return None
    return match.start(), match.end()
