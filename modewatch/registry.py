"""The watched models, their modules and their mode-sensitive layers, with the hooks put on them.

Modules are known by ``id()``, always checked against a weak reference: a program that makes and
frees models (a hyper-parameter search) may get a new model at the address of a freed one, which
must be watched anew, not taken for the old one. Layer ids index the lists the hooks read.
"""

from __future__ import annotations

import collections
import sys
import threading
import weakref
from typing import Any, Optional

from torch import nn

from . import compat, hooks, patches, sites
from .catalog import Catalog
from .layers import category as category_of

PARAMETER_SAMPLE = 8  # parameters of a model whose versions tell that it changed without an optimizer


class Model:
    """A watched model (or a deep copy of one): its id in the log, and what its forwards need."""

    __slots__ = ("index", "ref", "param_ids", "steps", "stepped", "sample", "mark", "changes")

    def __init__(self, index: int, module: nn.Module):
        self.index = index
        self.ref = weakref.ref(module)
        self.param_ids: frozenset = frozenset()  # refreshed whenever an optimizer shows up
        self.steps = 0  # steps of optimizers that hold its parameters
        self.stepped = False
        self.sample = parameter_sample(module)  # weak references to a few of its parameters
        self.mark: Optional[tuple] = None  # their versions at its last forward
        self.changes = 0  # forwards that found them changed, with no optimizer stepping the model


class Known:
    """What is known of one module of a watched model."""

    __slots__ = ("ref", "model", "path", "layer", "mode", "functional", "top", "root")

    def __init__(self, ref: weakref.ref, model: int, path: str):
        self.ref = ref
        self.model = model  # the index of the watched model it belongs to
        self.path = path  # its qualified name in that model
        self.layer: Optional[int] = None  # its layer id, for a mode-sensitive layer
        self.mode: Optional[tuple] = None  # (mode id, mode) of the last train()/eval() reaching it
        self.functional: Optional[dict] = None  # function name -> layer id of its functional dropouts
        self.top = False  # a watched model, or a wrapper of one (DDP, torch.compile): scope "model"
        self.root = False  # its forwards are watched forwards (it has the model hooks)


def unwrapped_chain(root: nn.Module) -> list:
    """The root and the models it wraps one inside the other (DDP's .module, compile's _orig_mod)."""
    chain = [root]
    while True:
        inner = getattr(chain[-1], "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(chain[-1], "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner in chain:
            return chain
        chain.append(inner)


def parameter_count(module: nn.Module) -> Optional[int]:
    """How many numbers a model's parameters hold (shape metadata, no value read)."""
    try:
        return sum(p.numel() for p in module.parameters())
    except Exception:  # lazy modules' parameters have no shape yet
        return None


def has_anything_to_watch(module: nn.Module, named: Any) -> bool:
    """Whether a module found by being set up is a model: it has parameters, or a mode-sensitive
    layer. A loss module moved to the device (``nn.CrossEntropyLoss().to(device)``) is not."""
    return (next(module.parameters(), None) is not None
            or any(category_of(inside, named) is not None for inside in module.modules()))


def parameter_sample(module: nn.Module) -> tuple:
    params = list(module.parameters())
    if len(params) > PARAMETER_SAMPLE:
        last = len(params) - 1
        params = [params[round(i * last / (PARAMETER_SAMPLE - 1))] for i in range(PARAMETER_SAMPLE)]
    return tuple(weakref.ref(p) for p in params)


class Registry:
    def __init__(self, watcher: hooks.Recorder, catalog: Catalog, named: dict, lock: threading.RLock):
        self.watcher = watcher  # what the hooks report to
        self.catalog = catalog
        self.named = named  # custom layers named by the user
        self.lock = lock
        self.handles: list = []  # of every hook put on an original module
        self.models: list = []  # Model per model index
        # Per layer id; the hooks read and write the first three in place:
        self.versions: list = []  # a norm layer's statistics counter's version after its last call
        self.layer_modes: list = []  # (mode id, mode) of the last train()/eval() reaching it
        self.marks: list = []  # a frozen norm layer's parameter versions at its last call
        self.layer_names: list = []
        self.layer_models: list = []
        self.norm_layers: list = []  # (layer id, weakref) of norm layers with parameters
        self._known: dict = {}  # id(module) -> Known
        self._dead: collections.deque = collections.deque()  # (id, weakref) of freed modules
        self.copies: list = []  # weak references to deep copies of watched modules (their hooks)
        self._copy_sites: dict = {}  # id(copy of a model) -> (weakref, site id of the deep copy)

    # ------------------------------------------------------------------ knowing modules

    def lookup(self, module: Any) -> Optional[Known]:
        known = self._known.get(id(module))
        return known if known is not None and known.ref() is module else None

    def remember(self, module: nn.Module, model: int, path: str) -> Known:
        known = self.lookup(module)
        if known is not None:
            known.model, known.path = model, path  # adopted by a model that holds it
            return known
        ident, dead = id(module), self._dead
        known = self._known[ident] = Known(weakref.ref(module, lambda ref: dead.append((ident, ref))), model, path)
        return known

    def forget_freed(self) -> None:
        """Forget the modules freed since last time (their ids may be given to new modules)."""
        dead = self._dead
        while dead:
            ident, ref = dead.popleft()
            known = self._known.get(ident)
            if known is not None and known.ref is ref:
                del self._known[ident]

    # ------------------------------------------------------------------ models

    def add_model(self, model: nn.Module, frame: Any = None, copy_of: Optional[int] = None,
                  site: Optional[int] = None) -> int:
        """Watch one more model; returns its index. A model that holds models already watched
        adopts them: their layers are renamed as this model's ``named_modules()`` names them.
        ``frame`` (or ``site``) is where it was watched or made; ``copy_of``, the model it is a
        deep copy of (whose hooks it carries already)."""
        with self.lock:
            self.forget_freed()
            known = self.lookup(model)
            if known is not None:
                return known.model  # watched already, or a part of a watched model
            carried = None if copy_of is not None else hooks.hooks_of(model, self.watcher, hooks.ModelHooks)
            if carried is not None:  # a deep copy of a watched model, watched before its first call
                return self.copy_model(model, carried.model)
            index = len(self.models)
            chain = unwrapped_chain(model)
            if site is None and frame is not None:
                site = self.catalog.site(sites.user_frame(frame)[0])
            self.catalog.define("model", id=index, name=type(chain[-1]).__name__, site=site, copy_of=copy_of,
                                parameters=parameter_count(model))
            self.models.append(Model(index, model))
            for name, module in model.named_modules():
                known = self.remember(module, index, name)
                known.top = False  # a model adopted is a part now
                if copy_of is not None or (known.layer is None and hooks.hooks_of(module, self.watcher) is not None):
                    self.find_layer(module, index)  # a deep copy: its layers carry the original's hooks
                    continue
                category = category_of(module, self.named)
                if category is None:
                    continue
                if known.layer is None:
                    known.layer = self.add_layer(module, name, category, index, copy_of=None)
                elif (self.layer_names[known.layer], self.layer_models[known.layer]) != (name, index):
                    self._rename_layer(known.layer, module, name, index, category)
            for module in chain:  # all in named_modules() above
                known = self.lookup(module)
                known.top = known.root = True
            if copy_of is None:  # a deep copy carries the original's model hooks already
                for root in chain:
                    patches.pickled_without_hooks(root)
                    model_hooks = hooks.ModelHooks(self.watcher, root, index)
                    self.handles.append(root.register_forward_pre_hook(model_hooks.before))
                    self.handles.append(root.register_forward_hook(model_hooks.after, always_call=True))
            return index

    def adopt(self, root: nn.Module, outer: int) -> None:
        """``root``, the root of a watched model (or of a deep copy of one), is found a part of the
        watched model ``outer``: its modules and layers become the outer model's, named as the
        outer model names them. Nothing changes where it is no part of it (a model passed in and
        called, not attached)."""
        with self.lock:
            known = self.lookup(root)
            if known is None or known.model == outer:
                return
            path = self.path_in(outer, root)
            if path is None:
                return
            known.top = False  # a part now; its model hooks stay, for its calls on its own
            for name, module in root.named_modules():
                inside = self.remember(module, outer, f"{path}.{name}" if name else path)
                if inside.layer is not None:
                    self._rename_layer(inside.layer, module, inside.path, outer,
                                       category_of(module, self.named) or "norm")

    def _rename_layer(self, layer: int, module: nn.Module, name: str, model: int, category: str) -> None:
        self.layer_names[layer] = name
        self.layer_models[layer] = model
        self.catalog.define("layer", id=layer, name=name, kind=type(module).__name__, category=category, model=model,
                            copy_of=None, params=category == "norm" and hooks.has_parameters(module))

    def _new_layer(self, name: str, model: int, version: int, mode: tuple) -> int:
        """A new layer id, with its entry in each per-layer list."""
        layer = len(self.layer_names)
        self.layer_names.append(name)
        self.layer_models.append(model)
        self.versions.append(version)
        self.marks.append(None)
        self.layer_modes.append(mode)
        return layer

    def add_layer(self, module: nn.Module, name: str, category: str, model: int, copy_of: Optional[int]) -> int:
        layer = self._new_layer(name, model, -1 if category == "dropout" else hooks.current_version(module),
                                self.layer_modes[copy_of] if copy_of is not None else (None, module.training))
        params = category == "norm" and hooks.has_parameters(module)
        if params:
            self.norm_layers.append((layer, weakref.ref(module)))
        self.catalog.define("layer", id=layer, name=name, kind=type(module).__name__, category=category,
                            model=model, copy_of=copy_of, params=params)
        if copy_of is None:
            patches.pickled_without_hooks(module)
            layer_hooks = hooks.hooks_class(module, category)(self.watcher, layer, module)
            if getattr(layer_hooks, "exact", False):
                self.handles.append(module.register_forward_pre_hook(layer_hooks.before))
            self.handles.append(module.register_forward_hook(layer_hooks.hook))
        return layer

    def add_functional(self, module: nn.Module, known: Known, kind: str, site: Optional[int]) -> int:
        """A layer for the functional dropouts of one kind made by ``module``, named after it (the
        watched model itself by its class), with the line of its first call."""
        with self.lock:
            name = f"{known.path or type(module).__name__}:{kind}"
            layer = self._new_layer(name, known.model, -1, (None, module.training))  # mode unused: the module's is read
            if known.functional is None:
                known.functional = {}
            known.functional[kind] = layer
            self.catalog.define("layer", id=layer, name=name, kind=kind, category="dropout", model=known.model,
                                copy_of=None, site=site)
            return layer

    # ------------------------------------------------------------------ deep copies

    def note_copy(self, copy: nn.Module, owner: hooks.Hooks) -> None:
        """A deep copy of a watched module is being made, and our hooks come along: it stays
        watched. Remembered so that the hooks can be taken off it again and, for a whole model,
        so that the copy is a model of its own in the log, made at the line of the deep copy."""
        with self.lock:
            if len(self.copies) > 64 and len(self.copies) & (len(self.copies) - 1) == 0:
                self.copies = [ref for ref in self.copies if ref() is not None]  # now and then
            self.copies.append(weakref.ref(copy))
            if isinstance(owner, hooks.ModelHooks):
                user, _ = sites.user_frame(sys._getframe(1), _inside_copy_module)  # past modewatch and copy
                self._copy_sites[id(copy)] = (weakref.ref(copy), self.catalog.site(user))

    def copy_model(self, module: nn.Module, original: int) -> int:
        """The model index of a deep copy of a watched model (an EMA or SWA copy), added at its
        first forward: a model of its own, whose layers are copies of the original's."""
        known = self.lookup(module)
        if known is not None and known.root:
            return known.model
        with self.lock:
            noted = self._copy_sites.pop(id(module), None)
            site = noted[1] if noted is not None and noted[0]() is module else None
            return self.add_model(module, copy_of=original, site=site)

    def copy_layer(self, module: nn.Module, original: int, model: Optional[int] = None) -> int:
        """The layer id of a deep copy of a watched layer (its hooks came along with the copy)."""
        known = self.lookup(module)
        if known is not None and known.layer is not None:
            return known.layer
        if compat.is_replica(module):  # DataParallel's per-call replicas: the original
            return original
        with self.lock:
            known = self.lookup(module)
            if known is not None and known.layer is not None:
                return known.layer
            name = self.layer_names[original]
            if model is None:
                model = known.model if known is not None else self.layer_models[original]
                if known is None:  # a copy made and attached inside a watched model: named as it names it
                    name = self.path_in(model, module) or name
            layer = self.add_layer(module, name, category_of(module, self.named) or "norm", model, copy_of=original)
            if known is None:
                known = self.remember(module, model, name)
            known.layer = layer
            return layer

    def path_in(self, model: int, module: nn.Module) -> Optional[str]:
        """The name of ``module`` in the watched model ``model`` (a deep copy made inside it and
        attached to it, as a BYOL target made at the first forward is), or None. Looked for once
        per copied layer, at its first call."""
        root = self.models[model].ref() if 0 <= model < len(self.models) else None
        if root is None:
            return None
        for name, inside in root.named_modules():
            if inside is module:
                return name or None
        return None

    def find_layer(self, module: nn.Module, model: Optional[int] = None) -> Optional[int]:
        """The layer id of ``module``: watched, a known copy, or a copy not yet called."""
        known = self.lookup(module)
        if known is not None and known.layer is not None:
            return known.layer
        owner = hooks.hooks_of(module, self.watcher)
        return None if owner is None else self.copy_layer(module, owner.layer, model)

    def detach(self) -> None:
        """Remove every hook: from the watched modules, and from their deep copies."""
        for handle in self.handles:
            handle.remove()
        for ref in self.copies:
            module = ref()
            if module is not None:
                hooks.strip(module, self.watcher)


def _inside_copy_module(frame: Any) -> bool:
    """Frames of the standard library's copy module, on the way out of a deep copy."""
    import copy

    return frame.f_code.co_filename == copy.__file__
