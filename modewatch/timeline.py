"""What each watched layer did over the optimizer steps: the data of the HTML report's timeline.

Format-free, like the analysis: records in, spans out. Spans of one state are merged as they come
and each layer keeps a bounded number of them, so that a run of any length makes a small report.
Imports no torch.
"""

from __future__ import annotations

import os
from typing import Any

from . import logfile
from .analysis import SMALL_BATCH, rules_for

MAX_LAYERS = 200  # rows drawn; more are counted and left out
MAX_SPANS = 2000  # per layer; past it, neighbouring spans are merged (the worst state wins)

# A call's state, in increasing order of how much it must show.
TRAIN, EVAL, INFO, BAD = "train", "eval", "info", "bad"
RANK = {TRAIN: 0, EVAL: 0, INFO: 1, BAD: 2}
STATE_NAMES = {
    TRAIN: "training forward, train mode",
    EVAL: "evaluation forward, eval mode",
    INFO: "worth a look (info or warning)",
    BAD: "wrong mode (an error finding)",
}


def state_of(calls: logfile.Calls) -> str:
    """How a run of calls is drawn: in the right mode, or what kind of finding it makes."""
    severities = {severity for rule, severity in rules_for(calls, SMALL_BATCH) if rule not in calls.context.allow}
    if "error" in severities:
        return BAD
    if severities:
        return INFO
    return TRAIN if calls.forward_kind == logfile.PARAM_GRAD else EVAL


class Timeline:
    """Per (log, layer): [first_step, last_step, state] spans, merged and bounded."""

    def __init__(self) -> None:
        self.layers: dict = {}
        self.dropped_layers = 0
        self.last_step = 0

    def add(self, label: str, calls: logfile.Calls) -> None:
        key = (label, calls.layer.name)
        spans = self.layers.get(key)
        if spans is None:
            if len(self.layers) >= MAX_LAYERS:
                self.dropped_layers += 1
                return
            spans = self.layers[key] = []
        state = state_of(calls)
        self.last_step = max(self.last_step, calls.last_step)
        last = spans[-1] if spans else None
        if last is not None and last[2] == state and calls.first_step <= last[1] + 1:
            last[1] = max(last[1], calls.last_step)
            return
        spans.append([calls.first_step, calls.last_step, state])
        if len(spans) > MAX_SPANS:
            spans[:] = _coarsen(spans)


def _coarsen(spans: list) -> list:
    """Halve the number of spans: merge neighbours, keeping the state that must show most."""
    merged = []
    for i in range(0, len(spans), 2):
        pair = spans[i:i + 2]
        state = max((s[2] for s in pair), key=RANK.__getitem__)
        merged.append([pair[0][0], pair[-1][1], state])
    return merged


def collect(paths: Any) -> Timeline:
    """The timeline of the logs (files or directories), one row per layer of each log."""
    timeline = Timeline()
    files = logfile.expand_paths(list(paths))
    for path in files:
        reader = logfile.LogReader(path)
        records = iter(reader)
        header = next(records)
        rank = logfile.job_rank(header)
        label = f"rank {rank}" if rank is not None else (os.path.basename(path) if len(files) > 1 else "")
        for calls in records:
            timeline.add(label, calls)
    return timeline
