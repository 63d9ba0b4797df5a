"""The playground: one static page (``playground.html``, beside this module) served at ``GET /``
when ``Settings.playground`` is on (always on the dev server; the template's ``Playground``
parameter on Lambda, off by default).

The page loads nothing from anywhere: its script and style are inline, and the
Content-Security-Policy sent with it (on that route alone: every other answer keeps
``default-src 'none'``) allows exactly those two blocks, by their SHA-256 hashes, plus
requests to its own origin (``connect-src 'self'``) and its ``data:`` icon. Model text is
only ever inserted as text (Trusted Types are required and no policy exists, so an
``innerHTML`` assignment would throw).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from pathlib import Path

PAGE = Path(__file__).with_name("playground.html")
_BLOCK = re.compile(rb"<(script|style)>(.*?)</\1>", re.S)


@functools.cache
def page() -> tuple[bytes, str]:
    """The page's bytes and the Content-Security-Policy that lets exactly it run."""
    html = PAGE.read_bytes()
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for kind, text in _BLOCK.findall(html):
        digest = base64.b64encode(hashlib.sha256(text).digest()).decode("ascii")
        hashes[kind].append(f"'sha256-{digest}'")
    policy = "; ".join([
        "default-src 'none'",
        "script-src " + " ".join(hashes[b"script"]),
        "style-src " + " ".join(hashes[b"style"]),
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ])
    return html, policy
