"""The classic mode bug, reproduced on synthetic data, recorded, and analyzed.

    python scripts/demo.py [--log PATH]

model.train() is called once before the loop; test() inside the loop calls model.eval() and
nobody calls model.train() again, so every later batch trains with dropout off and BatchNorm
frozen. The program trains "fine": only modewatch says what went wrong, and where.
"""

import argparse
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy says so
import torch  # noqa: E402
from torch import nn  # noqa: E402

import modewatch  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn1(self.fc1(x)))))


def test(model, data):
    model.eval()  # the bug: nobody switches back to train mode afterwards
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in data)
    return correct / sum(len(y) for _, y in data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", default=os.path.join(tempfile.mkdtemp(prefix="modewatch-demo-"), "demo.jsonl"))
    args = parser.parse_args()

    torch.manual_seed(0)
    weights = torch.randn(20)
    batches = [(x, (x @ weights > 0).long()) for x in torch.randn(40, 32, 20)]
    train_data, test_data = batches[:32], batches[32:]

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=args.log) as watcher:
        model.train()
        for epoch in range(3):
            for step, (x, y) in enumerate(train_data):
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step == 15:
                    print(f"epoch {epoch} step {step}: accuracy {test(model, test_data):.2f}")
    print(f"\nlog written to {watcher.path}; `modewatch analyze {watcher.path}` says:\n")
    sys.stdout.flush()
    from modewatch.cli import main as cli

    cli(["analyze", watcher.path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
