"""The per-call hot path: the forward hooks on watched models and layers, and version counters.

A layer hook appends one small tuple per call to the forward in progress (``format.CALL_FIELDS``)
and does nothing else: no tensor value is read (no device sync), no tensor is kept, nothing is
encoded or written. Everything unusual (a deep copy, a call outside any watched forward) goes to
the watcher (``Recorder``). Hooks are bound methods: CPython calls a bound method from torch's
``_call_impl`` on its fast path, where a callable object would take the slow one.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Protocol

from torch import nn

from . import compat
from .format import FROZEN, MODE_FLAGS, PARAMS_MOVED, STATS_CHANGED
from .functional import number
from .layers import is_torch_layer, probability_attribute

_is_grad_enabled = compat.is_grad_enabled
_version = compat.version
_own_buffers, _own_parameters = compat.own_buffers, compat.own_parameters
_module_call_codes = compat.MODULE_CALL_CODES


class Recorder(Protocol):
    """What the hooks need of the watcher that made them."""

    off: bool
    state: Any  # per thread: .forward (the Forward in progress, or None) and .depth
    nested: set  # id() of the watched models' roots met inside another watched forward
    layer_modes: list  # per layer id: (mode id, mode) of the last train()/eval() reaching it
    versions: list  # per norm layer id: its statistics counter's version after its last call
    marks: list  # per norm layer id: its frozen parameters' versions at its last call

    def begin_forward(self, frame: Any, model: int, args: tuple = ()) -> Any: ...
    def end_forward(self, forward: Any, output: Any) -> None: ...
    def unusual_call(self, hooks: "LayerHooks", module: nn.Module, args: tuple, output: Any) -> None: ...
    def copy_model(self, module: nn.Module, original: int) -> int: ...
    def nested_model(self, module: nn.Module, outer: int) -> None: ...
    def copy_layer(self, module: nn.Module, original: int) -> int: ...
    def note_copy(self, copy: nn.Module, hooks: "Hooks") -> None: ...
    def fail(self, exc: BaseException) -> None: ...


class Hooks:
    """The owner of a module's hook methods.

    A deep copy of the model (SWA, EMA) keeps the same hooks, so it stays watched by the same
    watcher (which notes the copy, to take the hooks off it at close); pickling
    (``torch.save(model)``) leaves them out (see ``patches``).
    """

    modewatch_hook = True  # what patches.is_ours looks for
    watcher: Recorder
    module_id: int

    def __deepcopy__(self, memo: dict) -> "Hooks":
        try:
            copy = memo.get(self.module_id)  # the copy being made of our module
            if isinstance(copy, nn.Module):
                self.watcher.note_copy(copy, self)
        except Exception:  # a deep copy must never fail because of modewatch
            pass
        return self

    def __reduce__(self) -> Any:
        return (Inert, ())


class Inert:
    """What a hook would become if pickled by a path that bypasses ``Module.__getstate__``."""

    def before(self, *args: Any) -> None:
        return None

    def after(self, *args: Any) -> None:
        return None

    def record(self, *args: Any) -> None:
        return None


class ModelHooks(Hooks):
    """Pre- and post-hook of a watched model (and of the models it wraps): one forward each."""

    def __init__(self, watcher: Recorder, module: nn.Module, model: int):
        self.watcher = watcher
        self.state = watcher.state
        self.module_id = id(module)
        self.model = model

    def before(self, module: nn.Module, args: tuple) -> None:
        watcher = self.watcher
        if watcher.off:
            return
        try:
            state = self.state
            if state.depth == 0:
                model = self.model if id(module) == self.module_id or compat.is_replica(module) else \
                    watcher.copy_model(module, self.model)  # a deep copy: a model of its own
                frame = sys._getframe(1)
                for code in _module_call_codes:  # torch's own frames, stepped over by identity
                    if frame.f_code is not code:
                        break
                    frame = frame.f_back
                state.forward = watcher.begin_forward(frame, model, args)
            elif id(module) not in watcher.nested and state.forward is not None:
                watcher.nested_model(module, state.forward.model)  # once per module
            state.depth += 1
        except Exception as exc:
            watcher.fail(exc)

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        watcher = self.watcher
        if watcher.off:
            return
        try:
            state = self.state
            if state.depth > 0:
                state.depth -= 1
            if state.depth == 0 and state.forward is not None:
                forward, state.forward = state.forward, None
                # Called even when the forward raised (always_call): then torch is handling the
                # exception (an out-of-memory batch the program skips), and the forward is dropped.
                if output is not None or sys.exc_info()[1] is None:
                    watcher.end_forward(forward, output)
        except Exception as exc:
            watcher.fail(exc)


class LayerHooks(Hooks):
    """Forward hook of one Dropout layer: appends one small tuple per call, nothing else.

    ``hook`` is the method registered: ``record`` for torch's own layers in their usual state (the
    common case, kept to the fewest operations, recorded in the hook itself: a further Python call
    per layer call would cost more than the reads), else ``after``. Both find the forward in
    progress; a call off that path (a deep copy of the layer, a call outside any watched forward)
    goes to ``Recorder.unusual_call``, which finds its layer and forward. ``add`` records a call
    into a given forward in every case: ``after``, ``unusual_call`` and ``record``'s own fallback
    end there.
    """

    def __init__(self, watcher: Recorder, layer: int, module: nn.Module):
        self.watcher = watcher
        self.layer = layer
        self.module_id = id(module)
        self.state = watcher.state
        self.modes = watcher.layer_modes  # the watcher's list, updated in place
        self.other = "p" not in module.__dict__  # torch's Dropout keeps its probability there
        self.usual = not self.other  # record() applies

    @property
    def hook(self) -> Any:
        """The method to register as the layer's forward hook."""
        return self.record if self.usual else self.after

    def probability(self, module: nn.Module) -> Optional[float]:
        return number(getattr(module, "p", None))

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The hook of a layer ``record`` does not apply to."""
        try:
            forward = self.state.forward
            if forward is None or id(module) != self.module_id:
                return self.watcher.unusual_call(self, module, args, output)
            self.add(module, args, forward, self.layer)
        except Exception as exc:
            self.watcher.fail(exc)

    def add(self, module: nn.Module, args: tuple, forward: Any, layer: int) -> None:
        """Record a call of ``module`` as ``layer`` into ``forward``."""
        try:
            # A module's attributes read from its __dict__: nn.Module's __getattr__ makes each
            # attribute read a slow generic look-up, and one gets the dict for all of them.
            attributes = module.__dict__
            training = attributes["training"]
            mode_id, mode = self.modes[layer]
            forward.calls.append((layer, MODE_FLAGS[training][_is_grad_enabled()], None,
                                  self.probability(module) if self.other else attributes["p"],
                                  mode_id if mode == training else None))
        except Exception as exc:
            self.watcher.fail(exc)

    def record(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The hook of a torch Dropout (its probability in ``p``): ``after`` and ``add`` in one."""
        try:
            forward = self.state.forward
            if forward is None or id(module) != self.module_id:
                return self.watcher.unusual_call(self, module, args, output)
            attributes = module.__dict__
            training = attributes["training"]
            layer = self.layer
            mode_id, mode = self.modes[layer]
            forward.calls.append((layer, MODE_FLAGS[training][_is_grad_enabled()], None, attributes["p"],
                                  mode_id if mode == training else None))
        except Exception as exc:
            self.watcher.fail(exc)


class OtherDropoutHooks(LayerHooks):
    """A dropout-like layer other than torch's Dropout (nn.MultiheadAttention, DropPath): its
    probability is read from the attribute that holds it, where it has one."""

    def __init__(self, watcher: Recorder, layer: int, module: nn.Module):
        super().__init__(watcher, layer, module)
        self.attribute = probability_attribute(module)
        self.other = True
        self.usual = False

    def probability(self, module: nn.Module) -> Optional[float]:
        return number(getattr(module, self.attribute, None)) if self.attribute else None


class NormHooks(LayerHooks):
    """Forward hook of one BatchNorm (or tracking InstanceNorm) layer.

    Whether running statistics changed is measured by a version counter, which reads no tensor
    value (no device sync): BatchNorm's num_batches_tracked moves when its statistics are updated
    (running_mean's does not, on CPU); InstanceNorm copies its statistics back into running_mean.
    For torch's own classes the version is compared with the one seen after the previous call,
    in train mode only (so that a reset or load_state_dict in between is not taken for an update);
    a subclass of unknown behaviour also gets ``before`` as a pre-hook, for an exact comparison.
    A custom norm layer (see modewatch.layers) is measured by the versions of all its buffers.

    A layer whose parameters all have ``requires_grad=False`` is marked FROZEN (stat-update-in-
    frozen); in the common case one attribute read (its weight requires grad) says it is not.
    """

    def __init__(self, watcher: Recorder, layer: int, module: nn.Module):
        super().__init__(watcher, layer, module)
        # One buffer's version for torch's own layers, read with their momentum from __dict__
        # (a subclass that turned momentum into a property is measured as a custom layer).
        self.counter = counter_of(module) if "momentum" in module.__dict__ else None
        self.exact = not is_torch_layer(module)
        self.versions = watcher.versions  # the watcher's lists, updated in place
        self.marks = watcher.marks
        self.usual = (self.counter == "num_batches_tracked" and not self.exact
                      and module.__dict__.get("affine") is True and module.__dict__.get("track_running_stats") is True)

    def add(self, module: nn.Module, args: tuple, forward: Any, layer: int) -> None:
        try:
            attributes = module.__dict__  # see LayerHooks.add
            training = attributes["training"]
            flags = MODE_FLAGS[training][_is_grad_enabled()]
            counter = self.counter
            if counter is not None:  # torch's own layers: one buffer's version counter
                tracked = attributes["_buffers"].get(counter)
                if tracked is None:
                    version = None
                else:
                    try:
                        version = tracked._version
                    except RuntimeError:  # an inference tensor: no version counter
                        version = -1
                momentum = attributes["momentum"]
            else:
                version = buffers_version(module)
                momentum = number(getattr(module, "momentum", 0.0))
            if version is not None:
                versions = self.versions
                if version != versions[layer] and (training or self.exact):
                    flags |= STATS_CHANGED
                versions[layer] = version
            parameters = attributes["_parameters"]
            weight = parameters.get("weight")
            if weight is None or not weight.requires_grad:  # rare: frozen, affine=False or custom
                flags |= self.frozen(layer, parameters)
            try:
                shape = args[0].shape
                batch = shape[0] if len(shape) > 1 else None
            except (IndexError, AttributeError, TypeError):  # no tensor input
                batch = None
            mode_id, mode = self.modes[layer]
            forward.calls.append((layer, flags, batch, momentum, mode_id if mode == training else None))
        except Exception as exc:
            self.watcher.fail(exc)

    def record(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The hook of torch's own BatchNorm with parameters and running statistics: ``after``
        and ``add`` in one, for the common case. What may not hold (an input without a batch
        dimension, a statistics counter made under inference mode, parameters taken away) is read
        before anything is changed, and then ``add`` records the call."""
        try:
            forward = self.state.forward
            if forward is None or id(module) != self.module_id:
                return self.watcher.unusual_call(self, module, args, output)
            attributes = module.__dict__
            try:
                version = attributes["_buffers"]["num_batches_tracked"]._version
                trained = attributes["_parameters"]["weight"].requires_grad
                batch = args[0].shape[0]
            except (KeyError, AttributeError, IndexError, TypeError, RuntimeError):
                return self.add(module, args, forward, self.layer)
            training = attributes["training"]
            layer = self.layer
            flags = MODE_FLAGS[training][_is_grad_enabled()]
            versions = self.versions
            if version != versions[layer]:
                if training:
                    flags |= STATS_CHANGED
                versions[layer] = version
            if not trained:
                flags |= self.frozen(layer, attributes["_parameters"])
            mode_id, mode = self.modes[layer]
            forward.calls.append((layer, flags, batch, attributes["momentum"], mode_id if mode == training else None))
        except Exception as exc:
            self.watcher.fail(exc)

    def frozen(self, layer: int, parameters: dict) -> int:
        """FROZEN when the layer has parameters and none requires grad; PARAMS_MOVED as well when
        they changed since its previous call all the same (a momentum encoder's update)."""
        mark = []
        for parameter in parameters.values():
            if parameter is None:
                continue
            if parameter.requires_grad:
                return 0
            mark.append((_version(parameter), compat.data_ptr(parameter)))
        if not mark:
            return 0
        previous, self.marks[layer] = self.marks[layer], tuple(mark)
        moved = previous is not None and previous != self.marks[layer]
        return FROZEN | (PARAMS_MOVED if moved else 0)

    def before(self, module: nn.Module, args: tuple) -> None:
        watcher = self.watcher
        if watcher.off:
            return
        try:
            layer = self.layer if id(module) == self.module_id else watcher.copy_layer(module, self.layer)
            self.versions[layer] = current_version(module)
        except Exception as exc:
            watcher.fail(exc)


def hooks_class(module: nn.Module, category: str) -> type:
    if category == "norm":
        return NormHooks
    return LayerHooks if isinstance(module, compat.DropoutBase) else OtherDropoutHooks


def counter_of(module: nn.Module) -> Optional[str]:
    """The buffer whose version tells that a norm layer's statistics changed (None: all of them)."""
    if isinstance(module, compat.InstanceNormBase):
        return "running_mean"  # InstanceNorm copies its statistics back into it
    if isinstance(module, compat.BatchNormBase):
        return "num_batches_tracked"
    return None


def buffers_version(module: nn.Module) -> int:
    """A number that changes when any buffer of ``module`` is changed in place or replaced."""
    return hash(tuple((id(b), _version(b)) for b in _own_buffers(module).values() if b is not None))


def current_version(module: nn.Module) -> int:
    counter = counter_of(module)
    if counter is None:
        return buffers_version(module)
    tracked = _own_buffers(module).get(counter)
    return -1 if tracked is None else _version(tracked)


def has_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in _own_parameters(module).values())


def hooks_of(module: nn.Module, watcher: Recorder, kind: type = LayerHooks) -> Any:
    """The hooks of ``kind`` (LayerHooks or ModelHooks) of ``watcher`` that ``module`` carries (a
    deep copy carries the original's), or None."""
    for hook in compat.forward_hooks(module):
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, kind) and owner.watcher is watcher:
            return owner
    return None


def strip(module: nn.Module, watcher: Recorder) -> None:
    """Take the hooks of ``watcher`` off a module that holds them by a deep copy."""
    compat.remove_hooks(module.__dict__, lambda hook: isinstance(getattr(hook, "__self__", None), Hooks)
                        and hook.__self__.watcher is watcher, in_place=True)
