"""Fixtures, and the check that every test leaves torch as it found it. Shared helpers are in
helpers.py (``import helpers``); nothing is imported from here."""

import os

import pytest
import torch
from torch import nn

pytest_plugins = ["pytester"]


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
