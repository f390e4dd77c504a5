"""modewatch: find PyTorch models that train or evaluate in the wrong mode, and the line that did it.

``import modewatch`` imports no torch: the analyzer runs on machines without it. ``watch`` and
``Watcher`` load the collector (and torch) when first used.
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .allow import allow  # eager: the submodule of the same name would shadow a lazy function
from .errors import (LogFormatError, LogPathError, ModeFindingError, ModewatchError, ModewatchWarning,
                     UnknownRuleError)

TYPE_CHECKING = False  # for the annotations only: `import modewatch` imports no torch, nor typing
if TYPE_CHECKING:
    import os
    from typing import Any, Mapping

    import torch

    from .analysis import Analysis, Finding, analyze
    from .collector import Watcher

__all__ = [
    "Analysis",
    "Finding",
    "LogFormatError",
    "LogPathError",
    "ModeFindingError",
    "ModewatchError",
    "ModewatchWarning",
    "UnknownRuleError",
    "Watcher",
    "__version__",
    "allow",
    "analyze",
    "watch",
]


def watch(model: "torch.nn.Module", log: "str | os.PathLike[str] | None" = None, *, flush_seconds: float = 1.0,
          fold: bool = True, on_finding: "str | None" = None, layers: "Mapping[type, str] | None" = None,
          **unknown: Any) -> "Watcher":
    """Watch `model`: record the mode of every Dropout/BatchNorm call into a JSON-lines log.

    Also watched: `nn.MultiheadAttention`, functional dropout (`F.dropout` and variants,
    `scaled_dot_product_attention`'s `dropout_p`) called in the model's forward, and custom
    leaf layers whose forward reads `self.training` (stochastic depth, custom norms).

    `model` is any `nn.Module`: plain, DDP-wrapped, a Hugging Face or Lightning module, one later
    passed to `torch.compile`. Returns a `Watcher`: use it as a context manager, or call
    `close()` (also run at interpreter exit); `Watcher.path` is where the log went.

    Args:
        model: the model to watch.
        log: the log's path (str or PathLike); `{rank}` and `{pid}` are substituted. Without it,
            `$MODEWATCH_LOG`, else `modewatch-{pid}.jsonl` in the working directory
            (`modewatch-rank{rank}-{pid}.jsonl` in a distributed job).
        flush_seconds: the longest time recorded calls wait before being written (default 1.0).
        fold: False writes one run per forward: a larger log, the same findings (default True).
        on_finding: `"warn"` issues a `ModewatchWarning` at the first error finding of each cause,
            `"raise"` raises `ModeFindingError` there (from the model call or optimizer step
            that completed it), with the analyzer's message and sites; default: only the log.
        layers: custom mode-sensitive layers that automatic detection misses, as a dict from
            module class to `"dropout"` or `"norm"`: `{DropPath: "dropout"}`.

    Raises:
        LogPathError: the log cannot be written (an unwritable folder, a full disk), before
            training starts.
        TypeError: `model` is not an `nn.Module`, an option is unknown, or `layers` is not a
            dict of module classes.
        ValueError: a category in `layers` is not "dropout" or "norm".
    """
    if unknown:
        raise TypeError(f"modewatch.watch() got an unknown option {sorted(unknown)[0]!r} "
                        "(it takes flush_seconds, fold, on_finding, layers)")
    if model is None:  # Watcher(None) is MODEWATCH=1's watcher of models yet to come
        raise TypeError("modewatch.watch() needs a torch.nn.Module, not None")
    from .collector import Watcher

    return Watcher(model, log, flush_seconds=flush_seconds, fold=fold, on_finding=on_finding, layers=layers)


# Loaded when first used: `import modewatch` (and `modewatch --version`) stays light, and only the
# collector imports torch.
_LAZY = {"Analysis": "analysis", "Finding": "analysis", "analyze": "analysis", "Watcher": "collector"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'modewatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
