"""torch's private APIs that modewatch relies on, in one place, each with its fallback.

Everything else modewatch uses of torch is public. When a torch release moves one of these, this
is the file to change; tests/test_compat.py checks each against the installed torch.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
# torch's base classes of its mode-sensitive layers (private names, public behaviour), for others here.
from torch.nn.modules.batchnorm import _BatchNorm as BatchNormBase  # noqa: F401
from torch.nn.modules.dropout import _DropoutNd as DropoutBase  # noqa: F401
from torch.nn.modules.instancenorm import _InstanceNorm as InstanceNormBase  # noqa: F401

# Read on every layer call: torch's C function, without the Python wrapper of torch.is_grad_enabled.
is_grad_enabled: Callable[[], bool] = torch._C.is_grad_enabled

# The id of the autograd graph task running on this thread, -1 outside any backward (exact, and
# per thread); None on a torch without it.
current_graph_task_id: Optional[Callable[[], int]] = getattr(torch._C, "_current_graph_task_id", None)


def is_replica(module: torch.nn.Module) -> bool:
    """A per-call replica made by DataParallel (or torch's _replicate_for_data_parallel)."""
    return getattr(module, "_is_replica", False) is True


# A module's own tables, name -> tensor or module (not its submodules'). Read on every layer call:
# nn.Module.__getattr__ is slow, and attrgetter is C.
own_buffers: Callable[[torch.nn.Module], dict] = operator.attrgetter("_buffers")
own_parameters: Callable[[torch.nn.Module], dict] = operator.attrgetter("_parameters")
own_children: Callable[[torch.nn.Module], dict] = operator.attrgetter("_modules")
FORWARD_HOOKS, FORWARD_PRE_HOOKS = "_forward_hooks", "_forward_pre_hooks"
# Tables keyed by a hook's handle id, kept beside the hook dicts.
HOOK_ID_TABLES = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _module_call_codes() -> tuple:
    """The code objects of torch's own frames between the line that called a module and its
    forward hooks, innermost first: in torch 2.13 ``_call_impl``'s nested ``inner``, then
    ``_call_impl`` and ``_wrapped_call_impl``. The model's pre-hook steps over them one by one
    while each matches, by identity, before looking for the user's frame: a torch that calls hooks
    from elsewhere gets nothing stepped over (slower, still right). Read from torch's functions,
    not by calling a module, which would run the program's global module hooks."""
    module = torch.nn.Module
    call_impl = getattr(getattr(module, "_call_impl", None), "__code__", None)
    if call_impl is None:
        return ()
    inner = tuple(code for code in call_impl.co_consts
                  if isinstance(code, type(call_impl)) and code.co_name == "inner")
    wrapped = getattr(getattr(module, "_wrapped_call_impl", None), "__code__", None)
    return inner[:1] + (call_impl,) + ((wrapped,) if wrapped is not None else ())


MODULE_CALL_CODES: tuple = _module_call_codes()


def version(tensor: torch.Tensor) -> int:
    """A tensor's version counter: it moves on every in-place change (no value read, no sync)."""
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def data_ptr(tensor: torch.Tensor) -> int:
    """Where a tensor's data lives (metadata, no sync): ``param.data = new`` moves it."""
    try:
        return tensor.data_ptr()
    except Exception:  # tensors without storage
        return 0


def forward_hooks(module: torch.nn.Module) -> Any:
    """The forward hooks (post-hooks) of a module: bound methods, functions."""
    return (module.__dict__.get(FORWARD_HOOKS) or {}).values()


def remove_hooks(state: dict, unwanted: Callable[[Any], bool], in_place: bool = False) -> bool:
    """Remove from a module's ``__dict__`` the forward hooks and pre-hooks for which
    ``unwanted(hook)`` is true, with their entries in the tables keyed by handle id. ``in_place``:
    change the tables of a live module (the handles of other hooks keep pointing at them); else
    replace them, for a shallow copy of the state that is being pickled. Returns whether anything
    was removed."""
    removed: set = set()
    for name in (FORWARD_HOOKS, FORWARD_PRE_HOOKS):
        hooks = state.get(name)
        if hooks and any(unwanted(hook) for hook in hooks.values()):
            removed.update(key for key, hook in hooks.items() if unwanted(hook))
            _keep(state, name, removed, in_place)
    if removed:
        for name in HOOK_ID_TABLES:
            if state.get(name) and not removed.isdisjoint(state[name]):
                _keep(state, name, removed, in_place)
    return bool(removed)


def _keep(state: dict, name: str, removed: set, in_place: bool) -> None:
    table = state[name]
    if in_place:
        for key in removed & set(table):
            del table[key]
    else:
        state[name] = type(table)((key, value) for key, value in table.items() if key not in removed)


def keep_out_of_compiled_graphs(packages: tuple, traced: tuple = ()) -> None:
    """Tell Dynamo (torch.compile) to run the code of these packages eagerly, never to trace it
    (a hook call inside a compiled model is then a silent graph break), except the modules in
    ``traced``, whose code must stay in the graph. A torch whose Dynamo has no such API traces
    everything, with warnings."""
    try:
        import importlib
        import pkgutil

        from torch._dynamo import trace_rules

        for package in packages:
            module = importlib.import_module(package)
            inside = [name for name in traced if name.startswith(f"{package}.")]
            if not inside or not hasattr(module, "__path__"):
                trace_rules.add(package)  # the whole package, by its folder
                continue
            for info in pkgutil.iter_modules(module.__path__, prefix=f"{package}."):
                if info.name not in inside:
                    trace_rules.add(info.name)  # module by module, by file
    except Exception:
        pass
