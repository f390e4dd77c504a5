"""What watch() records, and the promises it keeps inside other people's training loops."""

import io
import json
import os
import warnings

import pytest
import torch
from torch import nn

import modewatch
from modewatch import format as logformat, forwards, patches, reader
from helpers import Net, batches, findings_by_rule, line_of, rules_and_severities, train_step


def recorded_calls(log):
    """Every Calls record of a log, header dropped."""
    return list(reader.LogReader(log))[1:]


def test_statistics_change_flag_matches_the_values(log):
    """The recorded 'statistics changed' bit agrees with a before/after comparison of
    running_mean, across train/eval, grad, no_grad and inference_mode."""
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn)
    observed = []
    settings = [(True, torch.enable_grad), (True, torch.no_grad), (True, torch.inference_mode),
                (False, torch.enable_grad), (False, torch.no_grad), (False, torch.inference_mode)]
    with modewatch.watch(model, log=log):
        for training, context in settings:
            model.train(training)
            before = bn.running_mean.clone()
            with context():
                model(torch.randn(8, 4))
            observed.append(not torch.equal(before, bn.running_mean))
    recorded = [c.stats_changed for c in recorded_calls(log)]
    assert observed == [True, True, True, False, False, False]
    assert recorded == observed


def test_batchnorm_in_every_configuration_is_recorded_alike(log):
    """A BatchNorm with or without affine parameters, with a cumulative average, frozen, or with
    its weight taken away after watching began: each call's mode, batch, momentum, frozen bit and
    'statistics changed' bit (against a comparison of running_mean) come out right."""
    def frozen(bn):
        bn.requires_grad_(False)

    def weight_taken_away(bn):
        bn.weight = None

    configurations = [(dict(), None, False), (dict(affine=False), None, False), (dict(momentum=None), None, False),
                      (dict(), frozen, True), (dict(), weight_taken_away, False)]
    for options, after_watching, is_frozen in configurations:
        bn = nn.BatchNorm1d(4, **options)
        model = nn.Sequential(nn.Linear(4, 4), bn)
        observed = []
        with modewatch.watch(model, log=log):
            if after_watching is not None:
                after_watching(bn)
            for training, grad in [(True, True), (True, False), (False, True)]:
                model.train(training)
                before = bn.running_mean.clone()
                with torch.set_grad_enabled(grad):
                    model(torch.randn(8, 4))
                observed.append((training, grad, not torch.equal(before, bn.running_mean)))
        calls = recorded_calls(log)  # one row per forward, in the order their runs ended
        assert sorted((c.training, c.grad, c.stats_changed) for c in calls) == sorted(observed), options
        assert [(c.batch, c.param, c.frozen) for c in calls] == [(8, bn.momentum, is_frozen)] * 3, options
        os.unlink(log)


def test_the_common_case_hooks_record_what_the_general_ones_do(log, tmp_path, monkeypatch):
    """torch's own BatchNorm and Dropout get hooks written for the common case; a run through
    every unusual turn (frozen, a cumulative average, a weight taken away, inference mode, an EMA
    copy, a layer called on its own) records exactly what the general hooks record."""
    import copy

    from modewatch import hooks

    def run(path):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.3), nn.Flatten(),
                              nn.LazyLinear(2), nn.BatchNorm1d(2, momentum=None))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with modewatch.watch(model, log=path):
            model(torch.randn(2, 3, 5, 5))  # materialises the lazy layer
            ema = copy.deepcopy(model)
            for step in range(6):
                model.train()
                if step == 2:
                    model[1].requires_grad_(False)
                if step == 4:
                    model[5].weight = None
                nn.functional.cross_entropy(model(torch.randn(4, 3, 5, 5)), torch.tensor([0, 1, 0, 1])).backward()
                optimizer.step()
                optimizer.zero_grad()
                with torch.no_grad():
                    ema(torch.randn(4, 3, 5, 5))
                model.eval()
                with torch.inference_mode():
                    model(torch.randn(2, 3, 5, 5))
                model[1](torch.randn(2, 4, 3, 3))  # a layer called outside any forward
        return [tuple(call) for call in recorded_calls(path)]

    fast = run(log)
    monkeypatch.setattr(hooks.LayerHooks, "hook", property(lambda self: self.after))
    general = run(str(tmp_path / "general.jsonl"))
    assert len(fast) > 20 and fast == general


def test_the_calling_line_is_found_however_the_model_is_called(log):
    """The forward's site is the user's line that called the model: through ``model(x)``, through
    ``_call_impl`` directly (no _wrapped_call_impl frame), and inside a user's own module."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))

    class Outer(nn.Module):
        def forward(self, x):
            return model(x)  # <- inside a module

    with modewatch.watch(model, log=log):
        model(torch.randn(2, 4))  # <- called
        model._call_impl(torch.randn(2, 4))  # <- call_impl
        Outer()(torch.randn(2, 4))
    lines = sorted(c.site.line for c in recorded_calls(log))
    assert lines == sorted([line_of("called"), line_of("call_impl"), line_of("inside a module")])


def test_call_state_is_recorded(log):
    """Per call: mode, grad enabled, inference mode, batch size, p and momentum."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=0.2), nn.Dropout(0.25))
    with modewatch.watch(model, log=log):
        model(torch.randn(6, 4))
        model.eval()
        with torch.inference_mode():
            model(torch.randn(3, 4))
    norm_train, drop_train, norm_eval, drop_eval = recorded_calls(log)
    assert (norm_train.layer.name, norm_train.layer.kind, norm_train.layer.category) == ("1", "BatchNorm1d", "norm")
    assert (norm_train.training, norm_train.grad, norm_train.inference) == (True, True, False)
    assert (norm_train.batch, norm_train.param) == (6, 0.2)
    assert (drop_train.layer.category, drop_train.param) == ("dropout", 0.25)
    assert (norm_eval.training, norm_eval.grad, norm_eval.inference, norm_eval.batch) == (False, False, True, 3)
    assert drop_eval.mode.call == "eval"


def test_outputs_and_gradients_are_unchanged(log):
    """A watched model computes exactly what an unwatched one does (same seed)."""
    def run(watched):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        watcher = modewatch.watch(model, log=log) if watched else None
        losses = [train_step(model, opt, x, y).item() for x, y in batches(4)]
        if watcher:
            watcher.close()
        return losses, [p.detach().clone() for p in model.parameters()]

    (plain_losses, plain_params), (watched_losses, watched_params) = run(False), run(True)
    assert plain_losses == watched_losses
    assert all(torch.equal(a, b) for a, b in zip(plain_params, watched_params))


def test_training_on_the_meta_device_proves_no_value_is_read(log):
    """On the meta device any read of a tensor value raises; a watched model trains there and
    the seed bug is still found."""
    with torch.device("meta"):
        model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        for step in range(4):
            x = torch.randn(16, 8, device="meta")
            loss = model(x).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 1:
                model.eval()
    found = findings_by_rule(modewatch.analyze(log))
    assert set(found) == {"train-without-dropout", "bn-frozen-in-train"}
    assert found["train-without-dropout"].count == 2


def test_ddp_wrapped_model_and_its_module_called_directly(log, tmp_path):
    """A DDP-wrapped model is watched; evaluation through model.module is attributed with the
    right forward and mode lines, and layer names are those of the wrapper."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(Net())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with modewatch.watch(ddp, log=log):
            for x, y in batches(3):
                train_step(ddp, opt, x, y)
            ddp.module.eval()  # <- ddp eval
            with torch.no_grad():
                ddp.module(torch.randn(4, 8))
            for x, y in batches(2):
                train_step(ddp, opt, x, y)
    finally:
        dist.destroy_process_group()
    found = findings_by_rule(modewatch.analyze(log))
    assert set(found) == {"train-without-dropout", "bn-frozen-in-train"}
    finding = found["train-without-dropout"]
    assert finding.layers == ["module.drop"]
    assert finding.mode_site["line"] == line_of("ddp eval")
    assert finding.forward_site["line"] == line_of("train forward", train_step)
    assert (finding.first_step, finding.last_step) == (3, 4)
    assert "model.eval()" in finding.message  # .module of a wrapper is the model itself


def test_submodule_called_directly_is_its_own_forward(log):
    """Calling a part of the model (model.features(x)) outside the model's forward is recorded
    as a forward of its own, with the line that called it."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2))
    with modewatch.watch(model, log=log), torch.no_grad():
        model[0](torch.randn(8, 4))  # <- part called
    finding = findings_by_rule(modewatch.analyze(log))["stat-update-in-eval"]
    assert finding.forward_site["line"] == line_of("part called")
    assert finding.layers == ["0.1"]


def test_failure_inside_a_hook_warns_once_and_detaches(log, monkeypatch):
    """A bug inside modewatch never reaches the user's code: one warning, hooks removed, the
    training goes on with the same results."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = modewatch.watch(model, log=log)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(watcher, "begin_forward", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches(3):
            train_step(model, opt, x, y)
    assert [str(w.message).count("boom") for w in caught] == [1]
    assert not patches.active_watchers()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    watcher.close()


def test_failure_with_warnings_as_errors_still_does_not_raise(log, monkeypatch, capsys):
    """Under -W error a warning would raise; modewatch then writes its warning to stderr."""
    model = Net()
    watcher = modewatch.watch(model, log=log)
    monkeypatch.setattr(watcher, "begin_forward", lambda frame: 1 / 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(4, 8))
    assert "modewatch stopped watching" in capsys.readouterr().err
    watcher.close()


def test_unwritable_log_raises_at_once(tmp_path):
    """watch() on a log it cannot create raises LogPathError naming the path, before training."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(modewatch.LogPathError, match="file/sub/log.jsonl"):
        modewatch.watch(Net(), log=blocker / "sub" / "log.jsonl")
    with pytest.raises(modewatch.LogPathError, match="No space left"):
        modewatch.watch(Net(), log="/dev/full")  # a full disk, found before training starts
    assert not patches.active_watchers()


def test_log_path_substitution_and_environment(tmp_path, monkeypatch):
    """{pid} and {rank} are substituted; without log=, MODEWATCH_LOG is used; PathLike works."""
    monkeypatch.setenv("MODEWATCH_LOG", os.fspath(tmp_path / "env-{rank}-{pid}.jsonl"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with modewatch.watch(Net()) as watcher:
        pass
    assert watcher.path == os.fspath(tmp_path / f"env-0-{os.getpid()}.jsonl")
    with modewatch.watch(Net(), log=tmp_path / "nested" / "x-{pid}.jsonl") as watcher:
        pass
    assert os.path.exists(tmp_path / "nested" / f"x-{os.getpid()}.jsonl")


def test_close_is_idempotent_and_off_means_off(log):
    """close() twice is fine; afterwards no hook, no patch is left and the log is complete."""
    model = Net()
    train = nn.Module.__dict__["train"]
    watcher = modewatch.watch(model, log=log)
    assert nn.Module.__dict__["train"] is not train
    watcher.close()
    watcher.close()
    assert nn.Module.__dict__["train"] is train
    assert torch.autograd.backward.__module__ == "torch.autograd"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    log_reader = reader.LogReader(log)
    list(log_reader)
    assert log_reader.ended and log_reader.skipped == 0


def test_watched_model_can_be_saved_whole(log):
    """torch.save(model) of a watched model works (the hooks pickle as inert functions)."""
    model = Net()
    with modewatch.watch(model, log=log):
        buffer = io.BytesIO()
        torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded(torch.randn(4, 8))


def test_watch_rejects_what_is_not_a_module(log):
    """watch() says clearly what it needs."""
    with pytest.raises(TypeError, match="torch.nn.Module"):
        modewatch.watch(lambda x: x, log=log)
    with pytest.raises(TypeError, match="unknown option 'layer' .*it takes flush_seconds, fold, on_finding, layers"):
        modewatch.watch(Net(), log=log, layer="x")
    with pytest.raises(TypeError, match="not None"):
        modewatch.watch(None, log=log)
    with pytest.raises(ValueError, match="flush_seconds=.... must be a number of seconds .0 or more., not -1"):
        modewatch.watch(Net(), log=log, flush_seconds=-1)
    with pytest.raises(TypeError, match="fold=.... must be True or False, not 'no'"):
        modewatch.watch(Net(), log=log, fold="no")
    assert not os.path.exists(log)  # nothing half-made


def test_mode_calls_are_recorded_once_per_user_call(log):
    """model.train() on a deep model is one mode event, not one per submodule."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.1)) for _ in range(5)])
    with modewatch.watch(model, log=log):
        for _ in range(3):
            model.train()
            model.eval()
    with open(log) as f:
        events = [line for line in f if '"event":"mode"' in line]
    assert len(events) == 2  # train() and eval() at their lines, each defined once


def test_lazy_subclassed_and_sync_batchnorm_are_watched(log):
    """Lazy BatchNorm, a user subclass (measured exactly, with a pre-hook) and SyncBatchNorm are
    all watched; the subclass's statistics-change bit matches its values."""

    class MyNorm(nn.BatchNorm1d):
        pass

    model = nn.Sequential(nn.Linear(4, 4), nn.LazyBatchNorm1d(), MyNorm(4), nn.SyncBatchNorm(4))
    with modewatch.watch(model, log=log):
        model.eval()  # SyncBatchNorm needs a process group only in train mode
        with torch.no_grad():
            model(torch.randn(8, 4))
        model[1].train()
        model[2].train()
        before = model[2].running_mean.clone()
        with torch.no_grad():
            model(torch.randn(8, 4))
        changed = not torch.equal(before, model[2].running_mean)
    calls = recorded_calls(log)
    assert sorted({c.layer.name for c in calls}) == ["1", "2", "3"]
    assert {c.layer.kind for c in calls} >= {"MyNorm", "SyncBatchNorm"}
    second = {c.layer.name: c for c in calls if c.training or c.stats_changed}
    assert changed and second["2"].stats_changed and second["1"].stats_changed
    assert not any(c.stats_changed for c in calls if c.layer.name == "3")


def test_models_in_several_threads_are_recorded_apart(log):
    """Two threads running the watched model at once: each forward gets its own calls."""
    import threading

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    model.eval()
    errors = []

    def run():
        try:
            with torch.no_grad():
                for _ in range(50):
                    model(torch.randn(2, 4))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with modewatch.watch(model, log=log):
        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    calls = recorded_calls(log)
    assert sum(c.calls for c in calls) == 100
    assert sum(c.forwards for c in calls) == 100


def test_forwards_waiting_for_a_backward_are_bounded(log, monkeypatch):
    """Outputs kept with their graphs (predictions collected with grad enabled) make forwards
    that wait for a backward that may come; past forwards.MAX_PENDING of them the oldest are
    settled as evaluations, and written at the next flush: memory stays bounded however many
    outputs are kept."""
    monkeypatch.setattr(forwards, "MAX_PENDING", 8)
    model = Net()
    kept = []
    with modewatch.watch(model, log=log) as watcher:
        model.eval()
        for x, _ in batches(20):
            kept.append(model(x))
        assert len(watcher.pending.waiting) == 8
        watcher.flush()
        settled = recorded_calls(log)
        assert sum(c.calls for c in settled) == 2 * (20 - 8)  # two layers per forward
        assert {c.forward_kind for c in settled} == {logformat.GRAPH_UNUSED}
    assert modewatch.analyze(log).summary["layer_calls"] == 2 * 20


def test_a_model_that_adopts_a_watched_model_renames_its_layers(log):
    """A watched model later put inside another one that is watched too (a backbone in a
    classifier): from then on its layers' calls carry the names the new model gives them, also
    where a call repeats one read before the renaming."""
    backbone = Net()
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    with modewatch.watch(backbone, log=log) as watcher:
        backbone.eval()
        for x, y in batches(2):
            train_step(backbone, opt, x, y)
        watcher.flush()  # as the clock does: these calls are written under the old names
        classifier = nn.Sequential(backbone)
        watcher.add_model(classifier)
        for x, y in batches(2):
            train_step(classifier, opt, x, y)  # the same calls, from the same line
    dropout = [(c.layer.name, c.first_step, c.last_step) for c in recorded_calls(log) if c.layer.kind == "Dropout"]
    assert dropout == [("drop", 0, 1), ("0.drop", 2, 3)]
    found = [f for f in modewatch.analyze(log).findings if f.rule == "train-without-dropout"]
    assert sorted(name for f in found for name in f.layers) == ["0.drop", "drop"]


@pytest.mark.parametrize("what", ["model", "part"])
def test_a_deep_copy_watched_as_a_model_records_each_call_once(log, what):
    """A deep copy of a watched model (torchvision's EMA: AveragedModel copies the model, then
    moves the copy with .to()), or of a part of one, that is then watched as a model itself (as
    MODEWATCH=1 watches a module moved or set up): it carries our hooks from the copy already, and
    gets no second set; each of its layer calls is recorded once, its statistics updates too."""
    model = Net()
    with modewatch.watch(model, log=log) as watcher:
        copy = __import__("copy").deepcopy(model if what == "model" else model.bn1)
        watcher.add_model(copy)
        with torch.no_grad():
            for x, _ in batches(2):
                copy(x if what == "model" else model.fc1(x))
    calls = [c for c in recorded_calls(log) if c.layer.model != 0]
    assert sum(c.calls for c in calls if c.layer.kind == "BatchNorm1d") == 2
    assert all(c.stats_changed for c in calls if c.layer.kind == "BatchNorm1d")


class AdaptingNorm(nn.BatchNorm1d):
    """Test-time adaptation: a BatchNorm subclass that updates its statistics in eval mode too."""

    def forward(self, x):
        training, self.training = self.training, True
        try:
            return super().forward(x)
        finally:
            self.training = training


def test_a_norm_subclass_updating_its_statistics_in_eval_mode_is_seen(log):
    """A BatchNorm subclass, whose forward may do anything, is measured around each call: one
    that updates its running statistics in eval mode is recorded doing so, and reported (torch's
    own BatchNorm is trusted to update them only in train mode)."""
    model = nn.Sequential(nn.Linear(4, 4), AdaptingNorm(4))
    with modewatch.watch(model, log=log):
        model.eval()
        before = model[1].running_mean.clone()
        with torch.no_grad():
            model(torch.randn(8, 4))
    assert not torch.equal(before, model[1].running_mean)  # it did update them
    assert [(c.training, c.stats_changed) for c in recorded_calls(log)] == [(False, True)]
    assert rules_and_severities(modewatch.analyze(log)) == {("stat-update-in-eval", "error")}


def replicate_on_cpu(network, copies):
    """What torch.nn.parallel.replicate makes of a module for each device (it refuses CPU): a
    replica of every module by torch's own Module._replicate_for_data_parallel (a shallow copy,
    marked _is_replica, that shares the hooks), the children replaced by their replicas and the
    parameters by views of the original ones."""
    modules = list(network.modules())
    made = []
    for _ in range(copies):
        replicas = {id(module): module._replicate_for_data_parallel() for module in modules}
        for module in modules:
            replica = replicas[id(module)]
            for name, child in module._modules.items():
                replica._modules[name] = None if child is None else replicas[id(child)]
            for name, parameter in module._parameters.items():
                if parameter is not None:
                    setattr(replica, name, parameter.view_as(parameter))
        made.append(replicas[id(network)])
    return made


class DataParallelOnCPU(nn.DataParallel):
    """nn.DataParallel's forward on two CPU "devices": fresh replicas at every call, each run on
    its own thread (as parallel_apply does), the outputs gathered. (On CPU, nn.DataParallel itself
    calls the module directly, and makes no replica.)"""

    def forward(self, x):
        import threading

        replicas = replicate_on_cpu(self.module, 2)
        chunks, outputs = x.chunk(2), [None, None]

        def run(index):
            outputs[index] = replicas[index](chunks[index])

        threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return torch.cat(outputs)


def test_data_parallel_replicas_are_the_model_itself(log):
    """DataParallel runs fresh replicas of the model at every call; their layer calls are the
    model's own: each rule is one finding over all replicas and steps, naming the model's layers
    (DataParallel's module. prefix), and the log defines no layer, and no model, per replica."""
    model = DataParallelOnCPU(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        model.eval()
        for x, y in batches(3):
            train_step(model, opt, x, y)
    found = [(f.rule, f.layers, f.count) for f in modewatch.analyze(log).findings]
    assert found == [("train-without-dropout", ["module.drop"], 2 * 3), ("bn-frozen-in-train", ["module.bn1"], 2 * 3)]
    with open(log) as f:
        events = [json.loads(line)["event"] for line in f]
    assert events.count("layer") == 2 and events.count("model") == 1


def test_steps_are_counted_when_the_watched_model_is_wrapped_after(log):
    """watch(net), then DataParallel(net): the replicas' forwards run on threads of their own
    and the optimizer steps on the main thread, which runs no watched forward itself; each step
    is counted all the same (it counted none, and the findings of a forgotten model.train()
    were dropped as if they came after the last step)."""
    net = Net()
    with modewatch.watch(net, log=log):
        model = DataParallelOnCPU(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step, (x, y) in enumerate(batches(6)):
            train_step(model, opt, x, y)
            if step == 2:
                model.eval()
    found = {f.rule: (f.first_step, f.last_step) for f in modewatch.analyze(log).findings}
    assert found == {"train-without-dropout": (3, 5), "bn-frozen-in-train": (3, 5)}
    assert modewatch.analyze(log).summary["steps"] == 6


def test_a_closed_watcher_watches_no_more_models(log):
    """add_model() on a closed Watcher raises a ValueError that says so, and leaves no hook on
    the model."""
    watcher = modewatch.watch(Net(), log=log)
    watcher.close()
    other = Net()
    with pytest.raises(ValueError, match="Watcher is closed: it cannot watch another model"):
        watcher.add_model(other)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in other.modules())
