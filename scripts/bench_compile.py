"""What torch.compile users should expect from modewatch: graph breaks, graphs and step time.

    python scripts/bench_compile.py [--rounds 31] [--steps 10]

A small conv net (3 conv/BatchNorm2d blocks + Dropout, batch 64, 32x32, one CPU thread) in four
variants, each its own model instance: eager; compiled; watched then compiled; compiled then
watched. All are built, compiled and warmed up first (compiling happens once per variant), then
timed in interleaved rounds by thread CPU time; figures are medians of per-round paired ratios
against the compiled model. The number of graphs Dynamo made (its unique_graphs counter: more
graphs, more graph breaks) and the time of the first 3 steps (compiling) are measured for
each variant in a fresh process: Dynamo's cache is process-wide, variants would share graphs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

import modewatch


def conv_net() -> nn.Module:
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(64 * 4 * 4, 10))


class Variant:
    def __init__(self, name: str, folder: str):
        import torch._dynamo.utils as dynamo_utils

        torch.manual_seed(0)
        self.name = name
        self.model = conv_net().train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.x, self.y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        log = os.path.join(folder, f"{name.replace(' ', '-')}.jsonl")
        self.watcher = None
        if name == "eager":
            self.run = self.model
        elif name == "compiled":
            self.run = torch.compile(self.model)
        elif name == "watched, then compiled":
            self.watcher = modewatch.watch(self.model, log=log)
            self.run = torch.compile(self.model)
        else:  # compiled, then watched
            self.run = torch.compile(self.model)
            self.watcher = modewatch.watch(self.run, log=log)
        start = time.perf_counter()
        self.steps(3)  # compiles
        self.first_steps = time.perf_counter() - start
        self.graphs = dynamo_utils.counters["stats"].get("unique_graphs", 0)

    def steps(self, n: int) -> float:
        start = time.thread_time()
        for _ in range(n):
            loss = nn.functional.cross_entropy(self.run(self.x), self.y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return (time.thread_time() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--count", help=argparse.SUPPRESS)  # one variant's counters, in a fresh process
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    folder = tempfile.mkdtemp(prefix="modewatch-bench-")
    names = ["eager", "compiled", "watched, then compiled", "compiled, then watched"]
    if args.count:
        variant = Variant(args.count, folder)
        print(variant.graphs, f"{variant.first_steps:.2f}")
        return
    counted = {name: subprocess.run([sys.executable, __file__, "--count", name], capture_output=True, text=True,
                                    check=True).stdout.split()[-2:] for name in names}
    variants = [Variant(name, folder) for name in names]
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for variant in variants[r % 4:] + variants[: r % 4]:
            times[variant.name].append(variant.steps(args.steps))
    for variant in variants:
        if variant.watcher is not None:
            variant.watcher.close()
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds of {args.steps} steps")
    print(f"{'variant':26s} {'graphs':>6s} {'first 3 steps s':>15s} {'step ms':>8s} {'vs compiled':>11s}")
    for variant in variants:
        ratio = statistics.median(a / b for a, b in zip(times[variant.name], times["compiled"]))
        graphs, first_steps = counted[variant.name]
        print(f"{variant.name:26s} {graphs:>6s} {first_steps:>15s} "
              f"{statistics.median(times[variant.name]) * 1e3:8.2f} {ratio:10.3f}x")
    for variant in variants[2:]:
        findings = modewatch.analyze(variant.watcher.path).findings
        print(f"{variant.name}: log analyzed, {len(findings)} findings (a correct loop: expect 0)")


if __name__ == "__main__":
    main()
