"""Finding the line of user code on the stack: who called the model, who called ``.eval()``.

"User code" is any frame whose file is not inside torch, wrapt or modewatch, nor inside a
training library that calls .train()/.eval() and the model for its users (Transformers,
Lightning, Accelerate): a mode set inside ``from_pretrained()`` or ``trainer.fit()`` is attributed
to the user's line that called it, and the library function entered from there is kept as ``via``.
The verdict is cached per code object, so a walk costs a few attribute reads per frame. This
module imports no torch; it reads package locations from ``sys.modules`` when first asked.
"""

from __future__ import annotations

import os
import sys
from types import CodeType, FrameType
from typing import Optional

INTERNAL_PACKAGES = ("torch", "wrapt", "modewatch")
LIBRARY_PACKAGES = ("transformers", "lightning", "pytorch_lightning", "lightning_fabric", "accelerate")

# Library functions that recompute BatchNorm statistics on purpose, as (file name, function).
# A forward that runs beneath one of them is a recalibration pass, not an evaluation.
RECALIBRATION_FUNCTIONS = frozenset({("swa_utils.py", "update_bn")})

USER, INTERNAL, RECALIBRATION, LIBRARY = 0, 1, 2, 3

# Keyed by id(code), with the code object kept alive beside its verdict (so that its id is never
# reused): hashing a code object hashes its bytecode, ~0.4 µs, and a walk looks at several.
_verdicts: dict[int, tuple] = {}
_folders: dict[str, str] = {}  # package -> its folder, once imported


def _prefixes(packages: tuple) -> tuple[str, ...]:
    """The folders of those of ``packages`` imported so far. A package not imported yet has no
    code on any stack, so a verdict made without it stays right."""
    for name in packages:
        if name not in _folders:
            path = getattr(sys.modules.get(name), "__file__", None)
            if path:
                _folders[name] = os.path.dirname(os.path.abspath(path)) + os.sep
    return tuple(_folders[name] for name in packages if name in _folders)


def verdict(code: CodeType) -> int:
    """USER, INTERNAL or RECALIBRATION (an internal frame of a recalibration function)."""
    known = _verdicts.get(id(code))
    if known is not None:
        return known[1]
    filename = code.co_filename
    absolute = filename if filename.startswith("<") else os.path.abspath(filename)
    if absolute.startswith(_prefixes(INTERNAL_PACKAGES) + ("<frozen",)):
        internal = (os.path.basename(filename), code.co_name) in RECALIBRATION_FUNCTIONS
        result = RECALIBRATION if internal else INTERNAL
    elif absolute.startswith(_prefixes(LIBRARY_PACKAGES)):
        result = LIBRARY
    else:
        result = USER
    if len(_verdicts) < 100_000:  # code objects of exec'd strings could be endless
        _verdicts[id(code)] = (code, result)
    return result


def user_frame(frame: Optional[FrameType], skip_code=None) -> tuple[Optional[FrameType], bool]:
    """The first frame from ``frame`` outwards that is user code, and whether a recalibration
    function was passed on the way. ``skip_code(frame)`` may skip further user frames."""
    if skip_code is None:  # the common case, once per forward: the verdicts looked up inline
        recalibrating = False
        verdicts = _verdicts
        while frame is not None:
            code = frame.f_code
            known = verdicts.get(id(code))
            kind = known[1] if known is not None else verdict(code)
            if kind == USER:
                return frame, recalibrating
            if kind == RECALIBRATION:
                recalibrating = True
            frame = frame.f_back
        return None, recalibrating
    found, recalibrating, _ = user_frame_via(frame, skip_code)
    return found, recalibrating


def user_frame_via(frame: Optional[FrameType], skip_code=None) -> tuple[Optional[FrameType], bool, Optional[str]]:
    """``user_frame``, and the library function the user frame called, if a library's frames
    were passed on the way (``from_pretrained``, ``fit``)."""
    recalibrating, via = False, None
    while frame is not None:
        kind = verdict(frame.f_code)
        if kind == USER and not (skip_code is not None and skip_code(frame)):
            return frame, recalibrating, via
        if kind == RECALIBRATION:
            recalibrating = True
        elif kind == LIBRARY:
            via = frame.f_code.co_name
        frame = frame.f_back
    return None, recalibrating, via


def user_stacklevel(frame: Optional[FrameType]) -> int:
    """The ``stacklevel`` that makes a warning issued in ``frame`` point at the first user frame
    outwards (1, the frame itself, where there is none)."""
    level = 1
    while frame is not None:
        if verdict(frame.f_code) == USER:
            return level
        frame, level = frame.f_back, level + 1
    return 1
