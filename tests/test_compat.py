"""torch's private APIs modewatch relies on (modewatch/compat.py) still do what it relies on."""

import os

import torch
from torch import nn

from modewatch import compat


def test_version_counters_move_on_in_place_changes_and_read_no_value():
    """A version counter moves with every in-place change; an inference tensor has none (-1)."""
    t = torch.zeros(3)
    before = compat.version(t)
    t.add_(1)
    assert compat.version(t) == before + 1
    with torch.inference_mode():
        assert compat.version(torch.zeros(2)) == -1
    assert compat.version(torch.zeros(2, device="meta")) >= 0  # no storage to read: still a counter


def test_data_pointer_moves_when_data_is_replaced():
    """``param.data = new`` moves the data pointer (what the EMA check reads); meta tensors give 0."""
    p = nn.Parameter(torch.zeros(3))
    before = compat.data_ptr(p)
    p.data = torch.ones(3)
    assert compat.data_ptr(p) != before
    assert compat.data_ptr(torch.zeros(2, device="meta")) == 0


def test_a_modules_own_tables():
    """_buffers, _parameters and _modules are the module's own name -> tensor/module tables."""
    bn = nn.BatchNorm1d(4)
    assert set(compat.own_buffers(bn)) == {"running_mean", "running_var", "num_batches_tracked"}
    assert set(compat.own_parameters(bn)) == {"weight", "bias"}
    assert list(compat.own_children(nn.Sequential(bn))) == ["0"]


def test_torchs_frames_between_a_module_call_and_its_hooks_are_found():
    """The frames torch puts between the line calling a module and its forward pre-hook are found
    on this torch (the model's pre-hook steps over them by identity), and they are torch's own."""
    folder = os.path.dirname(torch.__file__)
    assert compat.MODULE_CALL_CODES
    assert all(code.co_filename.startswith(folder) for code in compat.MODULE_CALL_CODES)


def test_base_classes_of_the_mode_sensitive_layers():
    """The private base classes cover every BatchNorm, Dropout and InstanceNorm torch has."""
    assert all(isinstance(m, compat.BatchNormBase) for m in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.SyncBatchNorm(2)))
    assert all(isinstance(m, compat.DropoutBase) for m in (nn.Dropout(), nn.Dropout2d(), nn.AlphaDropout()))
    assert isinstance(nn.InstanceNorm1d(2), compat.InstanceNormBase)


def test_removing_hooks_in_place_and_from_a_copy_of_the_state():
    """remove_hooks takes the chosen hooks out of a live module's tables (other handles keep
    working) or out of a copy of its state (the module keeps them), with their id-keyed entries."""
    def mine(m, a, o):
        return None

    def theirs(m, a, o):
        return None

    layer = nn.Linear(2, 2)
    layer.register_forward_hook(mine, always_call=True)
    other = layer.register_forward_hook(theirs)
    state = dict(layer.__dict__)
    assert compat.remove_hooks(state, lambda hook: hook is mine)
    assert list(state["_forward_hooks"].values()) == [theirs] and not state["_forward_hooks_always_called"]
    assert list(layer._forward_hooks.values()) == [mine, theirs]  # the module itself unchanged
    assert compat.remove_hooks(layer.__dict__, lambda hook: hook is mine, in_place=True)
    assert list(layer._forward_hooks.values()) == [theirs]
    other.remove()
    assert not layer._forward_hooks


def test_the_graph_task_id_tells_a_backward():
    """-1 outside any backward; a task id inside one (read by a hook the engine runs)."""
    assert compat.current_graph_task_id is not None and compat.current_graph_task_id() == -1
    seen = []
    x = torch.ones(2, requires_grad=True)
    y = (x * 2).sum()
    y.grad_fn.register_prehook(lambda grads: seen.append(compat.current_graph_task_id()))
    y.backward()
    assert seen and seen[0] >= 0


def test_replicas_and_dynamo_skip_rules():
    """is_replica reads DataParallel's mark; keep_out_of_compiled_graphs puts modewatch's modules
    (but the traced one) on Dynamo's skip list, by file."""
    layer = nn.Linear(2, 2)
    assert not compat.is_replica(layer)
    layer._is_replica = True
    assert compat.is_replica(layer)
    from torch._dynamo import trace_rules

    compat.keep_out_of_compiled_graphs(("modewatch",), ("modewatch.functional",))
    skipped = [str(d) for d in trace_rules.SKIP_DIRS]
    assert any(d.endswith("hooks.py") and "modewatch" in d for d in skipped)
    assert not any(d.endswith("functional.py") and "modewatch" in d for d in skipped)
