"""Live mode: watch(on_finding=...) tells findings while the model runs, as the analyzer would."""

import warnings

import pytest
import torch

import modewatch
import modewatch.collector
from helpers import Net, batches, line_of, train_step


def seed_bug(model, opt, data):
    model.train()
    for step, (x, y) in enumerate(data):
        train_step(model, opt, x, y)
        if step == 2:
            model.eval()  # <- live eval
        if step == 4:
            with torch.no_grad():
                model(x)


def test_warn_once_per_cause_with_the_analyzers_findings(log):
    """on_finding='warn': one ModewatchWarning per cause, however many batches, naming the same
    rules and sites as the offline analysis of the same run."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(modewatch.ModewatchWarning) as caught:
        with modewatch.watch(model, log=log, on_finding="warn"):
            seed_bug(model, opt, batches(10))
    live = sorted(str(w.message).split(":")[0] for w in caught if w.category is modewatch.ModewatchWarning)
    offline = modewatch.analyze(log).findings
    assert live == sorted(f.rule for f in offline if f.severity == "error")
    assert live == ["bn-frozen-in-train", "train-without-dropout"]
    for warning in caught:  # each carries the analyzer's own sentence about the cause
        assert f"last set by model.eval() at {__file__}:{line_of('live eval')}" in str(warning.message)
        assert warning.filename != modewatch.collector.__file__  # it points at the user's code
        assert warning.filename.endswith(("test_live.py", "helpers.py"))


def test_raise_at_the_first_error_finding(log):
    """on_finding='raise': ModeFindingError from the first training step after the bad eval(),
    carrying the finding with the sites the analyzer reports."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    with pytest.raises(modewatch.ModeFindingError) as raised:
        with modewatch.watch(model, log=log, on_finding="raise"):
            model.train()
            for step, (x, y) in enumerate(batches(10)):
                steps.append(step)
                train_step(model, opt, x, y)
                if step == 2:
                    model.eval()  # <- raise eval
    assert steps == [0, 1, 2, 3]  # the step after eval() raised
    finding = raised.value.finding
    assert finding.rule in {"train-without-dropout", "bn-frozen-in-train"}
    assert finding.mode_site["line"] == line_of("raise eval")
    assert finding.forward_site["line"] == line_of("train forward", train_step)
    assert modewatch.analyze(log).findings  # the log is complete and analyzable


def test_a_correct_run_is_silent(log):
    """No finding, no warning."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with modewatch.watch(model, log=log, on_finding="raise"):
            for x, y in batches(4):
                train_step(model, opt, x, y)


def test_on_finding_rejects_other_values(log):
    """A typo in on_finding fails at once."""
    with pytest.raises(ValueError, match="on_finding"):
        modewatch.watch(Net(), log=log, on_finding="print")

