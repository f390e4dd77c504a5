"""Process-wide instrumentation shared by all watchers, installed while at least one is active.

- ``nn.Module.train``/``eval`` are wrapped (wrapt) to learn the line that set each mode.
- ``torch.autograd.backward``/``grad`` are wrapped to tell a parameter-gradient backward from a
  gradient with respect to inputs only; the collector's probes on a forward's outputs read it.
- A global optimizer step post-hook counts steps (it fires for every optimizer class).
- ``Optimizer.__init__`` is wrapped so that MODEWATCH=1 can find the models being trained, and
  ``nn.Module.to``/``cuda``/``load_state_dict``/``requires_grad_`` those being set up.
- Functional dropout (``F.dropout`` and variants, ``F.scaled_dot_product_attention``) is replaced
  by the wrappers of ``functional``, which tell the watchers of each call.
- ``nn.Module.__getstate__`` leaves modewatch's hooks out of what is pickled (``torch.save(model)``),
  while ``copy.deepcopy`` keeps them; so does the ``__getstate__`` of any class a hooked module
  is an instance of that overrides Module's (``nn.LSTM``, DistributedDataParallel), patched when
  the first such module gets hooks.

When the last watcher closes everything is restored: off means off.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
import weakref
from typing import Any, Callable, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
import wrapt

from . import compat, functional
from .format import INPUT_GRAD, PARAM_GRAD

_lock = threading.Lock()
_watchers: list = []  # active Watcher objects, in creation order
_originals: dict = {}  # (owner, name) -> (original attribute, what was put in its place), while patched
_step_hooks: dict = {}  # watcher -> the handle of its optimizer step post-hook
_getstate_owners: weakref.WeakSet = weakref.WeakSet()  # hooked modules' classes with a __getstate__ of their own

# The kinds of backward in progress, per thread that started one (its stack). On a CPU the
# autograd engine runs the probes on the thread that called backward; on a GPU on threads of its
# own, which then look at every thread's backward.
backward_kinds: dict = {}  # thread ident -> [kind, ...]
_graph_task_id = compat.current_graph_task_id


def backward_running() -> bool:
    """Whether this code runs inside a backward (activation checkpointing recomputing a forward)."""
    if _graph_task_id is not None:
        return _graph_task_id() != -1  # exact, and per thread
    return bool(backward_kinds)


_GRAD_CODES = (torch.autograd.grad.__code__, torch.autograd.backward.__code__)


def backward_kind() -> int:
    """What the backward now running differentiates with respect to (parameters if unknown)."""
    mine = backward_kinds.get(threading.get_ident())
    if mine:
        return mine[-1]
    if backward_kinds:  # an engine thread: the backward of some other thread
        kinds = {stack[-1] for stack in list(backward_kinds.values()) if stack}
        if kinds:
            return kinds.pop() if len(kinds) == 1 else PARAM_GRAD
    # Not through our wrappers (``from torch.autograd import grad`` binds the original): on a CPU
    # the engine runs the probe on the calling thread, so the original's frame is on the stack.
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _GRAD_CODES:
            return _kind_of(frame.f_locals.get("inputs"))
        frame = frame.f_back
    return PARAM_GRAD


def _kind_of(inputs: Any) -> int:
    """PARAM_GRAD unless ``inputs`` is given and holds no nn.Parameter."""
    if inputs is None:
        return PARAM_GRAD
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    try:
        return PARAM_GRAD if any(isinstance(t, torch.nn.Parameter) for t in inputs) else INPUT_GRAD
    except TypeError:
        return PARAM_GRAD


def _with_kind(kind: int, wrapped: Callable, args: tuple, kwargs: dict) -> Any:
    ident = threading.get_ident()
    stack = backward_kinds.setdefault(ident, [])
    stack.append(kind)
    try:
        return wrapped(*args, **kwargs)
    finally:
        stack.pop()
        if not stack:
            backward_kinds.pop(ident, None)


def _backward(wrapped, instance, args, kwargs):
    # torch.autograd.backward(tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs)
    inputs = kwargs.get("inputs", args[5] if len(args) > 5 else None)
    return _with_kind(_kind_of(inputs), wrapped, args, kwargs)


def _grad(wrapped, instance, args, kwargs):
    # torch.autograd.grad(outputs, inputs, ...): inputs is required
    inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
    return _with_kind(_kind_of(inputs) if inputs is not None else INPUT_GRAD, wrapped, args, kwargs)


class _ModeCall(threading.local):
    outer: Optional[bool] = None  # the mode of the outermost train()/eval() call in progress


_mode_call = _ModeCall()


def _set_mode(call: str, mode: Any, module: Any, wrapped: Callable, args: tuple, kwargs: dict) -> Any:
    outer = _mode_call.outer
    # Record the outermost call (once per user call, not once per submodule), and a nested call
    # that sets the other mode (a train() override that freezes its BatchNorm layers).
    if isinstance(mode, bool) and (outer is None or mode != outer):
        for watcher in tuple(_watchers):
            watcher.on_mode_call(module, call, mode, nested=outer is not None)
    if outer is not None or not isinstance(mode, bool):
        return wrapped(*args, **kwargs)
    _mode_call.outer = mode
    try:
        return wrapped(*args, **kwargs)
    finally:
        _mode_call.outer = None


def _train(wrapped, instance, args, kwargs):
    mode = args[0] if args else kwargs.get("mode", True)
    return _set_mode("train", mode, instance, wrapped, args, kwargs)


def _eval(wrapped, instance, args, kwargs):
    return _set_mode("eval", False, instance, wrapped, args, kwargs)


def _optimizer_init(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    for watcher in tuple(_watchers):
        watcher.on_optimizer_created(instance, sys._getframe(1))
    return result


def _model_set_up(wrapped, instance, args, kwargs):
    """``.to()``, ``.cuda()``, ``.load_state_dict()``, ``.requires_grad_()``: a model being set up
    (a teacher loaded and frozen, which never calls .train()/.eval() nor gets an optimizer)."""
    result = wrapped(*args, **kwargs)
    if _watchers and isinstance(instance, torch.nn.Module):
        for watcher in tuple(_watchers):
            watcher.on_model_set_up(instance, sys._getframe(1))
    return result


_COPY_CODES = (copy.deepcopy.__code__, copy.copy.__code__)


def is_ours(hook: Any) -> bool:
    """Whether a module's hook is one of modewatch's (a bound method of a hooks object)."""
    return getattr(getattr(hook, "__self__", None), "modewatch_hook", False) is True


def without_our_hooks(state: dict) -> dict:
    """A module's pickled state with modewatch's hooks left out, so that a checkpoint written
    while watched (``torch.save(model)``) is exactly what it would be unwatched: loadable with
    ``weights_only=True`` and where modewatch is not installed. The module keeps its hooks."""
    compat.remove_hooks(state, is_ours)
    return state


def _make_getstate(original: Callable) -> Callable:
    def __getstate__(self: Any) -> Any:
        state = original(self)
        try:
            # copy.deepcopy (SWA, EMA) keeps the hooks: the copy stays watched. Everything else
            # that asks for the state is pickling. (A subclass's __getstate__ may call this one.)
            caller = sys._getframe(1)
            while caller is not None and caller.f_code.co_name == "__getstate__":
                caller = caller.f_back
            if (caller is None or caller.f_code not in _COPY_CODES) and isinstance(state, dict):
                state = without_our_hooks(dict(state))
        except Exception:  # never stop a checkpoint from being written
            pass
        return state

    return __getstate__


def pickled_without_hooks(module: Any) -> None:
    """Before hooks go on ``module``: if its class pickles through a ``__getstate__`` of its own
    (``RNNBase`` copies ``__dict__`` itself, never reaching Module's), make that one leave our
    hooks out too, now if a watcher is active, else when the first one is. Restored with the other
    patches when the last watcher closes."""
    for owner in type(module).__mro__:
        getstate = owner.__dict__.get("__getstate__")
        if getstate is not None:
            break
    else:
        return
    if owner is torch.nn.Module or not callable(getstate) or owner in _getstate_owners:
        return
    with _lock:
        _getstate_owners.add(owner)
        if _watchers:
            _strip_hooks_in_getstate(owner)


def _strip_hooks_in_getstate(owner: type) -> None:
    if (owner, "__getstate__") not in _originals:
        try:
            _replace(owner, "__getstate__", _make_getstate(owner.__dict__["__getstate__"]))
        except (TypeError, AttributeError, KeyError):  # a class that cannot be patched keeps its own
            pass


_PATCHES = (
    (torch.nn.Module, "train", _train),
    (torch.nn.Module, "eval", _eval),
    (torch.autograd, "backward", _backward),
    (torch.autograd, "grad", _grad),
    (torch.optim.Optimizer, "__init__", _optimizer_init),
    *((torch.nn.Module, name, _model_set_up) for name in ("to", "cuda", "load_state_dict", "requires_grad_")),
)


def _on_functional_call(kind: str, p: Optional[float], training: bool, frame: Any) -> None:
    for watcher in _watchers:
        watcher.on_functional_call(kind, p, training, frame)


def _install_functional() -> None:
    # torch's Dropout modules get the unwrapped functions: their hooks record their calls.
    dropout_modules = torch.nn.modules.dropout
    if dropout_modules.__dict__.get("F") is torch.nn.functional:
        _replace(dropout_modules, "F", functional.originals_namespace())
    for name, *arguments in functional.FUNCTIONS:
        original = getattr(torch.nn.functional, name, None)
        if original is not None:  # None: an older torch without this variant
            _replace(torch.nn.functional, name,
                     functional.make_wrapper(original, name, *arguments, _on_functional_call))


def _replace(owner: Any, name: str, replacement: Any) -> None:
    _originals[(owner, name)] = (owner.__dict__[name], replacement)
    setattr(owner, name, replacement)


# Run eagerly by torch.compile, never traced: every module of these packages but the traced ones.
# Hooks read the stack, version counters and locks, which Dynamo would otherwise try to compile
# (and guard on); ``functional``'s wrappers are traced, so that dropout stays in the graph.
EAGER_PACKAGES = ("modewatch", "structlog", "wrapt")
TRACED_MODULES = ("modewatch.functional",)
_dynamo_told = False


def _keep_out_of_compiled_graphs(dynamo: Any) -> None:
    """When torch._dynamo is imported (torch.compile, Transformers, Lightning)."""
    global _dynamo_told
    if not _dynamo_told:
        _dynamo_told = True
        compat.keep_out_of_compiled_graphs(EAGER_PACKAGES, TRACED_MODULES)


def _before_fork() -> None:
    for watcher in tuple(_watchers):
        watcher.before_fork()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    for watcher in tuple(_watchers):
        watcher.after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a scheduler ending the job): write the logs, then die of SIGTERM as before."""
    for watcher in tuple(_watchers):
        watcher.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _catch_sigterm() -> None:
    # Only where the program left SIGTERM alone (a handler of its own exits through atexit),
    # and only from the main thread, the one place Python allows it.
    try:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        pass


def _release_sigterm() -> None:
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (ValueError, OSError):
        pass


def attach(watcher: Any) -> None:
    """Add an active watcher; install the patches if it is the first. Each watcher has an
    optimizer step post-hook of its own (its bound method: no loop over watchers per step)."""
    with _lock:
        if not _watchers:
            _catch_sigterm()
            for owner, name, wrapper in _PATCHES:
                _replace(owner, name, wrapt.FunctionWrapper(owner.__dict__[name], wrapper))
            _install_functional()
            for owner in (torch.nn.Module, *_getstate_owners):
                _strip_hooks_in_getstate(owner)
            wrapt.register_post_import_hook(_keep_out_of_compiled_graphs, "torch._dynamo")
        _watchers.append(watcher)
        _step_hooks[watcher] = register_optimizer_step_post_hook(watcher.on_optimizer_step)


def detach(watcher: Any) -> None:
    """Remove a watcher; restore torch as it was when the last one goes."""
    with _lock:
        if watcher in _watchers:
            _watchers.remove(watcher)
        handle = _step_hooks.pop(watcher, None)
        if handle is not None:
            handle.remove()
        if _watchers or not _originals:
            return
        for (owner, name), (original, replacement) in _originals.items():
            # Restore only our own wrapper: if someone patched on top of it, leave theirs alone
            # (our wrapper then passes calls through, as no watcher is left to tell).
            if owner.__dict__.get(name) is replacement:
                setattr(owner, name, original)
        _originals.clear()
        _release_sigterm()


def active_watchers() -> tuple:
    return tuple(_watchers)
