"""Mode-sensitive code that is not nn.Dropout or nn.BatchNorm: functional dropout, attention
dropout, custom stochastic layers and norms, and models passed to torch.compile."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import modewatch
import modewatch.report
from helpers import batches, findings_by_rule, line_of


class FunctionalBlock(nn.Module):
    """Dropout the way Transformers' attention does it: functional, p and training from the module."""

    def __init__(self, p=0.3):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.p = p

    def forward(self, x):
        return F.dropout(self.fc(x), p=self.p if self.training else 0.0, training=self.training)


class AttentionBlock(nn.Module):
    """scaled_dot_product_attention with dropout_p switched by the module's mode."""

    def __init__(self, p=0.2):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.p = p

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], 3, 2, 1, 4).unbind(1)  # (batch, heads, tokens, features)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return out.reshape(x.shape[0], 8)


class ForgetfulBlock(nn.Module):
    """The classic functional bug: F.dropout without training=self.training drops in eval mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5)  # <- forgetful dropout


class Heads(nn.Module):
    """Every kind of dropout that has no nn.Dropout of its own, plus one that has."""

    def __init__(self, forgetful=False, attention_p=0.1):
        super().__init__()
        self.block = FunctionalBlock()
        self.attn = AttentionBlock()
        self.mha = nn.MultiheadAttention(8, 2, dropout=attention_p, batch_first=True)
        self.extra = ForgetfulBlock() if forgetful else nn.Identity()
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        x = self.attn(self.block(x))
        x = self.mha(x[:, None], x[:, None], x[:, None], need_weights=True)[0][:, 0]
        return self.out(self.drop(self.extra(x)))


FUNCTIONAL_LAYERS = ["block:F.dropout", "attn:F.scaled_dot_product_attention", "mha", "drop"]


def run(model, log, data, after_step=None, **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with modewatch.watch(model, log=log, **options):
        model.train()  # <- train call
        for step, (x, y) in enumerate(data):
            loss = F.cross_entropy(model(x), y)  # <- forward
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
    return modewatch.analyze(log)


def forget_train(model, data):
    """The first seed bug: a test() that leaves the model in eval mode."""
    def after_step(step):
        if step == 1:
            model.eval()  # <- eval call
            with torch.no_grad():
                model(data[0][0])
    return after_step


def validate_in_train_mode(model, data):
    """The second seed bug: validation under no_grad without model.eval()."""
    def after_step(step):
        with torch.no_grad():
            model(data[0][0])  # <- validation forward
    return after_step


def test_functional_and_attention_dropout_left_in_eval_is_train_without_dropout(log):
    """F.dropout, scaled_dot_product_attention's dropout_p and MultiheadAttention, switched off by
    a forgotten eval(), are reported with nn.Dropout, each named after the module that called it."""
    torch.manual_seed(0)
    model, data = Heads(), batches(6)
    found = findings_by_rule(run(model, log, data, forget_train(model, data)))
    assert set(found) == {"train-without-dropout"}
    finding = found["train-without-dropout"]
    assert sorted(finding.layers) == sorted(FUNCTIONAL_LAYERS)
    assert finding.batches == 4 and finding.count == 4 * len(FUNCTIONAL_LAYERS)  # each once per forward
    assert finding.mode_site["line"] == line_of("eval call") and finding.mode_site["call"] == "eval"
    assert finding.forward_site["line"] == line_of("forward")


def test_functional_dropout_on_in_validation_is_dropout_in_eval(log):
    """Validation under no_grad in train mode: every functional dropout that dropped is reported as
    dropout-in-eval, pointing at the train() call that left the mode on."""
    torch.manual_seed(0)
    model, data = Heads(), batches(4)
    found = findings_by_rule(run(model, log, data, validate_in_train_mode(model, data)))
    assert set(found) == {"dropout-in-eval"}
    finding = found["dropout-in-eval"]
    assert sorted(finding.layers) == sorted(FUNCTIONAL_LAYERS)
    assert finding.batches == 4
    assert finding.mode_site["line"] == line_of("train call")
    assert finding.forward_site["line"] == line_of("validation forward")


def test_correct_loop_with_functional_dropout_has_no_findings(log):
    """Train, then evaluate in eval mode under no_grad: functional dropout raises nothing, also
    where attention dropout is configured 0 (MultiheadAttention's default)."""
    torch.manual_seed(0)
    model, data = Heads(attention_p=0.0), batches(4)

    def evaluate(step):
        model.eval()
        with torch.no_grad():
            model(data[0][0])
        model.train()

    assert run(model, log, data, evaluate).findings == []


def test_functional_dropout_that_ignores_the_mode_is_found_with_its_fix(log):
    """F.dropout(x, p) without training=self.training still drops after model.eval(): reported as
    dropout-in-eval, saying the call ignores the module's mode and how to pass it."""
    torch.manual_seed(0)
    model, data = Heads(forgetful=True), batches(4)

    def evaluate(step):
        model.eval()  # <- eval before validation
        with torch.no_grad():
            model(data[0][0])  # <- evaluation forward
        model.train()

    analysis = run(model, log, data, evaluate)
    found = findings_by_rule(analysis)
    assert set(found) == {"dropout-in-eval"}
    finding = found["dropout-in-eval"]
    assert finding.layers == ["extra:F.dropout"]
    assert finding.batches == 4
    assert finding.mode_site["line"] == line_of("eval before validation")
    call = f"F.dropout at {__file__}:{line_of('forgetful dropout')} in forward() ignores its module's mode"
    assert call in finding.message and finding.cause == call  # its own heading in the text report
    assert "training=self.training" in finding.fix
    assert f"{call}:\n" in modewatch.report.text_report(analysis)


def test_each_fix_of_a_group_is_shown(log):
    """The forgetful call and a forgotten model.train() in one run: the text report names each
    cause with its own fix (train() for the one, training=self.training for the other)."""
    torch.manual_seed(0)
    model, data = Heads(forgetful=True), batches(4)
    text = modewatch.report.text_report(run(model, log, data, forget_train(model, data)))
    assert "fix: call model.train() before the training batches" in text
    assert "fix: pass the module's mode to the call" in text


def test_functional_dropout_of_the_model_itself_is_named_by_its_class(log):
    """F.dropout in the watched model's own forward: the layer is named after the model's class."""
    torch.manual_seed(0)
    model, data = ForgetfulBlock(), batches(2)
    found = findings_by_rule(run(model, log, data, validate_in_train_mode(model, data)))
    assert found["dropout-in-eval"].layers == ["ForgetfulBlock:F.dropout"]


def test_nn_dropout_is_not_counted_twice(log):
    """nn.Dropout calls F.dropout itself: its calls are recorded once, by its own hook."""
    torch.manual_seed(0)
    model, data = Heads(), batches(3)
    run(model, log, data, forget_train(model, data))
    analysis = modewatch.analyze(log)
    assert analysis.summary["layer_calls"] == (3 + 1) * len(FUNCTIONAL_LAYERS)  # 3 steps + 1 eval forward


def test_functional_dropout_outside_the_watched_model_is_not_recorded(log):
    """F.dropout called by code outside any forward of the watched model (a loss, a data
    augmentation) belongs to no watched module and is not recorded."""
    torch.manual_seed(0)
    model, data = nn.Sequential(nn.Linear(8, 2)), batches(2)
    with modewatch.watch(model, log=log):
        for x, _ in data:
            F.dropout(x, 0.5)
            model(x).sum().backward()
    assert modewatch.analyze(log).summary["layer_calls"] == 0


def test_functional_dropout_is_untouched_without_a_watcher(log):
    """Off means off: torch's functional dropout is torch's own before watch() and after close()."""
    originals = (F.dropout, F.scaled_dot_product_attention, F.alpha_dropout)
    watcher = modewatch.watch(nn.Sequential(nn.Dropout()), log=log)
    assert F.dropout is not originals[0]  # the wrapper, while watching
    watcher.close()
    assert (F.dropout, F.scaled_dot_product_attention, F.alpha_dropout) == originals


# ---------------------------------------------------------------------------- custom layers

class DropPath(nn.Module):
    """Stochastic depth as timm writes it: a leaf module that reads self.training."""

    def __init__(self, drop_prob=0.2):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], 1) >= self.drop_prob
        return x * keep / (1 - self.drop_prob)


class RunningNorm(nn.Module):
    """A custom norm with running statistics, updated in train mode."""

    def __init__(self, features=8):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(features))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * x.mean(0))
            return x - x.mean(0)
        return x - self.running_mean


class Noise(nn.Module):
    """Stochastic in train mode through a helper: not found automatically, named by the user."""

    def __init__(self):
        super().__init__()
        self.scale = 0.1

    def forward(self, x):
        return add_noise(self, x)


def add_noise(module, x):
    return x + module.scale * torch.randn_like(x) if module.training else x


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = RunningNorm()
        self.drop_path = DropPath()
        self.noise = Noise()

    def forward(self, x):
        return x + self.noise(self.drop_path(self.norm(self.fc(x))))


class CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Residual(), Residual())
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.blocks(x))


def test_custom_stochastic_and_norm_layers_are_found_automatically(log):
    """A leaf module from outside torch whose forward reads self.training is watched: DropPath as
    a dropout (its drop_prob recorded), RunningNorm as a norm (its buffers measured)."""
    torch.manual_seed(0)
    model, data = CustomNet(), batches(5)
    found = findings_by_rule(run(model, log, data, forget_train(model, data)))
    assert set(found) == {"train-without-dropout", "bn-frozen-in-train"}
    assert found["train-without-dropout"].layers == ["blocks.0.drop_path", "blocks.1.drop_path"]
    assert found["bn-frozen-in-train"].layers == ["blocks.0.norm", "blocks.1.norm"]
    assert found["train-without-dropout"].mode_site["line"] == line_of("eval call")


def test_custom_norm_updated_in_validation_is_stat_update_in_eval(log):
    """A custom norm whose statistics move during validation in train mode is reported like
    BatchNorm: its buffers' version counters are compared around each call."""
    torch.manual_seed(0)
    model, data = CustomNet(), batches(3)
    found = findings_by_rule(run(model, log, data, validate_in_train_mode(model, data)))
    assert found["stat-update-in-eval"].layers == ["blocks.0.norm", "blocks.1.norm"]
    assert found["dropout-in-eval"].layers == ["blocks.0.drop_path", "blocks.1.drop_path"]


def test_layers_option_names_custom_layers(log):
    """watch(layers={Noise: "dropout"}) watches a layer that detection cannot see."""
    torch.manual_seed(0)
    model, data = CustomNet(), batches(4)
    found = findings_by_rule(run(model, log, data, forget_train(model, data), layers={Noise: "dropout"}))
    assert found["train-without-dropout"].layers == [
        "blocks.0.drop_path", "blocks.0.noise", "blocks.1.drop_path", "blocks.1.noise"]


@pytest.mark.parametrize("layers, error, words", [
    ([Noise], TypeError, "takes a dict"),
    ({"Noise": "dropout"}, TypeError, "is not an nn.Module class"),
    ({Noise: "stochastic"}, ValueError, "must be 'dropout' or 'norm'"),
])
def test_layers_option_rejects_bad_input_clearly(log, layers, error, words):
    """A malformed layers= option is one clear error at watch(), naming what was wrong."""
    with pytest.raises(error, match=words):
        modewatch.watch(CustomNet(), log=log, layers=layers)


# ---------------------------------------------------------------------------- torch.compile
#
# Dynamo (what decides where hooks run and graphs break) is the same whatever the backend; all
# tests but one use "aot_eager", which skips Inductor's code generation (seconds per graph on a
# fresh machine). test_compiled_model_trains_as_without_modewatch keeps the default backend.

def compiled_run(log, order, bug):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    data = batches(5)
    if order == "watch, then compile":
        watcher = modewatch.watch(model, log=log)
        compiled = torch.compile(model, backend="aot_eager")
    else:
        compiled = torch.compile(model, backend="aot_eager")
        watcher = modewatch.watch(compiled, log=log)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    with watcher:
        for step, (x, y) in enumerate(data):
            loss = F.cross_entropy(compiled(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if bug == "eval left on" and step == 1:
                model.eval()  # <- compiled eval
                with torch.no_grad():
                    compiled(x)
            if bug == "validation in train mode":
                with torch.no_grad():
                    compiled(x)  # <- compiled validation
    return findings_by_rule(modewatch.analyze(log)), losses


@pytest.mark.parametrize("order", ["watch, then compile", "compile, then watch"])
def test_seed_bugs_are_found_in_a_compiled_model(log, order, recwarn):
    """A model watched then compiled, or compiled then watched, trains and both seed bugs are
    found; hooks run outside the compiled graphs, without a warning from Dynamo."""
    found, losses = compiled_run(log, order, "eval left on")
    assert set(found) == {"train-without-dropout", "bn-frozen-in-train"}
    assert found["train-without-dropout"].count == 3
    assert found["train-without-dropout"].mode_site["line"] == line_of("compiled eval")
    prefix = "" if order == "watch, then compile" else "_orig_mod."
    assert f"(in layer {prefix}3 (Dropout))" in found["train-without-dropout"].message  # a bare number: the class
    assert all(loss == loss for loss in losses)  # no NaN
    found, _ = compiled_run(log, order, "validation in train mode")
    assert set(found) == {"stat-update-in-eval", "dropout-in-eval"}
    assert found["stat-update-in-eval"].count == 5
    assert found["stat-update-in-eval"].forward_site["line"] == line_of("compiled validation")
    assert not [w for w in recwarn if "Dynamo" in str(w.message) or "_getframe" in str(w.message)]


def test_compiled_model_trains_as_without_modewatch(log):
    """Watching changes no output: a model compiled with the default backend (Inductor; no
    dropout, so no randomness) reaches the same parameters watched and unwatched."""
    def train(watched):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        compiled = torch.compile(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        watcher = modewatch.watch(model, log=log) if watched else None
        for x, y in batches(4):
            loss = F.cross_entropy(compiled(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if watcher is not None:
            watcher.close()
        return [p.detach().clone() for p in model.state_dict().values()]

    for watched, plain in zip(train(True), train(False)):
        assert torch.equal(watched, plain)
