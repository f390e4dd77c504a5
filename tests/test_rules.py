"""Each rule fires on the pattern it names, and stays silent on its correct and deliberate twins."""

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

import modewatch
import modewatch.report
from helpers import Net, analyze_run, batches, findings_by_rule, line_of, train_step
from helpers import rules_and_severities as rules


def test_train_without_dropout_needs_active_dropout(log):
    """A training forward through Dropout in eval mode is an error, but not when p == 0."""
    for p, expected in ((0.3, {("train-without-dropout", "error")}), (0.0, set())):
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(p), nn.Linear(4, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def body():
            model.eval()
            train_step(model, opt, torch.randn(8, 4), torch.randint(0, 2, (8,)))

        assert rules(analyze_run(log, model, body)) == expected


def test_every_dropout_class_is_watched(log):
    """Dropout1d/2d/3d, AlphaDropout and FeatureAlphaDropout are all mode-sensitive layers."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout2d(0.2), nn.AlphaDropout(0.2),
                          nn.FeatureAlphaDropout(0.2), nn.Flatten(), nn.Dropout(0.2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body():
        model.eval()
        loss = model(torch.randn(2, 3, 4, 4)).sum()
        loss.backward()
        opt.step()

    found = findings_by_rule(analyze_run(log, model, body))
    assert found["train-without-dropout"].layers == ["1", "2", "3", "5"]


def test_bn_frozen_in_train_is_an_error_when_the_whole_model_is_in_eval(log):
    """model.eval() then training: BatchNorm frozen is an error (with the eval() line)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body():
        model.eval()  # <- whole model eval
        for x, y in batches(3, features=4):
            train_step(model, opt, x, y)

    finding = findings_by_rule(analyze_run(log, model, body))["bn-frozen-in-train"]
    assert finding.severity == "error"
    assert finding.count == 3 and finding.layers == ["1"]
    assert finding.mode_site["line"] == line_of("whole model eval")


def test_bn_frozen_layer_by_layer_is_info(log):
    """Fine-tuning that freezes each BatchNorm layer by itself is deliberate: info, not error,
    and no fix is offered."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body():
        model.train()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.eval()  # <- freeze one layer
        for x, y in batches(3, features=4):
            train_step(model, opt, x, y)

    analysis = analyze_run(log, model, body)
    assert rules(analysis) == {("bn-frozen-in-train", "info")}
    assert analysis.findings[0].layers == ["1", "4"]
    assert analysis.findings[0].mode_site["line"] == line_of("freeze one layer")
    assert analysis.failing("error") == []
    assert "fix:" not in modewatch.report.text_report(analysis)  # nothing to fix: the report says none


def test_a_linear_probe_on_a_frozen_backbone_is_deliberate(log):
    """MoCo's linear evaluation: the backbone's parameters frozen (requires_grad=False), an
    optimizer for the head alone, model.eval() in the training loop on purpose: its frozen
    BatchNorm layers in eval mode are info, not an error. The same BatchNorm layer learning,
    trained in eval mode by the same call, is still an error."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))

    def run():
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

        def body():
            for x, y in batches(3, features=4):
                model.eval()  # <- probe eval
                train_step(model, opt, x, y)

        return analyze_run(log, model, body)

    model[:3].requires_grad_(False)
    probe = run()
    assert rules(probe) == {("bn-frozen-in-train", "info")}
    assert probe.findings[0].layers == ["1"] and probe.findings[0].mode_site["line"] == line_of("probe eval")
    model[1].requires_grad_(True)
    assert rules(run()) == {("bn-frozen-in-train", "error")}


class Distiller(nn.Module):
    """Knowledge distillation with the teacher inside the trained module: frozen, put back in
    eval mode by a train() override, run under no_grad."""

    def __init__(self):
        super().__init__()
        self.teacher = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
        self.student = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
        self.teacher.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # <- teacher eval
        return self

    def forward(self, x):
        with torch.no_grad():
            soft = self.teacher(x).softmax(1)
        return self.student(x), soft


def test_a_frozen_teacher_inside_the_trained_model_is_deliberate(log):
    """A distillation wrapper whose frozen teacher is put in eval mode by itself and run under
    no_grad, inside the wrapper's training forward: its dropout is not train-without-dropout (an
    error, whose severity the CONTRACT fixes: it was one), its frozen BatchNorm is
    bn-frozen-in-train info. The student left in eval mode by an evaluation is still an error."""
    model = Distiller()
    opt = torch.optim.SGD(model.student.parameters(), lr=0.1)

    def step(x, y):
        logits, soft = model(x)
        loss = nn.functional.cross_entropy(logits, y) + nn.functional.kl_div(logits.log_softmax(1), soft, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()

    def correct():
        for x, y in batches(3, features=4):
            model.train()
            step(x, y)

    assert {(f.rule, f.severity) for f in analyze_run(log, model, correct).findings} == {
        ("bn-frozen-in-train", "info")}

    def forgotten_train():
        correct()
        model.eval()  # <- distiller eval
        for x, y in batches(2, features=4):
            step(x, y)

    errors = [f for f in analyze_run(log, model, forgotten_train).findings if f.severity == "error"]
    assert [f.rule for f in errors] == ["train-without-dropout"] and "student.1" in errors[0].layers
    assert errors[0].mode_site["line"] == line_of("distiller eval")


def test_train_override_that_freezes_batchnorm_is_deliberate(log):
    """A model whose train() override puts its BatchNorm back in eval mode (mmdet's norm_eval)
    is deliberate freezing, and the eval() line inside the override is the mode site."""

    class Backbone(nn.Sequential):
        def train(self, mode=True):
            super().train(mode)
            for module in self.modules():
                if isinstance(module, nn.BatchNorm1d):
                    module.eval()  # <- override freezes
            return self

    model = nn.Sequential(Backbone(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body():
        model.train()
        for x, y in batches(2, features=4):
            train_step(model, opt, x, y)

    analysis = analyze_run(log, model, body)
    assert rules(analysis) == {("bn-frozen-in-train", "info")}
    assert analysis.findings[0].mode_site["line"] == line_of("override freezes")


def test_stat_update_in_eval_and_not_under_eval(log):
    """no_grad forwards in train mode update BatchNorm statistics: an error; the same forwards
    after model.eval() update nothing and are clean."""
    for set_eval, expected in ((False, {"stat-update-in-eval"}), (True, set())):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

        def body():
            if set_eval:
                model.eval()
            with torch.no_grad():
                model(torch.randn(8, 4))

        assert {f.rule for f in analyze_run(log, model, body).findings} == expected


def test_inference_mode_counts_as_evaluation(log):
    """A forward under torch.inference_mode() in train mode is an evaluation that updates statistics."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.2))

    def body():
        with torch.inference_mode():
            model(torch.randn(8, 4))

    assert rules(analyze_run(log, model, body)) == {("stat-update-in-eval", "error"), ("dropout-in-eval", "error")}


def test_forward_never_backpropagated_is_evaluation(log):
    """Grad enabled but no backward: still an evaluation forward (dropout-in-eval), and in eval
    mode it is eval-with-grad (info) only."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))

    def body():
        model(torch.randn(8, 4))  # train mode, graph built, never used
        model.eval()
        for _ in range(3):
            model(torch.randn(8, 4))  # <- eval with grad

    found = findings_by_rule(analyze_run(log, model, body))
    assert set(found) == {"dropout-in-eval", "eval-with-grad"}
    assert found["eval-with-grad"].severity == "info"
    assert found["eval-with-grad"].count == 3
    assert found["eval-with-grad"].forward_site["line"] == line_of("eval with grad")


def test_eval_under_no_grad_is_not_eval_with_grad(log):
    """The recommended evaluation (eval() plus no_grad) reports nothing at all."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))

    def body():
        model.eval()
        with torch.no_grad():
            model(torch.randn(8, 4))

    assert analyze_run(log, model, body).findings == []


def test_bn_small_batch_is_a_warning_with_a_configurable_floor(log):
    """Training BatchNorm on 4 samples warns; with --small-batch 4 it does not."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body():
        for size in (16, 4, 4):
            loss = model(torch.randn(size, 4)).sum()  # <- small batch
            opt.zero_grad()
            loss.backward()
            opt.step()

    analysis = analyze_run(log, model, body)
    finding = findings_by_rule(analysis)["bn-small-batch"]
    assert (finding.severity, finding.count, finding.first_step, finding.last_step) == ("warning", 2, 1, 2)
    assert "smallest: 4" in finding.message
    assert finding.forward_site["line"] == line_of("small batch")
    assert modewatch.analyze(log, small_batch=4).findings == []


def test_swa_update_bn_on_a_deep_copy_is_recalibration(log):
    """SWA: AveragedModel deep-copies the watched model, update_bn recomputes its statistics in
    train mode; that is bn-recalibration (info), never stat-update-in-eval or dropout-in-eval."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(4)
    with modewatch.watch(model, log=log):
        swa_model = AveragedModel(model)  # a deep copy made after watch()
        model.train()
        for x, y in data:
            train_step(model, opt, x, y)
            swa_model.update_parameters(model)
        update_bn([x for x, _ in data], swa_model)
        model.eval()
        swa_model.eval()
        with torch.no_grad():
            swa_model(data[0][0])
            model(data[0][0])
    analysis = modewatch.analyze(log)
    assert rules(analysis) == {("bn-recalibration", "info")}
    assert analysis.findings[0].layers == ["bn1"]
    assert analysis.findings[0].count == 4


def test_hand_written_recalibration_with_cumulative_momentum_is_recognised(log):
    """Recomputing statistics by hand the way update_bn does (momentum None, train mode) is
    recalibration too."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def body():
        model[1].reset_running_stats()
        model[1].momentum = None
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 4))

    assert rules(analyze_run(log, model, body)) == {("bn-recalibration", "info")}


def test_saliency_and_fgsm_in_eval_mode_are_not_training(log):
    """Gradients with respect to the input in eval mode (saliency maps, FGSM) are evaluation
    forwards with a used graph: no finding at all, whichever way autograd.grad is called."""
    from torch.autograd import grad as imported_grad  # binds the original, past our wrapper

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body():
        train_step(model, opt, torch.randn(8, 4), torch.randint(0, 2, (8,)))
        model.eval()
        for grad in (torch.autograd.grad, imported_grad):
            x = torch.randn(8, 4, requires_grad=True)
            (saliency,) = grad(model(x).max(1).values.sum(), x)
            x_adv = (x + 0.1 * saliency.sign()).detach()
        with torch.no_grad():
            model(x_adv)
        model.train()
        train_step(model, opt, torch.randn(8, 4), torch.randint(0, 2, (8,)))

    assert analyze_run(log, model, body).findings == []


def test_autograd_grad_of_parameters_is_training(log):
    """torch.autograd.grad with respect to parameters (meta-learning), the gradients then stepped
    by an optimizer, is a training forward."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body():
        model.eval()
        for _ in range(2):
            loss = model(torch.randn(8, 4)).sum()
            grads = torch.autograd.grad(loss, list(model.parameters()))
            for parameter, grad in zip(model.parameters(), grads):
                parameter.grad = grad
            opt.step()

    assert rules(analyze_run(log, model, body)) == {("train-without-dropout", "error")}


def fgsm(model, x, y, epsilon=0.1):
    """The FGSM tutorial's attack: the input's gradient by loss.backward(), read from x.grad."""
    x = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), y)  # <- attack forward
    model.zero_grad()
    loss.backward()
    return (x + epsilon * x.grad.sign()).detach()


@pytest.mark.parametrize("frozen", [False, True])
def test_an_attack_by_backward_on_a_model_that_never_trains_is_no_training(log, frozen):
    """The FGSM tutorial: a pretrained model put in eval mode, the attack's gradient taken with
    loss.backward() (its parameters get gradients too, unless frozen), no optimizer anywhere:
    no weights learn, so no train-without-dropout or bn-frozen-in-train (it was an error)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.requires_grad_(not frozen)

    def body():
        model.eval()
        for x, y in batches(4, features=4):
            x_adv = fgsm(model, x, y)
            with torch.no_grad():
                model(x_adv)

    assert not [f for f in analyze_run(log, model, body).findings if f.severity == "error"]


def test_an_attack_after_the_last_step_is_no_training(log):
    """A model trained in train mode, then attacked in eval mode by loss.backward() once training
    is over: nothing is reported; the same attack in the middle of training, with training going
    on in eval mode after it, still is."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(3, features=4)

    def attack_after_training():
        for x, y in data:
            train_step(model, opt, x, y)
        model.eval()  # <- attack eval
        for x, y in data:
            fgsm(model, x, y)

    assert analyze_run(log, model, attack_after_training).findings == []

    def attack_then_train_on():
        attack_after_training()
        for x, y in data:
            train_step(model, opt, x, y)

    found = findings_by_rule(analyze_run(log, model, attack_then_train_on))
    assert {rule: f.severity for rule, f in found.items()} == {"train-without-dropout": "error",
                                                              "bn-frozen-in-train": "error"}
    assert found["train-without-dropout"].mode_site["line"] == line_of("attack eval")


def test_a_run_that_never_steps_still_trains_the_model_its_optimizer_holds(log):
    """A short smoke run that accumulates gradients over more batches than it runs: its
    optimizer never steps, but was made while watching, so the log tells that it holds the
    model, and batches trained in eval mode are still an error (not taken for an attack by a
    model that never trains)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))

    def body():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.eval()  # <- smoke eval
        for i, (x, y) in enumerate(batches(3, features=4)):
            (nn.functional.cross_entropy(model(x), y) / 8).backward()
            if (i + 1) % 8 == 0:
                optimizer.step()

    found = findings_by_rule(analyze_run(log, model, body))
    assert found["train-without-dropout"].severity == "error"
    assert found["train-without-dropout"].mode_site["line"] == line_of("smoke eval")


def test_an_attack_by_backward_in_the_middle_of_training_is_no_training(log):
    """TRADES' l2 attack: at every step, the model in eval mode, a few attack steps by
    loss.backward() on a perturbation (the weights get gradients too, zeroed before the
    optimizer's step), then model.train() and the training batch: no error. Training moved to a
    new line after an evaluation that left eval mode (one forward a step there, as at the first
    training line) is still one."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(4, features=4)

    def trades():
        for x, y in data:
            model.eval()
            delta = torch.zeros_like(x, requires_grad=True)
            for _ in range(3):
                loss = -nn.functional.cross_entropy(model(x + delta), y)  # <- attack step
                loss.backward()
                delta.data -= 0.1 * delta.grad.sign()
                delta.grad.zero_()
            model.train()
            train_step(model, opt, (x + delta).detach(), y)

    assert [f for f in analyze_run(log, model, trades).findings if f.severity == "error"] == []

    def second_phase():
        for x, y in data:
            train_step(model, opt, x, y)
        model.eval()  # <- phase eval
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)  # <- second phase
            opt.zero_grad()
            loss.backward()
            opt.step()

    found = findings_by_rule(analyze_run(log, model, second_phase))
    assert found["train-without-dropout"].severity == "error"
    assert found["train-without-dropout"].forward_site["line"] == line_of("second phase")


def test_a_model_trained_by_hand_is_still_reported(log):
    """Training with no optimizer, the update written by hand through .data (pytorch/examples'
    word_language_model), then an evaluation that leaves the model in eval mode: the batches
    after it are training batches in eval mode, an error as with an optimizer."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))

    def body():
        for epoch in range(2):
            if epoch == 0:
                model.train()
            for x, y in batches(3, features=4):
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                for parameter in model.parameters():
                    parameter.data.add_(parameter.grad, alpha=-0.1)
            model.eval()  # <- by hand eval
            with torch.no_grad():
                model(x)

    found = findings_by_rule(analyze_run(log, model, body))
    assert found["train-without-dropout"].severity == "error"
    assert found["train-without-dropout"].mode_site["line"] == line_of("by hand eval")


def test_mc_dropout_inside_allow_is_not_reported(log):
    """Monte-Carlo dropout inside modewatch.allow('dropout-in-eval') is deliberate; the same
    outside the block is still reported."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))

    def body():
        model.eval()
        model[1].train()
        with torch.no_grad():
            with modewatch.allow("dropout-in-eval"):
                for _ in range(5):
                    model(torch.randn(8, 4))
            model(torch.randn(8, 4))  # <- outside allow

    finding = findings_by_rule(analyze_run(log, model, body))["dropout-in-eval"]
    assert finding.count == 1
    assert finding.forward_site["line"] == line_of("outside allow")


def test_allow_rejects_unknown_rules():
    """A typo in allow() fails at once, naming the rule, instead of allowing nothing."""
    with pytest.raises(modewatch.UnknownRuleError, match="dropout-in-evaluation"):
        with modewatch.allow("dropout-in-evaluation"):
            pass


def test_ignore_drops_a_rule(log):
    """analyze(ignore=...) leaves the other rules alone."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))

    def body():
        with torch.no_grad():
            model(torch.randn(8, 4))

    assert {f.rule for f in analyze_run(log, model, body, ignore=["dropout-in-eval"]).findings} == {
        "stat-update-in-eval"}


def test_model_without_mode_sensitive_layers(log):
    """A model with no Dropout or BatchNorm trains watched and yields an empty, valid log."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body():
        model.eval()
        train_step(model, opt, torch.randn(8, 4), torch.randint(0, 2, (8,)))

    analysis = analyze_run(log, model, body)
    assert analysis.findings == [] and analysis.summary["layer_calls"] == 0


def test_instance_norm_with_running_stats_is_watched(log):
    """InstanceNorm with track_running_stats=True updates statistics like BatchNorm does."""
    model = nn.Sequential(nn.Conv1d(2, 2, 1), nn.InstanceNorm1d(2, track_running_stats=True),
                          nn.InstanceNorm1d(2))

    def body():
        with torch.no_grad():
            model(torch.randn(4, 2, 5))

    finding = findings_by_rule(analyze_run(log, model, body))["stat-update-in-eval"]
    assert finding.layers == ["1"]


def test_gan_style_late_backward_is_still_training(log):
    """A forward whose backward comes after another optimizer's step (GANs) is a training
    forward: no false stat-update-in-eval for the generator."""
    generator = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    critic = nn.Linear(4, 1)
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(critic.parameters(), lr=0.1)

    def body():
        for _ in range(3):
            fake = generator(torch.randn(8, 4))
            critic_loss = critic(fake.detach()).mean()
            opt_c.zero_grad()
            critic_loss.backward()
            opt_c.step()
            gen_loss = -critic(fake).mean()
            opt_g.zero_grad()
            gen_loss.backward()
            opt_g.step()

    assert analyze_run(log, generator, body).findings == []


def test_copy_deepcopied_before_watch_is_not_watched(log):
    """Only the watched object and copies made after watch() are recorded."""
    model = Net()
    twin = copy.deepcopy(model)
    with modewatch.watch(model, log=log), torch.no_grad():
        twin(torch.randn(4, 8))
    assert modewatch.analyze(log).summary["layer_calls"] == 0


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_is_not_an_evaluation(log, reentrant):
    """torch.utils.checkpoint recomputes the forward during backward (in train mode, reentrant
    under no_grad first): that is training, not a stat-update-in-eval or dropout-in-eval."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.3))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=reentrant))

    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body():
        for x, y in batches(3, features=4):
            train_step(model, opt, x.requires_grad_(), y)

    analysis = analyze_run(log, model, body)
    assert analysis.findings == []
    assert analysis.summary["layer_calls"] == 6  # the recomputations are not counted twice
