"""No device sync, on a real GPU: a watched CUDA model trained under
sync_debug("error"), with both seed bugs, then analyzed.

    python scripts/cuda_sync_check.py [--out report.txt]

With sync debug mode "error", any operation that makes the CPU wait for the GPU (a value read
back: .item(), bool(tensor), a nonzero() and the like) raises. The training loop itself reads no
value, so an error could only come from modewatch's hooks. Covered: nn.Dropout, BatchNorm1d,
nn.MultiheadAttention, functional dropout and scaled_dot_product_attention's dropout_p, a custom
stochastic-depth layer; then the same model watched and compiled (outside sync debug mode:
compiling syncs), and a short overhead measurement on the GPU. Needs a CUDA GPU; on a machine
without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn
from torch.nn import functional as F

import modewatch


class DropPath(nn.Module):
    def __init__(self, p=0.1):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, device=x.device) >= self.drop_prob).to(x.dtype)
        return x * keep / (1 - self.drop_prob)


class Block(nn.Module):
    def __init__(self, width=64, p=0.1):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.attn = nn.MultiheadAttention(width, 4, dropout=p, batch_first=True)
        self.qkv = nn.Linear(width, 3 * width)
        self.drop = nn.Dropout(p)
        self.drop_path = DropPath(p)
        self.p = p

    def forward(self, x):
        h = F.relu(self.bn(self.fc(x)))
        h = F.dropout(h, p=self.p, training=self.training)
        a = self.attn(h[:, None], h[:, None], h[:, None], need_weights=False)[0][:, 0]
        q, k, v = self.qkv(a).view(x.shape[0], 3, 4, 1, -1).unbind(1)
        s = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return x + self.drop_path(self.drop(s.reshape(x.shape[0], -1)))


def model_and_data(device):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), nn.Linear(64, 10)).to(device)
    data = [(torch.randn(32, 64, device=device), torch.randint(0, 10, (32,), device=device)) for _ in range(8)]
    return model, data


def train(model, data, run, bug):
    """Steps with one of the seed bugs; reads no value from the GPU."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for step, (x, y) in enumerate(data):
        loss = F.cross_entropy(run(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if bug == "eval left on" and step == 2:
            model.eval()
            with torch.no_grad():
                run(x)
        elif bug == "validation in train mode":
            with torch.no_grad():
                run(x)


def rules(log):
    return sorted({f.rule for f in modewatch.analyze(log).findings})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the script's logic on the CPU (no sync check)")
    args = parser.parse_args()
    lines = []

    def say(text):
        print(text, flush=True)
        lines.append(text)

    gpu = torch.cuda.is_available() and not args.cpu_dry_run
    if not gpu and not args.cpu_dry_run:
        say("no CUDA GPU here: nothing to check")
        return 0
    device = torch.device("cuda" if gpu else "cpu")
    synchronize = torch.cuda.synchronize if gpu else (lambda: None)
    sync_debug = torch.cuda.set_sync_debug_mode if gpu else (lambda mode: None)
    say(f"torch {torch.__version__}, {torch.cuda.get_device_name() if gpu else 'CPU (dry run)'}, "
        f"python {sys.version.split()[0]}")
    folder = tempfile.mkdtemp(prefix="modewatch-cuda-")
    expected = {"eval left on": ["train-without-dropout", "bn-frozen-in-train"],
                "validation in train mode": ["dropout-in-eval", "stat-update-in-eval"]}
    failures = 0
    for bug, wanted in expected.items():
        model, data = model_and_data(device)
        log = os.path.join(folder, f"{bug.replace(' ', '-')}.jsonl")
        train(model, data, model, None)  # warm-up, unwatched: cuBLAS/cuDNN set-up may sync
        synchronize()
        with modewatch.watch(model, log=log):
            sync_debug("error")
            try:
                train(model, data, model, bug)
                error = None
            except RuntimeError as exc:  # a sync: raised by the sync debug mode
                error = exc
            finally:
                sync_debug("default")
        synchronize()
        found = rules(log)
        ok = error is None and set(wanted) <= set(found)
        failures += not ok
        say(f"sync debug 'error', {bug}: {'no sync' if error is None else f'SYNC: {error}'}; findings {found} "
            f"-> {'OK' if ok else 'FAILED'}")
        analysis = modewatch.analyze(log)
        for finding in analysis.findings:
            say(f"    {finding.rule}: {', '.join(finding.layers)}")

    for order in ("watch, then compile", "compile, then watch"):
        model, data = model_and_data(device)
        log = os.path.join(folder, f"compiled-{order[:5]}.jsonl")
        if order == "watch, then compile":
            watcher = modewatch.watch(model, log=log)
            run = torch.compile(model)
        else:
            run = torch.compile(model)
            watcher = modewatch.watch(run, log=log)
        with watcher:
            train(model, data, run, "eval left on")
        found = rules(log)
        ok = {"train-without-dropout", "bn-frozen-in-train"} <= set(found)
        failures += not ok
        say(f"torch.compile on CUDA, {order}, eval left on: findings {found} -> {'OK' if ok else 'FAILED'}")

    # Overhead on the GPU: bare and watched, interleaved, wall time per step after a synchronize.
    model, data = model_and_data(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def steps(watched, n=20):
        watcher = modewatch.watch(model, log=os.path.join(folder, "bench.jsonl")) if watched else None
        synchronize()
        start = time.perf_counter()
        for i in range(n):
            x, y = data[i % len(data)]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        synchronize()
        elapsed = (time.perf_counter() - start) / n
        if watcher is not None:
            watcher.close()
        return elapsed

    steps(False), steps(True)
    times = {False: [], True: []}
    for r in range(21 if gpu else 3):
        for watched in ((False, True) if r % 2 else (True, False)):
            times[watched].append(steps(watched))
    bare = statistics.median(times[False])
    extra = statistics.median(w - b for w, b in zip(times[True], times[False]))
    say(f"overhead (2 blocks: Linear/BatchNorm1d/MultiheadAttention/SDPA/Dropout/DropPath, batch 32, 21 rounds "
        f"of 20 steps): bare {bare * 1e3:.3f} ms/step, watch() {extra * 1e3:+.3f} ms/step = {100 * extra / bare:+.1f}%")
    say("ALL OK" if not failures else f"{failures} check(s) FAILED")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
