"""Recording: hooks on every mode-sensitive layer of a model, and the Watcher that owns them.

What happens per layer call is kept to a few attribute reads and one tuple appended to the list
of the forward in progress: no tensor values are read (no sync), no tensor is kept, nothing is
encoded or written. Everything else happens once per forward, per step or per flush:

- A *forward* is the outermost call of the watched model (or, when a layer is called outside
  any watched forward, that layer call alone). Its pre-hook finds the user line that called it.
- When a forward ends, a probe is registered on the ``grad_fn`` of its outputs. If a
  parameter-gradient backward reaches a probe the forward was a training forward; when the
  graph is freed with no such backward, it was an evaluation forward (see logfile.FORWARD_KINDS).
  Probes only mark forwards and queue them; the queue is drained at safe points (forward start
  and end, optimizer step, close), since a probe may fire on another thread or inside GC.
- Resolved forwards are folded: consecutive forwards of the same kind, call site and context
  that made exactly the same layer calls become one run (counts and step range), written as
  one row per distinct layer call; the log grows with changes, not with steps.
"""

from __future__ import annotations

import atexit
import collections
import copy
import os
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

from . import functional, logfile, logpath, patches, sites
from .layers import category as category_of, check_named, is_torch_layer, probability_attribute
from .allow import allowed_rules
from .errors import LogPathError, ModeFindingError, ModewatchWarning

FLUSH_SECONDS = 1.0  # a killed job loses at most about this much of its log
MAX_PENDING = 1024  # forwards whose graph is still alive; past it the oldest are resolved
STALE_STEPS = 4  # a forward not backpropagated after this many steps of its model's optimizers is evaluation
MAX_OUTPUT_TENSORS = 32  # outputs that get a probe, per forward
MAX_ROWS_PER_LINE = 2048  # rows buffered before they are written, whatever the clock says
PARAMETER_SAMPLE = 8  # parameters of a model whose versions tell that it changed without an optimizer
UPDATES_SEEN = 2  # forwards that saw such a change before the model counts as updated in place

_is_grad_enabled = torch._C.is_grad_enabled
_is_inference = torch.is_inference_mode_enabled


def _unwrapped_chain(root: nn.Module) -> list:
    """The root and the models it wraps one inside the other (DDP's .module, compile's _orig_mod)."""
    chain = [root]
    while True:
        inner = getattr(chain[-1], "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(chain[-1], "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner in chain:
            return chain
        chain.append(inner)


def _header() -> dict:
    return dict(torch=torch.__version__, python=sys.version.split()[0], pid=os.getpid(), argv=list(sys.argv),
                rank=logpath.rank(), world_size=logpath.world_size(), time=time.time())


def _open_log(template: str) -> logfile.LogWriter:
    path = logpath.substitute(template)
    try:
        file, path = logpath.claim(path)
        return logfile.LogWriter(path, file)
    except OSError as exc:
        raise LogPathError(f"cannot write the modewatch log {path!r}: {exc.strerror or exc}") from None


class _Forward:
    """One forward of a watched model, until it is known whether it was a training forward."""

    __slots__ = ("seq", "site", "context", "calls", "step", "model", "model_steps", "kind", "probes", "watches",
                 "done", "resolved", "inference")

    def __init__(self, seq: int, site: Optional[int], context: int, step: int, model: int, model_steps: int,
                 done: collections.deque):
        self.seq = seq
        self.site = site
        self.context = context
        self.step = step  # optimizer steps completed before it
        self.model = model  # the watched model called
        self.model_steps = model_steps  # steps of that model's optimizers completed before it
        self.calls: list = []  # (layer id, flags, batch, param, mode id) per layer call, in order
        self.kind = logfile.GRAPH_UNUSED  # raised by probes to INPUT_GRAD / PARAM_GRAD
        self.probes = 0  # probes alive
        self.watches: list = []  # weak references to the probes
        self.done = done  # the watcher's queue of forwards to resolve
        self.resolved = False
        # Inference mode is read once per forward: tensors made under it cannot mix with
        # autograd, so a forward runs wholly inside it or wholly outside.
        self.inference = _is_inference()

    def probe_died(self, _ref: Any) -> None:
        self.probes -= 1
        if self.probes <= 0:
            self.done.append(self)


class _Probe:
    """Registered on a forward output's grad_fn: notes the backward that reaches it.

    Owned by the autograd graph alone; when the graph is freed, the probe dies and its weakref
    callback queues the forward for resolution.
    """

    __slots__ = ("forward", "done", "__weakref__")

    def __init__(self, forward: _Forward, done: collections.deque):
        self.forward = forward
        self.done = done

    def __call__(self, grad_outputs: Any) -> None:
        try:
            kind = patches.backward_kind()
            forward = self.forward
            if kind > forward.kind:
                forward.kind = kind
                if kind == logfile.PARAM_GRAD:
                    self.done.append(forward)
        except Exception:  # never raise into backward
            pass


class _State(threading.local):
    """Per-thread: the forward in progress and how deep inside watched forwards we are."""

    forward: Optional[_Forward] = None
    depth: int = 0


class _Model:
    """A watched model (or a deep copy of one): its id in the log, and what its forwards need."""

    __slots__ = ("index", "ref", "param_ids", "steps", "stepped", "sample", "mark", "changes")

    def __init__(self, index: int, module: nn.Module):
        self.index = index
        self.ref = weakref.ref(module)
        self.param_ids: frozenset = frozenset()  # refreshed whenever an optimizer shows up
        self.steps = 0  # steps of optimizers that hold its parameters
        self.stepped = False
        self.sample = _parameter_sample(module)  # weak references to a few of its parameters
        self.mark: Optional[tuple] = None  # their versions at its last forward
        self.changes = 0  # forwards that found them changed, with no optimizer stepping the model


def _parameter_count(module: nn.Module) -> Optional[int]:
    """How many numbers a model's parameters hold (shape metadata, no value read)."""
    try:
        return sum(p.numel() for p in module.parameters())
    except Exception:  # lazy modules' parameters have no shape yet
        return None


def _parameter_sample(module: nn.Module) -> tuple:
    params = list(module.parameters())
    if len(params) > PARAMETER_SAMPLE:
        last = len(params) - 1
        params = [params[round(i * last / (PARAMETER_SAMPLE - 1))] for i in range(PARAMETER_SAMPLE)]
    return tuple(weakref.ref(p) for p in params)


class _Known:
    """What the watcher knows of one module of a watched model. Kept by id(), and always checked
    against a weak reference: a new module may be given the id of a freed one."""

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


class _Hooks:
    """Hooks are bound methods of these objects: CPython calls a bound method from torch's
    ``_call_impl`` on its fast path, where a callable object would take the slow one.

    A deep copy of the model (SWA, EMA) keeps the same hooks, so it stays watched by the same
    watcher (and ``close()`` takes them off the copy too); pickling (``torch.save(model)``) leaves
    them out (see ``patches.without_our_hooks``).
    """

    modewatch_hook = True  # what patches.is_ours looks for
    watcher: "Watcher"
    module_id: int

    def __deepcopy__(self, memo: dict) -> "_Hooks":
        try:
            copy = memo.get(self.module_id)  # the copy being made of our module
            if isinstance(copy, nn.Module):
                self.watcher.note_copy(copy, self)
        except Exception:  # a deep copy must never fail because of modewatch
            pass
        return self

    def __reduce__(self) -> Any:
        return (_Inert, ())


class _Inert:
    """What a hook would become if pickled by a path that bypasses ``Module.__getstate__``."""

    def before(self, *args: Any) -> None:
        return None

    def after(self, *args: Any) -> None:
        return None


class _RootHooks(_Hooks):
    """Pre- and post-hook of a watched model (and of the models it wraps): one forward each."""

    def __init__(self, watcher: "Watcher", module: nn.Module, model: int):
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
                model = self.model if id(module) == self.module_id else watcher.copy_model(module, self.model)
                state.forward = watcher.begin_forward(sys._getframe(1), model)
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
                watcher.end_forward(forward, output)
        except Exception as exc:
            watcher.fail(exc)


class _DropoutHooks(_Hooks):
    """Forward hook of one Dropout layer: appends one small tuple per call, nothing else.

    The common case (the layer itself, inside a watched forward) is kept to a few attribute
    reads; everything unusual (a deep copy, a call outside any forward, a closed watcher) goes
    through ``Watcher.unusual_call``.
    """

    def __init__(self, watcher: "Watcher", layer: int, module: nn.Module):
        self.watcher = watcher
        self.layer = layer
        self.module_id = id(module)
        self.state = watcher.state
        self.modes = watcher.layer_modes  # the watcher's list, updated in place

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            forward = self.state.forward
            if forward is None or id(module) != self.module_id:
                return self.watcher.unusual_call(self, module, args, output)
            forward.calls.append(self.call(self.layer, module, args))
        except Exception as exc:
            self.watcher.fail(exc)

    def call(self, layer: int, module: nn.Module, args: tuple) -> tuple:
        """The recorded tuple of one call of ``module`` (as layer ``layer``)."""
        training = module.training
        mode_id, mode = self.modes[layer]
        return (layer, training | (_is_grad_enabled() << 1), None, module.p, mode_id if mode == training else None)


class _OtherDropoutHooks(_DropoutHooks):
    """A dropout-like layer other than torch's Dropout (nn.MultiheadAttention, DropPath): its
    probability is read from the attribute that holds it, where it has one."""

    def __init__(self, watcher: "Watcher", layer: int, module: nn.Module):
        super().__init__(watcher, layer, module)
        self.attribute = probability_attribute(module)

    def call(self, layer: int, module: nn.Module, args: tuple) -> tuple:
        training = module.training
        mode_id, mode = self.modes[layer]
        p = functional.number(getattr(module, self.attribute, None)) if self.attribute else None
        return (layer, training | (_is_grad_enabled() << 1), None, p, mode_id if mode == training else None)


class _NormHooks(_DropoutHooks):
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

    def __init__(self, watcher: "Watcher", layer: int, module: nn.Module):
        super().__init__(watcher, layer, module)
        self.counter = _counter(module)
        self.exact = not is_torch_layer(module)
        self.versions = watcher.versions  # the watcher's lists, updated in place
        self.marks = watcher.marks

    def call(self, layer: int, module: nn.Module, args: tuple) -> tuple:
        training = module.training
        flags = training | (_is_grad_enabled() << 1)
        if self.counter is None:
            version = _buffers_version(module)
        else:
            tracked = module._buffers.get(self.counter)  # not getattr: Module.__getattr__ is slow
            version = None if tracked is None else _version(tracked)
        if version is not None:
            if version != self.versions[layer] and (training or self.exact):
                flags |= logfile.STATS_CHANGED
            self.versions[layer] = version
        parameters = module._parameters
        weight = parameters.get("weight")
        if weight is None or not weight.requires_grad:  # rare: frozen, affine=False or custom
            flags |= self.frozen(layer, parameters)
        shape = args[0].shape if args and isinstance(args[0], torch.Tensor) else ()
        mode_id, mode = self.modes[layer]
        momentum = module.momentum if self.counter is not None else functional.number(
            getattr(module, "momentum", 0.0))
        return (layer, flags, shape[0] if len(shape) > 1 else None, momentum,
                mode_id if mode == training else None)

    def frozen(self, layer: int, parameters: dict) -> int:
        """FROZEN when the layer has parameters and none requires grad; PARAMS_MOVED as well when
        they changed since its previous call all the same (a momentum encoder's update)."""
        mark = []
        for parameter in parameters.values():
            if parameter is None:
                continue
            if parameter.requires_grad:
                return 0
            mark.append((_version(parameter), _data_ptr(parameter)))
        if not mark:
            return 0
        previous, self.marks[layer] = self.marks[layer], tuple(mark)
        moved = previous is not None and previous != self.marks[layer]
        return logfile.FROZEN | (logfile.PARAMS_MOVED if moved else 0)

    def before(self, module: nn.Module, args: tuple) -> None:
        watcher = self.watcher
        if watcher.off:
            return
        try:
            layer = self.layer if id(module) == self.module_id else watcher.copy_layer(module, self.layer)
            self.versions[layer] = _current_version(module)
        except Exception as exc:
            watcher.fail(exc)


def _hooks_class(module: nn.Module, category: str) -> type:
    if category == "norm":
        return _NormHooks
    return _DropoutHooks if isinstance(module, _DropoutNd) else _OtherDropoutHooks


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _data_ptr(tensor: torch.Tensor) -> int:
    """Where a tensor's data lives (metadata, no sync): ``param.data = new`` moves it."""
    try:
        return tensor.data_ptr()
    except Exception:  # tensors without storage
        return 0


def _counter(module: nn.Module) -> Optional[str]:
    """The buffer whose version tells that a norm layer's statistics changed (None: all of them)."""
    if isinstance(module, _InstanceNorm):
        return "running_mean"  # InstanceNorm copies its statistics back into it
    if isinstance(module, _BatchNorm):
        return "num_batches_tracked"
    return None


def _buffers_version(module: nn.Module) -> int:
    """A number that changes when any buffer of ``module`` is changed in place or replaced."""
    return hash(tuple((id(b), _version(b)) for b in module._buffers.values() if b is not None))


def _current_version(module: nn.Module) -> int:
    counter = _counter(module)
    if counter is None:
        return _buffers_version(module)
    tracked = module._buffers.get(counter)
    return -1 if tracked is None else _version(tracked)


def _has_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def _output_nodes(output: Any) -> list:
    """The distinct grad_fn nodes of the tensors in a (nested) model output."""
    if type(output) is torch.Tensor:  # the common case
        node = output.grad_fn
        return [] if node is None else [node]
    nodes, seen, todo = [], set(), [output]
    budget = 256  # containers and items looked at
    while todo and budget and len(nodes) < MAX_OUTPUT_TENSORS:
        budget -= 1
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            node = item.grad_fn
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                nodes.append(node)
        elif isinstance(item, (list, tuple)):
            todo.extend(item[:64])
        elif isinstance(item, dict):  # also Hugging Face ModelOutput
            todo.extend(list(item.values())[:64])
    return nodes


def _strip_hooks(module: nn.Module, watcher: "Watcher") -> None:
    """Take the hooks of ``watcher`` off a module that holds them by a deep copy."""
    removed = set()
    for name in ("_forward_hooks", "_forward_pre_hooks"):
        hooks = module.__dict__.get(name) or {}
        for key, hook in list(hooks.items()):
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, _Hooks) and owner.watcher is watcher:
                del hooks[key]
                removed.add(key)
    for name in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
        ids = module.__dict__.get(name) or {}
        for key in removed & set(ids):
            del ids[key]


def _inside_copy_module(frame: Any) -> bool:
    """Frames of the standard library's copy module, on the way out of a deep copy."""
    return frame.f_code.co_filename == copy.__file__


def _is_child_process() -> bool:
    """A multiprocessing child (a DataLoader worker, a spawned rank): not the program itself."""
    try:
        import multiprocessing

        return multiprocessing.parent_process() is not None
    except Exception:
        return False


class Watcher:
    """Records the mode of every Dropout/BatchNorm call of one model into a JSON-lines log.

    Made by ``modewatch.watch()``. ``close()`` (idempotent, also run at interpreter exit) writes
    what is pending and removes every hook; a Watcher is also a context manager.
    """

    def __init__(self, model: Optional[nn.Module], log: Any = None, flush_seconds: float = FLUSH_SECONDS,
                 fold: bool = True, discover: bool = False, on_finding: Optional[str] = None,
                 layers: Any = None):
        if on_finding not in (None, "warn", "raise"):
            raise ValueError(f"on_finding must be 'warn' or 'raise', not {on_finding!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"modewatch.watch() needs a torch.nn.Module, not {type(model).__name__}")
        if isinstance(flush_seconds, bool) or not isinstance(flush_seconds, (int, float)) or not flush_seconds >= 0:
            raise ValueError("modewatch.watch(flush_seconds=...) must be a number of seconds (0 or more), "
                             f"not {flush_seconds!r}")
        if not isinstance(fold, bool):
            raise TypeError(f"modewatch.watch(fold=...) must be True or False, not {fold!r}")
        self.named = check_named(layers)  # custom layers named by the user
        self.off = True  # hooks do nothing until the log is open
        self.template = logpath.template(log)
        # Under MODEWATCH=1 every process that imports torch gets a watcher: its log is created
        # once there is something to write, or at exit (see close), not at start-up.
        self._writer = None if discover else _open_log(self.template)
        self.path = logpath.substitute(self.template) if discover else self._writer.path
        self.fold = fold  # False: every forward is a run of its own (the unfolded record, for tests)
        self.discover = discover  # MODEWATCH=1: watch models as they show up (mode calls, optimizers)
        self.on_finding = on_finding
        self._live = _Live(self.path, on_finding) if on_finding else None
        self.flush_seconds = flush_seconds
        self.state = _State()
        self.step = 0
        # Per layer id, lists the hooks read and write in place:
        self.versions: list = []  # its statistics counter's version after its last call
        self.layer_modes: list = []  # (mode id, mode) of the last train()/eval() reaching it
        self.marks: list = []  # a frozen norm layer's parameter versions at its last call
        self._layer_names: list = []
        self._layer_models: list = []
        self._norm_layers: list = []  # (layer id, weakref) of norm layers with parameters
        self._known: dict = {}  # id(module) -> _Known, for every module of every watched model
        self._dead: collections.deque = collections.deque()  # (id, weakref) of freed modules to forget
        self._models: list = []  # _Model per model index
        self._copies: list = []  # weak references to deep copies of watched modules (their hooks)
        self._copy_sites: dict = {}  # id(copy of a model) -> (weakref, site id of the deep copy)
        self._kept: dict = {}  # mode id of a library's call that changed nothing -> the call it kept
        self._lock = threading.RLock()
        self._optimizers: dict = {}  # id(optimizer) -> (weakref, param groups seen, model indices)
        self._ids: dict = {}  # interned (kind, key) -> id, for sites, modes, contexts
        self._counts: collections.Counter = collections.Counter()  # ids given, per kind
        self._definitions: list = []  # (event, fields) not yet written
        self._defined: list = []  # every (event, fields) written, to start a forked child's log
        self._done: collections.deque = collections.deque()  # forwards whose probes spoke
        self._pending: dict = {}  # seq -> forward whose graph may still be backpropagated
        self._runs: dict = {}  # (kind, site, context) -> the open _Run of identical forwards
        self._rows: list = []  # closed runs, not yet written
        self._seq = 0
        self._called = False  # a layer was called since the last counted step
        self._handles: list = []
        self._failed = False
        self._closed = False
        self._child = False  # a forked child of the process that made this watcher
        self.always_log = False  # MODEWATCH=1's watcher: the program's process leaves a log, always
        self._last_flush = time.monotonic()
        self._since_clock = 0  # forwards since the clock was last read
        if self._writer is not None:
            self._writer.header(**_header())
        try:
            if model is not None:
                self.add_model(model, sys._getframe(1))
            self._write()  # the header reaches the disk now: a full disk is found before training
        except BaseException as exc:
            for handle in self._handles:
                handle.remove()
            self._discard_log()
            if isinstance(exc, OSError):
                raise LogPathError(f"cannot write the modewatch log {self.path!r}: {exc.strerror or exc}") from None
            raise
        patches.attach(self)
        atexit.register(self.close)
        _close_in_multiprocessing_children(self)
        self.off = False

    def _discard_log(self) -> None:
        """The log could not be started (a full disk): leave no empty file behind."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except OSError:
            pass
        try:
            if os.path.isfile(writer.path):
                os.unlink(writer.path)
        except OSError:
            pass

    # ------------------------------------------------------------------ knowing modules

    def _lookup(self, module: Any) -> Optional[_Known]:
        known = self._known.get(id(module))
        return known if known is not None and known.ref() is module else None

    def _remember(self, module: nn.Module, model: int, path: str) -> _Known:
        known = self._lookup(module)
        if known is not None:
            known.model, known.path = model, path  # adopted by a model that holds it
            return known
        ident, dead = id(module), self._dead
        known = self._known[ident] = _Known(weakref.ref(module, lambda ref: dead.append((ident, ref))), model, path)
        return known

    def _forget_freed(self) -> None:
        """Forget the modules freed since last time (their ids may be given to new modules)."""
        dead = self._dead
        while dead:
            ident, ref = dead.popleft()
            known = self._known.get(ident)
            if known is not None and known.ref is ref:
                del self._known[ident]

    # ------------------------------------------------------------------ attaching

    def add_model(self, model: nn.Module, frame: Any = None, copy_of: Optional[int] = None,
                  site: Optional[int] = None) -> int:
        """Watch one more model; returns its index. A model that holds models already watched
        adopts them: their layers are renamed as this model's ``named_modules()`` names them.
        ``frame`` (or ``site``) is where it was watched or made; ``copy_of``, the model it is a
        deep copy of."""
        with self._lock:
            self._forget_freed()
            known = self._lookup(model)
            if known is not None:
                return known.model  # watched already, or a part of a watched model
            index = len(self._models)
            chain = _unwrapped_chain(model)
            if site is None and frame is not None:
                site = self._site(sites.user_frame(frame)[0])
            self._define("model", id=index, name=type(chain[-1]).__name__, site=site, copy_of=copy_of,
                         parameters=_parameter_count(model))
            self._models.append(_Model(index, model))
            for name, module in model.named_modules():
                known = self._remember(module, index, name)
                known.top = False  # a model adopted is a part now
                if copy_of is not None:  # a deep copy: its layers carry the original's hooks
                    self._find_layer(module, index)
                    continue
                category = category_of(module, self.named)
                if category is None:
                    continue
                if known.layer is None:
                    known.layer = self._add_layer(module, name, category, index, copy_of=None)
                elif (self._layer_names[known.layer], self._layer_models[known.layer]) != (name, index):
                    self._rename_layer(known.layer, module, name, index, category)
            for module in chain:  # all in named_modules() above
                known = self._lookup(module)
                known.top = known.root = True
            if copy_of is None and not model.training:
                self._initial_eval_mode(model)
            self._optimizers.clear()  # an optimizer's verdict may change with the new parameters
            if copy_of is None:  # a deep copy carries the original's model hooks already
                for root in chain:
                    hooks = _RootHooks(self, root, index)
                    self._handles.append(root.register_forward_pre_hook(hooks.before))
                    self._handles.append(root.register_forward_hook(hooks.after, always_call=True))
            return index

    def _rename_layer(self, layer: int, module: nn.Module, name: str, model: int, category: str) -> None:
        self._layer_names[layer] = name
        self._layer_models[layer] = model
        self._define("layer", id=layer, name=name, kind=type(module).__name__, category=category, model=model,
                     copy_of=None, params=category == "norm" and _has_parameters(module))

    def _initial_eval_mode(self, model: nn.Module) -> None:
        """A model already in eval mode when watching begins (``from_pretrained()`` and many
        checkpoint loaders return one): its eval mode is recorded as set where watching began,
        the one line known to come after whatever set it. Layers put in eval mode while the model
        is in train mode (deliberate freezing) are left as they are."""
        user, _ = sites.user_frame(sys._getframe(1))
        site = self._site(user)
        key = (site, "eval", False, None, "model", "initial")
        mode_id = self._intern("mode", key, lambda ident: self._define(
            "mode", id=ident, site=site, call="eval", mode=False, target=None, scope="model", initial=True))
        for module in model.modules():
            if module.training:
                continue
            known = self._lookup(module)
            if known is None:
                continue
            if known.layer is not None and self.layer_modes[known.layer][0] is None:
                self.layer_modes[known.layer] = (mode_id, False)
            if known.mode is None:
                known.mode = (mode_id, False)

    def _add_layer(self, module: nn.Module, name: str, category: str, model: int, copy_of: Optional[int]) -> int:
        layer = len(self._layer_names)
        self._layer_names.append(name)
        self._layer_models.append(model)
        self.versions.append(-1 if category == "dropout" else _current_version(module))
        self.marks.append(None)
        self.layer_modes.append(self.layer_modes[copy_of] if copy_of is not None else (None, module.training))
        params = category == "norm" and _has_parameters(module)
        if params:
            self._norm_layers.append((layer, weakref.ref(module)))
        self._define("layer", id=layer, name=name, kind=type(module).__name__,
                     category=category, model=model, copy_of=copy_of, params=params)
        if copy_of is None:
            hooks = _hooks_class(module, category)(self, layer, module)
            if getattr(hooks, "exact", False):
                self._handles.append(module.register_forward_pre_hook(hooks.before))
            self._handles.append(module.register_forward_hook(hooks.after))
        return layer

    def note_copy(self, copy: nn.Module, hooks: _Hooks) -> None:
        """A deep copy of a watched module is being made, and our hooks come along: it stays
        watched. Remembered so that ``close()`` takes the hooks off it again and, for a whole model,
        so that the copy is a model of its own in the log, made at the line of the deep copy."""
        with self._lock:
            if len(self._copies) > 64 and len(self._copies) & (len(self._copies) - 1) == 0:
                self._copies = [ref for ref in self._copies if ref() is not None]  # now and then
            self._copies.append(weakref.ref(copy))
            if isinstance(hooks, _RootHooks):
                user, _ = sites.user_frame(sys._getframe(2), _inside_copy_module)
                self._copy_sites[id(copy)] = (weakref.ref(copy), self._site(user))

    def copy_model(self, module: nn.Module, original: int) -> int:
        """The model index of a deep copy of a watched model (an EMA or SWA copy), added at its
        first forward: a model of its own, whose layers are copies of the original's."""
        known = self._lookup(module)
        if known is not None and known.root:
            return known.model
        with self._lock:
            noted = self._copy_sites.pop(id(module), None)
            site = noted[1] if noted is not None and noted[0]() is module else None
            return self.add_model(module, copy_of=original, site=site)

    def copy_layer(self, module: nn.Module, original: int, model: Optional[int] = None) -> int:
        """The layer id of a deep copy of a watched layer (its hooks came along with the copy)."""
        known = self._lookup(module)
        if known is not None and known.layer is not None:
            return known.layer
        if getattr(module, "_is_replica", False):  # DataParallel's per-call replicas: the original
            return original
        with self._lock:
            known = self._lookup(module)
            if known is not None and known.layer is not None:
                return known.layer
            if model is None:
                model = known.model if known is not None else self._layer_models[original]
            name = self._layer_names[original]
            layer = self._add_layer(module, name, category_of(module, self.named) or "norm", model, copy_of=original)
            if known is None:
                known = self._remember(module, model, name)
            known.layer = layer
            return layer

    def _find_layer(self, module: nn.Module, model: Optional[int] = None) -> Optional[int]:
        """The layer id of ``module``: watched, a known copy, or a copy not yet called."""
        known = self._lookup(module)
        if known is not None and known.layer is not None:
            return known.layer
        for hook in module._forward_hooks.values():
            hooks = getattr(hook, "__self__", None)
            if isinstance(hooks, _DropoutHooks) and hooks.watcher is self:
                return self.copy_layer(module, hooks.layer, model)
        return None

    # ------------------------------------------------------------------ interning

    def _define(self, event: str, **fields: Any) -> None:
        self._definitions.append((event, fields))
        if self._live is not None:
            self._live.feed({"event": event, **fields})

    def _intern(self, kind: str, key: Any, make: Any) -> int:
        """The id of ``key`` among the definitions of ``kind``; ``make(id)`` defines a new one."""
        try:
            return self._ids[kind, key]
        except KeyError:
            ident = self._ids[kind, key] = self._counts[kind]
            self._counts[kind] += 1
            make(ident)
            return ident

    def _site(self, frame: Any) -> Optional[int]:
        if frame is None:
            return None
        code, line = frame.f_code, frame.f_lineno
        known = self._ids.get(("site", (code, line)))  # the common case, once per forward
        if known is not None:
            return known
        return self._intern("site", (code, line), lambda ident: self._define(
            "site", id=ident, file=code.co_filename, line=line, function=code.co_name))

    def _context(self, allow: frozenset, recalibration: bool) -> int:
        if not allow and not recalibration:
            return 0
        return self._intern("context", (allow, recalibration), lambda ident: self._define(
            "context", id=ident + 1, allow=sorted(allow), recalibration=recalibration)) + 1

    # ------------------------------------------------------------------ events from the hooks

    def begin_forward(self, frame: Any, model: int) -> _Forward:
        if self._done:  # forwards whose graph died since: resolve them first, to keep the order
            self._drain()
        user, recalibrating = sites.user_frame(frame)
        self._seq += 1
        record = self._models[model]
        if not record.stepped:
            self._check_parameters(record)
        return _Forward(self._seq, self._site(user), self._context(allowed_rules(), recalibrating), self.step,
                        model, record.steps, self._done)

    def _check_parameters(self, record: _Model) -> None:
        """An EMA / momentum target (BYOL, MoCo, DINO, mean teacher): a model that no optimizer
        steps, whose parameters change between its forwards all the same. The version counters
        and data pointers of a few of its parameters tell, reading no value. (An update through
        ``.data`` moves neither; the analysis recognises such a copy by its likeness instead.)"""
        parameters = [p for ref in record.sample if (p := ref()) is not None]
        mark = tuple((_version(p), _data_ptr(p)) for p in parameters)
        if record.mark is not None and mark != record.mark:
            record.changes += 1
            if record.changes == UPDATES_SEEN:
                self._define("updated", model=record.index, step=self.step)
        record.mark = mark

    def end_forward(self, forward: _Forward, output: Any) -> None:
        if forward.calls:
            self._called = True
            nodes = _output_nodes(output)
            if not nodes:
                self._resolve(forward, logfile.NO_GRAPH)
            else:
                for node in nodes:
                    probe = _Probe(forward, self._done)
                    node.register_prehook(probe)
                    forward.probes += 1
                    # The probe lives as long as the graph: its death means no more backward.
                    forward.watches.append(weakref.ref(probe, forward.probe_died))
                self._pending[forward.seq] = forward
                while len(self._pending) > MAX_PENDING:
                    self._resolve(self._pending[next(iter(self._pending))])
        self._drain()
        self._since_clock += 1
        if self._since_clock >= 16:  # reading the clock every forward costs more than it saves
            self._since_clock = 0
            if time.monotonic() - self._last_flush > self.flush_seconds:
                self.flush()

    def unusual_call(self, hooks: _DropoutHooks, module: nn.Module, args: tuple, output: Any) -> None:
        """A layer call off the fast path: a deep copy of a layer, or a call outside any watched
        forward (``model.features(x)``), which is then a forward of its own."""
        if self.off or patches.backward_running():
            # During a backward, a layer call is activation checkpointing recomputing a forward
            # that was already recorded: recording it again would count it twice.
            return
        layer = hooks.layer if id(module) == hooks.module_id else self.copy_layer(module, hooks.layer)
        call = hooks.call(layer, module, args)
        forward = self.state.forward
        if forward is not None:
            forward.calls.append(call)
            return
        forward = self.begin_forward(sys._getframe(2), self._layer_models[layer])
        forward.calls.append(call)
        self.end_forward(forward, output)

    def _discover(self, module: nn.Module, frame: Any) -> None:
        """MODEWATCH=1: a module met for the first time, at a mode call or as the owner of an
        optimizer's parameters, is watched, as ``watch()`` would watch it: also a model whose
        only dropout is functional (``F.dropout``, ``scaled_dot_product_attention``)."""
        if self._lookup(module) is None:
            self.add_model(module, frame)

    def on_optimizer_created(self, optimizer: Any, frame: Any) -> None:
        """MODEWATCH=1: watch the model an optimizer is made for, found among the locals (and
        their attributes, for trainer objects) of the code that made it."""
        if self.off or not self.discover:
            return
        try:
            first = next((p for group in optimizer.param_groups for p in group["params"]), None)
            user, _ = sites.user_frame(frame)
            if first is None or user is None:
                return
            candidates = []
            for value in list(user.f_locals.values()):
                if isinstance(value, nn.Module):
                    candidates.append(value)
                elif isinstance(getattr(value, "__dict__", None), dict):
                    candidates.extend(v for v in list(vars(value).values()) if isinstance(v, nn.Module))
            owners = [m for m in candidates if any(p is first for p in m.parameters())]
            if owners:
                self._discover(max(owners, key=lambda m: sum(1 for _ in m.modules())), user)
        except Exception as exc:
            self.fail(exc)

    def on_mode_call(self, module: nn.Module, call: str, mode: bool, nested: bool) -> None:
        if self.off:
            return
        try:
            caller = sys._getframe(2)
            if self.discover and not nested:
                self._discover(module, caller)
            modules = list(module.modules())
            layers = [(m, layer) for m in modules if (layer := self._find_layer(m)) is not None]
            known = [k for m in modules if (k := self._lookup(m)) is not None]  # whose functional calls count
            if not layers and not known:
                return
            skip = None if nested else _inside_mode_method
            user, _, via = sites.user_frame_via(caller, skip)
            site = self._site(user)
            target = self._lookup(module)
            path = None if target is None else target.path
            if target is not None and target.layer is not None:
                scope = "layer"
            elif target is not None and target.top:
                scope = "model"
            elif target is not None:
                scope = "submodule"
            else:
                scope = "outside"
            # A library's call that finds every layer in that mode already, set by a recorded
            # call (Lightning's eval() for validation of a model its user left in eval mode), is
            # still the last call (the contract's mode_site), and keeps a reference to that one.
            kept = None
            if via and layers and all(_already(self.layer_modes[layer], m, mode) for m, layer in layers):
                previous = {self.layer_modes[layer][0] for _, layer in layers}
                if len(previous) == 1:
                    setter = previous.pop()
                    kept = self._kept.get(setter, setter)  # one that only kept a mode: the call it kept
            key = (site, call, mode, path, scope, via, kept)
            mode_id = self._intern("mode", key, lambda ident: self._define(
                "mode", id=ident, site=site, call=call, mode=mode, target=path, scope=scope, via=via,
                kept=kept))
            if kept is not None:
                self._kept[mode_id] = kept
            for _, layer in layers:
                self.layer_modes[layer] = (mode_id, mode)
            for k in known:
                k.mode = (mode_id, mode)
        except Exception as exc:
            self.fail(exc)

    def on_functional_call(self, kind: str, p: Optional[float], training: bool, frame: Any) -> None:
        """A functional dropout (see ``functional``), recorded as a layer call of the module whose
        forward made it. Only inside a watched forward, and never during a backward (activation
        checkpointing recomputing a forward already recorded)."""
        forward = self.state.forward
        if forward is None or self.off or patches.backward_running():
            return
        try:
            module, known = functional.enclosing_module(frame, self._lookup)
            if module is None or known.layer is not None:  # a watched layer records itself
                return
            layer = None if known.functional is None else known.functional.get(kind)
            if layer is None:
                layer = self._add_functional(module, known, kind, frame)
            module_training = module.training
            training, param = functional.row_values(p, training, module_training)
            mode_id, mode = known.mode or (None, None)
            forward.calls.append((layer, training | (_is_grad_enabled() << 1), None, param,
                                  mode_id if mode == module_training else None))
        except Exception as exc:
            self.fail(exc)

    def _add_functional(self, module: nn.Module, known: _Known, kind: str, frame: Any) -> int:
        """A layer for the functional dropouts of one kind made by ``module``, named after it (the
        watched model itself by its class), with the line of its first call."""
        with self._lock:
            layer = len(self._layer_names)
            name = f"{known.path or type(module).__name__}:{kind}"
            site = self._site(frame)
            self._layer_names.append(name)
            self._layer_models.append(known.model)
            self.versions.append(-1)
            self.marks.append(None)
            self.layer_modes.append((None, module.training))  # unused: the module's mode is read
            if known.functional is None:
                known.functional = {}
            known.functional[kind] = layer
            self._define("layer", id=layer, name=name, kind=kind, category="dropout", model=known.model,
                         copy_of=None, site=site)
            return layer

    def on_optimizer_step(self, optimizer: Any) -> None:
        if self.off:
            return
        try:
            models = self._optimized_models(optimizer)
            if not models:
                return
            for index in models:
                record = self._models[index]
                record.steps += 1
                record.stepped = True
            if not self._called:
                return
            self._called = False
            self.step += 1
            self._drain()
            if self._pending:
                with self._lock:
                    # Stale: not backpropagated after several steps of its own model's optimizers.
                    # Other models' steps do not count: a WGAN critic steps five times while the
                    # generator's output waits for its backward.
                    stale = [f for f in self._pending.values()
                             if self._models[f.model].steps - f.model_steps >= STALE_STEPS]
                    for forward in stale:
                        self._resolve(forward)
            if time.monotonic() - self._last_flush > self.flush_seconds:
                self.flush()
        except Exception as exc:
            self.fail(exc)

    def _optimized_models(self, optimizer: Any) -> tuple:
        """The indices of the watched models whose parameters ``optimizer`` holds (cached per
        optimizer and its param groups). The first time, an ``optimized`` event says which models
        and which norm layers it steps (stat-update-in-frozen's "in no optimizer")."""
        groups = optimizer.param_groups
        seen = (len(groups), id(groups[-1]["params"]) if groups else None)
        cached = self._optimizers.get(id(optimizer))
        if cached is not None and cached[1] == seen and cached[0]() is optimizer:
            return cached[2]
        with self._lock:
            held = {id(p) for group in groups for p in group["params"]}
            models = []
            for record in self._models:
                module = record.ref()
                if module is None:
                    continue
                # Read again: a head replaced after watch() (transfer learning) has new parameters.
                record.param_ids = frozenset(id(p) for p in module.parameters())
                if not record.param_ids.isdisjoint(held):
                    models.append(record.index)
            layers = [layer for layer, ref in self._norm_layers if (module := ref()) is not None
                      and any(id(p) in held for p in module._parameters.values() if p is not None)]
            if models:
                self._define("optimized", step=self.step, models=models, layers=layers)
            if len(self._optimizers) > 64:
                self._optimizers = {k: v for k, v in self._optimizers.items() if v[0]() is not None}
            self._optimizers[id(optimizer)] = (weakref.ref(optimizer), seen, tuple(models))
            return tuple(models)

    # ------------------------------------------------------------------ resolving and folding

    def _drain(self) -> None:
        done = self._done
        while done:
            forward = done.popleft()
            if not forward.resolved:
                self._resolve(forward)

    def _resolve(self, forward: _Forward, kind: Optional[int] = None) -> None:
        """Fold a finished forward into the run of identical forwards it continues, if any.

        A run is keyed by what the forward was (kind, call site, context) and holds the exact
        list of its layer calls: steady training compares one list per step and writes nothing.
        """
        with self._lock:
            if forward.resolved:
                return
            forward.resolved = True
            self._pending.pop(forward.seq, None)
            key = (forward.kind if kind is None else kind, forward.site, forward.context)
            run = self._runs.get(key)
            if forward.inference:
                forward.calls = [(layer, flags | logfile.INFERENCE, *rest) for layer, flags, *rest in forward.calls]
            if run is not None and run.calls == forward.calls and self.fold:
                run.add(forward)
            else:
                if run is not None:
                    self._rows.extend(run.rows(key))
                    if len(self._rows) >= MAX_ROWS_PER_LINE:  # a mode change every step: keep lines short
                        self._write()
                self._runs[key] = _Run(forward)
            if self._live is not None:  # the same rows the log gets, one forward at a time
                self._live.check(_Run(forward).rows(key))
            forward.calls = []

    # ------------------------------------------------------------------ writing

    def _write(self, open_runs: bool = False, always: bool = False) -> None:
        with self._lock:
            if self._writer is None:  # MODEWATCH=1 or a forked child: opened once there is something
                if not (self._rows or (open_runs and self._runs) or always):
                    return
                self._writer = _open_log(self.template)
                self.path = self._writer.path
                self._writer.header(**_header())
                self._definitions[:0] = self._defined
                self._defined = []
            for event, fields in self._definitions:
                getattr(self._writer, event)(**fields)
            self._defined.extend(self._definitions)
            self._definitions.clear()
            if open_runs:
                for key, run in self._runs.items():
                    self._rows.extend(run.rows(key))
                self._runs.clear()
            if self._rows:
                self._writer.calls(self.step, self._rows)
                self._rows = []
            self._writer.flush()
            self._last_flush = time.monotonic()

    def _detach(self) -> None:
        """Remove every hook of this watcher (from deep copies too) and, with the last watcher,
        every patch."""
        for handle in self._handles:
            handle.remove()
        for ref in self._copies:
            module = ref()
            if module is not None:
                _strip_hooks(module, self)
        patches.detach(self)

    def before_fork(self) -> None:
        """Empty the file buffer, so that a forked child inherits nothing it could write twice."""
        try:
            if self._writer is not None:
                self._writer.flush()
        except Exception:
            pass

    def after_fork_in_child(self) -> None:
        """In a forked child (a DataLoader worker, multiprocessing): never the parent's log.

        The child writes a log of its own once it records something: at the path of ``{pid}``
        in the template, or beside the parent's (``logpath.claim``), said on stderr.
        """
        self._lock = threading.RLock()  # another thread may have held it at the fork
        self._child = True
        self._pending.clear()
        self._done.clear()
        self._runs.clear()
        self._rows = []
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None

    def flush(self) -> None:
        """Write everything recorded so far, including runs still open (crash safety)."""
        if self._closed:
            return
        try:
            self._drain()
            self._write(open_runs=True)
        except Exception as exc:
            self.fail(exc)

    def close(self) -> None:
        """Stop watching: resolve what is pending, write it, remove every hook. Idempotent.

        With ``on_finding="raise"``, a finding completed here is raised after the log is written
        whole. Under MODEWATCH=1 the program's own process always leaves a log, also when it
        watched nothing, so that ``modewatch analyze`` has something to read."""
        if self._closed:
            return
        self.off = True
        found = None
        try:
            self._detach()
            if not self._failed:
                self._drain()
                for forward in list(self._pending.values()):
                    try:
                        self._resolve(forward)
                    except ModeFindingError as exc:
                        found = found or exc
                if self._live is not None:
                    try:
                        self._live.check([], final=True)
                    except ModeFindingError as exc:
                        found = found or exc
                always = self.always_log and not self._child and not _is_child_process()
                self._write(open_runs=True, always=always)
                if self._writer is not None:
                    self._writer.footer(steps=self.step, forwards=self._seq, models=len(self._models))
                    if self.discover:  # MODEWATCH=1: nobody chose the path, so say where it is
                        sys.stderr.write(f"modewatch: wrote {self.path} (see: modewatch analyze {self.path})\n")
        except Exception as exc:
            self._warn(exc)
        finally:
            self._closed = True
            try:
                if self._writer is not None:
                    self._writer.close()
            except Exception:
                pass
            atexit.unregister(self.close)
        if found is not None:
            raise found

    def fail(self, exc: BaseException) -> None:
        """A failure inside modewatch: one warning, stop watching, never disturb the training."""
        if isinstance(exc, ModeFindingError):  # not a failure: what on_finding="raise" asked for
            raise exc
        if self._failed:
            return
        self._failed = True
        self.off = True
        self._warn(exc)
        try:
            self._detach()
            if self._writer is not None:
                self._writer.flush()
        except Exception:
            pass

    def _warn(self, exc: BaseException) -> None:
        if isinstance(exc, LogPathError):  # not a bug: the log's place is the problem
            message = f"modewatch stopped watching: {exc.message}; training goes on unwatched"
        else:
            message = (f"modewatch stopped watching after an internal error ({type(exc).__name__}: {exc}); "
                       f"training goes on unwatched. Log so far: {self.path}")
        try:
            warnings.warn(message, RuntimeWarning, stacklevel=sites.user_stacklevel(sys._getframe()))
        except Exception:  # warnings turned into errors must not reach the user's code
            try:
                sys.stderr.write(f"warning: {message}\n")
            except Exception:
                pass

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "off" if self.off else "watching"
        return f"<modewatch.Watcher {state} {len(self._layer_names)} layers -> {self.path}>"


def _close_in_multiprocessing_children(watcher: Watcher) -> None:
    """A multiprocessing child (fork) ends with ``os._exit``, which skips ``atexit``: have the
    child close the watcher through multiprocessing's own exit finalizers instead."""
    try:
        from multiprocessing import util

        util.register_after_fork(watcher, _finalize_in_child)
    except Exception:
        pass


def _finalize_in_child(watcher: Watcher) -> None:
    from multiprocessing import util

    util.Finalize(watcher, watcher.close, exitpriority=10)


class _Run:
    """Consecutive forwards of one kind, site and context that made exactly the same calls."""

    __slots__ = ("calls", "first_step", "last_step", "first_forward", "forwards")

    def __init__(self, forward: _Forward):
        self.calls = forward.calls
        self.first_step = self.last_step = forward.step
        self.first_forward = forward.seq
        self.forwards = 1

    def add(self, forward: _Forward) -> None:
        # Forwards are resolved roughly, not strictly, in order (a late backward): min and max.
        self.first_step = min(self.first_step, forward.step)
        self.last_step = max(self.last_step, forward.step)
        self.first_forward = min(self.first_forward, forward.seq)
        self.forwards += 1

    def rows(self, key: tuple) -> list:
        """The log rows of this run: one per distinct layer call of its forwards."""
        kind, site, context = key
        return [[layer, kind, flags, batch, param, mode, site, context, self.first_step, self.last_step,
                 self.first_forward, self.forwards, self.forwards * times]
                for (layer, flags, batch, param, mode), times in collections.Counter(self.calls).items()]


class _Live:
    """``on_finding``: the analyzer's own Job, fed the watcher's rows as they are made, so that a
    finding is told (warned once per cause, or raised) with the same words and sites as
    ``modewatch analyze`` gives later."""

    def __init__(self, path: str, on_finding: str):
        from .analysis import Job  # the analysis imports no torch; imported only when live

        self.on_finding = on_finding
        self.reader = logfile.LogReader(path)
        self.job = Job()
        self.add = self.job.start_log(path, logfile.Header(logfile.SCHEMA, "", None, None, None, (), None, None),
                                      self.reader.facts)
        self.told: set = set()

    def feed(self, event: dict) -> None:
        for calls in self.reader.feed(event):
            self.add(calls)

    def check(self, rows: list, final: bool = False) -> None:
        """Feed ``rows``; tell each new error finding. Until ``final`` (the watcher closing), a
        verdict that more of the run could change (an EMA target not yet recognised) waits."""
        self.feed({"event": "calls", "rows": rows})
        for finding in self.job.findings(final):
            key = (finding.rule, finding.severity, finding.cause)
            if finding.severity != "error" or key in self.told:
                continue
            self.told.add(key)
            if self.on_finding == "raise":
                raise ModeFindingError(finding)
            warnings.warn(f"{finding.rule}: {finding.message}", ModewatchWarning,
                          stacklevel=sites.user_stacklevel(sys._getframe()))


def _already(recorded: tuple, module: nn.Module, mode: bool) -> bool:
    """Whether a module is in ``mode`` already, set by the recorded call ``recorded[0]``."""
    return recorded[0] is not None and recorded[1] == mode and module.training == mode


def _inside_mode_method(frame: Any) -> bool:
    """A user-defined train()/eval() override: look past it, to the line that called it."""
    return frame.f_code.co_name in ("train", "eval") and isinstance(frame.f_locals.get("self"), nn.Module)


OPTIONS = ("flush_seconds", "fold", "on_finding", "layers")


def watch(model: nn.Module, log: Any = None, **options: Any) -> Watcher:
    """The implementation of `modewatch.watch()` (documented there)."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"modewatch.watch() got an unknown option {sorted(unknown)[0]!r} "
                        f"(it takes {', '.join(OPTIONS)})")
    if model is None:  # Watcher(None) is MODEWATCH=1's watcher of models yet to come
        raise TypeError("modewatch.watch() needs a torch.nn.Module, not None")
    return Watcher(model, log, **options)
