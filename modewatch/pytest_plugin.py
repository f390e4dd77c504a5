"""pytest plugin: ``pytest --modewatch`` fails a test whose models show error findings, and a
``modewatch`` fixture watches a model inside a test and asserts on its findings.

Loaded by every pytest run where modewatch is installed (entry point ``pytest11``), so loading it
imports no torch, and without ``--modewatch`` nothing runs around the tests: the plugin object
that does is registered only when the option is given (as pytest-cov does). docs/pytest.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

import pytest

from .analysis import analyze
from .rules import SEVERITIES


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("modewatch", "find models that train or evaluate in the wrong mode")
    group.addoption("--modewatch", action="store_true", default=False,
                    help="fail tests whose models train or evaluate in the wrong mode")
    group.addoption("--modewatch-fail-on", default="error", choices=SEVERITIES[::-1],
                    help="the least severe finding that fails a test (default: error)")


def pytest_configure(config: Any) -> None:
    if config.getoption("modewatch", False):
        config.pluginmanager.register(WatchEveryTest(config.getoption("modewatch_fail_on")), "modewatch-watcher")


def _describe(findings: list) -> str:
    lines = ["modewatch found models in the wrong mode:"]
    lines += [f"  {f.severity} {f.rule}: {f.message}" for f in findings]
    return "\n".join(lines)


class WatchEveryTest:
    """Under ``--modewatch``: every model of each test is watched (as ``MODEWATCH=1`` would), and
    a test with findings at or above ``fail_on`` fails with them. Logs go to one temporary
    folder for the session, each removed once analyzed, the folder at the end."""

    def __init__(self, fail_on: str):
        self.fail_on = fail_on
        self.folder = tempfile.mkdtemp(prefix="modewatch-pytest-")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: Any) -> Iterator[None]:
        # A test that uses the modewatch fixture checks its findings itself (often on purpose bugs).
        if "modewatch" in getattr(item, "fixturenames", ()):
            yield
            return
        from .collector import Watcher  # torch: only now

        watcher = Watcher(None, log=os.path.join(self.folder, "test.jsonl"), discover=True)
        outcome = yield
        watcher.close()
        if not os.path.exists(watcher.path):
            return
        try:
            if outcome.excinfo is None:
                bad = analyze(watcher.path).failing(self.fail_on)
                if bad:
                    item.stash[_FOUND] = _describe(bad)
        finally:
            os.unlink(watcher.path)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: Any, call: Any) -> Iterator[None]:
        outcome = yield
        found = item.stash.get(_FOUND, None)
        if found is not None and call.when == "call":
            report = outcome.get_result()
            report.outcome = "failed"  # the test's own outcome becomes this failure
            report.longrepr = found

    def pytest_unconfigure(self, config: Any) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


_FOUND = pytest.StashKey[str]()


class ModewatchFixture:
    """What the ``modewatch`` fixture gives a test: watch models, then look at the findings."""

    def __init__(self, folder: str):
        self.folder = folder
        self._watchers: list = []

    def watch(self, model: Any, **options: Any) -> Any:
        """Watch ``model`` for the rest of the test (``modewatch.watch`` with a log of its own)."""
        from . import watch

        watcher = watch(model, log=os.path.join(self.folder, f"watch-{len(self._watchers)}.jsonl"), **options)
        self._watchers.append(watcher)
        return watcher

    def findings(self, fail_on: Optional[str] = None) -> list:
        """Close the watchers and return their findings (those at least as severe as ``fail_on``)."""
        for watcher in self._watchers:
            watcher.close()
        logs = [w.path for w in self._watchers if os.path.exists(w.path)]
        if not logs:
            return []
        analysis = analyze(*logs)
        return analysis.findings if fail_on is None else analysis.failing(fail_on)

    def assert_clean(self, fail_on: str = "error") -> None:
        """Fail the test, with the findings in the report, if any reaches ``fail_on``."""
        bad = self.findings(fail_on)
        if bad:
            pytest.fail(_describe(bad), pytrace=False)

    def close(self) -> None:
        for watcher in self._watchers:
            watcher.close()


@pytest.fixture
def modewatch(tmp_path: Any) -> Iterator[ModewatchFixture]:
    """Watch models inside a test: ``modewatch.watch(model)``, then ``modewatch.findings()`` or
    ``modewatch.assert_clean()``."""
    fixture = ModewatchFixture(str(tmp_path))
    try:
        yield fixture
    finally:
        fixture.close()
