"""pytest plugin: ``pytest --modewatch`` fails a test whose models show error findings, and a
``modewatch`` fixture watches a model inside a test and asserts on its findings.

Loaded by every pytest run where modewatch is installed (entry point ``pytest11``), so loading it
imports no torch; torch is imported only by a test that uses it.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import pytest

from .analysis import analyze
from .rules import severity_rank


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("modewatch", "find models that train or evaluate in the wrong mode")
    group.addoption("--modewatch", action="store_true", default=False,
                    help="fail tests whose models train or evaluate in the wrong mode")
    group.addoption("--modewatch-fail-on", default="error", choices=("error", "warning", "info"),
                    help="the least severe finding that fails a test (default: error)")


def _describe(findings: list) -> str:
    lines = ["modewatch found models in the wrong mode:"]
    lines += [f"  {f.severity} {f.rule}: {f.message}" for f in findings]
    return "\n".join(lines)


class ModewatchFixture:
    """What the ``modewatch`` fixture gives a test: watch models, then look at the findings."""

    def __init__(self, folder: str):
        self.folder = folder
        self._watchers: list = []

    def watch(self, model: Any, **options: Any) -> Any:
        """Watch ``model`` for the rest of the test (``modewatch.watch`` with a log of its own)."""
        from .collector import watch

        watcher = watch(model, log=os.path.join(self.folder, f"watch-{len(self._watchers)}.jsonl"), **options)
        self._watchers.append(watcher)
        return watcher

    def findings(self, fail_on: Optional[str] = None) -> list:
        """Close the watchers and return their findings (those at least as severe as ``fail_on``)."""
        for watcher in self._watchers:
            watcher.close()
        logs = [w.path for w in self._watchers if os.path.exists(w.path)]
        found = analyze(*logs).findings if logs else []
        if fail_on is None:
            return found
        return [f for f in found if severity_rank(f.severity) >= severity_rank(fail_on)]

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: Any) -> Iterator[None]:
    config = item.config
    # A test that uses the modewatch fixture checks its findings itself (often on purpose bugs).
    if not config.getoption("modewatch") or "modewatch" in getattr(item, "fixturenames", ()):
        yield
        return
    import tempfile

    from .collector import Watcher  # torch: only now, and only with --modewatch

    folder = tempfile.mkdtemp(prefix="modewatch-pytest-")
    watcher = Watcher(None, log=os.path.join(folder, "test.jsonl"), discover=True)
    outcome = yield
    watcher.close()
    if outcome.excinfo is not None or not os.path.exists(watcher.path):
        return
    floor = severity_rank(config.getoption("modewatch_fail_on"))
    bad = [f for f in analyze(watcher.path).findings if severity_rank(f.severity) >= floor]
    if bad:  # the test's own outcome becomes this failure (raising from a hook wrapper would warn)
        outcome.force_exception(pytest.fail.Exception(_describe(bad), pytrace=False))
