"""Which ``.train()``/``.eval()`` call a layer's mode is blamed on (a finding's ``mode_site``).

Each user call is one ``mode`` definition (not one per submodule), at the line of the code that
called it: past torch, past the training libraries that set modes for their users (the library
function entered is kept as ``via``), past a model's own ``train()`` override. Every watched layer
and module it reaches remembers it; a layer's call records it when the layer is still in the
mode it set (``.training`` assigned directly since leaves it unblamed).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from . import sites
from .catalog import Catalog
from .registry import Registry


def mode_call(registry: Registry, catalog: Catalog, kept_calls: dict, module: nn.Module, call: str, mode: bool,
              nested: bool, caller: Any) -> None:
    """``module.train(mode)`` / ``module.eval()`` was called from ``caller`` (``nested``: inside
    another train()/eval() call, such as a train() override)."""
    modules = list(module.modules())
    layers = [(m, layer) for m in modules if (layer := registry.find_layer(m)) is not None]
    known = [k for m in modules if (k := registry.lookup(m)) is not None]  # whose functional calls count
    if not layers and not known:
        return
    skip = None if nested else _inside_mode_method
    user, _, via = sites.user_frame_via(caller, skip)
    site = catalog.site(user)
    target = registry.lookup(module)
    path = None if target is None else target.path
    scope = _scope(target)
    # A library's call that finds every layer in that mode already, set by a recorded call
    # (Lightning's eval() for validation of a model its user left in eval mode), is still the last
    # call (a finding's mode_site), and keeps a reference to that one.
    kept = None
    modes = registry.layer_modes
    if via and layers and all(_already(modes[layer], m, mode) for m, layer in layers):
        previous = {modes[layer][0] for _, layer in layers}
        if len(previous) == 1:
            setter = previous.pop()
            kept = kept_calls.get(setter, setter)  # one that only kept a mode: the call it kept
    key = (site, call, mode, path, scope, via, kept)
    mode_id = catalog.intern("mode", key, lambda ident: catalog.define(
        "mode", id=ident, site=site, call=call, mode=mode, target=path, scope=scope, via=via, kept=kept))
    if kept is not None:
        kept_calls[mode_id] = kept
    for _, layer in layers:
        modes[layer] = (mode_id, mode)
    for k in known:
        k.mode = (mode_id, mode)


def _scope(target: Any) -> str:
    if target is None:
        return "outside"  # a wrapper above the watched model
    if target.layer is not None:
        return "layer"
    return "model" if target.top else "submodule"


def initial_eval_mode(registry: Registry, catalog: Catalog, model: nn.Module) -> None:
    """A model already in eval mode when watching begins (``from_pretrained()`` and many
    checkpoint loaders return one): its eval mode is recorded as set where watching began, the one
    line known to come after whatever set it. Layers put in eval mode while the model is in train
    mode (deliberate freezing) are left as they are."""
    user, _ = sites.user_frame(sys._getframe(1))
    site = catalog.site(user)
    key = (site, "eval", False, None, "model", "initial")
    mode_id = catalog.intern("mode", key, lambda ident: catalog.define(
        "mode", id=ident, site=site, call="eval", mode=False, target=None, scope="model", initial=True))
    for module in model.modules():
        if module.training:
            continue
        known = registry.lookup(module)
        if known is None:
            continue
        if known.layer is not None and registry.layer_modes[known.layer][0] is None:
            registry.layer_modes[known.layer] = (mode_id, False)
        if known.mode is None:
            known.mode = (mode_id, False)


def _already(recorded: tuple, module: nn.Module, mode: bool) -> bool:
    """Whether a module is in ``mode`` already, set by the recorded call ``recorded[0]``."""
    return recorded[0] is not None and recorded[1] == mode and module.training == mode


def _inside_mode_method(frame: Any) -> bool:
    """A user-defined train()/eval() override: look past it, to the line that called it."""
    return frame.f_code.co_name in ("train", "eval") and isinstance(frame.f_locals.get("self"), nn.Module)

