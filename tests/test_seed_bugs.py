"""The two bugs modewatch exists for, found end to end with the exact lines that caused them."""

import torch
from torch import nn

import modewatch
import helpers
from helpers import Net, batches, findings_by_rule, line_of


def test_eval_in_training_loop_is_found_with_both_lines(seed_log):
    """The seed bug (helpers.seed_bug_run: 6 steps, model.eval() after step 2, never train()
    again): the 3 later training batches are reported, pointing at the eval() line and at the
    line that called the model; the evaluation's grad-enabled forward is an info finding."""
    found = findings_by_rule(modewatch.analyze(seed_log))
    assert set(found) == {"train-without-dropout", "bn-frozen-in-train", "eval-with-grad"}
    for rule, layer in (("train-without-dropout", "drop"), ("bn-frozen-in-train", "bn1")):
        finding = found[rule]
        assert finding.severity == "error"
        assert finding.layers == [layer]
        assert finding.count == 3  # steps 3, 4 and 5
        assert (finding.first_step, finding.last_step) == (3, 5)
        assert finding.forward_site == {"file": helpers.__file__, "line": line_of("train forward", helpers),
                                        "function": "train_step"}
        assert finding.mode_site == {"file": helpers.__file__, "line": line_of("seed eval", helpers),
                                     "function": "seed_bug_run", "call": "eval"}
    info = found["eval-with-grad"]
    assert (info.severity, info.count, info.first_step) == ("info", 2, 3)  # its two layers, after step 3
    assert info.forward_site["line"] == line_of("seed evaluation forward", helpers)


def test_validation_under_no_grad_without_eval_is_found(log):
    """Validation under torch.no_grad() with the model still in train mode: BatchNorm statistics
    drift onto validation data and Dropout makes predictions random; both are reported."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(6)
    with modewatch.watch(model, log=log):
        model.train()  # <- train call
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for x, _ in data[:3]:
                model(x)  # <- validation forward
    found = findings_by_rule(modewatch.analyze(log))
    assert set(found) == {"stat-update-in-eval", "dropout-in-eval"}
    for rule, layer in (("stat-update-in-eval", "bn1"), ("dropout-in-eval", "drop")):
        finding = found[rule]
        assert finding.severity == "error"
        assert finding.layers == [layer]
        assert finding.count == 3
        assert (finding.first_step, finding.last_step) == (6, 6)
        assert finding.forward_site["line"] == line_of("validation forward")
        assert finding.mode_site["line"] == line_of("train call")
        assert finding.mode_site["call"] == "train"


def test_correct_loop_has_no_findings(log):
    """The same loop written correctly (train() after eval(), eval() under no_grad) is clean."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(8)
    with modewatch.watch(model, log=log):
        for epoch in range(2):
            model.train()
            for x, y in data:
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                for x, _ in data[:2]:
                    model(x)
    analysis = modewatch.analyze(log)
    assert analysis.findings == []
    assert analysis.summary["steps"] == 16
    assert analysis.summary["layer_calls"] == 2 * 2 * (8 + 2)


def test_mode_site_without_any_mode_call_is_null(log):
    """Validation with no mode call ever made: the mode was never set, so mode_site is null."""
    model = Net()
    with modewatch.watch(model, log=log), torch.no_grad():
        model(torch.randn(4, 8))
    found = findings_by_rule(modewatch.analyze(log))
    assert found["dropout-in-eval"].mode_site is None
    assert "modules start in train mode" in found["dropout-in-eval"].message
