"""The event log's format: its version, the codes and bits a row holds, and the row's layout.

Defined here once, used by the collector that packs calls, the writer, the reader and the
analysis. A log is JSON lines: a header, definitions (models, layers, sites, mode calls,
contexts) by id, and ``calls`` events whose rows refer to them. docs/log-format.md describes every
field; bump SCHEMA when a reader could misread a new log. Imports nothing.
"""

from __future__ import annotations

SCHEMA = 1
HEADER_EVENT = "modewatch"

# What a forward's outputs went through, decided when the forward is over (see forwards).
NO_GRAPH = 0  # no autograd graph: no_grad, inference_mode, or nothing required grad
GRAPH_UNUSED = 1  # a graph was built, and no backward ever went through it
INPUT_GRAD = 2  # differentiated with respect to inputs only (torch.autograd.grad(loss, x))
PARAM_GRAD = 3  # a parameter-gradient backward went through it: a training forward
FORWARD_KINDS = (NO_GRAPH, GRAPH_UNUSED, INPUT_GRAD, PARAM_GRAD)

# Bits of a call's flags.
TRAINING = 1  # module.training during the call
GRAD_ENABLED = 2  # torch.is_grad_enabled()
INFERENCE = 4  # torch.is_inference_mode_enabled() (read once per forward)
STATS_CHANGED = 8  # running statistics changed during the call (measured)
FROZEN = 16  # a norm layer whose parameters all have requires_grad=False
PARAMS_MOVED = 32  # ... and they changed since its previous call all the same (a momentum update)
ALL_FLAGS = 63

# The flags of a call's mode and grad state, packed: MODE_FLAGS[training][grad_enabled].
MODE_FLAGS = ((0, GRAD_ENABLED), (TRAINING, TRAINING | GRAD_ENABLED))

CATEGORIES = ("dropout", "norm")
SCOPES = ("model", "submodule", "layer", "outside")

# A call, as the hooks record it: a tuple in this order (the row's fields of one layer call).
CALL_FIELDS = ("layer", "flags", "batch", "param", "mode")

# A ``calls`` row, in this order. A row stands for `calls` consecutive layer calls in identical
# state (a call's fields, and the forward's kind, site and context), made by `forwards` forwards
# from step first_step to last_step.
ROW_FIELDS = (
    "layer", "forward_kind", "flags", "batch", "param", "mode", "site", "context",
    "first_step", "last_step", "first_forward", "forwards", "calls",
)
ROW_LENGTH = len(ROW_FIELDS)


def row(call: tuple, kind: int, site, context: int, first_step: int, last_step: int, first_forward: int,
        forwards: int, calls: int) -> list:
    """A ``calls`` row of one recorded call (CALL_FIELDS) of forwards of one kind, site and context."""
    layer, flags, batch, param, mode = call
    return [layer, kind, flags, batch, param, mode, site, context, first_step, last_step, first_forward, forwards,
            calls]


def with_flags(call: tuple, flags: int) -> tuple:
    """A recorded call with more flags set (INFERENCE, known only once its forward is over)."""
    return (call[0], call[1] | flags, *call[2:])


def is_log_name(name: str) -> bool:
    """Whether a file found in a directory given to the analyzer is taken as a log."""
    return name.endswith(".jsonl") and not name.startswith(".")
