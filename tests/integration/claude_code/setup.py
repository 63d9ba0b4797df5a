"""Claude Code for the integration tests, installed where it can be: the version pinned in
package.json / package-lock.json beside this file, with ``npm ci`` into a cache outside the
repository, one folder per lock file (``$STREAMGATE_CLAUDE_CODE_CACHE`` or
``~/.cache/streamgate/claude-code/<lock hash>``).

Claude Code ships as a native executable in a per-platform package; its postinstall script
only copies that executable over a placeholder, so the install runs no scripts
(``--ignore-scripts``) and the tests run the platform package's executable directly.

``make test`` runs this first (``python -m tests.integration.claude_code.setup``); the tests'
fixture calls the same function, so ``pytest`` alone works too. Nothing here fails the run:
what cannot be installed is reported, and the Claude Code tests skip with that reason.
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
    """Why the Claude Code tests cannot run here (the skip reason)."""


def _platform_package() -> str:
    if sys.platform != "linux":
        raise Unavailable(f"the Claude Code tests run on Linux (this is {sys.platform})")
    arch = _ARCH.get(platform.machine().lower())
    if arch is None:
        raise Unavailable(f"Claude Code has no package for {platform.machine()}")
    musl = not platform.libc_ver()[0]
    return f"@anthropic-ai/claude-code-linux-{arch}{'-musl' if musl else ''}"


def claude() -> Path:
    """The ``claude`` executable of the pinned version, installed on first use."""
    npm = shutil.which("npm")
    if not npm:
        raise Unavailable("npm is not installed: install nodejs and npm")
    package = _platform_package()
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("STREAMGATE_CLAUDE_CODE_CACHE")
                or Path.home() / ".cache" / "streamgate" / "claude-code") / digest
    executable = root / "node_modules" / package / "claude"
    done = root / ".installed"
    if done.is_file() and executable.is_file():
        return executable
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
    if not executable.is_file():
        raise Unavailable(f"npm installed no {package}/claude (an unsupported platform?)")
    executable.chmod(0o755)
    done.write_text(digest + "\n")
    return executable


def main() -> int:
    """Install what can be installed and say what is missing; never fails the build."""
    try:
        print(f"claude code tests: {claude()}")
    except Unavailable as e:
        print(f"claude code tests will be skipped: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
