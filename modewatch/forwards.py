"""A forward's life, from the model's pre-hook until its probes say whether it trained.

A *forward* is the outermost call of a watched model (or, for a layer called outside any watched
forward, that call alone). When it ends, a probe is registered on the ``grad_fn`` of its outputs.
A parameter-gradient backward that reaches a probe makes it a training forward; when the graph is
freed with no such backward, the probe dies with it and the forward was an evaluation. Probes
only mark forwards and queue them: the queue is drained at safe points (a forward's start and
end, an optimizer step, close), since a probe may run on another thread or inside the GC.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Optional

import torch

from . import patches
from .format import GRAPH_UNUSED, NO_GRAPH, PARAM_GRAD

MAX_PENDING = 1024  # forwards whose graph is still alive; past it the oldest are resolved
STALE_STEPS = 4  # a forward not backpropagated after this many steps of its model's optimizers is evaluation
MAX_OUTPUT_TENSORS = 32  # outputs that get a probe, per forward

_is_inference = torch.is_inference_mode_enabled
_backward_kinds = patches.backward_kinds
_get_ident = threading.get_ident


class Forward:
    """One forward of a watched model, until it is known whether it was a training forward."""

    __slots__ = ("seq", "site", "context", "calls", "step", "model", "model_steps", "kind", "probes", "done",
                 "resolved", "inference", "output")

    def __init__(self, seq: int, site: Optional[int], context: int, step: int, model: int, model_steps: int,
                 done: collections.deque):
        self.seq = seq
        self.site = site
        self.context = context
        self.step = step  # optimizer steps completed before it
        self.model = model  # the watched model called
        self.model_steps = model_steps  # steps of that model's optimizers completed before it
        self.calls: list = []  # one format.CALL_FIELDS tuple per layer call, in order
        self.kind = GRAPH_UNUSED  # raised by probes to INPUT_GRAD / PARAM_GRAD
        self.probes = 0  # probes alive
        self.done = done  # the queue of forwards to resolve
        self.resolved = False
        self.output = 0  # id of its first output's grad_fn, while it waits (see Pending.outputs)
        # Inference mode is read once per forward: tensors made under it cannot mix with
        # autograd, so a forward runs wholly inside it or wholly outside.
        self.inference = _is_inference()


class Probe:
    """Registered on a forward output's grad_fn: notes the backward that reaches it.

    Owned by the autograd graph alone: when the graph is freed, the probe is too, and tells its
    forward (no weak reference needed).
    """

    __slots__ = ("forward",)

    def __init__(self, forward: Forward):
        self.forward = forward

    def __call__(self, grad_outputs: Any) -> None:
        try:
            mine = _backward_kinds.get(_get_ident())  # patches.backward_kind's common case, inline
            kind = mine[-1] if mine else patches.backward_kind()
            forward = self.forward
            if kind > forward.kind:
                forward.kind = kind
                if kind == PARAM_GRAD:
                    forward.done.append(forward)
        except Exception:  # never raise into backward
            pass

    def __del__(self) -> None:
        try:
            forward = self.forward
            forward.probes -= 1
            # A training forward was queued by its backward already.
            if forward.probes <= 0 and not forward.resolved and forward.kind != PARAM_GRAD:
                forward.done.append(forward)
        except Exception:  # at interpreter exit, or anywhere the GC runs
            pass


class State(threading.local):
    """Per thread: the forward in progress, how deep inside watched forwards we are, and whether a
    watched forward ran since this thread's last counted step."""

    forward: Optional[Forward] = None
    depth: int = 0
    # False: a watched forward ran on this thread since its last counted step; True: none did;
    # None: none ever did (DataParallel's caller: its replicas run on threads of their own).
    stepped_since: Optional[bool] = None


def output_nodes(output: Any) -> list:
    """The distinct grad_fn nodes of the tensors in a (nested) model output (a lone tensor, the
    common case, is probed by ``Pending.watch`` without this call)."""
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


class Pending:
    """The forwards that ended and await their verdict, and the queue of those whose probes spoke.

    ``resolve(forward, kind)`` (the watcher's) is called once per forward: with NO_GRAPH at once
    for a forward with no graph; with None (the probes' verdict) when drained; with None when the
    forward is stale or evicted, or at close.
    """

    def __init__(self, resolve: Callable[[Forward, Optional[int]], None]):
        self.resolve = resolve
        self.waiting: dict = {}  # seq -> forward whose graph may still be backpropagated
        self.done: collections.deque = collections.deque()
        self.outputs: dict = {}  # id(grad_fn) of a waiting forward's output -> its model (who feeds whom)

    def watch(self, forward: Forward, output: Any) -> None:
        """A forward that made layer calls has ended: probe its outputs, or resolve it now."""
        if type(output) is torch.Tensor:  # the common case, without output_nodes' call
            node = output.grad_fn
            nodes = [] if node is None else [node]
        else:
            nodes = output_nodes(output)
        if not nodes:
            self.resolve(forward, NO_GRAPH)
            return
        forward.probes = len(nodes)
        self.waiting[forward.seq] = forward
        forward.output = id(nodes[0])
        self.outputs[forward.output] = forward.model
        for node in nodes:
            node.register_prehook(Probe(forward))
        while len(self.waiting) > MAX_PENDING:
            self.resolve(self.waiting[next(iter(self.waiting))], None)

    def forget(self, forward: Forward) -> None:
        if self.waiting.pop(forward.seq, None) is not None:
            self.outputs.pop(forward.output, None)  # its graph may be freed, and the id reused

    def drain(self) -> None:
        done = self.done
        while done:
            forward = done.popleft()
            if not forward.resolved:
                self.resolve(forward, None)

    def resolve_stale(self, steps_of: Callable[[int], int]) -> None:
        """Resolve the forwards not backpropagated after STALE_STEPS steps of their own model's
        optimizers (``steps_of(model)``). Other models' steps do not count: a WGAN critic steps
        five times while the generator's output waits for its backward."""
        for forward in [f for f in self.waiting.values() if steps_of(f.model) - f.model_steps >= STALE_STEPS]:
            self.resolve(forward, None)

    def resolve_all(self) -> None:
        self.drain()
        for forward in list(self.waiting.values()):
            self.resolve(forward, None)

    def clear(self) -> None:
        self.waiting.clear()
        self.done.clear()
        self.outputs.clear()
