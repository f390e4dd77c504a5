"""Process-wide instrumentation shared by all watchers, installed while at least one is active.

- ``nn.Module.train``/``eval`` are wrapped (wrapt) to learn the line that set each mode.
- ``torch.autograd.backward``/``grad`` are wrapped to tell a parameter-gradient backward from a
  gradient with respect to inputs only; the collector's probes on a forward's outputs read it.
- A global optimizer step post-hook counts steps (it fires for every optimizer class).
- ``Optimizer.__init__`` is wrapped so that MODEWATCH=1 can find the models being trained.
- Functional dropout (``F.dropout`` and variants, ``F.scaled_dot_product_attention``) is replaced
  by the wrappers of ``functional``, which tell the watchers of each call.

When the last watcher closes everything is restored: off means off.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
import wrapt

from . import functional
from .logfile import INPUT_GRAD, PARAM_GRAD

_lock = threading.Lock()
_watchers: list = []  # active Watcher objects, in creation order
_originals: dict = {}  # (owner, name) -> (original attribute, what was put in its place), while patched
_step_hook = None

# The kind of backward in progress. A plain list, not thread-local: on a GPU the autograd engine
# runs the probes on its own threads, while the call that started the backward is on the user's.
_backward_kinds: list = []


def backward_running() -> bool:
    """Whether a backward started through torch.autograd.backward/grad is in progress."""
    return bool(_backward_kinds)


_GRAD_CODES = (torch.autograd.grad.__code__, torch.autograd.backward.__code__)


def backward_kind() -> int:
    """What the backward now running differentiates with respect to (parameters if unknown)."""
    if _backward_kinds:
        return _backward_kinds[-1]
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
    _backward_kinds.append(kind)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _backward_kinds.pop()


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


def _on_step(optimizer, args, kwargs):
    for watcher in tuple(_watchers):
        watcher.on_optimizer_step(optimizer)


_PATCHES = (
    (torch.nn.Module, "train", _train),
    (torch.nn.Module, "eval", _eval),
    (torch.autograd, "backward", _backward),
    (torch.autograd, "grad", _grad),
    (torch.optim.Optimizer, "__init__", _optimizer_init),
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


# modewatch's modules whose code torch.compile must run as it is, never trace: hooks read the
# stack, version counters and locks, which Dynamo would otherwise try to compile (and guard on).
# ``functional`` is not among them: its wrappers are traced, so that dropout stays in the graph.
EAGER_MODULES = ("modewatch.collector", "modewatch.patches", "modewatch.sites", "modewatch.allow",
                 "modewatch.logfile", "modewatch.analysis", "modewatch.ranks", "structlog", "wrapt")
_dynamo_told = False


def _keep_out_of_compiled_graphs(dynamo: Any) -> None:
    """When torch._dynamo is imported (torch.compile, Transformers, Lightning): tell it to run the
    hooks' code eagerly. A hook call inside a compiled model is then a silent graph break."""
    global _dynamo_told
    if _dynamo_told:
        return
    _dynamo_told = True
    try:
        from torch._dynamo import trace_rules

        for name in EAGER_MODULES:
            trace_rules.add(name)
    except Exception:  # a torch whose Dynamo has no such API: hooks are traced, with warnings
        pass


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
    """Add an active watcher; install the patches if it is the first."""
    global _step_hook
    with _lock:
        if not _watchers:
            _catch_sigterm()
            for owner, name, wrapper in _PATCHES:
                _replace(owner, name, wrapt.FunctionWrapper(owner.__dict__[name], wrapper))
            _install_functional()
            wrapt.register_post_import_hook(_keep_out_of_compiled_graphs, "torch._dynamo")
            _step_hook = register_optimizer_step_post_hook(_on_step)
        _watchers.append(watcher)


def detach(watcher: Any) -> None:
    """Remove a watcher; restore torch as it was when the last one goes."""
    global _step_hook
    with _lock:
        if watcher in _watchers:
            _watchers.remove(watcher)
        if _watchers or not _originals:
            return
        for (owner, name), (original, replacement) in _originals.items():
            # Restore only our own wrapper: if someone patched on top of it, leave theirs alone
            # (our wrapper then passes calls through, as no watcher is left to tell).
            if owner.__dict__.get(name) is replacement:
                setattr(owner, name, original)
        _originals.clear()
        _release_sigterm()
        if _step_hook is not None:
            _step_hook.remove()
            _step_hook = None


def active_watchers() -> tuple:
    return tuple(_watchers)
