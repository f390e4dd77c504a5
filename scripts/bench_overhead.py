"""Training-step overhead of modewatch.watch(), against bare training and against empty hooks.

    python scripts/bench_overhead.py [--rounds 201] [--steps 20] [--conv-steps 3] [--warm-up 3]

Models:
- hook-bound: 12 blocks of Linear(16,16)/BatchNorm1d/ReLU/Dropout, batch 8, one CPU thread: the
  worst case, where hooks are most of the step. Budget: watch() overhead at most 1.8x that of
  empty pre+post hooks on the same 24 layers.
- one layer: Linear/Dropout/Linear, batch 8: the per-step fixed cost of watching (model hooks,
  the probe on the output, the backward wrapper, the optimizer-step hook, folding) with a single
  layer call; with the hook-bound model, it also gives the cost of one more layer call.
- conv net: a small CNN, batch 64, 32x32 images. Budget: at most 3% over bare.

Machines here are shared and noisy, so: within each round the variants run in a shuffled order
(a fixed seed; never the same neighbour each time), each timed by thread CPU time over `steps`
training steps, and the figures are medians of the per-round paired differences. No watcher is
active while another variant runs (watch() patches torch process-wide while it is active).

Each round puts each variant's instrumentation on afresh (a new watcher), and its first
`--warm-up` steps are timed apart: a watcher's first steps define its sites and look at the
optimizer once, a cost per watcher, not per step. Spread over 20 timed steps it would read as
~10 us a step more than a training job pays. The start-up cost is printed on its own.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch
from torch import nn

import modewatch
from modewatch.layers import category


def hook_bound() -> tuple:
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1)) for _ in range(12)]
    return nn.Sequential(*blocks, nn.Linear(16, 2)), (8, 16)


def one_layer() -> tuple:
    return nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.1), nn.Linear(16, 2)), (8, 16)


def conv_net() -> tuple:
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    layers = block(3, 16) + block(16, 32) + block(32, 64)
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 4 * 4, 10)), (64, 3, 32, 32)


def _empty_pre(module, args):
    return None


def _empty_post(module, args, output):
    return None


class Bench:
    """One model and its data; each variant instruments it in turn (no instance effects)."""

    def __init__(self, build, folder: str):
        torch.manual_seed(0)
        self.folder = folder
        self.model, shape = build()
        self.model.train()
        self.layers = sum(1 for m in self.model.modules() if category(m))
        self.x = torch.randn(*shape)
        self.y = torch.randint(0, 2, (shape[0],))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)

    def steps(self, name: str, n: int, warm_up: int = 0) -> tuple:
        """Thread CPU seconds of the first ``warm_up`` steps, and per step over the ``n`` after them,
        with this variant's instrumentation on."""
        handles, watcher = [], None
        if name == "empty hooks":
            for m in self.model.modules():
                if category(m):
                    handles += [m.register_forward_pre_hook(_empty_pre), m.register_forward_hook(_empty_post)]
        elif name == "watch":
            watcher = modewatch.watch(self.model, log=os.path.join(self.folder, "bench-{pid}.jsonl"))
        start = time.thread_time()
        self._train(warm_up)
        started = time.thread_time()
        self._train(n)
        elapsed = time.thread_time() - started
        for handle in handles:
            handle.remove()
        if watcher is not None:
            watcher.close()
        return started - start, elapsed / n

    def _train(self, n: int) -> None:
        for _ in range(n):
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()


def measure(benches: dict, rounds: int, steps: dict, warm_up: int, seed: int = 0) -> tuple:
    """{(bench, variant): [seconds per step, one per round]}, variants shuffled within each round,
    and {(bench, variant): [seconds of the first warm_up steps, one per round]}."""
    runs = [(bench, name) for bench, names in benches.items() for name in names]
    for bench, name in runs:  # the process's own warm-up (caches, allocator)
        bench.steps(name, max(steps[bench] // 10, 2), warm_up)
    times: dict = {run: [] for run in runs}
    starts: dict = {run: [] for run in runs}
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        order = runs[:]
        shuffle(order)
        for bench, name in order:
            start, per_step = bench.steps(name, steps[bench], warm_up)
            starts[bench, name].append(start)
            times[bench, name].append(per_step)
    return times, starts


def paired(times: dict, bench: Bench, a: str, b: str = "bare") -> float:
    return statistics.median(x - y for x, y in zip(times[bench, a], times[bench, b]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=201)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--conv-steps", type=int, default=3)
    parser.add_argument("--warm-up", type=int, default=3, help="untimed steps after instrumenting (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="modewatch-bench-")
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds, variants shuffled within each round, "
          f"{args.warm_up} warm-up steps timed apart")

    bound, single, conv = Bench(hook_bound, folder), Bench(one_layer, folder), Bench(conv_net, folder)
    variants = ["bare", "empty hooks", "watch"]
    times, starts = measure({bound: variants, single: variants, conv: ["bare", "watch"]}, args.rounds,
                            {bound: args.steps, single: args.steps, conv: args.conv_steps}, args.warm_up)

    empty, watched = paired(times, bound, "empty hooks"), paired(times, bound, "watch")
    print(f"\nhook-bound ({bound.layers} layers: 12 x Linear/BatchNorm1d/ReLU/Dropout, batch 8), {args.steps} steps a round")
    print(f"  bare step                 {statistics.median(times[bound, 'bare']) * 1e6:8.1f} us")
    print(f"  empty pre+post hooks      {empty * 1e6:+8.1f} us/step")
    print(f"  watch()                   {watched * 1e6:+8.1f} us/step")
    print(f"  watch / empty hooks       {watched / empty:8.2f}x   (budget 1.8x)")

    fixed = paired(times, single, "watch")
    per_layer = (watched - fixed) / (bound.layers - single.layers)
    print("\none layer (Linear/Dropout/Linear, batch 8): the per-step fixed cost")
    print(f"  watch(), 1 layer call     {fixed * 1e6:+8.1f} us/step   (empty pre+post hooks: "
          f"{paired(times, single, 'empty hooks') * 1e6:+.1f})")
    print(f"  each further layer call   {per_layer * 1e6:+8.2f} us")
    if args.warm_up:
        first = paired(starts, single, "watch")
        print(f"  a new watcher's first {args.warm_up} steps {first * 1e6:+8.1f} us in all (once per watcher)")

    bare = statistics.median(times[conv, "bare"])
    watched = paired(times, conv, "watch")
    print(f"\nconv net (3 conv/BatchNorm2d blocks + Dropout, batch 64, 32x32), {args.conv_steps} steps a round")
    print(f"  bare step                 {bare * 1e3:8.2f} ms")
    print(f"  watch()                   {watched * 1e3:+8.3f} ms/step = {100 * watched / bare:+.2f}%   (budget 3%)")


if __name__ == "__main__":
    main()
