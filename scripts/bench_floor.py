"""What watching costs at the least: torch's own price for the mechanisms watch() relies on.

    python scripts/bench_floor.py [--rounds 101] [--steps 20]

Each mechanism alone, with an empty body, on the one-layer model (Linear/Dropout/Linear, batch 8)
and the hook-bound model of bench_overhead.py, in steady state (3 untimed steps after putting it
on): the probe (a ``grad_fn`` pre-hook registered on each forward's output, what makes the
training/evaluation verdict exact), a pass-through wrapt wrapper on ``torch.autograd.backward``,
a pre- and a post-hook on the model, an optimizer step post-hook, and one post-hook per layer.
Beside them: the probe registered and removed at once (what registering costs, nothing fired), a
"death sentinel" (an object put in each forward's output ``grad_fn.metadata``, whose ``__del__``
tells that the graph was freed: the cheapest way to learn of the graph's death), the same with a
search of each backward's graph from its roots for the sentinels of waiting forwards in a wrapper
on ``torch.autograd.backward`` (the alternative to a registered probe), and "least recorder": all of these mechanisms with the least Python an exact
recorder can run in them (each layer call appends its index, mode and grad state to the forward's
list in thread-local state; the model's pre-hook notes the calling frame; each forward gets a
probe; steps are counted), the floor under any design with these hooks.
Then where watch()'s overhead falls in a step of the hook-bound model: forward, backward,
optimizer step (with the graph freed before it). Interleaved, shuffled per round, thread CPU
time, medians of per-round paired differences (see bench_overhead.py).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
import wrapt

import modewatch
from modewatch.layers import category

from bench_overhead import hook_bound, one_layer  # the same models (this script's folder is on sys.path)

WARM_UP = 3


class _Empty:
    """Bound methods, as modewatch's hooks are."""

    def before(self, module, args):
        return None

    def after(self, module, args, output):
        return None

    def probe(self, grad_outputs):
        return None

    def step(self, optimizer, args, kwargs):
        return None


def _pass_through(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs)


class _Sentinel:
    """Freed with the autograd node whose metadata holds it."""

    found = False

    def __del__(self):
        return None


_waiting: list = []  # sentinels of forwards not yet reached by a backward


def _search(wrapped, instance, args, kwargs):
    """The alternative to a probe: before the backward runs, search its graph from its roots for
    the sentinels of waiting forwards (one metadata look-up per node met, stopping once all are
    found: in a training step, the model's output is two nodes under the loss)."""
    roots = args[0] if args else kwargs["tensors"]
    todo = [roots.grad_fn] if isinstance(roots, torch.Tensor) else [t.grad_fn for t in roots]
    seen, left = set(), len(_waiting)
    while todo and left:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        sentinel = node.metadata.get("floor")
        if sentinel is not None and not sentinel.found:
            sentinel.found, left = True, left - 1
        todo.extend(child for child, _ in node.next_functions)
    _waiting.clear()
    return wrapped(*args, **kwargs)


class _Forward:
    """The least an exact recorder keeps of a forward: its calling line, its calls, its verdict."""

    __slots__ = ("site", "calls", "trained")

    def __init__(self, site):
        self.site, self.calls, self.trained = site, [], False

    def probe(self, grad_outputs):
        self.trained = True


class _Least(threading.local):
    """The hook bodies of the least recorder (see the module docstring)."""

    forward = None

    def __init__(self, layers):
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.steps = 0

    def before(self, module, args):
        frame = sys._getframe(1)
        self.forward = _Forward((frame.f_code, frame.f_lasti))

    def after(self, module, args, output):
        forward, self.forward = self.forward, None
        output.grad_fn.register_prehook(forward.probe)

    def layer(self, module, args, output):
        self.forward.calls.append((self.index[id(module)], module.__dict__["training"], torch._C.is_grad_enabled()))

    def step(self, optimizer, args, kwargs):
        self.steps += 1


VARIANTS = ("bare", "probe", "probe removed at once", "death sentinel", "sentinel + search", "backward wrapper", "model hooks", "step hook", "all four",
            "layer post-hooks", "empty pre+post hooks", "least recorder", "watch")


class Bench:
    def __init__(self, build, folder: str):
        torch.manual_seed(0)
        self.model, shape = build()
        self.model.train()
        self.layers = [m for m in self.model.modules() if category(m)]
        self.x, self.y = torch.randn(*shape), torch.randint(0, 2, (shape[0],))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.folder = folder
        self.empty = _Empty()

    def run(self, variant: str, n: int) -> list:
        """Thread CPU seconds per step of [the whole step, forward, backward, graph freed + optimizer step]."""
        empty, handles, watcher, original = self.empty, [], None, torch.autograd.backward
        probe = variant in ("probe", "all four")
        if variant in ("backward wrapper", "all four"):
            torch.autograd.backward = wrapt.FunctionWrapper(original, _pass_through)
        if variant in ("model hooks", "all four"):
            handles += [self.model.register_forward_pre_hook(empty.before),
                        self.model.register_forward_hook(empty.after, always_call=True)]
        if variant in ("step hook", "all four"):
            handles.append(register_optimizer_step_post_hook(empty.step))
        if variant == "layer post-hooks":
            handles += [layer.register_forward_hook(empty.after) for layer in self.layers]
        if variant == "empty pre+post hooks":  # what the budget is measured against
            handles += [hook for layer in self.layers for hook in (layer.register_forward_pre_hook(empty.before),
                                                                   layer.register_forward_hook(empty.after))]
        if variant == "least recorder":
            least = _Least(self.layers)
            torch.autograd.backward = wrapt.FunctionWrapper(original, _pass_through)
            handles += [self.model.register_forward_pre_hook(least.before),
                        self.model.register_forward_hook(least.after, always_call=True),
                        register_optimizer_step_post_hook(least.step)]
            handles += [layer.register_forward_hook(least.layer) for layer in self.layers]
        sentinel = variant in ("death sentinel", "sentinel + search")
        searched = variant == "sentinel + search"
        if searched:
            torch.autograd.backward = wrapt.FunctionWrapper(original, _search)
        unregistered = variant == "probe removed at once"  # the registration's cost, nothing fired
        if variant == "watch":
            watcher = modewatch.watch(self.model, log=os.path.join(self.folder, "floor-{pid}.jsonl"))
        clock = time.thread_time_ns
        phases = [0, 0, 0, 0]
        try:
            for i in range(WARM_UP + n):
                start = clock()
                output = self.model(self.x)
                if probe:
                    output.grad_fn.register_prehook(empty.probe)
                elif sentinel:
                    mark = output.grad_fn.metadata["floor"] = _Sentinel()
                    if searched:
                        _waiting.append(mark)
                elif unregistered:
                    output.grad_fn.register_prehook(empty.probe).remove()
                forward = clock()
                loss = nn.functional.cross_entropy(output, self.y)
                self.optimizer.zero_grad()
                del output
                backward = clock()
                loss.backward()
                stepping = clock()
                del loss
                self.optimizer.step()
                end = clock()
                if i >= WARM_UP:
                    for k, spent in enumerate((end - start, forward - start, stepping - backward, end - stepping)):
                        phases[k] += spent
        finally:
            torch.autograd.backward = original
            for handle in handles:
                handle.remove()
            if watcher is not None:
                watcher.close()
        return [spent / n / 1e9 for spent in phases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="modewatch-floor-")
    benches = {"one layer": Bench(one_layer, folder), "hook-bound": Bench(hook_bound, folder)}
    runs = [(name, variant) for name in benches for variant in VARIANTS]
    for name, variant in runs:
        benches[name].run(variant, 2)
    times: dict = {run: [] for run in runs}
    shuffle = random.Random(0).shuffle
    for _ in range(args.rounds):
        order = runs[:]
        shuffle(order)
        for name, variant in order:
            times[name, variant].append(benches[name].run(variant, args.steps))

    def over(name: str, variant: str, phase: int = 0) -> float:
        pairs = zip(times[name, variant], times[name, "bare"])
        return statistics.median(a[phase] - b[phase] for a, b in pairs) * 1e6

    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds of {args.steps} steps, "
          f"{WARM_UP} warm-up steps, variants shuffled within each round")
    print(f"\n{'us per step over bare':30s}" + "".join(f"{name:>14s}" for name in benches) + "   x empty pre+post")
    empty = over("hook-bound", "empty pre+post hooks")
    for variant in VARIANTS[1:]:
        print(f"{variant:30s}" + "".join(f"{over(name, variant):+14.1f}" for name in benches)
              + f"{over('hook-bound', variant) / empty:12.2f}")
    print("\nwhere watch() costs, hook-bound model (us per step over bare; empty layer post-hooks beside it)")
    for phase, label in ((1, "forward"), (2, "backward"), (3, "graph freed + optimizer step")):
        print(f"  {label:30s} watch {over('hook-bound', 'watch', phase):+7.1f}   "
              f"layer post-hooks {over('hook-bound', 'layer post-hooks', phase):+7.1f}")


if __name__ == "__main__":
    main()
