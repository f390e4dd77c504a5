"""Log bytes per training step on a steady run (compact-log budget: at most 64 B/step).

    python scripts/bench_log_size.py [--steps 3000] [--eval-every 500]

A 20-layer model (10 blocks of Linear/BatchNorm1d/ReLU/Dropout) trains for `steps` steps with a
correct evaluation (eval() + no_grad, then train()) every `eval_every` steps; the script prints
the log's size, bytes per step, and checks that the analysis of that log is clean.
"""

import argparse
import os
import tempfile

import torch
from torch import nn

import modewatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                                           nn.Dropout(0.1))], nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 16), torch.randint(0, 2, (16,))
    log = os.path.join(tempfile.mkdtemp(prefix="modewatch-size-"), "size.jsonl")
    with modewatch.watch(model, log=log):
        model.train()
        for step in range(1, args.steps + 1):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    model(x)
                model.train()
    size = os.path.getsize(log)
    analysis = modewatch.analyze(log)
    print(f"{args.steps} steps, 20 watched layers, evaluation every {args.eval_every} steps")
    print(f"log: {size:,} bytes = {size / args.steps:.1f} bytes per step   (budget 64)")
    print(f"findings: {len(analysis.findings)}; layer calls recorded: {analysis.summary['layer_calls']:,}")


if __name__ == "__main__":
    main()
