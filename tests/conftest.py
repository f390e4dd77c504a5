"""Fixtures, and the check that every test leaves torch as it found it. Shared helpers are in
helpers.py (``import helpers``); nothing is imported from here."""

import os

import pytest
import torch
from torch import nn

import helpers

pytest_plugins = ["pytester"]


@pytest.fixture
def log(tmp_path):
    """A fresh log path in a temporary folder."""
    return os.fspath(tmp_path / "run.jsonl")


@pytest.fixture(scope="session")
def seed_log(tmp_path_factory):
    """The log of the seed bug (helpers.seed_bug_run: eval() in the training loop, never train()
    again, plus one grad-enabled forward in eval mode), recorded once per session, alone in its
    folder. Read-only: a test that needs it changed works on a copy."""
    log = helpers.seed_bug_run(tmp_path_factory.mktemp("seed") / "seed.jsonl")
    os.chmod(log, 0o444)
    return log


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
