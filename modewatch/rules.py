"""The rules: one record each (its id, severity, what happened, the fix, the check), and severities.

Adding a rule touches this file alone: the analysis asks each record's ``check`` about every run
of identical calls, words its findings from ``summary`` and ``fix``, and settles the verdicts that
wait for the whole log through ``settle``; the CLI, the reporters and ``allow()`` take the ids from
here. docs/rules/ has a page per rule. Imports no torch.
"""

from __future__ import annotations

import collections

TYPE_CHECKING = False  # typing is for annotations only: the CLI starts without importing it
if TYPE_CHECKING:
    from typing import Any, Iterable, Mapping

from .errors import UnknownRuleError
from .format import GRAPH_UNUSED, PARAM_GRAD

SEVERITIES = ("info", "warning", "error")  # ascending
MOVED_FORWARDS = 2  # forwards in which a frozen layer's parameters moved: a momentum encoder, not frozen
# A line that runs an EMA / momentum target at most a quarter as often as its online model trains
# validates it (at the end of each epoch): in train mode that is the inference bug, an error.
VALIDATION_SHARE = 4


def severity_rank(severity: str) -> int:
    """Position of ``severity`` in ascending order (info=0 ... error=2)."""
    return SEVERITIES.index(severity)


_RULE_FIELDS = ("id", "severity", "summary", "fix", "check", "variants", "in_train_mode", "explain_mode",
                "fix_for_info", "detail", "settle")


class Rule(collections.namedtuple("Rule", _RULE_FIELDS, defaults=(None, {}, False, True, False, None, None))):
    """One rule, immutable:

    - ``id``, ``severity`` (as the rule table gives it; ``check`` may give another), ``summary``
      (what happened, one sentence), ``fix`` (what to do);
    - ``check(calls, small_batch)``: the severity a run of identical calls breaks it with, or None
      (None for the rules found otherwise: across ranks, or by settling another rule);
    - ``variants``: summaries of one severity or flavour ("info", "ignores-mode");
    - ``in_train_mode``: broken in train mode (with no mode call, "modules start in train mode");
    - ``explain_mode``: the message names the .train()/.eval() call that set the mode;
    - ``fix_for_info``: its info findings are worth fixing too (reports show the fix);
    - ``detail(calls)``: what a per-layer verdict keeps causes apart by;
    - ``settle(cause, seen, final)``: the verdict once the whole log is read (see
      ``analysis.Job.settled``).

    Summaries are format strings over the fields ``analysis._summary`` fills in: {training},
    {evaluation}, {forwards}, {layers}, {small_batch}, {smallest}, {what}, {frozen}, {model}
    (and {rank}, {first}, {last} for rank-mode-mismatch).
    """

    __slots__ = ()


# ----------------------------------------------------------------------------- what a run of calls was

def _training_forward(calls: Any) -> bool:
    return calls.forward_kind == PARAM_GRAD


def _norm(calls: Any) -> bool:
    return calls.layer.category == "norm"


def _active_dropout(calls: Any) -> bool:
    return calls.layer.category == "dropout" and (calls.param is None or calls.param > 0)


def _recalibration(calls: Any) -> bool:
    """A recalibration pass (update_bn, or BatchNorm in cumulative-average mode) updates the
    statistics on purpose, and runs Dropout in train mode as a side effect."""
    return calls.context.recalibration or (_norm(calls) and calls.param is None and calls.training)


def _evaluation(calls: Any) -> bool:
    return not _training_forward(calls) and not _recalibration(calls)


def deliberate_freeze(mode: Any) -> bool:
    """BatchNorm put in eval mode layer by layer (or a submodule at a time), or by assigning
    ``.training``: a fine-tuning pattern, not a forgotten model.train()."""
    return mode is None or mode.scope in ("layer", "submodule")


# ----------------------------------------------------------------------------- verdicts on the whole log

def _settle_frozen(cause: Any, seen: Any, final: bool) -> Any:
    """stat-update-in-frozen, layer by layer: not a momentum encoder (its parameters move), and
    "left out of every optimizer" only where an optimizer steps the rest of its model."""
    name, how = cause.detail
    layer = (cause.model, name)
    if seen.moved[layer] >= MOVED_FORWARDS:
        return None
    facts = seen.facts
    if how == "optimizer" and (cause.model not in facts.optimized_models or layer in facts.optimized_layers):
        return None if final else ...
    return cause.rule, cause.severity, None


def _settle_training(cause: Any, seen: Any, final: bool) -> Any:
    """train-without-dropout and bn-frozen-in-train, once the whole log is read: no finding where
    no weights learnt in the wrong mode, the backward having been taken for something else (an
    adversarial example or saliency map by ``loss.backward()`` and ``x.grad``, a Fisher estimate):

    - a model that never trains in the run: no optimizer holds its parameters, they never changed
      in place, and it never ran a training forward in train mode (the FGSM tutorial);
    - a model an optimizer trains, where every offending forward came after the run's last
      optimizer step (an attack on the trained model once training is over), or came in bursts
      at a line where it never trains in train mode (an attack's steps mid-training: see
      ``_Seen.attack_bursts``).

    What this lets by, nothing in the log telling it from an attack: a model trained by hand
    through ``.data`` with no optimizer, or by an optimizer made before watch() that never steps
    (a short smoke run), in eval mode from its very first batch.
    """
    model, facts = cause.model, seen.facts
    if model in facts.optimized_models:
        if not seen.after_last_step(cause.first_step) and not seen.attack_bursts(cause, cause.detail):
            return cause.rule, cause.severity, None
    elif model in facts.updated_models or seen.trains_in_train_mode(model):
        return cause.rule, cause.severity, None
    return None if final else ...


def _evaluation_detail(calls: Any) -> tuple:
    """What stat-update-in-eval and dropout-in-eval verdicts depend on: the BatchNorm layer (does it
    ever run in eval mode: sampling), the line that called the model, and whether the forward built
    a graph no backward used (a skipped training batch does)."""
    return (calls.layer.name if _norm(calls) else None, calls.site, calls.forward_kind == GRAPH_UNUSED)


def _settle_evaluation(cause: Any, seen: Any, final: bool) -> Any:
    """stat-update-in-eval and dropout-in-eval, once the whole log is read:

    - an EMA / momentum target is ema-target; at a line that runs it no more than half as often
      as its online model trains, a warning there; no more than a quarter as often (a validation
      of it at the end of each epoch), the rule as checked, an error, saying what was recognised;
    - not an evaluation at all: a training batch skipped before its backward (at a line where
      the model trains, no more between two steps than that line trains in a step: a
      ``continue`` on a NaN loss), or a single dry-run forward before the first step of a model
      that trains later (lazy modules, shape checks);
    - in a generator (a model that trains in this run, on whose outputs another model is
      called): a line that runs it more than half as often as it trains makes fakes for the
      discriminator (under no_grad, or detached): training, no finding; an occasional one
      (sampling) that updates BatchNorm statistics in layers never run in eval mode in the run is
      stat-update-in-sampling (nothing in the run used them); one that runs Dropout in train mode,
      in layers never run in eval mode, is dropout-in-sampling (pix2pix's noise);
    - else as checked (a classifier validated in train mode stays an error).
    """
    norm_layer, site, unused = cause.detail
    target = seen.ema_target(cause.model)
    if target is not None:
        if not seen.as_often(cause, target[1], site, share=VALIDATION_SHARE):  # a validation of it
            return cause.rule, cause.severity, ("now and then", target[1])
        if not seen.as_often(cause, target[1], site):  # not the target's every-step forward
            return "ema-target", "warning", ("now and then", target[1])
        return "ema-target", "info" if target[0] == "updated" else "warning", target
    if not final and (seen.undecided(cause.model) or cause.model not in seen.trained):
        return ...
    if seen.dry_run(cause) or (unused and seen.skipped_batches(cause, site)):
        return None
    generator = seen.generator(cause.model)
    if generator and seen.as_often(cause, cause.model, site):  # fakes for the discriminator, under no_grad
        return None if final else ...
    if norm_layer is not None and generator and (cause.model, norm_layer) not in seen.eval_mode:
        return ("stat-update-in-sampling", "warning", None) if final else ...
    if (norm_layer is None and generator and cause.rule == "dropout-in-eval"
            and not any((cause.model, name) in seen.eval_mode for name in cause.layers)):
        # pix2pix keeps its generator's dropout on at test time, as its noise: a warning
        return ("dropout-in-sampling", "warning", None) if final else ...
    return cause.rule, cause.severity, None


# ----------------------------------------------------------------------------- the rules

TRAIN_AGAIN = "call model.train() before the training batches (after any evaluation that called model.eval())."
# The fix of an ema-target finding at a line that runs the target only now and then.
EMA_VALIDATION_FIX = ("to evaluate the EMA / momentum target, call .eval() on it before and .train() after; its "
                      "every-step use in train mode needs no change.")

_RULES = (
    Rule(
        "train-without-dropout", "error",
        "{training} ran Dropout in eval mode, with dropout off ({layers}).",
        TRAIN_AGAIN,
        # A part put in eval mode by itself and run under no_grad inside the training forward is
        # a frozen teacher in the trained model (knowledge distillation), not a forgotten train():
        # those layers learn nothing there, and are not reported.
        check=lambda c, _: ("error" if _training_forward(c) and _active_dropout(c) and not c.training
                            and not (deliberate_freeze(c.mode) and not c.grad) else None),
        detail=lambda c: c.site,
        settle=_settle_training,
    ),
    Rule(
        "bn-frozen-in-train", "error",
        "{training} ran BatchNorm in eval mode, with running statistics frozen ({layers}).",
        f"{TRAIN_AGAIN[:-1]}; to freeze BatchNorm on purpose, put only the BatchNorm layers in eval mode.",
        # A layer whose parameters are all frozen (requires_grad=False) is frozen on purpose in
        # eval mode too: a linear probe on a frozen backbone (MoCo, DINO) calls model.eval() in
        # its training loop, and only the head learns.
        check=lambda c, _: (("info" if c.frozen or deliberate_freeze(c.mode) else "error")
                            if _training_forward(c) and _norm(c) and not c.training else None),
        variants={"info": "{training} ran BatchNorm in eval mode ({layers}); the layers were frozen "
                          "(requires_grad=False), or put in eval mode one by one or a submodule at a time, which "
                          "looks like deliberate freezing."},
        detail=lambda c: c.site,
        settle=_settle_training,
    ),
    Rule(
        "stat-update-in-eval", "error",
        "{evaluation} updated BatchNorm running statistics ({layers}): evaluation data leaked into the "
        "statistics used at inference.",
        "call model.eval() before evaluating (torch.no_grad() does not switch BatchNorm to its running "
        "statistics).",
        check=lambda c, _: "error" if _evaluation(c) and _norm(c) and c.stats_changed else None,
        in_train_mode=True,
        detail=_evaluation_detail,
        settle=_settle_evaluation,
    ),
    Rule(
        "dropout-in-eval", "error",
        "{evaluation} ran Dropout in train mode, so predictions were random ({layers}).",
        "call model.eval() before evaluating (torch.no_grad() does not switch Dropout off).",
        check=lambda c, _: "error" if _evaluation(c) and _active_dropout(c) and c.training else None,
        variants={"ignores-mode": "{evaluation} ran functional dropout, so predictions were random ({layers})."},
        in_train_mode=True,
        detail=_evaluation_detail,
        settle=_settle_evaluation,
    ),
    Rule(
        "eval-with-grad", "info",
        "{evaluation} in eval mode built an autograd graph that no backward used ({layers}).",
        "wrap evaluation in torch.no_grad() or torch.inference_mode() to save memory and time.",
        check=lambda c, _: ("info" if _evaluation(c) and c.forward_kind == GRAPH_UNUSED and not c.training
                            and c.grad else None),
        fix_for_info=True,
    ),
    Rule(
        "bn-small-batch", "warning",
        "{training} computed BatchNorm statistics from fewer than {small_batch} samples (smallest: {smallest}) "
        "({layers}).",
        "use larger batches, or GroupNorm/LayerNorm, or freeze BatchNorm when batches are this small.",
        check=lambda c, small: ("warning" if _training_forward(c) and _norm(c) and c.training
                                and c.batch is not None and c.batch < small else None),
        in_train_mode=True,
    ),
    Rule(
        "bn-recalibration", "info",
        "BatchNorm running statistics were recomputed on purpose over {forwards} ({layers}).",
        "nothing to fix: BatchNorm statistics were recomputed on purpose.",
        check=lambda c, _: ("info" if not _training_forward(c) and _recalibration(c) and _norm(c)
                            and c.stats_changed else None),
        in_train_mode=True,
        explain_mode=False,
    ),
    Rule(
        "rank-mode-mismatch", "error",
        "Rank {rank} trained {layers} in eval mode at steps {first}-{last}, while other ranks trained them in "
        "train mode.",
        "make every rank set the same mode: call model.train() on every rank after rank-0-only evaluation.",
        # Found across the logs of a job, not in a run of calls: see ranks.Timelines.
    ),
    Rule(
        "stat-update-in-frozen", "warning",
        "{training} updated the running statistics of BatchNorm layers whose parameters are frozen ({frozen}), "
        "so the frozen part still changes ({layers}).",
        "put the frozen part in eval mode after each model.train() (for example model.backbone.eval()), or use a "
        "frozen norm (torchvision.ops.FrozenBatchNorm2d); for deliberate adaptation (AdaBN), wrap it in "
        'modewatch.allow("stat-update-in-frozen").',
        check=lambda c, _: ("warning" if _training_forward(c) and _norm(c) and c.training and c.stats_changed
                            and (c.frozen or c.layer.params) else None),
        in_train_mode=True,
        detail=lambda c: (c.layer.name, "requires_grad" if c.frozen else "optimizer"),
        settle=_settle_frozen,
    ),
    Rule(
        "ema-target", "info",
        "{evaluation} of {model} ran {what} in train mode ({layers}).",
        "nothing to fix for an EMA / momentum target; a fixed teacher, or a model run for its predictions, "
        "belongs in eval mode (teacher.eval()).",
        in_train_mode=True,
        explain_mode=False,  # the message says what was recognised instead
        # What stat-update-in-eval and dropout-in-eval settle into for a recognised target.
    ),
    Rule(
        "stat-update-in-sampling", "warning",
        "{evaluation} that no backward used (sampling) updated the BatchNorm running statistics of a generator "
        "({layers}); these layers never ran in eval mode in this run, so nothing here used those statistics, "
        "but a checkpoint of the model carries them.",
        "to sample or evaluate with the statistics learnt, call model.eval() before and model.train() after; "
        "sampling a generator in train mode on purpose (as many GANs do) needs no change.",
        in_train_mode=True,
        # What stat-update-in-eval settles into (see _settle_evaluation).
    ),
    Rule(
        "dropout-in-sampling", "warning",
        "{evaluation} that no backward used (sampling) ran a generator's Dropout in train mode, so its outputs "
        "were random ({layers}); these layers never ran in eval mode in this run, as in pix2pix, which keeps "
        "dropout on at test time as its noise.",
        "to sample with dropout off, call model.eval() before and model.train() after; a generator that keeps "
        "dropout on at test time on purpose (pix2pix) needs no change.",
        in_train_mode=True,
        # What dropout-in-eval settles into (see _settle_evaluation).
    ),
)

RULES: Mapping[str, Rule] = {rule.id: rule for rule in _RULES}


def rules_for(calls: Any, small_batch: int) -> list:
    """The (rule id, severity) pairs a run of identical calls breaks, before allow()/--ignore."""
    return [(rule.id, severity) for rule in _RULES if rule.check is not None
            and (severity := rule.check(calls, small_batch)) is not None]


def check_rules(rules: Iterable[str]) -> frozenset[str]:
    """Return ``rules`` as a frozenset, or raise UnknownRuleError naming the first unknown id."""
    rules = frozenset(rules)
    for rule in sorted(rules):
        if rule not in RULES:
            known = ", ".join(RULES)
            raise UnknownRuleError(f"unknown rule {rule!r}; known rules: {known}")
    return rules
