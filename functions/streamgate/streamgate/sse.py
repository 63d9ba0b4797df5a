"""Server-Sent Events encoding (https://html.spec.whatwg.org/multipage/server-sent-events.html).

Compact JSON on one ``data:`` line: JSON escapes CR and LF inside strings, so no field value can
end the line or inject a frame. ``ensure_ascii=False`` keeps non-ASCII text as UTF-8 (smaller,
and what OpenAI sends); ``allow_nan=False`` keeps the output valid JSON.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def dumps(obj: Any) -> str:
    """Compact JSON text, the one serialisation used for chunks and bodies."""
    return _encoder.encode(obj)


def data_event(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON: ``data: {...}\\n\\n``."""
    return b"data: " + _encoder.encode(obj).encode("utf-8") + b"\n\n"
