"""Live mode: watch(on_finding=...) tells findings while the model runs, as the analyzer would."""

import warnings

import pytest
import torch

import modewatch
import modewatch.collector
from modewatch import reader
from modewatch.forwards import STALE_STEPS
from helpers import Net, batches, line_of, rules_and_severities, train_step


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


def test_a_forward_never_backpropagated_is_told_once_stale(log):
    """A grad-enabled forward whose output is kept but never backpropagated (validation in train
    mode, its outputs collected) is settled as an evaluation when its model's optimizer has
    stepped forwards.STALE_STEPS times since: on_finding="raise" raises from that step, while the
    model trains, not at the end."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kept, steps = [], []
    with pytest.raises(modewatch.ModeFindingError) as raised:
        with modewatch.watch(model, log=log, on_finding="raise"):
            model.train()
            for step, (x, y) in enumerate(batches(10)):
                train_step(model, opt, x, y)
                steps.append(step)
                if step == 1:
                    kept.append(model(x))  # <- kept forward
    assert steps == list(range(1 + STALE_STEPS))  # the step STALE_STEPS after the forward raised
    finding = raised.value.finding
    assert finding.rule in {"dropout-in-eval", "stat-update-in-eval"}
    assert finding.forward_site["line"] == line_of("kept forward")


@pytest.mark.parametrize("on_finding", ["warn", "raise"])
def test_only_error_findings_are_told(log, on_finding):
    """on_finding tells error findings only: a run whose findings are a warning (BatchNorm
    trained on 4 samples) and an info (an evaluation with grad enabled) trains to its end with
    no warning and no exception, and its log has both findings."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with modewatch.watch(model, log=log, on_finding=on_finding):
            for x, y in batches(3, size=4):
                train_step(model, opt, x, y)
            model.eval()
            model(x)
    assert rules_and_severities(modewatch.analyze(log)) == {("bn-small-batch", "warning"), ("eval-with-grad", "info")}


@pytest.mark.parametrize("settled_by", ["a forward's verdict", "the whole run"])
def test_a_finding_settled_at_close_is_raised_after_the_log_is_written(log, settled_by):
    """on_finding="raise" and a finding that close() settles: a forward never backpropagated,
    its output still alive; or an evaluation in train mode of a model nothing trains, which the
    rest of the run might have shown to be an EMA target. close() raises ModeFindingError once
    the log is written whole, its end event and every layer call (the runs still open) in it,
    and every hook is off."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = modewatch.watch(model, log=log, on_finding="raise")
    if settled_by == "a forward's verdict":
        for x, y in batches(3):
            train_step(model, opt, x, y)
        kept = model(x)  # <- kept to the end
        marker, calls = "kept to the end", 2 * (3 + 1)  # two layers, three steps and the kept forward
    else:
        with torch.no_grad():
            for x, _ in batches(3):
                kept = model(x)  # <- evaluated in train mode
        marker, calls = "evaluated in train mode", 2 * 3
    with pytest.raises(modewatch.ModeFindingError) as raised:
        watcher.close()
    assert raised.value.finding.forward_site["line"] == line_of(marker)
    log_reader = reader.LogReader(log)
    list(log_reader)
    assert log_reader.ended and log_reader.skipped == 0
    analysis = modewatch.analyze(log)
    assert analysis.summary["layer_calls"] == calls
    assert raised.value.finding.rule in {f.rule for f in analysis.findings}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    del kept
