"""modewatch beside torch-audit 0.3 (autopatch, auditing every step), the closest runtime peer.

    pip install torch-audit==0.3.0      # not a modewatch dependency: only this script uses it
    python scripts/bench_vs_torch_audit.py [--rounds 41] [--steps 20]

Two questions, in one run: does each tool report the two seed bugs (evaluation inside the
training loop leaving eval mode on; validation under no_grad without eval()), and what does each
cost per training step on the hook-bound model of bench_overhead.py (interleaved rounds, thread CPU
time, medians of paired differences against bare training)?
"""

import argparse
import logging
import os
import statistics
import tempfile
import time

import torch
from torch import nn

import modewatch

try:
    import torch_audit
    from torch_audit.reporters.base import Reporter
except ImportError:  # pragma: no cover - the script says how to get it
    raise SystemExit("this comparison needs torch-audit: pip install torch-audit==0.3.0") from None


class Collect(Reporter):
    """A torch-audit reporter that keeps the findings' rule ids and messages."""

    def __init__(self):
        self.seen = []

    def report(self, result):
        for finding in getattr(result, "findings", []):
            self.seen.append((getattr(finding, "rule_id", ""), getattr(finding, "message", "")))


def hook_bound():
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1)) for _ in range(12)]
    return nn.Sequential(*blocks, nn.Linear(16, 2))


def seed_bug_run(tool, folder, bug):
    """Train 30 steps with one seed bug under `tool`; return what the tool reported."""
    torch.manual_seed(0)
    model = hook_bound()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 16), torch.randint(0, 2, (8,))
    log = os.path.join(folder, f"{bug}.jsonl")
    collect = Collect()
    if tool == "modewatch":
        watcher = modewatch.watch(model, log=log)
    else:
        auditor = torch_audit.autopatch(model, optimizer=opt, every_n_steps=1, reporters=[collect],
                                        fail_level="FATAL" if hasattr(torch_audit.core.Severity, "FATAL") else "ERROR")
    model.train()
    for step in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 10 and bug == "eval-in-loop":
            model.eval()
        if step % 10 == 9 and bug == "no-grad-validation":
            with torch.no_grad():
                model(x)
    if tool == "modewatch":
        watcher.close()
        return sorted({f.rule for f in modewatch.analyze(log).findings})
    try:
        result = auditor.finish(report=False)
        collect.report(result)
    finally:
        auditor.unpatch()
    described = {rule: f"{rule} ({message.split('.')[0][:48]})" for rule, message in collect.seen}
    return sorted(described.values()) or ["(nothing)"]


def step_cost(folder, rounds, steps):
    torch.manual_seed(0)
    model = hook_bound()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 16), torch.randint(0, 2, (8,))

    def run(name):
        watcher = auditor = None
        if name == "modewatch":
            watcher = modewatch.watch(model, log=os.path.join(folder, "cost.jsonl"))
        elif name == "torch-audit":
            auditor = torch_audit.autopatch(model, optimizer=opt, every_n_steps=1, reporters=[Collect()])
        start = time.thread_time()
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        elapsed = (time.thread_time() - start) / steps
        if watcher:
            watcher.close()
        if auditor:
            auditor.finish(report=False)
            auditor.unpatch()
        return elapsed

    names = ["bare", "modewatch", "torch-audit"]
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % 3:] + names[: r % 3]:
            times[name].append(run(name))
    bare = statistics.median(times["bare"])
    return bare, {n: statistics.median(a - b for a, b in zip(times[n], times["bare"])) for n in names[1:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="modewatch-vs-")
    print(f"torch {torch.__version__}, torch-audit {torch_audit.__version__ if hasattr(torch_audit, '__version__') else '0.3'}")
    print("\n| seed bug | modewatch reports | torch-audit (autopatch, every step) reports |\n|---|---|---|")
    for bug in ("eval-in-loop", "no-grad-validation"):
        print(f"| {bug} | {', '.join(seed_bug_run('modewatch', folder, bug))} | "
              f"{', '.join(seed_bug_run('torch-audit', folder, bug))} |")
    bare, extra = step_cost(folder, args.rounds, args.steps)
    print(f"\nhook-bound model, bare step {bare * 1e6:.0f} us ({args.rounds} rounds x {args.steps} steps)")
    print("\n| tool | overhead per step | relative to bare |\n|---|---|---|")
    for name, cost in extra.items():
        print(f"| {name} | {cost * 1e6:.0f} us | {100 * cost / bare:+.0f}% |")


if __name__ == "__main__":
    main()
