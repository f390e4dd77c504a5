"""The rule table (docs/rules.md): ids, severities and the one-line fix for each.

Kept apart from the analysis so that ``allow()`` and the CLI can validate rule ids without
loading anything else.
"""

from __future__ import annotations

from typing import Iterable

from .errors import UnknownRuleError

SEVERITIES = ("info", "warning", "error")  # ascending


def severity_rank(severity: str) -> int:
    """Position of ``severity`` in ascending order (info=0 ... error=2)."""
    return SEVERITIES.index(severity)


# rule id -> (default severity, what to do about it)
RULES = {
    "train-without-dropout": (
        "error",
        "call model.train() before the training batches (after any evaluation that called model.eval()).",
    ),
    "bn-frozen-in-train": (
        "error",
        "call model.train() before the training batches; to freeze BatchNorm on purpose, put only the "
        "BatchNorm layers in eval mode.",
    ),
    "stat-update-in-eval": (
        "error",
        "call model.eval() before evaluating (torch.no_grad() does not switch BatchNorm to its running "
        "statistics).",
    ),
    "dropout-in-eval": (
        "error",
        "call model.eval() before evaluating (torch.no_grad() does not switch Dropout off).",
    ),
    "eval-with-grad": (
        "info",
        "wrap evaluation in torch.no_grad() or torch.inference_mode() to save memory and time.",
    ),
    "bn-small-batch": (
        "warning",
        "use larger batches, or GroupNorm/LayerNorm, or freeze BatchNorm when batches are this small.",
    ),
    "bn-recalibration": (
        "info",
        "nothing to fix: BatchNorm statistics were recomputed on purpose.",
    ),
    "rank-mode-mismatch": (
        "error",
        "make every rank set the same mode: call model.train() on every rank after rank-0-only evaluation.",
    ),
    "stat-update-in-frozen": (
        "warning",
        "put the frozen part in eval mode after each model.train() (for example model.backbone.eval()), or use a "
        "frozen norm (torchvision.ops.FrozenBatchNorm2d); for deliberate adaptation (AdaBN), wrap it in "
        "modewatch.allow(\"stat-update-in-frozen\").",
    ),
    "ema-target": (
        "info",
        "nothing to fix for an EMA / momentum target; a fixed teacher, or a model run for its predictions, "
        "belongs in eval mode (teacher.eval()).",
    ),
    "stat-update-in-sampling": (
        "warning",
        "to sample with the statistics learnt, call model.eval() before sampling and model.train() after; "
        "sampling in train mode on purpose (as many GANs do) needs no change.",
    ),
}


def check_rules(rules: Iterable[str]) -> frozenset[str]:
    """Return ``rules`` as a frozenset, or raise UnknownRuleError naming the first unknown id."""
    rules = frozenset(rules)
    for rule in sorted(rules):
        if rule not in RULES:
            known = ", ".join(RULES)
            raise UnknownRuleError(f"unknown rule {rule!r}; known rules: {known}")
    return rules
