"""``watch(model, on_finding="warn" | "raise")``: findings told while the model runs.

The analyzer's own Job is fed the watcher's definitions and rows as they are made (through the
reader's checks, as a log would be read), so that a finding is told with the same words and sites
as ``modewatch analyze`` gives later: warned once per cause, or raised. Only error findings are
told; a verdict that more of the run could change (an EMA target not yet recognised) waits until
it is settled, or until the watcher closes.
"""

from __future__ import annotations

import sys
import warnings

from . import sites
from .errors import ModeFindingError, ModewatchWarning

ON_FINDING = ("warn", "raise")


class Live:
    def __init__(self, path: str, on_finding: str):
        from .analysis import Job  # the analysis imports no torch; imported only when live
        from .format import SCHEMA
        from .reader import Header, LogReader

        self.on_finding = on_finding
        self.reader = LogReader(path)
        self.job = Job()
        self.add = self.job.start_log(path, Header(SCHEMA, "", None, None, None, (), None, None), self.reader.facts)
        self.told: set = set()

    def feed(self, event: dict) -> None:
        for calls in self.reader.feed(event):
            self.add(calls)

    def check(self, rows: list, step: int, final: bool = False) -> None:
        """Feed ``rows`` (``step``: the optimizer steps completed now); tell each new error finding
        (``final``: the watcher is closing)."""
        self.feed({"event": "calls", "step": step, "rows": rows})
        for finding in self.job.findings(final):
            key = (finding.rule, finding.severity, finding.cause)
            if finding.severity != "error" or key in self.told:
                continue
            self.told.add(key)
            if self.on_finding == "raise":
                raise ModeFindingError(finding)
            warnings.warn(f"{finding.rule}: {finding.message}", ModewatchWarning,
                          stacklevel=sites.user_stacklevel(sys._getframe()))
