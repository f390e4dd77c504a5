"""The analysis: from recorded layer calls to findings, grouped by cause.

It reads records through ``reader.LogReader`` and knows nothing of JSON or of how findings are
shown. It streams: memory grows with the number of distinct causes, never with the log's length.
Imports no torch.
"""

from __future__ import annotations

import collections

TYPE_CHECKING = False  # typing is for annotations only: the CLI starts without importing it
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, Optional

from . import ranks as distributed
from .errors import LogFormatError
from .format import GRAPH_UNUSED, PARAM_GRAD
from .reader import MAX_TABLE, STATE_LENGTH, add_bounded, Calls, Facts, LogReader, ModeSet, Site, expand_paths, job_rank
from .rules import EMA_VALIDATION_FIX, RULES, check_rules, rules_for, severity_rank

SMALL_BATCH = 8
MAX_CAUSES = 10_000  # distinct findings kept; a hostile log cannot make more
MAX_LAYERS_PER_FINDING = 1_000
# Layer names kept by all the findings of a job, and their characters: names come from the logs,
# each log's bounded on its own (reader.MAX_TEXT_KEPT), but a job may have any number of logs.
# Past either, a finding lists no more layers than it has (always at least one).
MAX_FINDING_LAYERS = 1_000_000
MAX_FINDING_TEXT = 64 << 20


_FINDING_FIELDS = ("rule", "severity", "message", "layers", "count", "first_step", "last_step", "rank", "forward_site",
                   "mode_site", "fix", "batches", "cause", "summary", "ranks", "log", "model")


class Finding(collections.namedtuple("Finding", _FINDING_FIELDS, defaults=("", 0, "", "", None, None, None))):
    """One cause of wrong-mode calls: the fields of a finding in `modewatch analyze --format json`.

    Beyond the keys every finding has had from the start: `fix` (what to do), `batches` (forwards affected: the most any one
    of its layers saw), `cause` (the mode call behind it, in words: reporters group findings by
    it), `summary` (the message's first sentence: what happened, without the why), `ranks` (a
    finding the same on every rank: those ranks, `rank` being null), `log` (the log it was found
    in; null when merged across ranks), `model` (`{"name": class, "site": where it was watched or
    made}`). Immutable.
    """

    __slots__ = ()

    def as_dict(self) -> dict:
        """The finding as `--format json` prints it."""
        found = self._asdict()
        del found["cause"], found["summary"]
        found["layers"] = list(self.layers)
        return found


class Analysis:
    """What ``modewatch.analyze()`` returns: findings, most severe first, and a summary."""

    __slots__ = ("findings", "logs", "summary")

    def __init__(self, findings: list, logs: list, summary: Optional[dict] = None):
        self.findings = findings
        self.logs = logs
        self.summary = summary if summary is not None else {}

    def failing(self, fail_on: str = "error") -> list:
        """The findings at or above ``fail_on`` ("error", "warning", "info"; "never": none)."""
        if fail_on == "never":
            return []
        floor = severity_rank(fail_on)
        return [f for f in self.findings if severity_rank(f.severity) >= floor]

    def __repr__(self) -> str:
        return f"<modewatch.Analysis: {len(self.findings)} finding(s) in {len(self.logs)} log(s)>"


def _cause_key(mode: Optional[ModeSet]) -> Any:
    """Findings are grouped by the mode call behind them. Layers frozen one by one by the same
    line (a loop over modules) share one cause."""
    if mode is None or mode.scope != "layer":
        return mode
    return (mode.site, mode.call, mode.mode, mode.scope)


_UNSETTLED = object()


class _Names:
    """What a settled cause keeps of its log (``_Cause.freeze``): the names of the models its
    finding names, as ``_Seen`` gives them."""

    def __init__(self, seen: "_Seen", models: set):
        self._models = {model: (seen.model_name(model), seen.model_dict(model)) for model in models}

    def model_name(self, model: Optional[int]) -> str:
        return self._models.get(model, ("a model", None))[0]

    def model_dict(self, model: Optional[int]) -> Optional[dict]:
        return self._models.get(model, ("a model", None))[1]

    def settling(self) -> None:
        pass


class _Cause:
    """Accumulates the calls of one finding while the logs stream by."""

    __slots__ = ("rule", "severity", "mode", "rank", "log", "count", "first_step", "last_step",
                 "first_forward", "forward_site", "layers", "kinds", "smallest_batch", "call", "model", "detail",
                 "seen", "rules", "recognised", "room", "most_at_one_step", "steps_seen", "verdict")

    def __init__(self, rule: str, severity: str, mode: Optional[ModeSet], rank: Optional[int], log: str,
                 call: Optional[tuple] = None, model: Optional[int] = None, detail: Any = None,
                 seen: Optional["_Seen"] = None, room: Optional[list] = None):
        self.rule, self.severity, self.mode, self.rank, self.log = rule, severity, mode, rank, log
        self.call = call  # (function, its call line) of a functional dropout that ignores the mode
        self.model = model  # the model id its layers belong to, in its log
        self.detail = detail  # what a verdict waiting for the whole log depends on (see _settle)
        self.seen = seen  # what its log showed as a whole
        self.rules = {rule}  # the rules it was made of, when settled findings are merged
        self.recognised: Any = None  # what _settle recognised (an EMA target and its online model)
        self.room = room if room is not None else [MAX_FINDING_LAYERS, MAX_FINDING_TEXT]  # the job's, shared
        self.count = 0
        self.first_step = self.last_step = None
        self.first_forward: Optional[tuple] = None
        self.forward_site: Optional[Site] = None
        self.layers: dict = {}  # name -> forwards, in order of first appearance
        self.kinds: dict = {}  # name -> class name, for the names shown in the message
        self.smallest_batch: Optional[int] = None
        self.most_at_one_step = 0  # the most of its forwards of unused graphs between two steps
        self.verdict: Any = _UNSETTLED  # settled once its log is read to its end (see freeze)
        self.steps_seen: dict = {}  # layer name -> (the step of its latest forwards, how many at it)

    def add(self, calls: Calls, log_index: int) -> None:
        self.count += calls.calls
        if self.first_step is None:
            self.first_step, self.last_step = calls.first_step, calls.last_step
        elif calls.first_step < self.first_step:
            self.first_step = calls.first_step
        if calls.last_step > self.last_step:
            self.last_step = calls.last_step
        earliest = self.first_forward  # (log index, step, forward): rows come mostly in order, so
        if earliest is None or log_index != earliest[0] or calls.first_step <= earliest[1]:  # rarely earlier
            order = (log_index, calls.first_step, calls.first_forward)
            if earliest is None or order < earliest:
                self.first_forward, self.forward_site = order, calls.site
        name = calls.layer.name
        if name in self.layers:  # _layer's common case, inline: this runs for every row
            self.layers[name] += calls.forwards
        else:
            self._layer(name, calls.layer.kind, calls.forwards)
        if calls.batch is not None and (self.smallest_batch is None or calls.batch < self.smallest_batch):
            self.smallest_batch = calls.batch
        if calls.forward_kind == GRAPH_UNUSED:  # only where it may tell a skipped batch
            self._crowding(calls)

    def _crowding(self, calls: Calls) -> None:
        # The collector never folds forwards of unused graphs across steps, so a row's forwards
        # came at one step (an older log's row across steps is taken as if they had); rows of one
        # step (a live analysis, runs ended by a flush) add up, layer by layer.
        name, step, count = calls.layer.name, calls.first_step, calls.forwards
        if calls.last_step == step:
            before = self.steps_seen.get(name)
            if before is not None and before[0] == step:
                count += before[1]
            if name in self.layers:  # the layers it keeps, which the job's room bounds
                self.steps_seen[name] = (step, count)
        if count > self.most_at_one_step:
            self.most_at_one_step = count

    def _layer(self, name: str, kind: str, forwards: int) -> None:
        if name in self.layers:
            self.layers[name] += forwards
        elif len(self.layers) < MAX_LAYERS_PER_FINDING:
            room = self.room
            if self.layers and (room[0] <= 0 or room[1] < len(name)):
                return
            room[0] -= 1
            room[1] -= len(name)
            self.layers[name] = forwards
            self.kinds[name] = kind

    def absorb(self, other: "_Cause") -> None:
        """Count the calls of ``other`` as if added here: the same cause in a later log, or a
        cause that settled into the same finding (see Job.settled)."""
        self.count += other.count
        self.first_step = min(self.first_step, other.first_step)
        self.last_step = max(self.last_step, other.last_step)
        if other.first_forward < self.first_forward:
            self.first_forward, self.forward_site = other.first_forward, other.forward_site
        for name, forwards in other.layers.items():
            self._layer(name, other.kinds[name], forwards)
        if other.smallest_batch is not None and (self.smallest_batch is None
                                                 or other.smallest_batch < self.smallest_batch):
            self.smallest_batch = other.smallest_batch
        self.rules |= other.rules
        self.most_at_one_step = max(self.most_at_one_step, other.most_at_one_step)
        for name, (step, count) in other.steps_seen.items():
            mine = self.steps_seen.get(name)
            if mine is not None and mine[0] == step:
                self.most_at_one_step = max(self.most_at_one_step, mine[1] + count)

    def copy(self) -> "_Cause":
        twin = _Cause.__new__(_Cause)  # not copy.copy: the copy module is not worth its import here
        for name in _Cause.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.layers, twin.kinds, twin.rules = dict(self.layers), dict(self.kinds), set(self.rules)
        twin.steps_seen = dict(self.steps_seen)
        return twin

    def freeze(self) -> None:
        """Its log is read to its end: settle its verdict now and keep, of what the log showed,
        only the names its finding shows, so that a job of many logs holds no log's tables."""
        seen = self.seen
        if seen is None or self.verdict is not _UNSETTLED:
            return
        self.verdict = _settle(self, True)
        named = {self.model}
        if self.verdict is not None and self.verdict[2] is not None:  # (how, online model) recognised
            named.add(self.verdict[2][1])
        self.seen = _Names(seen, named)

    def finding(self, small_batch: int) -> Finding:
        batches = max(self.layers.values(), default=0)
        return Finding(
            rule=self.rule, severity=self.severity,
            message=_message(self, batches, small_batch), summary=_summary(self, batches, small_batch),
            layers=list(self.layers), count=self.count,
            first_step=self.first_step, last_step=self.last_step, rank=self.rank,
            forward_site=_site_dict(self.forward_site), mode_site=_mode_dict(self.mode),
            fix=(IGNORES_MODE_FIX if self.call else EMA_VALIDATION_FIX
                 if self.recognised is not None and self.recognised[0] == "now and then" else RULES[self.rule].fix),
            batches=batches,
            cause=_call_text(self.call) if self.call else _headline(self.mode, self.rule), log=self.log,
            model=self.seen.model_dict(self.model) if self.seen is not None else None,
        )


def _site_dict(site: Optional[Site]) -> Optional[dict]:
    return None if site is None else {"file": site.file, "line": site.line, "function": site.function}


def _mode_dict(mode: Optional[ModeSet]) -> Optional[dict]:
    if mode is None or mode.site is None:
        return None
    return {**_site_dict(mode.site), "call": mode.call}


def _target_text(mode: ModeSet, layer: str) -> str:
    """What a mode call was made on, in words: ``model``, ``model.encoder``, or ``layer``."""
    if mode.scope == "layer":
        return layer
    if not mode.target or mode.scope == "model":
        return "model"
    return f"model.{mode.target}"


def mode_call_text(mode: ModeSet) -> str:
    """How the user wrote the call: ``model.eval()``, ``model.encoder.train(False)``."""
    call = "eval()" if mode.call == "eval" else "train()" if mode.mode else "train(False)"
    inside = f" inside {mode.via}()" if mode.via else ""
    if mode.scope == "layer":  # called on each layer, under whatever name the loop gave it
        return f".{call} on each layer{inside}"
    return f"{_target_text(mode, 'layer')}.{call}{inside}"


def _cause_text(mode: Optional[ModeSet], rule: str) -> str:
    """The mode call behind a finding, in words: what the text report groups findings by."""
    if mode is None:
        if RULES[rule].in_train_mode:  # modules start in train mode
            return "no .train()/.eval() call (modules start in train mode)"
        return ".training assigned directly (no .train()/.eval() call)"
    where = "" if mode.site is None else f" at {mode.site.file}:{mode.site.line} in {mode.site.function}()"
    if mode.initial:
        return f"the model already in eval mode when modewatch began watching it{where}"
    return f"{mode_call_text(mode)}{where}"


LOADED_IN_EVAL = ("from_pretrained() and many checkpoint loaders return a model in eval mode; "
                  "nothing called model.train() after")


def _headline(mode: Optional[ModeSet], rule: str) -> str:
    if mode is None or mode.initial:  # no call to name as having left the model in a mode
        return _cause_text(mode, rule)
    what = _target_text(mode, "the layers")
    what = "the model" if what == "model" else what
    return f"{_cause_text(mode, rule)} left {what} in {'train' if mode.mode else 'eval'} mode"


def _why(mode: Optional[ModeSet], rule: str) -> str:
    if mode is None:
        if RULES[rule].in_train_mode:
            return "Nothing ever called model.eval() on these layers: modules start in train mode"
        return "No .train()/.eval() call set this mode: .training was assigned directly"
    if mode.initial:
        return f"The mode was that of {_cause_text(mode, rule)}: {LOADED_IN_EVAL}"
    if mode.kept is not None:  # a library's call that changed nothing: also the call it kept
        return (f"The mode was last set by {_cause_text(mode, rule)}, which kept the mode set before by "
                f"{_cause_text(mode.kept, rule)}")
    return f"The mode was last set by {_cause_text(mode, rule)}"


def _ignored_mode_call(calls: Calls, rule: str) -> Optional[tuple]:
    """Dropout that ran in an evaluation forward although a .eval() call had reached its module
    (only a functional dropout can: F.dropout without training=self.training): its function and
    call line, which make a cause of their own. None for any other finding."""
    if rule == "dropout-in-eval" and calls.mode is not None and not calls.mode.mode:
        return calls.layer.kind, calls.layer.site
    return None


def _call_text(call: tuple) -> str:
    """``F.dropout at model.py:39 in forward() ignores its module's mode``."""
    function, site = call
    where = "" if site is None else f" at {site.file}:{site.line} in {site.function}()"
    return f"{function}{where} ignores its module's mode"


IGNORES_MODE_FIX = ("pass the module's mode to the call: F.dropout(x, p, training=self.training), "
                    "or dropout_p=p if self.training else 0.0 for scaled_dot_product_attention")


def _message(cause: _Cause, batches: int, small_batch: int) -> str:
    text = _summary(cause, batches, small_batch)
    if cause.call:
        return (f"{text} {_call_text(cause.call)}: the module was in eval mode, set by "
                f"{_cause_text(cause.mode, cause.rule)}, and the call dropped all the same.")
    if cause.recognised is not None:  # part of the summary already (_summary)
        return text
    return f"{text} {_why(cause.mode, cause.rule)}." if RULES[cause.rule].explain_mode else text


def _recognised_text(cause: _Cause) -> str:
    """What made an ema-target finding: a change seen (info), or only a likeness (warning)."""
    how, online = cause.recognised
    other = cause.seen.model_name(online)
    if how == "now and then":
        return (f"It is an EMA / momentum target of {other}, but this line runs it only now and then, as a "
                f"validation of it would: evaluating it needs eval mode (call .eval() before, .train() after).")
    if how == "updated":
        return (f"Recognised as deliberate: its parameters changed between steps with no optimizer stepping them, "
                f"while {other} trained.")
    likeness = "a deep copy of it" if how == "copy" else "the same class, size and norm layers"
    return (f"It looks like an EMA / momentum target of {other} ({likeness}, and no optimizer steps it), but no "
            f"change of its parameters was seen (an update through .data leaves no trace that can be read without "
            f"reading values). If it is a fixed teacher or a model run for its predictions, it should be in eval "
            f"mode.")


def plural(count: int, noun: str) -> str:
    """``1 training forward``, ``2 evaluation forwards``, ``2 batches``."""
    if count == 1:
        return f"1 {noun}"
    return f"{count:,} {noun}es" if noun.endswith(("ch", "s")) else f"{count:,} {noun}s"


def layers_text(names: Any, kinds: Optional[dict] = None) -> str:
    """``in layer drop`` / ``in layers bn1, bn2, ...``: names, never mistaken for a count. A name
    ending in a number (``nn.Sequential``'s ``1``, ``features.3``) gets its class: ``1 (BatchNorm1d)``."""
    names = list(names)
    kinds = kinds or {}
    shown = ", ".join(f"{name} ({kinds[name]})" if name in kinds and name.rsplit(".", 1)[-1].isdigit() else name
                      for name in names[:6]) + (", ..." if len(names) > 6 else "")
    return f"in layer {shown}" if len(names) == 1 else f"in layers {shown}"


FROZEN_WORDS = {"requires_grad": "requires_grad=False", "optimizer": "left out of every optimizer"}


def _summary(cause: _Cause, batches: int, small_batch: int) -> str:
    rule = RULES[cause.rule]
    template = rule.variants.get("ignores-mode" if cause.call else cause.severity) or rule.summary
    what = " and ".join(name for rule, name in (("stat-update-in-eval", "BatchNorm"), ("dropout-in-eval", "Dropout"))
                        if rule in cause.rules)
    # The template is ours; the values come from the log, and are never formatted again.
    text = template.format(
        training=plural(batches, "training forward"), evaluation=plural(batches, "evaluation forward"),
        forwards=plural(batches, "forward"), layers=layers_text(cause.layers, cause.kinds), small_batch=small_batch,
        smallest=cause.smallest_batch, what=what or "its layers",
        frozen=FROZEN_WORDS.get(cause.detail[1], "") if isinstance(cause.detail, tuple) else "",
        model=cause.seen.model_name(cause.model) if cause.seen is not None else "a model",
    )
    if cause.recognised is not None:  # what was recognised is what a reader must see first
        text = f"{text} {_recognised_text(cause)}"
    return text


def _causes_for(calls: Calls, small_batch: int, ignored: frozenset, rank: Optional[int], log: str,
                log_index: int, causes: dict, counts: Any, seen: "_Seen") -> list:
    """The causes (made as needed) that calls in this state count towards. Logs of one
    distributed job meet by rank; other logs (separate runs) are kept apart; findings of
    different models never meet."""
    fed = []
    for rule, severity in rules_for(calls, small_batch):
        if rule in ignored or rule in calls.context.allow:
            continue
        call = _ignored_mode_call(calls, rule)
        detail = RULES[rule].detail(calls) if RULES[rule].detail is not None else None
        model = calls.layer.model
        key = (rule, severity, _cause_key(calls.mode), rank, log_index if rank is None else None, call, model, detail)
        cause = causes.get(key)
        if cause is None:
            if len(causes) >= MAX_CAUSES:
                counts.dropped_causes += 1
                continue
            cause = causes[key] = _Cause(rule, severity, calls.mode, rank, log, call, model, detail, seen,
                                         counts.room)
        fed.append(cause)
    return fed


class _Seen:
    """What one log showed as a whole, for the verdicts that wait for all of it (_settle): the
    log's own facts (models, optimizers, in-place updates), and what its rows showed."""

    def __init__(self, facts: Facts):
        self.facts = facts
        self.trained: set = set()  # model ids with training forwards
        self.train_mode_lines: set = set()  # (model id, site) of training forwards in train mode
        # How often each model trains, and each line runs it otherwise (see as_often): forwards,
        # in one-item lists that the rows of a state add to without a look-up.
        self.trained_calls: dict = {}  # (model id, site, layer) -> [training forwards]
        self.totals = [0, 0]  # its log's layer calls and latest step (the open log's list)
        self.line_calls: dict = {}  # (model id, site, layer) -> [other forwards]
        self._training_forwards: Optional[dict] = None  # model id -> its training forwards, while settling
        self._per_line: Optional[dict] = None  # (model id, site) -> training forwards there, while settling
        self.eval_mode: set = set()  # (model id, layer name) that ran in eval mode
        self.moved: collections.Counter = collections.Counter()  # (model id, layer name) -> forwards
        self._alike: Optional[dict] = None  # see _trained_alike
        self._likenesses: dict = {}  # model id -> its likeness, while settling
        self._lowest_trained: Optional[int] = None  # min(trained), while settling
        self._generators: dict = {}  # model id -> Facts.generator(model), while settling
        self._train_mode_rate: Optional[dict] = None  # see _train_mode_rates, while settling

    def counter(self, calls: Calls) -> list:
        """The forwards count that the rows of ``calls``'s state add to (once per state)."""
        layer = calls.layer
        table = self.trained_calls if calls.forward_kind == PARAM_GRAD else self.line_calls
        key = (layer.model, calls.site, layer.name)
        counted = table.get(key)
        if counted is None:
            counted = [0]
            if len(table) < MAX_TABLE:  # past it, counted nowhere
                table[key] = counted
        return counted

    def note_state(self, calls: Calls) -> None:
        """Once per distinct state of calls."""
        if calls.forward_kind == PARAM_GRAD:
            add_bounded(self.trained, calls.layer.model)
            if calls.training:
                add_bounded(self.train_mode_lines, (calls.layer.model, calls.site))
        if not calls.training:
            add_bounded(self.eval_mode, (calls.layer.model, calls.layer.name))

    def generator(self, model: Optional[int]) -> bool:
        """A model that trains in the run, on whose outputs a model of another optimizer is called
        (see Facts.generator): worked out once per model and settling."""
        if model not in self._generators:
            self._generators[model] = model in self.trained and model is not None and self.facts.generator(model)
        return self._generators[model]

    def after_last_step(self, step: int) -> bool:
        """Whether no optimizer step followed ``step`` (steps completed), as far as the log has
        told (all of it once read to its end); False where its events tell no step."""
        told = self.facts.steps
        # A model an optimizer holds has stepped at least once: a log telling no step at all
        # miscounted them, and is not believed.
        return bool(told) and step >= max(told, self.totals[1])

    def model_name(self, model: Optional[int]) -> str:
        info = self.facts.models.get(model)
        return info.name if info is not None else "a model" if model is None else f"model {model}"

    def model_dict(self, model: Optional[int]) -> Optional[dict]:
        info = self.facts.models.get(model)
        return None if info is None else {"name": info.name, "site": _site_dict(info.site)}

    def ema_target(self, model: Optional[int]) -> Optional[tuple]:
        """(how, online model) when ``model`` is an EMA / momentum target: no optimizer steps it and
        it never trains, while another model trains, and either its parameters changed in place
        ("updated") or it is a deep copy of ("copy"), or is like ("likeness": same class, parameter
        count and norm layers) a model that trains. None otherwise: a model run in train mode for
        its predictions (a fixed teacher, an inference script)."""
        facts = self.facts
        if model is None or model in facts.optimized_models or model in self.trained or not self.trained:
            return None  # nothing else trains: inference in train mode
        if model in facts.updated_models:
            if self._lowest_trained is None:  # once per settling, not once per finding
                self._lowest_trained = min(self.trained)
            return ("updated", self._lowest_trained)
        info = facts.models.get(model)
        if info is not None and info.copy_of in self.trained:
            return ("copy", info.copy_of)
        mine = self._likeness(model)
        return None if mine is None else self._trained_alike().get(mine)

    def _likeness(self, model: int) -> Optional[tuple]:
        """What an EMA copy shares with its online model: class, parameter count, norm layers
        (worked out once per model and settling)."""
        if model not in self._likenesses:
            info = self.facts.models.get(model)
            layers = _plain_layers(self.facts.layers.get(model))
            self._likenesses[model] = (None if info is None or info.parameters is None or not layers
                                       else (info.name, info.parameters, layers))
        return self._likenesses[model]

    def _trained_alike(self) -> dict:
        """Likeness -> ("likeness", the lowest trained model id that has it): worked out once per
        settling (see ``settling``), not once per finding, whose number a log chooses."""
        if self._alike is None:
            self._alike = {}
            for other in sorted(self.trained):
                likeness = self._likeness(other)
                if likeness is not None:
                    self._alike.setdefault(likeness, ("likeness", other))
        return self._alike

    def settling(self) -> None:
        """Verdicts are about to be settled: forget what was worked out from an earlier part of
        the log (a live analysis settles again as the log grows)."""
        self._alike = None
        self._likenesses = {}
        self._lowest_trained = None
        self._training_forwards = None
        self._per_line = None
        self._generators = {}
        self._train_mode_rate = None

    def dry_run(self, cause: _Cause) -> bool:
        """A single forward before the first step of a model that trains: materialising lazy
        modules, checking shapes, a library's warm-up call."""
        return cause.last_step == 0 and cause.model in self.trained and max(cause.layers.values(), default=0) <= 1

    def as_often(self, cause: _Cause, model: Optional[int], site: Any, share: int = 2) -> bool:
        """Whether the line of ``cause`` ran its model more than half (1/``share``) as often as
        ``model`` trains: a use in the training loop (an EMA target's every-step forward, a
        generator making fakes for its discriminator under no_grad), not an occasional one (a
        validation, a sample sheet). Counted in forwards of the busiest layer, whatever mode call
        set the layers, so that any number of optimizers (a critic's five steps) counts the same."""
        if self._training_forwards is None:  # once per settling: per model, its busiest layer's
            per_layer: collections.Counter = collections.Counter()  # training forwards, any line
            for (owner, _, name), (forwards,) in self.trained_calls.items():
                per_layer[owner, name] += forwards
            self._training_forwards = {}
            for (owner, _), forwards in per_layer.items():
                if forwards > self._training_forwards.get(owner, 0):
                    self._training_forwards[owner] = forwards
        ran = max((self.line_calls.get((cause.model, site, name), (0,))[0] for name in cause.layers), default=0)
        return share * ran > self._training_forwards.get(model, 0)

    def _lines(self) -> dict:
        """(model id, site) -> training forwards of its busiest layer there (once per settling)."""
        if self._per_line is None:
            self._per_line = {}
            for (model, where, _), (forwards,) in self.trained_calls.items():
                if forwards > self._per_line.get((model, where), 0):
                    self._per_line[model, where] = forwards
        return self._per_line

    def skipped_batches(self, cause: _Cause, site: Any) -> bool:
        """Forwards whose graphs no backward used, at a line where the model trains, never more
        between two steps than that line trains the model in a step on average (one, or the
        micro-batches of gradient accumulation): training batches skipped before their backward
        (a NaN loss)."""
        trained = self._lines().get((cause.model, site))
        if trained is None:  # not a line where the model trains
            return False
        return cause.most_at_one_step <= max(1, round(trained / (self.totals[1] + 1)))  # per step, on average

    def _train_mode_rates(self) -> dict:
        """Per model that ran training forwards in train mode: those of its busiest such line
        (its busiest layer's there), once per settling."""
        if self._train_mode_rate is None:
            lines = self._lines()
            self._train_mode_rate = {}
            for line in self.train_mode_lines:
                forwards = lines.get(line, 0)
                if forwards >= self._train_mode_rate.get(line[0], 0):
                    self._train_mode_rate[line[0]] = forwards
        return self._train_mode_rate

    def trains_in_train_mode(self, model: Optional[int]) -> bool:
        """Whether ``model`` ran a training forward in train mode anywhere in the log."""
        return model in self._train_mode_rates()

    def attack_bursts(self, cause: _Cause, site: Any) -> bool:
        """Training forwards in eval mode at a line where the model never trains in train mode,
        while it does at another, more of them between two steps than that other line trains it
        in a step: an attack's or a saliency method's steps by loss.backward() in the middle of
        training (TRADES), whose gradients on the weights are zeroed before the step, not training
        batches. (A forgotten train() shows at the training line itself, at its own rate.)"""
        model = cause.model
        rates = self._train_mode_rates()
        if (model, site) in self.train_mode_lines or model not in rates:
            return False
        training = rates[model]
        steps = self.totals[1] + 1
        here = max(cause.layers.values(), default=0) / (cause.last_step - cause.first_step + 1)
        return here > max(1, round(training / steps))

    def undecided(self, model: Optional[int]) -> bool:
        """Whether more of the log may still make ``model`` an EMA target."""
        return model is not None and model not in self.facts.optimized_models and model not in self.trained


def _plain_layers(layers: Optional[set]) -> frozenset:
    return frozenset((distributed.plain_name(name), kind) for name, kind in layers or ())


def _settle(cause: _Cause, final: bool) -> Any:
    """The final (rule, severity, recognised) of a cause; None to drop it; ``...`` while more of
    the log could still change it (only when not ``final``: a live analysis). See rules.Rule.settle."""
    if cause.verdict is not _UNSETTLED:
        return cause.verdict
    settle = RULES[cause.rule].settle
    if settle is None or cause.seen is None:
        return cause.rule, cause.severity, None
    return settle(cause, cause.seen, final)


class _OpenLog:
    """What one log adds to a job, kept apart until the log is read to its end: a log found bad
    halfway (mostly damaged) adds nothing."""

    def __init__(self, path: str, rank: Optional[int], index: int, tap: Any, header: Any, facts: Facts,
                 room: list):
        self.path, self.rank, self.index = path, rank, index
        self.room = room  # the job's, for the layer names of findings
        self.causes: dict = {}
        self.timelines = distributed.Timelines()
        self.totals = [0, 0]  # layer calls, the latest step
        self.dropped_causes = 0
        self.seen = _Seen(facts)
        self.seen.totals = self.totals
        self.tap = None if tap is None else tap.start_log(path, header)


class Job:
    """The analysis of one or more logs (a job), fed one record at a time.

    ``analyze()`` feeds it from files; a live watcher (``watch(on_finding=...)``) feeds it the
    same records as it makes them, so that both reach the same findings. ``tap``, if given, is
    fed the same records too, in the same pass (the HTML report's timeline): an object with
    ``start_log(path, header) -> add(calls)``, ``end_log()`` and ``drop_log()``.
    """

    def __init__(self, ignore: Iterable[str] = (), small_batch: int = SMALL_BATCH, tap: Any = None):
        self.ignored = check_rules(ignore)
        self.small_batch = small_batch
        self.tap = tap
        self.causes: dict = {}  # of the logs read to their end
        self.summary = {"logs": 0, "steps": 0, "layer_calls": 0, "skipped_lines": 0,
                        "truncated_logs": [], "unclosed_logs": [], "dropped_causes": 0, "bad_logs": [],
                        "logs_without_models": [], "models": 0}
        self.timelines = distributed.Timelines()
        self.ranks: set = set()
        self.logs: list = []
        self._open: Optional[_OpenLog] = None
        self._room = [MAX_FINDING_LAYERS, MAX_FINDING_TEXT]  # what findings may still keep of layer names

    def start_log(self, path: str, header: Any, facts: Optional[Facts] = None) -> Callable[[Calls], None]:
        """Begin a log; returns the function that takes its records, one at a time. ``facts``
        (the reader's, filled in as it reads) settle the verdicts that wait for the whole log."""
        rank = job_rank(header)
        log = self._open = _OpenLog(path, rank, len(self.logs), self.tap, header,
                                    facts if facts is not None else Facts(), self._room)
        index, small_batch, ignored, causes, seen = log.index, self.small_batch, self.ignored, log.causes, log.seen
        timelines, tap, totals, moved = log.timelines, log.tap, log.totals, log.seen.moved
        fed_by_state: dict = {}  # Calls.state -> (the causes it feeds, its counter): once per state

        def add(calls: Calls) -> None:  # a closure: this runs once per row of every log
            totals[0] += calls.calls
            if calls.last_step > totals[1]:
                totals[1] = calls.last_step
            state = calls.state
            if state is None:  # a log of more states than the reader numbers: keyed by value
                state = calls[:STATE_LENGTH]
            known = fed_by_state.get(state)
            if known is None:
                seen.note_state(calls)
                known = (_causes_for(calls, small_batch, ignored, rank, path, index, causes, log, seen),
                         seen.counter(calls))
                if len(fed_by_state) < MAX_CAUSES:
                    fed_by_state[state] = known
            fed, counted = known
            for cause in fed:
                cause.add(calls, index)
            counted[0] += calls.forwards
            if calls.moved:
                key = (calls.layer.model, calls.layer.name)
                if key in moved or len(moved) < MAX_TABLE:
                    moved[key] += calls.forwards
            if rank is not None:
                timelines.add(calls, rank, index)
            if tap is not None:
                tap(calls)

        return add

    def end_log(self, reader: LogReader) -> None:
        """The log started last was read to its end: what it adds joins the job."""
        log, self._open = self._open, None
        self.logs.append(log.path)
        if log.rank is not None:
            self.ranks.add(log.rank)
        summary = self.summary
        summary["logs"] += 1
        summary["layer_calls"] += log.totals[0]
        summary["steps"] = max(summary["steps"], log.totals[1] if reader.steps is None else reader.steps)
        summary["skipped_lines"] += reader.skipped
        summary["dropped_causes"] += log.dropped_causes
        if reader.truncated:
            summary["truncated_logs"].append(log.path)
        if not reader.ended:
            summary["unclosed_logs"].append(log.path)
        if reader.models == 0:
            summary["logs_without_models"].append(log.path)
        summary["models"] = max(summary["models"], len(reader.facts.models))  # in one log, at most
        log.seen.settling()
        for cause in log.causes.values():
            cause.freeze()
        for key, cause in log.causes.items():
            if key in self.causes:
                self.causes[key].absorb(cause)
            elif len(self.causes) < MAX_CAUSES:
                self.causes[key] = cause
            else:
                summary["dropped_causes"] += 1
        self.timelines.absorb(log.timelines)
        if self.tap is not None:
            self.tap.end_log()

    def drop_log(self, error: LogFormatError) -> None:
        """The log started last (if any) turned out bad: nothing of it stays; it is named in
        ``summary["bad_logs"]``."""
        log, self._open = self._open, None
        if log is not None and self.tap is not None:
            self.tap.drop_log()
        self.summary["bad_logs"].append(error.message)

    def _all_causes(self) -> dict:
        """The causes of the logs read so far, and of the log being read (a live analysis)."""
        if self._open is None or not self._open.causes:
            return self.causes
        causes = dict(self.causes)
        for key, cause in self._open.causes.items():
            if key in causes:
                causes[key] = causes[key].copy()
                causes[key].absorb(cause)
            else:
                causes[key] = cause
        return causes

    def settled(self, final: bool = True) -> list:
        """The causes with their verdicts settled on the whole of each log, merged where several
        settle into one finding (the BatchNorm and Dropout layers of one EMA target, the layers of
        one frozen backbone)."""
        groups: dict = {}
        causes = self._all_causes()
        for seen in {id(cause.seen): cause.seen for cause in causes.values() if cause.seen is not None}.values():
            seen.settling()
        for key, cause in causes.items():
            verdict = _settle(cause, final)
            if verdict is None or verdict is ...:
                continue
            rule, severity, recognised = verdict
            _, _, mode, rank, log, call, model, detail = key
            how = detail[1] if rule == "stat-update-in-frozen" else None
            groups.setdefault((rule, severity, mode, rank, log, call, model, recognised, how), []).append(cause)
        settled = []
        for (rule, severity, *_, recognised, how), members in groups.items():
            first = members[0]
            if len(members) == 1 and (first.rule, first.severity, first.recognised) == (rule, severity, recognised):
                settled.append(first)
                continue
            merged = first.copy()
            merged.rule, merged.severity, merged.recognised, merged.detail = rule, severity, recognised, (None, how)
            for member in members[1:]:
                merged.absorb(member)
            settled.append(merged)
        return settled

    def findings(self, final: bool = True) -> list:
        """The findings so far, most severe first. Not ``final`` (a live analysis, the log still
        growing): verdicts that more of the log could still change are left out."""
        rule_order = list(RULES)
        ordered = sorted(self.settled(final),
                         key=lambda c: (-severity_rank(c.severity), c.first_forward, rule_order.index(c.rule)))
        findings = [cause.finding(self.small_batch) for cause in ordered]
        findings = [group[0] if len(group) == 1 else _on_every_rank(group)
                    for group in distributed.same_on_every_rank(findings, self.ranks)]
        if "rank-mode-mismatch" not in self.ignored:
            findings[0:0] = [_mismatch_finding(m) for m in distributed.mismatches(self.timelines)]
        return findings

    def result(self) -> Analysis:
        findings = self.findings()
        summary = self.summary
        summary["ranks"] = sorted(self.ranks)
        if self.timelines.dropped:
            summary["ranks_not_compared"] = sorted(self.timelines.dropped)
        if self.timelines.dropped_unnamed:
            summary["ranks_not_compared_more"] = self.timelines.dropped_unnamed
        summary["findings"] = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
        return Analysis(findings=findings, logs=list(self.logs), summary=summary)


def _on_every_rank(group: list) -> Finding:
    """One finding for the same finding on every rank of a job (``ranks`` lists them)."""
    first = group[0]
    summary = f"{first.summary[:-1]}, on all {len(group)} ranks."
    return first._replace(
        rank=None, ranks=sorted(f.rank for f in group), count=sum(f.count for f in group),
        first_step=min(f.first_step for f in group), last_step=max(f.last_step for f in group),
        layers=[distributed.plain_name(name) for name in first.layers], batches=max(f.batches for f in group),
        log=None, summary=summary, message=first.message.replace(first.summary, summary, 1))


def _mismatch_finding(mismatch: Any) -> Finding:
    rule = RULES["rank-mode-mismatch"]
    summary = rule.summary.format(rank=mismatch.rank, layers=layers_text(mismatch.layers)[3:],
                                  first=mismatch.first, last=mismatch.last)
    return Finding(
        rule=rule.id, severity=rule.severity, message=f"{summary} {_why(mismatch.mode, rule.id)} on rank {mismatch.rank}.",
        layers=mismatch.layers, count=mismatch.count, first_step=mismatch.first, last_step=mismatch.last,
        rank=mismatch.rank, forward_site=_site_dict(mismatch.site), mode_site=_mode_dict(mismatch.mode),
        fix=rule.fix, batches=mismatch.batches, cause=_headline(mismatch.mode, rule.id), summary=summary)


def analyze(*paths: Any, ignore: Iterable[str] = (), small_batch: int = SMALL_BATCH,
            progress: Optional[Any] = None, tap: Any = None) -> Analysis:
    """Analyze saved logs (files, or directories of `*.jsonl` logs) and return the findings.

    `ignore`: rule ids not to report. `small_batch`: the sample count under which
    `bn-small-batch` fires. `progress(path, bytes_read)`, if given, is called now and then
    during a long analysis. Each log is read once.

    Raises LogFormatError for a file named in `paths` that is missing, unreadable, not a regular
    file or a pipe, foreign, or mostly damaged. A bad log found in a directory does not stop
    the others: it is left out, and its error (one line naming it) is in
    `summary["bad_logs"]`; `modewatch analyze` then exits 2 after reporting the rest.
    """
    if not paths:
        raise TypeError("modewatch.analyze() needs at least one log path")
    job = Job(ignore, small_batch, tap)
    for path, named in expand_paths(list(paths)):
        reader = LogReader(path, named=named)  # a FIFO or a system file in a folder is not a log
        try:
            records = iter(reader)
            add = job.start_log(path, next(records), reader.facts)
            if progress is None:
                for calls in records:
                    add(calls)
            else:
                for rows, calls in enumerate(records, 1):
                    if not rows % 4096:
                        progress(path, reader.bytes_read)
                    add(calls)
        except LogFormatError as error:
            if named:
                raise
            job.drop_log(error)
            continue
        job.end_log(reader)
    return job.result()
