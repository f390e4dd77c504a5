"""Analyzer speed and memory against merely parsing the log (budget: at most 3x json-parse time).

    python scripts/bench_analyze.py [--steps 20000] [--rounds 21]

Records a real run whose model switches mode every 2 steps (so that nothing folds and the log is
as long as it gets), then times, interleaved, `modewatch.analyze()` and a loop that only
`json.loads` every line, and reports the ratio of medians and the analyzer's peak memory.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
import tracemalloc

import torch
from torch import nn

import modewatch


def record(path: str, steps: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
    with modewatch.watch(model, log=path):
        for step in range(steps):
            model.train(step % 4 < 2)  # a mode switch every 2 steps: a bug on half the steps
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def parse_only(path: str) -> int:
    lines = 0
    with open(path, "rb") as f:
        for line in f:
            json.loads(line)
            lines += 1
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    path = os.path.join(tempfile.mkdtemp(prefix="modewatch-analyze-"), "switching.jsonl")
    record(path, args.steps)
    parse, analyze = [], []
    for _ in range(args.rounds):
        start = time.process_time()
        lines = parse_only(path)
        parse.append(time.process_time() - start)
        start = time.process_time()
        findings = modewatch.analyze(path).findings
        analyze.append(time.process_time() - start)
    tracemalloc.start()
    modewatch.analyze(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"log: {os.path.getsize(path):,} bytes, {lines:,} lines, {args.steps:,} steps, mode switch every 2 steps")
    print(f"json.loads every line  {statistics.median(parse) * 1e3:8.1f} ms")
    print(f"modewatch.analyze()    {statistics.median(analyze) * 1e3:8.1f} ms   "
          f"({statistics.median(analyze) / statistics.median(parse):.2f}x, budget 3x); {len(findings)} findings")
    print(f"analyzer peak memory   {peak / 1024:8.1f} KiB")


if __name__ == "__main__":
    main()
