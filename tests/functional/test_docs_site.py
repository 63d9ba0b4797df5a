"""The documentation site builds, strictly and offline, and shows only commands that exist.

``mkdocs build --strict`` fails on any warning: a page missing from the nav's files, a link to
a page or an anchor that does not exist (``validation`` in mkdocs.yml), a snippet whose file is
missing. The examples that run against the dev server are run by
tests/integration/test_docs_examples.py."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.docs_text import DOCS, ROOT, code_blocks


def _build(site: Path, config: Path = ROOT / "mkdocs.yml") -> subprocess.CompletedProcess[str]:
    # No network: nothing in the build may reach for it (no web fonts, no downloading plugin).
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "no_proxy": "*",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_the_site_builds_in_strict_mode_without_a_warning(tmp_path: Path) -> None:
    # WHEN the site is built as `make docs` serves it, strictly, into a temporary directory
    built = _build(tmp_path / "site")
    # THEN it builds, and nothing it said was a warning or an error
    assert built.returncode == 0, built.stderr
    assert not re.search(r"^(WARNING|ERROR)\b", built.stderr, re.M), built.stderr
    # AND every page under docs/ became a page of the site
    for md in DOCS.rglob("*.md"):
        relative = md.relative_to(DOCS).with_suffix("")
        html = (tmp_path / "site" / (relative.parent if relative.name == "index" else relative)
                / "index.html")
        assert html.is_file(), md


def test_the_openapi_page_holds_openapi_yaml_verbatim(tmp_path: Path) -> None:
    import html

    built = _build(tmp_path / "site")
    assert built.returncode == 0, built.stderr
    page = (tmp_path / "site" / "api" / "openapi" / "index.html").read_text()
    # the highlighted code block, its markup removed, is the document line for line
    code = html.unescape(re.sub(r"<[^>]+>", "", page))
    for line in (ROOT / "openapi.yaml").read_text().splitlines():
        assert line in code, line


def test_a_broken_anchor_fails_the_build(tmp_path: Path) -> None:
    # GIVEN the site with one link to an anchor no page has
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[gone](other.md#no-such-heading)\n")
    (docs / "other.md").write_text("# Other\n")
    config = (ROOT / "mkdocs.yml").read_text()
    config = re.sub(r"(?ms)^nav:.*", "", config).replace("docs_dir: docs", f"docs_dir: {docs}")
    (tmp_path / "mkdocs.yml").write_text(config)
    # WHEN it is built as the tests build ours THEN the build fails, naming the anchor
    built = _build(tmp_path / "site", tmp_path / "mkdocs.yml")
    assert built.returncode != 0
    assert "no-such-heading" in built.stderr, built.stderr


def _shell_lines() -> list[tuple[str, str]]:
    """(page, command) for each shell command the docs show, continuation lines joined."""
    lines = []
    for page, lang, body in code_blocks():
        if lang not in ("bash", "sh", ""):
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                lines.append((page, command))
    return lines


def test_every_make_target_the_docs_show_exists() -> None:
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
    shown = 0
    for page, command in _shell_lines():
        for match in re.finditer(r"(?:^|&&\s*|;\s*)(?:\w+=\S+\s+)*make\s+([^|;&]*)", command):
            words = [w for w in shlex.split(match.group(1)) if "=" not in w and
                     not w.startswith("-")]
            assert words, (page, command)
            assert words[0] in targets, f"{page}: `{command}`: no make target {words[0]!r}"
            shown += 1
    assert shown >= 8


def test_every_pytest_path_and_marker_the_docs_show_exists() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    markers = {m.split(":")[0] for m in pyproject["tool"]["pytest"]["ini_options"]["markers"]}
    shown = 0
    for page, command in _shell_lines():
        if " -m pytest " not in command:
            continue
        words = shlex.split(command.split("&&")[0])
        for i, word in enumerate(words):
            if word.startswith("tests"):
                assert (ROOT / word.split("::")[0]).exists(), f"{page}: `{command}`"
            if word == "-m" and words[i + 1] != "pytest":
                named = set(re.findall(r"\w+", words[i + 1])) - {"not", "and", "or"}
                assert named <= markers, f"{page}: `{command}`: unknown marker"
        shown += 1
    assert shown >= 4


def test_make_docs_serves_the_site_on_loopback() -> None:
    dry = subprocess.run(["make", "-n", "docs"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert dry.returncode == 0, dry.stderr
    assert "mkdocs serve -a 127.0.0.1:8000" in dry.stdout, dry.stdout
