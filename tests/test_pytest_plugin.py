"""The pytest plugin: --modewatch fails tests whose models are in the wrong mode; the fixture."""

import os
import subprocess
import sys

import pytest

from helpers import environment

INNER = '''
import torch
from torch import nn


def make():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def step(model, opt):
    loss = model(torch.randn(8, 4)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_trains_in_eval_mode():
    model, opt = make()
    model.eval()  # the bug
    step(model, opt)


def test_trains_correctly():
    model, opt = make()
    model.train()
    step(model, opt)


def test_fixture_finds_the_bug(modewatch):
    model, opt = make()
    modewatch.watch(model)
    with torch.no_grad():
        model(torch.randn(8, 4))  # validation without eval()
    assert {f.rule for f in modewatch.findings()} == {"stat-update-in-eval", "dropout-in-eval"}
'''


@pytest.fixture(autouse=True)
def _no_modewatch_variables(monkeypatch):
    """The inner pytest runs must not inherit a developer's MODEWATCH=1."""
    for name in list(os.environ):
        if name.startswith("MODEWATCH"):
            monkeypatch.delenv(name)


CHECK_REGISTERED = '''

def test_no_watcher_plugin_without_the_option(request):
    assert request.config.pluginmanager.get_plugin("modewatch-watcher") is None
'''


def test_modewatch_option_fails_only_the_buggy_test(pytester, tmp_path, monkeypatch):
    """With --modewatch the test that trains in eval mode fails, naming the rule and the line;
    the correct one and the fixture's test pass; no temporary file or folder is left behind."""
    pytester.makepyfile(test_inner=INNER)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    result = pytester.runpytest_subprocess("--modewatch", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "bt"))
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*modewatch found models in the wrong mode*",
                                 "*train-without-dropout*model.eval() at *test_inner.py:* in test_trains_in_eval_mode()*",
                                 "FAILED test_inner.py::test_trains_in_eval_mode*"])
    assert [p.name for p in scratch.iterdir() if "modewatch" in p.name] == []


def test_without_the_option_nothing_is_watched(pytester):
    """Without --modewatch the plugin does nothing: no plugin object runs around the tests, the
    buggy test passes, and loading the plugin imports no torch."""
    pytester.makepyfile(test_inner=INNER + CHECK_REGISTERED)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=4)
    code = ("import sys, pytest; pytest.main(['--co', '-q', '-p', 'no:cacheprovider', '/dev/null']); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=pytester.path,
                            env=environment())
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout
