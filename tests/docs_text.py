"""The documentation as the tests read it: README.md and every page under docs/, and their
fenced code blocks. Tests that run a page's example, or drive a client with a page's set-up,
read it from here, so that what a user copies is what was tested."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def pages() -> list[Path]:
    """README.md first, then docs/**/*.md in path order."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def page(name: str) -> str:
    """One page's text: ``README.md`` or a path under docs/ (``clients.md``)."""
    return (ROOT / name if name == "README.md" else DOCS / name).read_text()


def code_blocks() -> list[tuple[str, str, str]]:
    """(page, language, text) of every fenced block, a block repeated verbatim on several
    pages only once (where it first appears), so each example runs once."""
    seen: set[str] = set()
    blocks = []
    for path in pages():
        for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), re.S | re.M):
            if body not in seen:
                seen.add(body)
                blocks.append((str(path.relative_to(ROOT)), lang, body))
    return blocks
