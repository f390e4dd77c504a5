"""Which modules are mode-sensitive layers, and in which category ("dropout" or "norm").

- torch's own: every Dropout (``_DropoutNd``), ``nn.MultiheadAttention`` (its attention dropout),
  ``nn.LSTM``/``GRU``/``RNN`` with dropout between stacked layers, every ``_BatchNorm`` and
  InstanceNorm with ``track_running_stats=True``;
- named by the user: ``watch(model, layers={DropPath: "dropout", RunningNorm: "norm"})``;
- found automatically: a *leaf* module (no submodules) of a class from outside torch whose
  ``forward`` reads ``self.training``: stochastic depth (timm's DropPath, torchvision's
  StochasticDepth), DropBlock, custom norms. A custom layer with buffers is a norm (its statistics
  are measured by the buffers' version counters), one without is a dropout. Modules with
  submodules are left out: attention blocks and whole models read ``self.training`` too, to pass
  it on to the layers inside, which are watched themselves.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from . import compat

CATEGORIES = ("dropout", "norm")

# Where a custom dropout-like layer keeps its probability, in the order looked for.
PROBABILITY_ATTRIBUTES = ("p", "drop_prob", "drop_rate", "dropout", "rate", "prob")

_reads_training: dict = {}  # class -> whether its forward reads .training


def check_named(layers: Any) -> dict:
    """The ``layers=`` option of watch(), checked: {module class: "dropout" or "norm"}."""
    if layers is None:
        return {}
    if not isinstance(layers, Mapping):
        raise TypeError("modewatch.watch(layers=...) takes a dict {layer class: 'dropout' or 'norm'}, "
                        f"not {type(layers).__name__}")
    for cls, category in layers.items():
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"modewatch.watch(layers=...): {cls!r} is not an nn.Module class")
        if category not in CATEGORIES:
            raise ValueError(f"modewatch.watch(layers=...): the category of {cls.__name__} must be "
                             f"'dropout' or 'norm', not {category!r}")
    return dict(layers)


def category(module: nn.Module, named: Mapping = {}) -> Optional[str]:
    """"dropout" or "norm" for a mode-sensitive layer, else None."""
    if isinstance(module, (compat.DropoutBase, nn.MultiheadAttention)):
        return "dropout"
    if isinstance(module, nn.RNNBase):  # its own dropout, between stacked layers: only with several
        return "dropout" if module.num_layers > 1 and module.dropout > 0 else None
    if isinstance(module, compat.BatchNormBase) or (isinstance(module, compat.InstanceNormBase)
                                                     and module.track_running_stats):
        return "norm"
    for cls, named_category in named.items():
        if isinstance(module, cls):
            return named_category
    if is_custom(module):
        return "norm" if next(module.buffers(recurse=False), None) is not None else "dropout"
    return None


def is_custom(module: nn.Module) -> bool:
    """A leaf module of a class from outside torch whose forward reads ``self.training``."""
    cls = type(module)
    known = _reads_training.get(cls)
    if known is None:
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        known = _reads_training[cls] = (
            not is_torch_layer(module) and code is not None and "training" in code.co_names)
    return known and not compat.own_children(module)


def is_torch_layer(module: nn.Module) -> bool:
    """One of torch's own layers, whose behaviour modewatch knows (no exact pre-hook needed)."""
    return type(module).__module__.startswith("torch.")


def probability_attribute(module: nn.Module) -> Optional[str]:
    """The attribute holding a custom dropout layer's probability, if it has a numeric one."""
    for name in PROBABILITY_ATTRIBUTES:
        value = module.__dict__.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return name
    return None
