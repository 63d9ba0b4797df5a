"""The client programs the integration tests drive, installed where they can be: from
package.json / package-lock.json beside this file, the Codex CLI (npm ``@openai/codex``) and
Claude Code (npm ``@anthropic-ai/claude-code``), pinned. Each ships its native executable inside
a per-platform registry package, so nothing else is fetched; Claude Code's postinstall script
only copies that executable over a placeholder, so the install runs no scripts
(``--ignore-scripts``) and the tests run the platform package's executable directly.

The packages go to a cache outside the repository, one folder per lock file:
``$STREAMGATE_CLIENTS_CACHE`` or ``~/.cache/streamgate/clients/<lock hash>``.

``make test`` runs this first (``python -m tests.integration.clients.setup``); the tests' fixture
calls the same function, so ``pytest`` alone works too. Nothing here fails the run: what cannot be
installed is reported, and the tests that need it skip with that reason.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE / "package-lock.json"
NPM_TIMEOUT_S = 600
# platform.machine() → the name in Claude Code's platform packages
_ARCH = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}


class Unavailable(Exception):
    """Why a client cannot run here (the skip reason)."""


def node_modules() -> Path:
    """``node_modules`` with exactly the locked packages (``npm ci``), cached by lock hash."""
    if not shutil.which("node"):
        raise Unavailable("Node.js is not installed (the CLI clients ship as npm packages): "
                          "install nodejs and npm")
    npm = shutil.which("npm")
    if not npm:
        raise Unavailable("npm is not installed: install npm")
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("STREAMGATE_CLIENTS_CACHE")
                or Path.home() / ".cache" / "streamgate" / "clients") / digest
    modules = root / "node_modules"
    done = root / ".installed"
    if done.is_file():
        return modules
    root.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(HERE / name, root / name)
    command = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    try:
        result = subprocess.run(command, cwd=root, capture_output=True, text=True,
                                timeout=NPM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise Unavailable(f"`npm ci` did not finish in {NPM_TIMEOUT_S} s") from e
    if result.returncode != 0:
        raise Unavailable(f"`npm ci` failed ({result.returncode}): "
                          f"{(result.stderr or result.stdout).strip()[-500:]}")
    done.write_text(digest + "\n")
    return modules


def codex() -> Path:
    """The ``codex`` command of the pinned Codex CLI."""
    path = node_modules() / ".bin" / "codex"
    if not os.access(path, os.X_OK):
        raise Unavailable(f"npm installed @openai/codex, yet {path} is not executable")
    return path


def claude() -> Path:
    """The ``claude`` executable of the pinned Claude Code (its platform package's)."""
    if sys.platform != "linux":
        raise Unavailable(f"the Claude Code tests run on Linux (this is {sys.platform})")
    arch = _ARCH.get(platform.machine().lower())
    if arch is None:
        raise Unavailable(f"Claude Code has no package for {platform.machine()}")
    musl = not platform.libc_ver()[0]
    package = f"@anthropic-ai/claude-code-linux-{arch}{'-musl' if musl else ''}"
    executable = node_modules() / package / "claude"
    if not executable.is_file():
        raise Unavailable(f"npm installed no {package}/claude (an unsupported platform?)")
    executable.chmod(0o755)
    return executable


def main() -> int:
    """Install what can be installed and say what is missing; never fails the build."""
    for name, find in (("codex", codex), ("claude", claude)):
        try:
            print(f"client tests: {name}: {find()}")
        except Unavailable as e:
            print(f"client tests: {name} tests will be skipped: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
