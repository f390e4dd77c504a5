"""Training-step overhead of modewatch.watch(), against bare training and against empty hooks.

    python scripts/bench_overhead.py [--rounds 201] [--steps 20] [--conv-steps 3]

Two models, each with its budget:
- hook-bound: 12 blocks of Linear(16,16)/BatchNorm1d/ReLU/Dropout, batch 8, one CPU thread.
  Budget: watch() overhead at most 1.5x that of empty pre+post hooks on the same layers.
- conv net: a small CNN, batch 64, 32x32 images. Budget: at most 3% over bare.

Machines here are shared and noisy, so: variants are interleaved in rotating order within each
round, each timed by thread CPU time over `steps` training steps, and the figures are medians of
the per-round paired differences. No watcher is active while another variant runs (watch()
patches torch process-wide while it is active).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

import modewatch
from modewatch.layers import category as layer_category


def hook_bound() -> tuple:
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1)) for _ in range(12)]
    return nn.Sequential(*blocks, nn.Linear(16, 2)), (8, 16)


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
        self.x = torch.randn(*shape)
        self.y = torch.randint(0, 2, (shape[0],))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)

    def steps(self, name: str, n: int) -> float:
        """Thread CPU seconds for n training steps, with this variant's instrumentation on."""
        handles, watcher = [], None
        if name == "empty hooks":
            for m in self.model.modules():
                if layer_category(m):
                    handles += [m.register_forward_pre_hook(_empty_pre), m.register_forward_hook(_empty_post)]
        elif name == "watch":
            watcher = modewatch.watch(self.model, log=os.path.join(self.folder, "bench-{pid}.jsonl"))
        start = time.thread_time()
        for _ in range(n):
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        elapsed = time.thread_time() - start
        for handle in handles:
            handle.remove()
        if watcher is not None:
            watcher.close()
        return elapsed


def measure(build, names, rounds: int, steps: int, folder: str) -> dict:
    bench = Bench(build, folder)
    for name in names:  # warm-up
        bench.steps(name, max(steps // 10, 5))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(bench.steps(name, steps) / steps)
    return times


def paired(times: dict, a: str, b: str) -> float:
    return statistics.median(x - y for x, y in zip(times[a], times[b]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=201)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--conv-steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="modewatch-bench-")
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds")

    times = measure(hook_bound, ["bare", "empty hooks", "watch"], args.rounds, args.steps, folder)
    bare = statistics.median(times["bare"])
    empty, watched = paired(times, "empty hooks", "bare"), paired(times, "watch", "bare")
    print(f"\nhook-bound (12 x Linear/BatchNorm1d/ReLU/Dropout, batch 8), {args.steps} steps per round")
    print(f"  bare step                 {bare * 1e6:8.1f} us")
    print(f"  empty hooks overhead      {empty * 1e6:8.1f} us/step")
    print(f"  watch() overhead          {watched * 1e6:8.1f} us/step")
    print(f"  watch / empty hooks       {watched / empty:8.2f}x   (budget 1.5x)")

    times = measure(conv_net, ["bare", "watch"], args.rounds, args.conv_steps, folder)
    bare = statistics.median(times["bare"])
    watched = paired(times, "watch", "bare")
    print(f"\nconv net (3 conv/BatchNorm2d blocks + Dropout, batch 64, 32x32), {args.conv_steps} steps per round")
    print(f"  bare step                 {bare * 1e3:8.2f} ms")
    print(f"  watch() overhead          {watched * 1e3:8.3f} ms/step = {100 * watched / bare:+.2f}%   (budget 3%)")


if __name__ == "__main__":
    main()
