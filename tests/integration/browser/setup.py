"""What the browser tests need, installed where it can be: Debian's Chromium and Node.js with
npm (with apt, when they are missing and we are root) and, from package.json /
package-lock.json beside this file, Playwright's core (which drives that Chromium: it downloads
no browser of its own) and the official ``openai`` SDK, whose browser build the tests serve to a
page.

The npm packages go to a cache outside the repository, one folder per lock file:
``$STREAMGATE_BROWSER_CACHE`` or ``~/.cache/streamgate/browser-tests/<lock hash>``.

``make test`` runs this first (``python -m tests.integration.browser.setup``); the tests' fixture
calls the same functions, so ``pytest`` alone works too. Only a machine that lacks what we cannot
install ourselves (not root, or no apt-get) raises :class:`Unavailable`, and the browser tests
skip with that reason; an install that fails (apt-get, ``npm ci``) raises :class:`SetupError`,
and the browser tests fail with it. This script itself never fails the build: it reports, and
the tests decide.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE / "package-lock.json"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
APT_TIMEOUT_S = 900
NPM_TIMEOUT_S = 600


class Unavailable(Exception):
    """What the browser tests need is missing and cannot be installed here (the skip reason)."""


class SetupError(Exception):
    """Installing what the browser tests need failed: a failure, never a reason to skip."""


def apt_install(packages: list[str], what: str) -> None:
    """``apt-get install`` ``packages`` (as root); :class:`Unavailable` where that cannot
    happen, :class:`SetupError` when it fails."""
    if not shutil.which("apt-get"):
        raise Unavailable(f"{what} is not installed and there is no apt-get to install it: "
                          f"install {' '.join(packages)}")
    if os.geteuid() != 0:
        raise Unavailable(f"{what} is not installed and installing it needs root: run "
                          f"`sudo apt-get install {' '.join(packages)}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", *packages]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=APT_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as e:
            raise SetupError(f"`{' '.join(command)}` did not finish in {APT_TIMEOUT_S} s") from e
        if done.returncode != 0:
            raise SetupError(f"`{' '.join(command)}` failed ({done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-500:]}")


def chromium() -> str:
    """The Chromium executable, installed with apt if it is missing and that is possible."""
    found = _which_chromium()
    if found:
        return found
    apt_install(["chromium"], "Chromium")
    found = _which_chromium()
    if not found:
        raise SetupError("apt-get installed chromium, yet no chromium executable is on PATH")
    return found


def _which_chromium() -> str | None:
    override = os.environ.get("STREAMGATE_CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def node() -> str:
    """Node.js (which runs playwright-core), installed with apt with npm if it is missing."""
    path = shutil.which("node")
    if path:
        return path
    apt_install(["nodejs", "npm"], "Node.js")
    path = shutil.which("node")
    if not path:
        raise SetupError("apt-get installed nodejs, yet no node executable is on PATH")
    return path


def node_modules() -> Path:
    """``node_modules`` with exactly the locked packages (``npm ci``), cached by lock hash."""
    node()
    npm = shutil.which("npm")
    if not npm:
        apt_install(["npm"], "npm")
        npm = shutil.which("npm")
        if not npm:
            raise SetupError("apt-get installed npm, yet no npm executable is on PATH")
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("STREAMGATE_BROWSER_CACHE")
                or Path.home() / ".cache" / "streamgate" / "browser-tests") / digest
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
        raise SetupError(f"`npm ci` did not finish in {NPM_TIMEOUT_S} s") from e
    if result.returncode != 0:
        raise SetupError(f"`npm ci` failed ({result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()[-500:]}")
    done.write_text(digest + "\n")
    return modules


def main() -> int:
    """Install what can be installed and say what is missing or failed; never fails the build
    (the browser tests then skip, or fail, saying why)."""
    for what, step in (("chromium", chromium), ("node", node), ("node_modules", node_modules)):
        try:
            print(f"browser tests: {what}: {step()}")
        except Unavailable as e:
            print(f"browser tests will be skipped: {e}")
            break
        except SetupError as e:
            print(f"browser tests will fail: {e}")
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
