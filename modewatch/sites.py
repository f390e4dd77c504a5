"""Finding the line of user code on the stack: who called the model, who called ``.eval()``.

"User code" is any frame whose file is not inside torch, wrapt or modewatch. The verdict is
cached per code object, so a walk costs a few attribute reads per frame. This module imports
no torch; it reads package locations from ``sys.modules`` when first asked.
"""

from __future__ import annotations

import os
import sys
from types import CodeType, FrameType
from typing import Optional

INTERNAL_PACKAGES = ("torch", "wrapt", "modewatch")

# Library functions that recompute BatchNorm statistics on purpose, as (file name, function).
# A forward that runs beneath one of them is a recalibration pass, not an evaluation.
RECALIBRATION_FUNCTIONS = frozenset({("swa_utils.py", "update_bn")})

USER, INTERNAL, RECALIBRATION = 0, 1, 2

_verdicts: dict[CodeType, int] = {}
_prefixes: Optional[tuple[str, ...]] = None


def _internal_prefixes() -> tuple[str, ...]:
    global _prefixes
    if _prefixes is None or len(_prefixes) < len(INTERNAL_PACKAGES):
        found = []
        for name in INTERNAL_PACKAGES:
            module = sys.modules.get(name)
            path = getattr(module, "__file__", None)
            if path:
                found.append(os.path.dirname(os.path.abspath(path)) + os.sep)
        if len(found) < len(INTERNAL_PACKAGES):  # not all imported yet: do not cache a partial answer
            return tuple(found) + ("<frozen",)
        _prefixes = tuple(found) + ("<frozen",)
    return _prefixes


def verdict(code: CodeType) -> int:
    """USER, INTERNAL or RECALIBRATION (an internal frame of a recalibration function)."""
    try:
        return _verdicts[code]
    except KeyError:
        pass
    filename = code.co_filename
    absolute = filename if filename.startswith("<") else os.path.abspath(filename)
    if not absolute.startswith(_internal_prefixes()):
        result = USER
    elif (os.path.basename(filename), code.co_name) in RECALIBRATION_FUNCTIONS:
        result = RECALIBRATION
    else:
        result = INTERNAL
    if len(_verdicts) < 100_000:  # code objects of exec'd strings could be endless
        _verdicts[code] = result
    return result


def user_frame(frame: Optional[FrameType], skip_code=None) -> tuple[Optional[FrameType], bool]:
    """The first frame from ``frame`` outwards that is user code, and whether a recalibration
    function was passed on the way. ``skip_code(frame)`` may skip further user frames."""
    recalibrating = False
    while frame is not None:
        kind = verdict(frame.f_code)
        if kind == USER and not (skip_code is not None and skip_code(frame)):
            return frame, recalibrating
        if kind == RECALIBRATION:
            recalibrating = True
        frame = frame.f_back
    return None, recalibrating
