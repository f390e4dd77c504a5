"""The analyzer on a whole distributed job: memory on a long run, time on a job that switches
modes at every step.

    python scripts/bench_ranks.py [--ranks 64] [--steps 20000]
    python scripts/bench_ranks.py --switching [--ranks 1024] [--steps 64]

Writes synthetic rank logs through modewatch's own writer (so the format is the real one).

Default (memory): a 20-layer model, every rank training for `steps` steps, switching to eval mode
for one step every 500 steps (an evaluation), and rank 0 staying in eval mode for the last 1000
steps. Then analyzes the folder under tracemalloc, for 8 and for all the ranks, and prints peak
memory and time.

--switching (time, rank-mode-mismatch's worst case): 2 layers, every rank switching mode at every
step, odd ranks out of phase with even ones, so every rank trains in eval mode at steps where
others train in train mode; for `steps` x1, x2 and x4, the analysis time (process CPU, best of
three) and its throughput in MB of logs per second, which stays flat if time is linear in size.
"""

import argparse
import os
import tempfile
import time
import tracemalloc

import modewatch
from modewatch import format as logformat
from modewatch.writer import LogWriter


def write_rank(path, rank, ranks, steps):
    writer = LogWriter(path)
    writer.header(torch="2.13.0", python="3.11", pid=rank, argv=[], rank=rank, world_size=ranks, time=0)
    for layer in range(20):
        kind = ("BatchNorm1d", "norm") if layer % 2 else ("Dropout", "dropout")
        writer.layer(id=layer, name=f"module.block{layer // 2}.{kind[0].lower()}", kind=kind[0], category=kind[1],
                     model=0, copy_of=None)
    writer.site(id=0, file="train.py", line=20, function="train")
    writer.site(id=1, file="train.py", line=29, function="test")
    writer.mode(id=0, site=0, call="train", mode=True, target="", scope="model")
    writer.mode(id=1, site=1, call="eval", mode=False, target="", scope="model")
    broken_from = steps - 1000 if rank == 0 else steps
    step = 0
    while step < steps:
        end = min(step + 499, broken_from - 1) if step < broken_from else steps - 1
        training = step < broken_from
        flags = (logformat.TRAINING if training else 0) | logformat.GRAD_ENABLED
        rows = [[layer, logformat.PARAM_GRAD, flags | (logformat.STATS_CHANGED if layer % 2 and training else 0),
                 8 if layer % 2 else None, 0.1, 0 if training else 1, 0, 0, step, end, step, end - step + 1,
                 end - step + 1] for layer in range(20)]
        if training:  # the evaluation after these steps
            rows += [[layer, logformat.NO_GRAPH, 0, 8 if layer % 2 else None, 0.1, 1, 1, 0, end, end, end, 1, 1]
                     for layer in range(20)]
        writer.calls(step=end, rows=rows)
        step = end + 1
    writer.footer(steps=steps, forwards=steps)
    writer.close()


def write_switching(path, rank, ranks, steps):
    writer = LogWriter(path)
    writer.header(torch="2.13.0", python="3.11", pid=rank, argv=[], rank=rank, world_size=ranks, time=0)
    for layer in range(2):
        writer.layer(id=layer, name=f"module.drop{layer}", kind="Dropout", category="dropout", model=0, copy_of=None)
    writer.site(id=0, file="train.py", line=20, function="train")
    writer.mode(id=0, site=0, call="train", mode=True, target="", scope="model")
    writer.mode(id=1, site=0, call="eval", mode=False, target="", scope="model")
    rows = []
    for step in range(steps):
        training = (step + rank) % 2 == 0
        flags = (logformat.TRAINING if training else 0) | logformat.GRAD_ENABLED
        rows += [[layer, logformat.PARAM_GRAD, flags, None, 0.1, 0 if training else 1, 0, 0, step, step, step, 1, 1]
                 for layer in range(2)]
        if len(rows) >= 200 or step == steps - 1:
            writer.calls(step=step, rows=rows)
            rows = []
    writer.footer(steps=steps, forwards=steps)
    writer.close()


def switching(ranks, steps):
    root = tempfile.mkdtemp(prefix="modewatch-switching-")
    print(f"{ranks} rank logs, 2 layers, a mode switch every step (odd ranks out of phase):")
    for factor in (1, 2, 4):
        folder = os.path.join(root, str(factor))
        os.mkdir(folder)
        for rank in range(ranks):
            write_switching(os.path.join(folder, f"rank{rank}.jsonl"), rank, ranks, steps * factor)
        size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        times = []
        for _ in range(3):
            start = time.process_time()
            analysis = modewatch.analyze(folder)
            times.append(time.process_time() - start)
        mismatches = sum(f.rule == "rank-mode-mismatch" for f in analysis.findings)
        print(f"  x{factor}: {steps * factor:5,} steps, {size / 1e6:6.1f} MB: {min(times):6.2f} s, "
              f"{size / 1e6 / min(times):5.1f} MB/s; {mismatches} rank-mode-mismatch findings")


def measure(folder):
    tracemalloc.start()
    start = time.process_time()
    analysis = modewatch.analyze(folder)
    elapsed = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return analysis, elapsed, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switching", action="store_true", help="time a job switching modes at every step")
    parser.add_argument("--ranks", type=int)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()
    if args.switching:
        switching(args.ranks or 1024, args.steps or 64)
        return
    args.ranks, args.steps = args.ranks or 64, args.steps or 20_000
    root = tempfile.mkdtemp(prefix="modewatch-ranks-")
    for count in (8, args.ranks):
        folder = os.path.join(root, str(count))
        os.mkdir(folder)
        for rank in range(count):
            write_rank(os.path.join(folder, f"rank{rank}.jsonl"), rank, count, args.steps)
        size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        analysis, elapsed, peak = measure(folder)
        rules = sorted({f.rule for f in analysis.findings})
        print(f"{count:3d} rank logs x {args.steps:,} steps ({size / 1e6:.1f} MB): analyzed in {elapsed:.2f} s CPU, "
              f"peak {peak / 1024:.0f} KiB; findings: {', '.join(rules)}")


if __name__ == "__main__":
    main()
