"""Functional dropout: ``F.dropout`` and its variants, and ``scaled_dot_product_attention``'s
``dropout_p`` (Transformers' attention uses one or the other).

These drop activations without an ``nn.Dropout`` module, so no layer hook sees them. While a
watcher is active, ``patches`` replaces them in ``torch.nn.functional`` by the wrappers made here;
the watcher attributes each call to the module whose forward made it (``enclosing_module``). A
plain Python wrapper, not wrapt: ``torch.compile`` traces through it (see ``_compiling``).

What a call *did* is reduced to the mode and p the collector records (see ``row_values``).
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any, Callable, Optional

import torch
from torch import nn

# (name in torch.nn.functional, index of p in its positional arguments, p's keyword, p's default,
#  index of training, training's default); sdpa has no training argument: dropout_p is the switch.
FUNCTIONS = (
    ("dropout", 1, "p", 0.5, 2, True),
    ("dropout1d", 1, "p", 0.5, 2, True),
    ("dropout2d", 1, "p", 0.5, 2, True),
    ("dropout3d", 1, "p", 0.5, 2, True),
    ("alpha_dropout", 1, "p", 0.5, 2, False),
    ("feature_alpha_dropout", 1, "p", 0.5, 2, False),
    ("scaled_dot_product_attention", 4, "dropout_p", 0.0, None, True),
)

MAX_FRAMES = 12  # frames looked at, outwards from the call, for the module that made it

# nn.MultiheadAttention drops through F.multi_head_attention_forward, which calls the wrappers;
# its layer hook records those calls already, so the wrapper lets them through at once.
_RECORDED_BY_LAYER = frozenset({id(torch.nn.functional.multi_head_attention_forward.__code__)})  # ids: see sites


def originals_namespace() -> types.ModuleType:
    """A stand-in for ``torch.nn.functional`` holding its functions as they are now (unwrapped).

    torch's Dropout modules call ``F.dropout`` through their module's global ``F``; given this
    instead, they reach torch's own function directly, with no wrapper to pass through (their
    layer hooks record those calls already). Only functions are looked up there.
    """
    namespace = types.ModuleType(torch.nn.functional.__name__)
    namespace.__dict__.update(vars(torch.nn.functional))
    return namespace


_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def number(value: Any) -> Optional[float]:
    """p as a float, or None where it is not a plain number (a tensor: reading it would sync)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _flag(value: Any) -> bool:
    """training as a bool; a value that is not a plain bool or int (a tensor) counts as True."""
    return bool(value) if isinstance(value, (bool, int)) else True


def make_wrapper(original: Callable, name: str, p_index: int, p_keyword: str, p_default: float,
                 training_index: Optional[int], training_default: bool, on_call: Callable) -> Callable:
    """A stand-in for ``torch.nn.functional.<name>`` that tells ``on_call(kind, p, training, frame)``
    about each call (not those nn.MultiheadAttention makes: its hook records them), then calls the
    original, whatever happened."""
    kind = f"F.{name}"

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _compiling():  # traced by torch.compile: constant, the branch disappears
            try:
                frame = sys._getframe(1)
                if id(frame.f_code) not in _RECORDED_BY_LAYER:
                    p = args[p_index] if len(args) > p_index else kwargs.get(p_keyword, p_default)
                    if training_index is None:
                        training = True
                    else:
                        training = args[training_index] if len(args) > training_index else \
                            kwargs.get("training", training_default)
                    on_call(kind, number(p), _flag(training), frame)
            except Exception:  # the watcher reports its own failures; nothing reaches the user
                pass
        return original(*args, **kwargs)

    wrapper.__modewatch_original__ = original  # type: ignore[attr-defined]
    return wrapper


_SELF_NAMES = ("self", "module")  # Hugging Face's attention functions take the module as `module`
_receivers: dict = {}  # id(code) -> (code, its receiver's name); ids, not code hashes (see sites)


def _receiver(code: types.CodeType) -> Optional[str]:
    """The name of the argument of ``code`` that may hold a module (``self``), or None."""
    known = _receivers.get(id(code))
    if known is not None:
        return known[1]
    found = code.co_varnames[0] if code.co_argcount and code.co_varnames[0] in _SELF_NAMES else None
    if len(_receivers) < 100_000:
        _receivers[id(code)] = (code, found)
    return found


def enclosing_module(frame: Any, lookup: Callable[[nn.Module], Any]) -> tuple:
    """The innermost module on the stack, from ``frame`` outwards, that ``lookup`` knows, with what
    ``lookup`` says of it; (None, None) where there is none."""
    for _ in range(MAX_FRAMES):
        if frame is None:
            break
        name = _receiver(frame.f_code)
        if name is not None:
            candidate = frame.f_locals.get(name)
            if isinstance(candidate, nn.Module):
                known = lookup(candidate)
                if known is not None:
                    return candidate, known
        frame = frame.f_back
    return None, None


def row_values(p: Optional[float], training: bool, module_training: bool) -> tuple:
    """(training, p) to record for one functional call, by what it did and its module's mode.

    - It dropped: recorded as a Dropout in train mode with that p, whatever the module's mode
      (a module in eval mode whose call still drops ignores its mode: dropout-in-eval).
    - It did not drop and the module is in train mode: dropout configured off (p 0, or a
      deliberate training=False); recorded with p 0, which no rule reports.
    - It did not drop and the module is in eval mode: switched off by the mode. Transformers
      passes p=0.0 in eval mode, so the configured p is unknown (None) unless it was given.
    """
    if training and (p is None or p > 0):
        return True, p
    if module_training:
        return True, 0.0
    return False, p if p else None
