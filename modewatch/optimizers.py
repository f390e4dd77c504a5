"""Which optimizer steps which watched model: steps counted per model, and the ``optimized`` facts.

An optimizer is looked at once (again when its param groups change): the watched models whose
parameters it holds, and the norm layers whose parameters it holds, are written down (the
analysis's "left out of every optimizer", stat-update-in-frozen). After that, a step costs a
dictionary look-up. Each model counts the steps of the optimizers holding its parameters: a
forward is stale after steps of *its* model's optimizers, never of others'.
"""

from __future__ import annotations

import weakref
from typing import Any

from . import compat
from .catalog import Catalog
from .registry import Registry


class Optimizers:
    def __init__(self, registry: Registry, catalog: Catalog):
        self.registry = registry
        self.catalog = catalog
        self._seen: dict = {}  # id(optimizer) -> (weakref, param groups seen, Model records it holds)

    def forget(self) -> None:
        """A model was added: every optimizer's verdict may change."""
        self._seen.clear()

    def created(self, optimizer: Any, step: int) -> None:
        """An optimizer was made: the watched models it holds are written down now (``optimized``),
        not at its first step only, so that a run that never steps (a short smoke test that
        accumulates gradients) still tells that they are trained."""
        self._held(optimizer, step)

    def step(self, optimizer: Any, step: int) -> bool:
        """An optimizer stepped: count it for the models it holds; whether it holds any."""
        cached = self._held(optimizer, step)
        for record in cached[2]:
            record.steps += 1
            record.stepped = True
        return bool(cached[2])

    def _held(self, optimizer: Any, step: int) -> tuple:
        """What ``_look_at`` found of ``optimizer``, looked at again when its param groups change."""
        groups = optimizer.param_groups
        seen = (len(groups), id(groups[-1]["params"]) if groups else None)
        cached = self._seen.get(id(optimizer))
        if cached is None or cached[1] != seen or cached[0]() is not optimizer:
            cached = self._look_at(optimizer, groups, seen, step)
        return cached

    def _look_at(self, optimizer: Any, groups: list, seen: tuple, step: int) -> tuple:
        """The watched models whose parameters ``optimizer`` holds (kept, with what was seen of its
        param groups); the first time, an ``optimized`` event."""
        registry = self.registry
        with registry.lock:
            held = {id(p) for group in groups for p in group["params"]}
            models = []
            for record in registry.models:
                module = record.ref()
                if module is None:
                    continue
                # Read again: a head replaced after watch() (transfer learning) has new parameters.
                record.param_ids = frozenset(id(p) for p in module.parameters())
                if not record.param_ids.isdisjoint(held):
                    models.append(record)
            layers = [layer for layer, ref in registry.norm_layers if (module := ref()) is not None
                      and any(id(p) in held for p in compat.own_parameters(module).values() if p is not None)]
            if models:
                self.catalog.define("optimized", step=step, models=[m.index for m in models], layers=layers)
            if len(self._seen) > 64:
                self._seen = {key: value for key, value in self._seen.items() if value[0]() is not None}
            cached = self._seen[id(optimizer)] = (weakref.ref(optimizer), seen, tuple(models))
            return cached
