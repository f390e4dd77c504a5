"""modewatch's exceptions: one short message each, with the docs anchor that explains it."""

from __future__ import annotations

DOCS = "modewatch's docs/errors.md"


class ModewatchError(Exception):
    """Base of every error modewatch raises on purpose.

    ``anchor`` names the section of docs/errors.md that explains the error; ``str()`` gives the
    message followed by that link, so a user who sees only the last line still has a pointer.
    """

    anchor = "modewatch-error"

    def __init__(self, message: str, anchor: str | None = None):
        super().__init__(message)
        self.message = message
        if anchor is not None:
            self.anchor = anchor

    def __str__(self) -> str:
        return f"{self.message} (see {DOCS}#{self.anchor})"


class LogPathError(ModewatchError, OSError):
    """The event log cannot be created where ``watch(log=...)``/MODEWATCH_LOG says."""

    anchor = "log-path"


class LogFormatError(ModewatchError):
    """A file given to the analyzer is missing, unreadable, empty or not a modewatch log."""

    anchor = "bad-log"


class UnknownRuleError(ModewatchError, ValueError):
    """A rule id that modewatch does not know (in ``allow()`` or ``--ignore``)."""

    anchor = "unknown-rule"


class ModewatchWarning(UserWarning):
    """A finding reported while the model runs: ``watch(model, on_finding="warn")``."""


class ModeFindingError(ModewatchError):
    """An error finding, raised where it happened: ``watch(model, on_finding="raise")``."""

    anchor = "mode-finding"

    def __init__(self, finding: object):
        super().__init__(f"{getattr(finding, 'rule', '')}: {getattr(finding, 'message', '')}")
        self.finding = finding
