"""Trust on real code: no error on correct research patterns, no model missed, no program broken.

Each test is a small copy of a pattern from public training code (pytorch/examples, BYOL, MoCo,
DINO, mean teacher, WGAN, DCGAN, transfer learning, hyper-parameter searches), run as a user
runs it: watched with ``watch()``, or every model found as under ``MODEWATCH=1``.
"""

import contextlib
import copy
import glob
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import modewatch
from modewatch.cli import main
from helpers import (Net, batches, environment, findings_by_rule, line_of, rules_and_severities, train_step,
                     watch_everything)


def encoder():
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))


# ----------------------------------------------------------------------------- EMA / momentum targets

def ema_update(target, online, style):
    """The ways public code updates an EMA / momentum target from the online network."""
    pairs = list(zip(target.parameters(), online.parameters()))
    with torch.no_grad():
        if style == "no_grad":  # timm ModelEmaV2, BYOL implementations
            for t, o in pairs:
                t.mul_(0.9).add_(o, alpha=0.1)
        elif style == "foreach":  # torch.optim.swa_utils.AveragedModel, timm ModelEmaV3
            torch._foreach_lerp_([t for t, _ in pairs], [o for _, o in pairs], 0.1)
        elif style == "assign":  # MoCo v2/v3, lucidrains' BYOL: param.data = ...
            for t, o in pairs:
                t.data = t.data * 0.9 + o.data * 0.1
        elif style == "data":  # DINO, mean teacher: param.data.mul_(...).add_(...)
            for t, o in pairs:
                t.data.mul_(0.9).add_(o.data, alpha=0.1)


def optimize(optimizer, loss):
    """One optimizer step on ``loss``."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def byol_loop(style, steps=6, online=None):
    """BYOL / DINO / mean teacher: the target is a deep copy of the online network (``online``, or
    a new one), run in train mode under no_grad every step, and moved towards it after each
    optimizer step."""
    online = encoder() if online is None else online
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    online.train()
    target = copy.deepcopy(online)  # <- ema copy
    for p in target.parameters():
        p.requires_grad = False
    for x, _ in batches(steps):
        with torch.no_grad():
            wanted = target(x)
        optimize(optimizer, (online(x) - wanted).pow(2).mean())
        ema_update(target, online, style)


@pytest.mark.parametrize("style", ["no_grad", "foreach", "assign"])
def test_an_ema_target_updated_in_place_is_recognised_not_an_error(log, style):
    """A copy updated in place from the online network and run in train mode under no_grad every
    step is deliberate: one info finding that says what was recognised, no error."""
    with watch_everything(log):
        byol_loop(style)
    (finding,) = modewatch.analyze(log).findings
    assert (finding.rule, finding.severity) == ("ema-target", "info")
    assert finding.layers == ["1"] and finding.batches == 6
    assert "Recognised as deliberate: its parameters changed between steps with no optimizer" in finding.message
    assert finding.model == {"name": "Sequential", "site": {"file": __file__, "line": line_of("ema copy"),
                                                            "function": "byol_loop"}}


def test_an_ema_target_updated_through_data_is_a_warning_not_an_error(log):
    """An update through ``.data`` leaves no version counter moved; the target is recognised by
    being a deep copy of the model that trains: a warning that says so, never an error."""
    with watch_everything(log):
        byol_loop("data")
    (finding,) = modewatch.analyze(log).findings
    assert (finding.rule, finding.severity) == ("ema-target", "warning")
    assert "looks like an EMA / momentum target of Sequential (a deep copy of it" in finding.message


def test_a_model_run_in_train_mode_while_nothing_else_trains_stays_an_error(log):
    """The inference bug: a model run in train mode under no_grad in a process that trains
    nothing else is an error, EMA recognition or not."""
    model = encoder()
    with watch_everything(log):
        model.train()
        with torch.no_grad():
            for x, _ in batches(4):
                model(x)
    assert rules_and_severities(modewatch.analyze(log)) == {("stat-update-in-eval", "error")}


def test_a_fixed_teacher_left_in_train_mode_stays_an_error(log):
    """Knowledge distillation with a fixed teacher of another architecture, left in train mode:
    nothing moves its parameters, so it is no EMA target; its evaluation is an error."""
    teacher = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Dropout(0.3), nn.Linear(32, 8))
    student = encoder()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with watch_everything(log):
        teacher.train()  # forgotten: teacher.eval()
        distill(teacher, student, optimizer, steps=5)
    found = findings_by_rule(modewatch.analyze(log))
    assert {(rule, f.severity) for rule, f in found.items()} == {("stat-update-in-eval", "error"),
                                                                 ("dropout-in-eval", "error")}
    assert found["dropout-in-eval"].model["name"] == "Sequential"


def distill(teacher, student, optimizer, steps):
    """Knowledge distillation: the student trained on a fixed teacher's predictions, made under
    no_grad."""
    student.train()
    for x, _ in batches(steps):
        with torch.no_grad():
            soft = teacher(x)
        optimize(optimizer, (student(x) - soft).pow(2).mean())


class MoCo(nn.Module):
    """MoCo: the key encoder lives inside the trained model, its parameters frozen and moved by
    momentum (``param.data = ...``) in every forward, its BatchNorm in train mode on purpose."""

    def __init__(self):
        super().__init__()
        self.encoder_q = encoder()
        self.encoder_k = encoder()
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.data.copy_(q.data)
            k.requires_grad = False

    def forward(self, x):
        with torch.no_grad():
            for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                k.data = k.data * 0.99 + q.data * 0.01
            keys = self.encoder_k(x)
        return (self.encoder_q(x) * keys).sum(1)


def test_a_momentum_key_encoder_inside_the_model_is_not_a_frozen_part(log):
    """MoCo's key encoder has requires_grad=False and BatchNorm in train mode, but its
    parameters move every step: it is no frozen part, and nothing is reported."""
    model = MoCo()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        model.train()
        for x, _ in batches(5):
            loss = model(x).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert modewatch.analyze(log).findings == []


@pytest.mark.parametrize("every", [4, 3])
def test_an_ema_target_validated_in_train_mode_is_an_error_at_the_validation_line(log, every):
    """Mean teacher: the teacher runs in train mode at every step on purpose (info); validating
    it without eval(), at another line once every 4 steps (an epoch's end), is the inference bug
    at that line: stat-update-in-eval, an error that says the model is an EMA target (it was a
    warning). A line that runs it more often than that, but no more than half as often as the
    student trains (once every 3 steps), stays an ema-target warning."""
    student, teacher = encoder(), encoder()
    teacher.requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with modewatch.watch(student, log=log) as watcher:
        watcher.add_model(teacher)
        for step, (x, _) in enumerate(batches(12)):
            with torch.no_grad():
                target = teacher(x)  # <- deliberate
            loss = nn.functional.mse_loss(student(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema_update(teacher, student, "no_grad")
            if step % every == every - 1:
                with torch.no_grad():
                    teacher(x)  # <- teacher validated
    by_line = {f.forward_site["line"]: (f.rule, f.severity) for f in modewatch.analyze(log).findings}
    validated = ("stat-update-in-eval", "error") if every == 4 else ("ema-target", "warning")
    assert by_line == {line_of("deliberate"): ("ema-target", "info"), line_of("teacher validated"): validated}
    if every == 4:
        finding = next(f for f in modewatch.analyze(log).findings if f.rule == "stat-update-in-eval")
        assert "EMA / momentum target" in finding.message and "only now and then" in finding.message


def test_live_mode_waits_for_the_ema_target_to_be_recognised(log):
    """on_finding="raise" does not raise on a BYOL target before it is recognised (its first
    forward comes before any update), and still raises on the inference bug, at close."""
    online = encoder()
    with modewatch.watch(online, log=log, on_finding="raise"):
        byol_loop("no_grad", steps=4, online=online)
    model = encoder()
    with pytest.raises(modewatch.ModeFindingError, match="stat-update-in-eval"):
        with modewatch.watch(model, log=log, on_finding="raise"):
            model.train()
            with torch.no_grad():
                model(torch.randn(4, 8))
    assert modewatch.analyze(log).summary["unclosed_logs"] == []  # written whole before raising


# ----------------------------------------------------------------------------- several optimizers, threads

def test_a_wgan_critic_stepping_five_times_does_not_make_the_generator_evaluation(log):
    """WGAN: the generator's output waits through five critic steps before the generator's own
    backward. Other models' steps never make a forward stale: no finding at all."""
    generator = encoder()
    critic = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.LeakyReLU(), nn.Linear(16, 1))
    opt_g = torch.optim.RMSprop(generator.parameters(), lr=1e-3)
    opt_c = torch.optim.RMSprop(critic.parameters(), lr=1e-3)
    with watch_everything(log):
        generator.train()
        critic.train()
        for x, _ in batches(4):
            fake = generator(torch.randn(16, 8))
            for _ in range(5):
                critic_loss = critic(fake.detach()).mean() - critic(x).mean()
                opt_c.zero_grad()
                critic_loss.backward()
                opt_c.step()
            generator_loss = -critic(fake).mean()
            opt_g.zero_grad()
            generator_loss.backward()
            opt_g.step()
    assert modewatch.analyze(log).findings == []


def test_an_optimizer_of_no_watched_parameter_steps_no_watched_model(log):
    """Adversarial training: each batch's clean forward waits for its backward while a
    perturbation is crafted by an optimizer of its own, over the input (five steps). That
    optimizer holds no parameter of the model: its steps are not the model's, the clean forward
    is still a training forward, and the run counts the model's own steps only."""
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        model.train()
        for x, y in batches(3):
            clean = nn.functional.cross_entropy(model(x), y)
            delta = torch.zeros_like(x, requires_grad=True)
            attack = torch.optim.SGD([delta], lr=0.01)
            for _ in range(5):
                attack.zero_grad()
                (-nn.functional.cross_entropy(model(x + delta), y)).backward()
                attack.step()
            optimizer.zero_grad()
            (clean + nn.functional.cross_entropy(model(x + delta.detach()), y)).backward()
            optimizer.step()
    analysis = modewatch.analyze(log)
    assert analysis.findings == []
    assert analysis.summary["steps"] == 3


def test_threads_training_their_own_models_never_count_each_others_steps(log):
    """One thread's forward waits for its backward while two other threads step their own models
    many times: the waiting forward is still a training forward."""
    models = [encoder() for _ in range(3)]
    waiting, go = threading.Event(), threading.Event()
    errors = []

    def train(index):
        try:
            model = models[index]
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            for step, (x, _) in enumerate(batches(6, seed=index)):
                loss = model(x).pow(2).mean()
                if index == 0 and step == 2:
                    waiting.set()
                    go.wait(10)  # the others step many times meanwhile
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if index != 0:
                waiting.wait(10)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with watch_everything(log):
        for model in models:
            model.train()
        threads = [threading.Thread(target=train, args=(i,)) for i in range(3)]
        threads[0].start()
        waiting.wait(10)
        threads[1].start()
        threads[2].start()
        threads[1].join()
        threads[2].join()
        go.set()
        threads[0].join()
    assert not errors
    assert modewatch.analyze(log).findings == []


# ----------------------------------------------------------------------------- sampling from a generator

def dcgan_loop(evaluate_at_end, no_grad=False):
    generator = encoder()
    discriminator = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(), nn.Linear(16, 1))
    opt_g = torch.optim.Adam(generator.parameters())
    opt_d = torch.optim.Adam(discriminator.parameters())
    fixed_noise = torch.randn(16, 8)
    for step, (x, _) in enumerate(batches(6)):
        fake = generator(torch.randn(16, 8))
        loss_d = discriminator(fake.detach()).mean() - discriminator(x).mean()
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = -discriminator(fake).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        if step % 2 == 0:
            with torch.no_grad() if no_grad else contextlib.nullcontext():  # the tutorial's, or examples'
                samples = generator(fixed_noise).detach()  # <- sampling
    if evaluate_at_end:
        generator.eval()
        with torch.no_grad():
            samples = generator(fixed_noise)
    return samples


@pytest.mark.parametrize("no_grad", [False, True], ids=["examples", "tutorial"])
def test_sampling_from_a_generator_never_put_in_eval_mode_is_a_warning(log, no_grad):
    """pytorch/examples dcgan samples netG(fixed_noise) with grad enabled, the DCGAN tutorial
    under no_grad; netG is never in eval mode, so its statistics are never used in this run. A
    generator is a model another model is called on (the discriminator). A warning that says so."""
    with watch_everything(log):
        dcgan_loop(evaluate_at_end=False, no_grad=no_grad)
    (finding,) = modewatch.analyze(log).findings
    assert (finding.rule, finding.severity) == ("stat-update-in-sampling", "warning")
    assert "never ran in eval mode in this run" in finding.message
    assert finding.forward_site["line"] == line_of("sampling")


@pytest.mark.parametrize("evaluated", [False, True])
def test_sampling_a_generator_with_dropout_on_is_a_warning_where_it_never_runs_in_eval_mode(log, evaluated):
    """pix2pix keeps its generator's dropout on at test time, as its noise, and samples in train
    mode: dropout-in-sampling, a warning, not a dropout-in-eval error (it was one; the CONTRACT
    fixes that rule's severity, so the deliberate pattern has a rule of its own). A generator
    whose dropout does run in eval mode elsewhere in the run (a final evaluation) was sampled in
    train mode by mistake: still an error."""
    generator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 8))
    discriminator = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(), nn.Linear(16, 1))
    with watch_everything(log):
        opt_g, opt_d = torch.optim.Adam(generator.parameters()), torch.optim.Adam(discriminator.parameters())
        for step, (x, _) in enumerate(batches(6)):
            fake = generator(torch.randn(16, 8))
            optimize(opt_d, discriminator(fake.detach()).mean() - discriminator(x).mean())
            optimize(opt_g, -discriminator(fake).mean())
            if step % 2 == 0:
                generator(torch.randn(16, 8))  # <- pix2pix sample
        if evaluated:
            generator.eval()
            with torch.no_grad():
                generator(torch.randn(16, 8))
    (finding,) = modewatch.analyze(log).findings
    assert (finding.rule, finding.severity) == (("dropout-in-eval", "error") if evaluated
                                                else ("dropout-in-sampling", "warning"))
    assert finding.forward_site["line"] == line_of("pix2pix sample")


def test_a_backbone_and_head_of_one_optimizer_are_no_gan(log):
    """An encoder and a head watched as two models (MODEWATCH=1 finds each), trained by one
    optimizer, validated under no_grad without eval(): the head is called on the encoder's
    outputs, but one optimizer holds both, so the encoder is no generator and its validation in
    train mode is an error for its BatchNorm and its Dropout (they were warnings, as sampling)."""
    encoder_ = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5))
    head = nn.Linear(16, 2)
    with watch_everything(log) as watcher:
        watcher.add_model(encoder_)
        watcher.add_model(head)
        optimizer = torch.optim.SGD([*encoder_.parameters(), *head.parameters()], lr=0.1)
        for step, (x, y) in enumerate(batches(6)):
            optimize(optimizer, nn.functional.cross_entropy(head(encoder_(x)), y))
            if step % 2 == 1:
                with torch.no_grad():
                    head(encoder_(x))  # <- validation without eval
    found = {(f.rule, f.severity) for f in modewatch.analyze(log).findings}
    assert found == {("stat-update-in-eval", "error"), ("dropout-in-eval", "error")}


@pytest.mark.parametrize("critic_steps", [1, 5])
def test_fakes_made_under_no_grad_for_the_discriminator_are_training(log, critic_steps):
    """BigGAN- and WGAN-style: the discriminator's step makes its fakes under no_grad, once per
    critic step; progress pictures are taken in eval mode. Correct: no finding (the fakes' line
    was a warning, and an error once the layers had run in eval mode)."""
    generator = encoder()
    critic = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(), nn.Linear(16, 1))
    with watch_everything(log):
        opt_g, opt_c = torch.optim.Adam(generator.parameters()), torch.optim.Adam(critic.parameters())
        for step, (x, _) in enumerate(batches(8)):
            for _ in range(critic_steps):
                with torch.no_grad():
                    fake = generator(torch.randn(16, 8))  # fakes for the critic
                optimize(opt_c, critic(fake).mean() - critic(x).mean())
            optimize(opt_g, -critic(generator(torch.randn(16, 8))).mean())
            if step % 4 == 3:
                generator.eval()
                with torch.no_grad():
                    generator(torch.randn(16, 8))  # a progress picture, in eval mode
                generator.train()
    assert modewatch.analyze(log).findings == []


def test_an_ema_target_of_a_generator_trained_among_critic_steps_is_recognised(log):
    """An EMA generator run once per iteration while the critic steps five times per iteration
    and the generator once: its every-iteration use is ema-target info, not "now and then"."""
    generator, ema = encoder(), encoder()
    critic = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(), nn.Linear(16, 1))
    opt_g, opt_c = torch.optim.Adam(generator.parameters()), torch.optim.Adam(critic.parameters())
    with modewatch.watch(generator, log=log) as watcher:
        watcher.add_model(critic)
        watcher.add_model(ema)
        for x, _ in batches(6):
            for _ in range(5):
                optimize(opt_c, critic(generator(torch.randn(16, 8)).detach()).mean() - critic(x).mean())
            optimize(opt_g, -critic(generator(torch.randn(16, 8))).mean())
            ema_update(ema, generator, "no_grad")
            with torch.no_grad():
                ema(torch.randn(16, 8))  # <- every iteration
    findings = [f for f in modewatch.analyze(log).findings if f.model["name"] == "Sequential" and f.rule == "ema-target"]
    assert [(f.severity, f.forward_site["line"]) for f in findings] == [("info", line_of("every iteration"))]


def test_sampling_drift_is_an_error_when_the_statistics_are_used_later(log):
    """The same sampling, when the generator is evaluated in eval mode later: the drifted
    statistics are used, so the sampling's update is an error again."""
    with watch_everything(log):
        dcgan_loop(evaluate_at_end=True)
    assert rules_and_severities(modewatch.analyze(log)) == {("stat-update-in-eval", "error")}


# ----------------------------------------------------------------------------- statistics drift in a frozen part

class Finetune(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


def finetune(log, freeze, backbone_eval=False, allow=False):
    model = Finetune()
    if freeze == "requires_grad":  # the pytorch/tutorials transfer-learning example
        for p in model.backbone.parameters():
            p.requires_grad = False
        optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    elif freeze == "optimizer":
        optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        for x, y in batches(4):
            model.train()  # <- train call
            if backbone_eval:
                model.backbone.eval()
            if allow:
                with modewatch.allow("stat-update-in-frozen"):
                    train_step(model, optimizer, x, y)
            else:
                train_step(model, optimizer, x, y)
    return modewatch.analyze(log)


@pytest.mark.parametrize("freeze, words", [("requires_grad", "requires_grad=False"),
                                           ("optimizer", "left out of every optimizer")])
def test_statistics_drift_in_a_frozen_backbone_is_a_warning(log, freeze, words):
    """Freezing parameters does not freeze BatchNorm: stat-update-in-frozen names the layers, how
    they were frozen and the line that last put them in train mode, with the fix."""
    (finding,) = finetune(log, freeze).findings
    assert (finding.rule, finding.severity) == ("stat-update-in-frozen", "warning")
    assert finding.layers == ["backbone.1"] and finding.batches == 4
    assert words in finding.message
    assert finding.mode_site["line"] == line_of("train call")
    assert "backbone.eval()" in finding.fix


def test_a_frozen_backbone_in_eval_mode_or_allowed_or_trained_is_not_reported(log):
    """The fix (backbone.eval() after model.train()) leaves only the deliberate-freezing info;
    allow() silences deliberate adaptation; a backbone that trains is no frozen part."""
    assert rules_and_severities(finetune(log, "requires_grad", backbone_eval=True)) == {("bn-frozen-in-train", "info")}
    assert finetune(log, "requires_grad", allow=True).findings == []
    assert finetune(log, None).findings == []


# ----------------------------------------------------------------------------- several models

def test_findings_of_two_models_are_apart_and_name_their_model(log, capsys):
    """One eval() line leaving a generator and a discriminator in eval mode gives one finding
    per model, each naming its model's class and the line where it was found (MODEWATCH=1)."""
    class Generator(nn.Sequential):
        pass

    class Discriminator(nn.Sequential):
        pass

    generator = Generator(nn.Linear(8, 8), nn.BatchNorm1d(8))
    discriminator = Discriminator(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    opt = torch.optim.SGD([*generator.parameters(), *discriminator.parameters()], lr=0.1)
    with watch_everything(log):
        for model in (generator, discriminator):
            model.eval()  # <- found here
        for x, _ in batches(3):
            loss = discriminator(generator(x)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    findings = modewatch.analyze(log).findings
    assert sorted(f.model["name"] for f in findings) == ["Discriminator", "Generator"]
    assert all(f.rule == "bn-frozen-in-train" and f.layers == ["1"] for f in findings)
    assert all(f.model["site"]["line"] == line_of("found here") for f in findings)
    assert main(["analyze", log]) == 1
    out = capsys.readouterr().out
    assert "Generator (" in out and "Discriminator (" in out
    assert main(["analyze", log, "--format", "json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert {f["model"]["name"] for f in document["findings"]} == {"Generator", "Discriminator"}


def test_a_finding_names_its_model_where_the_log_holds_several_whatever_the_others_did(log, capsys):
    """Knowledge distillation: the teacher and the student both have a layer ``drop``; only the
    teacher's is reported, and the report says whose it is."""
    class Teacher(Net):
        pass

    teacher, student = Teacher(), Net()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with modewatch.watch(student, log=log) as watcher:
        watcher.add_model(teacher)
        student.train()
        for x, y in batches(3):
            with torch.no_grad():
                soft = teacher(x)  # the bug: the teacher is never put in eval mode
            loss = nn.functional.cross_entropy(student(x), y) + nn.functional.mse_loss(student(x), soft)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    findings = modewatch.analyze(log).findings
    assert {f.model["name"] for f in findings} == {"Teacher"}
    assert main(["analyze", log]) == 1
    assert "\nTeacher: no .train()/.eval() call" in capsys.readouterr().out


# ----------------------------------------------------------------------------- MODEWATCH=1 finds every model

def test_every_model_of_a_search_is_watched_however_many_are_freed(log):
    """A hyper-parameter search or k-fold run makes and frees model after model; a new model
    given the address of a freed one is still watched, and its bug found."""
    with watch_everything(log):
        for trial in range(6):
            model = Net()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            model.train()
            for step, (x, y) in enumerate(batches(3, seed=trial)):
                train_step(model, optimizer, x, y)
                model.eval()  # the seed bug in every trial
            del model, optimizer
    findings = modewatch.analyze(log).findings
    assert sum(f.rule == "train-without-dropout" for f in findings) == 6  # one per trial's model


class GAT(nn.Module):
    """pytorch/examples gat: dropout only through F.dropout, no Dropout module."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x = nn.functional.dropout(x, 0.6, training=self.training)
        return self.fc(x)


class Attention(nn.Module):
    """No Dropout or BatchNorm module at all: attention dropout through SDPA's dropout_p."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(0).chunk(3, dim=-1)
        return nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)[0]


@pytest.mark.parametrize("make", [GAT, Attention])
def test_a_model_whose_only_dropout_is_functional_is_found(log, make):
    """MODEWATCH=1 watches a model with no Dropout/BatchNorm module, as watch() does, so that a
    model left in eval mode during training is found."""
    with watch_everything(log):
        model = make()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.eval()  # forgotten: model.train()
        for x, _ in batches(3):
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert rules_and_severities(modewatch.analyze(log)) == {("train-without-dropout", "error")}


# ----------------------------------------------------------------------------- checkpoints and copies

NET_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.rnn = nn.LSTM(16, 16, 2, dropout=0.5)  # RNNBase pickles through a __getstate__ of its own
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.rnn(self.bn(self.fc(x)).unsqueeze(0))[0].squeeze(0))
'''

LOAD_WITHOUT_MODEWATCH = '''
import sys
sys.modules["modewatch"] = None  # modewatch cannot be imported: as on a machine without it
import torch
from torch import nn
import netdef

allowed = [netdef.Net, nn.Linear, nn.BatchNorm1d, nn.LSTM, nn.Dropout]
for name in sys.argv[1:]:
    with torch.serialization.safe_globals(allowed):
        model = torch.load(name, weights_only=True)
    model.eval()
    model(torch.randn(4, 8))
    print("loaded", name, sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))
'''


def test_a_checkpoint_written_while_watched_holds_no_trace_of_modewatch(tmp_path, log):
    """torch.save(model) of a watched model writes what an unwatched one would: it loads with
    weights_only=True wherever the unwatched one does, also where modewatch is not installed,
    with no hook. A deep copy made while watched stays watched, and loses the hooks at close."""
    (tmp_path / "netdef.py").write_text(NET_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import netdef
    finally:
        sys.path.remove(str(tmp_path))
    model = netdef.Net()
    with modewatch.watch(model, log=log):
        torch.save(model, tmp_path / "watched.pt")
        ema = copy.deepcopy(model)
        torch.save(ema, tmp_path / "copy.pt")
        ema.train()
        with torch.no_grad():
            ema(torch.randn(4, 8))  # recorded: the copy is watched
    torch.save(netdef.Net(), tmp_path / "plain.pt")
    for name in ("watched.pt", "copy.pt"):
        with open(tmp_path / name, "rb") as f:
            assert b"modewatch" not in f.read()
    assert not any(m._forward_hooks for m in ema.modules())  # close() took them off the copy too
    assert type(model.rnn).__getstate__ is nn.LSTM.__mro__[1].__dict__["__getstate__"]  # restored at close
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MODEWATCH, "plain.pt", "watched.pt", "copy.pt"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=environment(PYTHONPATH=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["loaded plain.pt 0", "loaded watched.pt 0", "loaded copy.pt 0"]
    found = findings_by_rule(modewatch.analyze(log))
    assert set(found) == {"stat-update-in-eval", "dropout-in-eval"} and found["dropout-in-eval"].layers == ["rnn", "drop"]


# ----------------------------------------------------------------------------- several processes

SPAWN_SCRIPT = '''
import torch
from torch import nn


def train(rank):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(4):
        loss = model(torch.randn(8, 4)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 1:
            model.eval()  # the seed bug, in one process only


if __name__ == "__main__":
    torch.multiprocessing.spawn(train, nprocs=2)
'''


def test_two_watchers_of_one_process_given_one_log_say_so(tmp_path, capsys):
    """MODEWATCH=1 and a watch() in the code, with one log path: the second writes beside the
    first and says another watcher of this process holds it (not another process)."""
    path = tmp_path / "run.jsonl"
    first = modewatch.watch(Net(), log=path)
    second = modewatch.watch(Net(), log=path)
    second.close()
    first.close()
    err = capsys.readouterr().err
    assert "run.jsonl holds the log of another watcher of this process" in err
    assert len(glob.glob(str(tmp_path / "run*.jsonl"))) == 2


@pytest.mark.slow
def test_processes_given_one_log_path_keep_every_record(tmp_path, capsys):
    """torch.multiprocessing.spawn under MODEWATCH=1 with one fixed MODEWATCH_LOG: no process
    overwrites another's log; those that find the path taken write beside it and say so, and
    the buggy process's findings are there."""
    (tmp_path / "spawn.py").write_text(SPAWN_SCRIPT)
    env = environment(MODEWATCH="1", MODEWATCH_LOG=str(tmp_path / "logs" / "run.jsonl"))
    result = subprocess.run([sys.executable, "spawn.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    logs = sorted(glob.glob(str(tmp_path / "logs" / "*.jsonl")))
    assert len(logs) == 3, (logs, result.stderr)  # the parent's (no model) and each child's
    assert result.stderr.count("holds the log of another process") == 2
    assert main(["analyze", str(tmp_path / "logs")]) == 1
    out = capsys.readouterr().out
    assert "train-without-dropout" in out and "bn-frozen-in-train" in out


def test_a_multiprocessing_child_that_trains_briefly_writes_its_log(tmp_path):
    """A multiprocessing child ends with os._exit, skipping atexit: it writes its log all the
    same, however short its training (before: only after a flush, a second in)."""
    import multiprocessing

    model = Net()
    watcher = modewatch.watch(model, log=tmp_path / "run-{pid}.jsonl")
    context = multiprocessing.get_context("fork")
    child = context.Process(target=train_with_the_seed_bug, args=(model,))
    child.start()
    child.join(60)
    watcher.close()
    assert child.exitcode == 0
    (child_log,) = glob.glob(str(tmp_path / f"run-{child.pid}.jsonl"))
    found = findings_by_rule(modewatch.analyze(child_log))
    assert set(found) == {"train-without-dropout", "bn-frozen-in-train"}


def train_with_the_seed_bug(model):
    torch.set_num_threads(1)  # as DataLoader workers do: a forked OpenMP pool hangs
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    for x, y in batches(2):
        train_step(model, optimizer, x, y)


def test_a_log_that_cannot_be_started_leaves_nothing(tmp_path, monkeypatch):
    """watch() on a full disk raises LogPathError and leaves no empty log behind, which would
    make `modewatch analyze DIR` fail for the whole folder."""
    from modewatch import writer

    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.LogWriter, "flush", full)
    with pytest.raises(modewatch.LogPathError, match="No space left on device"):
        modewatch.watch(Net(), log=tmp_path / "run.jsonl")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- from a new user's trial

class SkipsBatches(nn.Module):
    """A model whose forward fails on some batches after its BatchNorm ran (an out-of-memory
    error, a NaN check): the program catches the error and skips the batch."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2))
        self.head = nn.Linear(16, 2)
        self.fail = False

    def forward(self, x):
        hidden = self.net(x)
        if self.fail:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.head(hidden)


def test_a_forward_that_raises_is_no_evaluation(log):
    """An aborted forward (caught by the program, the batch skipped) is dropped, not taken for an
    evaluation in train mode: no stat-update-in-eval or dropout-in-eval."""
    model = SkipsBatches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        model.train()
        for step, (x, y) in enumerate(batches(6)):
            model.fail = step % 2 == 1
            try:
                train_step(model, optimizer, x, y)
            except RuntimeError:
                continue
    analysis = modewatch.analyze(log)
    assert analysis.findings == [] and analysis.summary["layer_calls"] == 3 * 2


def skip_non_finite_losses(model, optimizer, data, corrupt):
    """A training loop that skips the batches whose loss is not finite before their backward (a
    common guard): those forwards build a graph no backward uses, in train mode."""
    for step, (x, y) in enumerate(data):
        if step in corrupt:
            x = x.clone()
            x[0, 0] = float("inf")
        loss = nn.functional.cross_entropy(model(x), y)  # <- guarded forward
        if not torch.isfinite(loss):
            continue
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("corrupt", [{3}, {2, 5}, {0, 6}])
def test_a_batch_skipped_before_its_backward_is_no_evaluation(log, corrupt):
    """A training batch skipped on a non-finite loss (one between two steps, the very first
    included) is a training batch left out, not an evaluation in train mode."""
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        model.train()
        skip_non_finite_losses(model, optimizer, batches(8), corrupt)
    analysis = modewatch.analyze(log)
    assert analysis.findings == [] and analysis.summary["steps"] == 8 - len(corrupt)


@pytest.mark.parametrize("corrupt", [{5, 6}, {1, 2, 9}])
def test_micro_batches_skipped_under_gradient_accumulation_are_no_evaluation(log, corrupt):
    """Four micro-batches per step, those with a non-finite loss skipped before their backward:
    as many in one window as the line trains in a step on average (here 2 or 3) are skipped
    training batches, no evaluation."""
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        model.train()
        for i, (x, y) in enumerate(batches(16)):
            if i in corrupt:
                x = x.clone()
                x[0, 0] = float("inf")
            loss = nn.functional.cross_entropy(model(x), y) / 4
            if torch.isfinite(loss):
                loss.backward()
            if i % 4 == 3:
                optimizer.step()
                optimizer.zero_grad()
    assert modewatch.analyze(log).findings == []


def forward_loss(model, x, y):
    """One helper for training and validation batches, as many training scripts have."""
    return nn.functional.cross_entropy(model(x), y)  # <- shared forward


def test_validation_in_train_mode_through_the_training_line_stays_an_error(log):
    """Validation batches run in train mode with grad on through the line that trains (a helper
    shared by both loops) are an evaluation: several forwards with no step between them."""
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        model.train()
        for epoch in range(2):
            for x, y in batches(4):
                loss = forward_loss(model, x, y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            for x, y in batches(3, seed=1):
                forward_loss(model, x, y)  # validation, neither eval() nor no_grad
    found = findings_by_rule(modewatch.analyze(log))
    assert {(rule, f.severity) for rule, f in found.items()} == {("stat-update-in-eval", "error"),
                                                                 ("dropout-in-eval", "error")}
    assert found["dropout-in-eval"].forward_site["line"] == line_of("shared forward")


@pytest.mark.parametrize("no_grad", [False, True])
def test_a_dry_run_forward_before_training_is_no_evaluation(log, no_grad):
    """One forward before the first step, to materialise lazy modules (as torch's LazyModuleMixin
    documents) or check shapes, of a model then trained and validated correctly: no finding,
    under MODEWATCH=1 where the model is found at ``.to()`` before that forward."""
    with watch_everything(log):
        model = nn.Sequential(nn.LazyLinear(16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
        model.to("cpu")
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            model(torch.randn(2, 8))  # dry run
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for epoch in range(2):
            model.train()
            for x, y in batches(3):
                train_step(model, optimizer, x, y)
            model.eval()
            with torch.no_grad():
                model(torch.randn(4, 8))
    analysis = modewatch.analyze(log)
    assert analysis.findings == [] and analysis.summary["steps"] == 6


@pytest.mark.parametrize("trains_later", [False, True])
def test_evaluation_in_train_mode_before_training_stays_an_error(log, trains_later):
    """Not a dry run: several batches evaluated in train mode before training starts, or a single
    prediction from a model that never trains."""
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        with torch.no_grad():
            for x, _ in batches(3 if trains_later else 1, seed=1):
                model(x)  # <- evaluation before training
        if trains_later:
            for x, y in batches(3):
                train_step(model, optimizer, x, y)
    found = findings_by_rule(modewatch.analyze(log))
    assert {(rule, f.severity) for rule, f in found.items()} == {("stat-update-in-eval", "error"),
                                                                 ("dropout-in-eval", "error")}
    assert found["stat-update-in-eval"].forward_site["line"] == line_of("evaluation before training")


class LazyTarget(nn.Module):
    """lucidrains/byol-pytorch's shape: the target network is a deep copy of the online one made
    at the first forward (a mock forward in __init__) and attached to the learner."""

    def __init__(self):
        super().__init__()
        self.online = encoder()
        self.target = None
        self.to("cpu")
        self(torch.randn(2, 8))  # mock forward: makes the target

    def forward(self, x):
        if self.target is None:
            self.target = copy.deepcopy(self.online)
            self.target.requires_grad_(False)
        with torch.no_grad():
            target = self.target(x)
        return nn.functional.mse_loss(self.online(x), target)


def test_a_copy_made_and_attached_inside_a_watched_model_is_named_as_it_names_it(log):
    """A deep copy made during a forward of a model found already, and attached to it, has its
    own names in findings (target.1), not those of the layers it was copied from (online.1)."""
    with watch_everything(log):
        learner = LazyTarget()
        optimizer = torch.optim.SGD(learner.online.parameters(), lr=0.1)
        for x, _ in batches(4):
            loss = learner(x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    (finding,) = modewatch.analyze(log).findings
    assert (finding.rule, finding.layers) == ("stat-update-in-frozen", ["target.1"])


class LazyProjector(nn.Module):
    """byol-pytorch's other shape: the projector is built, and moved with .to(), at the first
    forward, which __init__ runs by calling self.forward() directly (so outside the learner's
    watched forwards, where MODEWATCH=1 finds the projector a model of its own); the target is a
    deep copy of encoder and projector, made then too."""

    def __init__(self):
        super().__init__()
        self.encoder = encoder()
        self.projector = self.target = None
        self.to("cpu")
        self.forward(torch.randn(2, 8))  # mock forward, as byol-pytorch's __init__ runs it

    def forward(self, x):
        if self.projector is None:
            self.projector = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).to("cpu")
            self.target = copy.deepcopy(nn.ModuleList([self.encoder, self.projector]))
            self.target.requires_grad_(False)
        with torch.no_grad():
            target = self.target[1](self.target[0](x))
        return nn.functional.mse_loss(self.projector(self.encoder(x)), target)


def test_a_part_watched_before_it_was_attached_is_named_as_its_model_names_it(log):
    """A module found as a model of its own before it was attached to the model that calls it
    (a projector built at a mock forward) becomes part of that model at its first call inside
    it: one model, one finding for one forgotten model.train(), layers named as named_modules()
    names them (projector.1, target.1.1), not 1 in three models."""
    with watch_everything(log):
        learner = LazyProjector()
        optimizer = torch.optim.SGD([*learner.encoder.parameters(), *learner.projector.parameters()], lr=0.1)
        for step, (x, _) in enumerate(batches(4)):
            loss = learner(x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 1:
                learner.eval()  # <- embedding check
                with torch.no_grad():
                    learner(x)
    errors = [f for f in modewatch.analyze(log).findings if f.severity == "error"]
    assert [(f.rule, f.model["name"], sorted(f.layers)) for f in errors] == [
        ("bn-frozen-in-train", "LazyProjector", ["encoder.1", "projector.1"])]
    assert errors[0].mode_site["line"] == line_of("embedding check")


@pytest.mark.parametrize("watched", ["found", "watched"])
def test_a_loss_module_is_no_discriminator(log, watched):
    """pytorch/examples imagenet moves its loss module to the device (``criterion.to(device)``):
    under MODEWATCH=1 it is not taken for a model, and, watched or not, the classifier called
    before it is no generator. Validation under no_grad in train mode stays an error."""
    model = encoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch_everything(log) as watcher:
        criterion = nn.MSELoss().to("cpu")
        if watched == "watched":
            watcher.add_model(criterion)
        for epoch in range(2):
            model.train()
            for x, _ in batches(3):
                loss = criterion(model(x), x)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                criterion(model(x), x)  # <- validated in train mode
    found = findings_by_rule(modewatch.analyze(log))
    assert (found["stat-update-in-eval"].severity, found["stat-update-in-eval"].forward_site["line"]) == (
        "error", line_of("validated in train mode"))
    assert "stat-update-in-sampling" not in found


def test_a_teacher_only_loaded_and_frozen_is_found_under_modewatch(log):
    """Knowledge distillation under MODEWATCH=1: a teacher that never calls .train()/.eval() and
    has no optimizer is found where it is set up (moved, loaded or frozen), and running it in
    train mode is reported."""
    student = encoder()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with watch_everything(log):
        teacher = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Dropout(0.3), nn.Linear(32, 8))
        teacher.load_state_dict(teacher.state_dict())  # <- teacher loaded
        teacher.requires_grad_(False)
        distill(teacher, student, optimizer, steps=4)
    found = findings_by_rule(modewatch.analyze(log))
    assert {(rule, f.severity) for rule, f in found.items()} == {("stat-update-in-eval", "error"),
                                                                 ("dropout-in-eval", "error")}
    assert found["dropout-in-eval"].model["site"]["line"] == line_of("teacher loaded")


class LanguageModel(nn.Module):
    """pytorch/examples word_language_model's shape: the only dropout is the LSTM's own."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, dropout=0.5)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.lstm(x.unsqueeze(0))[0][0])


def test_the_dropout_of_a_stacked_lstm_is_watched(log):
    """nn.LSTM's dropout between stacked layers is a dropout layer: left off by an evaluation in
    the training loop, it is train-without-dropout."""
    model = LanguageModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        model.train()
        for step, (x, y) in enumerate(batches(4)):
            train_step(model, optimizer, x, y)
            if step == 1:
                model.eval()  # <- lstm eval
    (finding,) = modewatch.analyze(log).findings
    assert (finding.rule, finding.layers, finding.count) == ("train-without-dropout", ["lstm"], 2)
    assert finding.mode_site["line"] == line_of("lstm eval")


def test_every_step_of_every_thread_and_model_is_counted(log):
    """Steps are counted per thread (one thread's step never swallows another's), and also for
    models with no Dropout or BatchNorm layer."""
    models = [nn.Linear(8, 2), nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 2))]

    def train(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for x, y in batches(20):
            train_step(model, optimizer, x, y)

    with watch_everything(log):
        for model in models:
            model.train()
        threads = [threading.Thread(target=train, args=(model,)) for model in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert modewatch.analyze(log).summary["steps"] == 2 * 20
