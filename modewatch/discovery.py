"""``MODEWATCH=1``: finding the models of a program that does not call ``watch()``.

A model is found at its first ``.train()``/``.eval()`` call (the outermost module called), and
when an optimizer is made for its parameters: among the locals of the code that made the
optimizer (and their attributes, for trainer objects), the largest module that holds the
optimizer's first parameter. Every model found is watched as ``watch()`` would watch it.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from . import sites


def model_of_optimizer(optimizer: Any, frame: Any) -> tuple:
    """(the model ``optimizer`` was made for, the user frame that made it), or (None, None)."""
    first = next((p for group in optimizer.param_groups for p in group["params"]), None)
    user, _ = sites.user_frame(frame)
    if first is None or user is None:
        return None, None
    candidates = []
    for value in list(user.f_locals.values()):
        if isinstance(value, nn.Module):
            candidates.append(value)
        elif isinstance(getattr(value, "__dict__", None), dict):
            candidates.extend(v for v in list(vars(value).values()) if isinstance(v, nn.Module))
    owners = [m for m in candidates if any(p is first for p in m.parameters())]
    return (_largest(owners), user) if owners else (None, None)


def _largest(modules: list) -> Optional[nn.Module]:
    return max(modules, key=lambda m: sum(1 for _ in m.modules()))
