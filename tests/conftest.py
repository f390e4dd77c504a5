"""Shared helpers: tiny models, a watched run, and line numbers found by marker comments."""

import inspect
import os

import pytest
import torch
from torch import nn

pytest_plugins = ["pytester"]


class Net(nn.Module):
    """The smallest model with both kinds of mode-sensitive layer."""

    def __init__(self, p=0.5):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn1(self.fc1(x)))))


def batches(n=8, size=16, features=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, features, generator=generator), torch.randint(0, 2, (size,), generator=generator))
            for _ in range(n)]


def train_step(model, optimizer, x, y):
    loss = nn.functional.cross_entropy(model(x), y)  # <- train forward
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def line_of(marker, obj=None):
    """The line number of the line holding ``# <- marker`` in the file of ``obj`` (default: caller's),
    or in the file at path ``obj``."""
    if obj is None:
        filename = inspect.stack()[1].filename
    elif isinstance(obj, (str, os.PathLike)):
        filename = os.fspath(obj)
    else:
        filename = inspect.getsourcefile(obj)
    with open(filename) as f:
        for number, text in enumerate(f, 1):
            if f"# <- {marker}" in text:
                return number
    raise AssertionError(f"no marker {marker!r} in {filename}")


def findings_by_rule(analysis):
    return {f.rule: f for f in analysis.findings}


@pytest.fixture
def log(tmp_path):
    """A fresh log path in a temporary folder."""
    return os.fspath(tmp_path / "run.jsonl")


@pytest.fixture(autouse=True)
def _no_watcher_left():
    """Every test leaves torch as it found it: no active watcher, no patches."""
    yield
    from modewatch import patches

    for watcher in patches.active_watchers():
        watcher.close()
    assert not patches.active_watchers()
    assert "wrapt" not in type(nn.Module.__dict__["train"]).__module__
    assert not hasattr(nn.functional.dropout, "__modewatch_original__")
    assert torch.nn.modules.dropout.F is nn.functional
