"""What each watched layer did over the optimizer steps: the data of the HTML report's timeline.

Format-free, like the analysis: records in, spans out. Spans of one state are merged as they come
and each layer keeps a bounded number of them, so that a run of any length makes a small report.
Imports no torch.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing is for annotations only: the CLI starts without importing it
if TYPE_CHECKING:
    from typing import Callable, Optional

from .format import PARAM_GRAD
from .reader import Calls, Header, add_bounded, job_rank
from .analysis import SMALL_BATCH
from .rules import rules_for

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


def state_of(calls: Calls) -> str:
    """How a run of calls is drawn: in the right mode, or what kind of finding it makes."""
    severities = {severity for rule, severity in rules_for(calls, SMALL_BATCH) if rule not in calls.context.allow}
    if "error" in severities:
        return BAD
    if severities:
        return INFO
    return TRAIN if calls.forward_kind == PARAM_GRAD else EVAL


class Timeline:
    """Per (log, layer): [first_step, last_step, state] spans, merged and bounded.

    Fed by the analysis in its one pass over the logs (``analyze(..., tap=timeline)``): a log's
    rows are kept apart until the log is read to its end, and dropped if it turns out bad.
    Rows are keyed by their label: ``rank N`` in a distributed job, else the log's name, shown
    only where several logs are drawn (``label``).
    """

    def __init__(self) -> None:
        self.layers: dict = {}  # (rank, or the log's path; layer name) -> spans
        self.dropped_layers = 0
        self.last_step = 0
        self._open: dict = {}  # the same, for the log being read
        self._refused: set = set()  # its layers past MAX_LAYERS
        self._open_last_step = 0

    def start_log(self, path: str, header: Header) -> Callable[[Calls], None]:
        rank = job_rank(header)
        owner = f"rank {rank}" if rank is not None else path
        self.drop_log()
        return lambda calls: self._add(owner, calls)

    def end_log(self) -> None:
        self.last_step = max(self.last_step, self._open_last_step)
        self.dropped_layers += len(self._refused)
        for key, spans in self._open.items():
            kept = self.layers.get(key)
            if kept is not None:  # the same rank in another log: its spans follow on
                for span in spans:
                    _extend(kept, *span)
            elif len(self.layers) < MAX_LAYERS:
                self.layers[key] = spans
            else:
                self.dropped_layers += 1
        self.drop_log()

    def drop_log(self) -> None:
        self._open, self._refused, self._open_last_step = {}, set(), 0

    def _add(self, owner: str, calls: Calls) -> None:
        key = (owner, calls.layer.name)
        spans = self._open.get(key)
        if spans is None:
            if len(self._open) >= MAX_LAYERS:
                add_bounded(self._refused, key)  # counted, up to MAX_TABLE
                return
            spans = self._open[key] = []
        self._open_last_step = max(self._open_last_step, calls.last_step)
        _extend(spans, calls.first_step, calls.last_step, state_of(calls))

    def rows(self, logs: int, erring: Optional[set] = None) -> list:
        """(label, spans) per layer row; a row's label names its rank, or its log when several
        separate runs are drawn. ``erring``: the layer names of the error findings. Spans are
        drawn from each run of calls alone, before the verdicts that wait for the whole log (an
        EMA target, a skipped batch, a dry run): a layer in no error finding is drawn as worth a
        look there, never as wrong."""
        rows = []
        for (owner, name), spans in self.layers.items():
            label = owner if owner.startswith("rank ") else (os.path.basename(owner) if logs > 1 else "")
            if erring is not None and name not in erring:
                spans = [[first, last, INFO if state == BAD else state] for first, last, state in spans]
            rows.append((f"{label}: {name}" if label else name, spans))
        return rows


def _extend(spans: list, first: int, last: int, state: str) -> None:
    """Add a span of one state: it extends the last one where it continues it, and past
    MAX_SPANS neighbours are merged."""
    previous = spans[-1] if spans else None
    if previous is not None and previous[2] == state and first <= previous[1] + 1:
        previous[1] = max(previous[1], last)
        return
    spans.append([first, last, state])
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
