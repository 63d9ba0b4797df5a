"""The rules tests/conftest.py gives the whole suite, checked in a pytest run of their own
(a subprocess, with this conftest): the browser tier's summary counts what ran, passed,
failed and skipped; with STREAMGATE_NO_SKIPS=1 (CI) a skipped test fails the run; and a
resource left unclosed fails the test that left it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

INI = """[pytest]
addopts = -p no:cacheprovider
markers =
    browser: the browser tier
filterwarnings = error
"""
TIER = """
import pytest

pytestmark = pytest.mark.browser


def test_passes():
    pass


def test_fails():
    assert False


def test_skips():
    pytest.skip("no browser here")


@pytest.mark.xfail(reason="known", strict=True)
def test_is_a_known_failure():
    assert False


def test_outside_the_tier_passes():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A directory with our conftest, the function package on the path."""
    pytester.makeini(INI)
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT / "functions" / "streamgate"), str(ROOT)]))
    monkeypatch.delenv("STREAMGATE_NO_SKIPS", raising=False)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # hypothesis, schemathesis, ...
    return pytester


def test_the_browser_tier_summary_counts_what_ran_passed_failed_and_skipped(
        suite: pytest.Pytester) -> None:
    suite.makepyfile(test_tier=TIER)
    result = suite.runpytest_subprocess("-k", "not outside")
    result.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1)
    result.stdout.re_match_lines([r"browser tier: 3 ran \(1 passed, 1 failed, 1 xfailed\), "
                                  r"1 skipped, \d+\.\d s \(setup, calls and teardown\)"])


def test_a_skip_passes_the_run_unless_ci_says_no_tier_may_skip(
        suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    suite.makepyfile(test_tier=TIER)
    # GIVEN a run whose only problem is a skipped test
    args = ("-k", "skips or known or outside")
    assert suite.runpytest_subprocess(*args).ret == pytest.ExitCode.OK
    # WHEN CI's switch is on, THEN the skip is a failure that says why, and the run fails;
    # a known failure (xfail) is still not one
    monkeypatch.setenv("STREAMGATE_NO_SKIPS", "1")
    result = suite.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, failed=1, xfailed=1)
    result.stdout.fnmatch_lines(["*skipped, which STREAMGATE_NO_SKIPS=1 (CI) does not allow*"
                                 "no browser here*"])


def test_a_file_left_unclosed_fails_the_test_that_left_it(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_leak="""
def test_leaks_a_file_in_a_cycle(tmp_path):
    class Holder:
        pass
    holder = Holder()
    holder.me = holder
    holder.file = open(tmp_path / "x", "w")


def test_after_it():
    pass
""")
    result = suite.runpytest_subprocess()
    # THEN the leak is reported where it was made (the test's teardown), not later or never
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_file_in_a_cycle*",
                                 "*ResourceWarning*unclosed file*"])
