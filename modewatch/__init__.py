"""modewatch: find PyTorch models that train or evaluate in the wrong mode, and the line that did it.

``import modewatch`` imports no torch: the analyzer runs on machines without it. ``watch`` and
``Watcher`` load the collector (and torch) when first used.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .allow import allow
from .analysis import Analysis, Finding, analyze
from .errors import LogFormatError, LogPathError, ModewatchError, UnknownRuleError

__all__ = [
    "Analysis",
    "Finding",
    "LogFormatError",
    "LogPathError",
    "ModewatchError",
    "UnknownRuleError",
    "Watcher",
    "__version__",
    "allow",
    "analyze",
    "watch",
]


def watch(model: Any, log: Any = None, **options: Any) -> Any:
    """Watch ``model``: record the mode of every Dropout/BatchNorm call into a JSON-lines log.

    Returns a :class:`Watcher`. See :func:`modewatch.collector.watch` for ``log`` and options.
    """
    from .collector import watch as _watch

    return _watch(model, log, **options)


def __getattr__(name: str) -> Any:
    if name == "Watcher":  # the class lives with the collector, which imports torch
        from .collector import Watcher

        return Watcher
    raise AttributeError(f"module 'modewatch' has no attribute {name!r}")
