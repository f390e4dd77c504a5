"""modewatch beside torch-audit 0.3 (autopatch, auditing every step), the closest runtime peer.

    pip install torch-audit==0.3.0      # not a modewatch dependency: only this script uses it
    python scripts/bench_vs_torch_audit.py [--rounds 41] [--steps 20]

Two questions, in one run: does each tool report the two seed bugs (evaluation inside the
training loop leaving eval mode on; validation under no_grad without eval()), and what does each
cost per training step, on the hook-bound model of bench_overhead.py and on three realistic ones:
a CIFAR ResNet (batch 64, 32x32), nn.TransformerEncoder (4 layers, d 128, seq 64, batch 8), and a
dropout MLP of MNIST size (784-512-512-10, batch 64)? Rounds run the three variants (bare,
modewatch, torch-audit) in a shuffled order, each timed by thread CPU time; figures are medians of
the paired differences against bare training. One CPU thread.
"""

import argparse
import logging
import os
import random
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


def resnet():
    """A CIFAR ResNet (3 stages of 2 basic blocks, 16-32-64 channels): BatchNorm everywhere."""
    def block(c_in, c_out, stride):
        body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        short = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        return Residual(body, short)

    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    for c_in, c_out, stride in ((16, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)):
        layers.append(block(c_in, c_out, stride))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)), (64, 3, 32, 32)


class Residual(nn.Module):
    def __init__(self, body, short):
        super().__init__()
        self.body, self.short = body, short

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def transformer():
    return Encoder(), (8, 64, 128)


def mlp():
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 512), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(512, 10)), (64, 784)


def hook_bound_model():
    return hook_bound(), (8, 16)


MODELS = {
    "hook-bound MLP (24 mode-sensitive layers, batch 8)": hook_bound_model,
    "CIFAR ResNet (batch 64)": resnet,
    "TransformerEncoder (4 x d128, seq 64, batch 8)": transformer,
    "dropout MLP, MNIST size (batch 64)": mlp,
}


def step_cost(build, folder, rounds, steps):
    torch.manual_seed(0)
    model, shape = build()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(*shape), torch.randint(0, 2, (shape[0],))

    def run(name, n):
        watcher = auditor = None
        if name == "modewatch":
            watcher = modewatch.watch(model, log=os.path.join(folder, "cost.jsonl"))
        elif name == "torch-audit":
            auditor = torch_audit.autopatch(model, optimizer=opt, every_n_steps=1, reporters=[Collect()])
        start = time.thread_time()
        for _ in range(n):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        elapsed = (time.thread_time() - start) / n
        if watcher:
            watcher.close()
        if auditor:
            auditor.finish(report=False)
            auditor.unpatch()
        return elapsed

    names = ["bare", "modewatch", "torch-audit"]
    for name in names:  # warm-up
        run(name, 2)
    shuffle = random.Random(0).shuffle
    times = {n: [] for n in names}
    for _ in range(rounds):
        order = names[:]
        shuffle(order)
        for name in order:
            times[name].append(run(name, steps))
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
    print(f"\n{args.rounds} rounds; per round, steps per variant: hook-bound and MLP {args.steps}, others "
          f"{max(args.steps // 10, 2)}")
    print("\n| model | bare step | modewatch | torch-audit |\n|---|---|---|---|")
    for label, build in MODELS.items():
        steps = args.steps if build in (hook_bound_model, mlp) else max(args.steps // 10, 2)
        bare, extra = step_cost(build, folder, args.rounds, steps)
        cells = [f"{100 * extra[name] / bare:+.1f}% ({extra[name] * 1e6:+.0f} us)" for name in ("modewatch", "torch-audit")]
        print(f"| {label} | {bare * 1e3:.2f} ms | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
