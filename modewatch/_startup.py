"""Switching modewatch on without touching the program: ``MODEWATCH=1`` and ``modewatch run``.

``modewatch.pth`` (installed at the root of site-packages) imports this module at interpreter
start-up only when MODEWATCH is set and not "0"; unset, start-up imports nothing of modewatch,
torch, wrapt or structlog. ``install()`` then waits for torch to be imported (a wrapt post-import
hook), and starts one process-wide Watcher that finds models as they show up: at their first
``.train()``/``.eval()`` call, and when an optimizer is made for their parameters.

Nothing here may break the program: every failure is one warning on stderr, and the program
runs unwatched.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Optional

MIN_TORCH = (2, 1)

_installed = False
watcher: Optional[Any] = None  # the process-wide Watcher, once torch is imported


def enabled(environ: Any = os.environ) -> bool:
    """Whether MODEWATCH asks for watching ("1", "yes", anything but empty or "0")."""
    return environ.get("MODEWATCH", "").strip() not in ("", "0")


def install() -> None:
    """Watch every model of this process once torch is imported. Idempotent (a .pth line may
    run twice in a venv), cheap, and never raises."""
    global _installed
    if _installed or not enabled():
        return
    _installed = True
    try:
        import importlib.util

        if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
            warn("MODEWATCH is set, but torch is not installed: there is nothing to watch")
            return
        import wrapt

        wrapt.register_post_import_hook(_torch_imported, "torch")
    except Exception as exc:  # a broken install must not stop the user's program
        warn(f"MODEWATCH is set, but modewatch could not start ({type(exc).__name__}: {exc})")


def _torch_imported(torch: Any) -> None:
    global watcher
    try:
        version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
        if version < MIN_TORCH:
            warn(f"MODEWATCH is set, but torch {torch.__version__} is older than modewatch supports "
                 f"({'.'.join(map(str, MIN_TORCH))}); the program runs unwatched")
            return
        from . import logpath
        from .collector import Watcher

        problem = logpath.unwritable(logpath.substitute(logpath.template()))
        if problem is not None:  # said now, not when the program ends and the log is lost
            warn(f"{problem}; the program runs unwatched")
            return
        watcher = Watcher(None, discover=True)
        watcher.always_log = True  # a CI step analyzing the program's log must find one
    except Exception as exc:
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        warn(f"MODEWATCH is set, but modewatch could not start ({message}); the program runs unwatched")


def warn(message: str) -> None:
    """One line on stderr: the user's program may turn warnings into errors, this cannot raise."""
    try:
        sys.stderr.write(f"modewatch: warning: {message}\n")
    except Exception:
        pass
