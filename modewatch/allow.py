"""``modewatch.allow``: mark a block of code as deliberately running in an unusual mode.

A context variable (not a global) so that threads and asyncio tasks each see their own blocks.
The collector reads it once per model forward; this module imports no torch.
"""

from __future__ import annotations

import contextlib
import contextvars

TYPE_CHECKING = False  # typing is for annotations only: the CLI starts without importing it
if TYPE_CHECKING:
    from typing import Callable, Iterator

from .rules import RULES, check_rules

_allowed: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "modewatch_allowed", default=frozenset()
)


@contextlib.contextmanager
def allow(*rules: str) -> Iterator[None]:
    """Record what runs inside as deliberate: the analyzer does not report ``rules`` for it.

    For Monte-Carlo dropout, ``with modewatch.allow("dropout-in-eval"):`` around the sampling.
    With no argument every rule is allowed. An unknown rule id raises UnknownRuleError at once,
    so that a typo does not silently allow nothing. Blocks nest; inner ones add to outer ones.
    """
    wanted = check_rules(rules) if rules else frozenset(RULES)
    token = _allowed.set(_allowed.get() | wanted)
    try:
        yield
    finally:
        _allowed.reset(token)


# The rules allowed where this is called (empty outside any ``allow()`` block): the context
# variable's own C method, read once per model forward without a Python call around it.
allowed_rules: Callable[[], frozenset[str]] = _allowed.get
