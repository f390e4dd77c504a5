"""A distributed job seen as a whole: findings merged across ranks, and rank-mode-mismatch.

Each rank writes its own log; the analysis reads them one after the other. What it keeps of
each rank for the cross-rank rule is, per layer, the step ranges of its training forwards in
each mode, merged as they come: memory grows with mode changes, never with steps, and is capped.
The comparison is a sweep over the sorted span boundaries of all ranks at once, so its time is
O(n log n) in the spans kept, whatever the number of ranks. Imports no torch.
"""

from __future__ import annotations

import collections
from array import array
from bisect import bisect_right

TYPE_CHECKING = False  # typing is for annotations only: the CLI starts without importing it
if TYPE_CHECKING:
    from typing import Any, Optional

from .format import PARAM_GRAD
from .reader import Calls

MAX_SPANS = 4096  # per rank, layer and mode; past it that layer is no longer compared
MAX_TOTAL_SPANS = 1 << 21  # in all (about 200 MB at most); past it, layers that need more are dropped
MAX_COMPARED_LAYERS = 10_000  # distinct layer names compared; later ones are not
MAX_NAMED_DROPPED = 1_000  # layers not compared that the summary names (the others are counted)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A layer's name without wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``),
    so that ranks that wrapped the model differently still compare."""
    start, stripped = 0, True
    while stripped:  # one slice at the end: a name of many prefixes costs its length, not its square
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix, start):
                start, stripped = start + len(prefix), True
    return name[start:]


class _Span:
    """Consecutive training steps of one rank in which a layer ran in eval mode: what a finding
    needs of them. (Spans in train mode are kept as bare step pairs.)"""

    __slots__ = ("first", "last", "calls", "forwards", "site", "mode", "log", "step", "forward")

    def __init__(self, calls: Calls, log_index: int):
        self.first, self.last, self.calls, self.forwards = calls.first_step, calls.last_step, calls.calls, calls.forwards
        self.site, self.mode = calls.site, calls.mode
        self.log, self.step, self.forward = log_index, calls.first_step, calls.first_forward

    @property
    def order(self) -> tuple:
        """Where the span began: which log, step and forward (earliest first)."""
        return self.log, self.step, self.forward


class _Layer:
    """One layer's spans on every rank: ``train[rank]`` a flat array of (first, last) step pairs,
    ``eval[rank]`` a list of _Span."""

    __slots__ = ("train", "eval", "size")

    def __init__(self) -> None:
        self.train: dict = {}
        self.eval: dict = {}
        self.size = 0  # spans kept, of both modes


class Timelines:
    """Per layer and rank, the spans of training steps in train mode and in eval mode."""

    def __init__(self) -> None:
        self.layers: dict = {}  # plain layer name -> _Layer
        self.dropped: set = set()  # plain layer names no longer compared (too many mode changes)
        self.dropped_unnamed = 0  # more of them, past MAX_NAMED_DROPPED
        self.size = 0  # spans kept in all

    def add(self, calls: Calls, rank: Optional[int], log_index: int) -> None:
        if rank is None or calls.forward_kind != PARAM_GRAD:
            return
        name = plain_name(calls.layer.name)
        if calls.training:
            self._train(name, rank, calls.first_step, calls.last_step)
            return
        spans = self._eval(name, rank, calls.first_step, calls.last_step, calls.calls, calls.forwards)
        if spans is not None:
            spans.append(_Span(calls, log_index))

    def absorb(self, other: "Timelines") -> None:
        """Add the spans of ``other`` (those of one more log), as its rows would have been: only
        its first span of each list can extend the last one here; the others stay as they are."""
        for name in other.dropped:
            self._drop(name)
        self.dropped_unnamed += other.dropped_unnamed
        for name, layer in other.layers.items():
            for rank, pairs in layer.train.items():
                for i in range(0, len(pairs), 2):
                    self._train(name, rank, pairs[i], pairs[i + 1], join=not i)
            for rank, spans in layer.eval.items():
                for i, span in enumerate(spans):
                    kept = self._eval(name, rank, span.first, span.last, span.calls, span.forwards, join=not i)
                    if kept is not None:
                        kept.append(span)

    def _layer(self, name: str) -> Optional[_Layer]:
        if name in self.dropped:
            return None
        layer = self.layers.get(name)
        if layer is None:
            if len(self.layers) >= MAX_COMPARED_LAYERS:
                self._drop(name)
                return None
            layer = self.layers[name] = _Layer()
        return layer

    def _drop(self, name: str) -> None:
        """No longer compare layer ``name``: its spans go, and it is named in the summary (or
        counted, past MAX_NAMED_DROPPED names)."""
        layer = self.layers.pop(name, None)
        if layer is not None:
            self.size -= layer.size
        if name in self.dropped:
            return
        if len(self.dropped) < MAX_NAMED_DROPPED:
            self.dropped.add(name)
        else:
            self.dropped_unnamed += 1

    def _train(self, name: str, rank: int, first: int, last: int, join: bool = True) -> None:
        layer = self._layer(name)
        if layer is None:
            return
        pairs = layer.train.get(rank)
        if pairs is None:
            pairs = layer.train[rank] = array("q")
        if join and pairs and first <= pairs[-1] + 1 and last >= pairs[-2] - 1:  # extends the last span
            pairs[-2], pairs[-1] = min(pairs[-2], first), max(pairs[-1], last)
        elif self._room(name, layer, len(pairs) // 2):
            pairs.append(first)
            pairs.append(last)

    def _eval(self, name: str, rank: int, first: int, last: int, calls: int, forwards: int,
              join: bool = True) -> Optional[list]:
        """Extend the rank's last span in eval mode (if ``join``); or return the list a new one
        goes in (None: no room, or the layer is no longer compared)."""
        layer = self._layer(name)
        if layer is None:
            return None
        spans = layer.eval.setdefault(rank, [])
        span = spans[-1] if spans and join else None
        if span is not None and first <= span.last + 1 and last >= span.first - 1:
            span.first, span.last = min(span.first, first), max(span.last, last)
            span.calls += calls
            span.forwards += forwards
            return None
        return spans if self._room(name, layer, len(spans)) else None

    def _room(self, name: str, layer: _Layer, kept: int) -> bool:
        """Whether one more span fits; if not, the layer is dropped from the comparison."""
        if kept < MAX_SPANS and self.size < MAX_TOTAL_SPANS:
            layer.size += 1
            self.size += 1
            return True
        self._drop(name)
        return False

    def mismatches(self) -> list:
        """(rank, layer, span in eval mode, overlapping steps) wherever a rank trained a layer in
        eval mode at steps where another rank trained it in train mode."""
        found = []
        for name in sorted(self.layers):
            layer = self.layers[name]
            cover = _Cover(layer.train)
            for rank in sorted(layer.eval):
                for span in layer.eval[rank]:
                    overlap = cover.overlap(span.first, span.last, rank)
                    if overlap is not None:
                        found.append((rank, name, span, overlap))
        return found


class _Cover:
    """Which steps some rank trained a layer in train mode, as sorted segments of the step axis,
    each with the number of ranks that did and, where that is one, which. Answers "the first and
    last step of [a, b] trained in train mode by a rank other than r" in O(log n)."""

    def __init__(self, train: dict):
        events = []
        for rank, pairs in train.items():
            for first, last in _union(pairs):  # a rank counts once where its own spans overlap
                events.append((first, 1, rank))
                events.append((last + 1, -1, rank))
        events.sort()
        self.starts: list = []
        self.counts: list = []
        self.sole: list = []  # the rank, where one alone covers the segment
        count = total = 0
        for i, (step, delta, rank) in enumerate(events):
            count += delta
            total += delta * rank  # the sum of the covering ranks: the rank itself when one covers
            if i + 1 == len(events) or events[i + 1][0] != step:
                self.starts.append(step)
                self.counts.append(count)
                self.sole.append(total if count == 1 else None)
        size = len(self.starts)
        none = size  # "no such segment"
        # For each segment, the next (and the previous) segment covered by two ranks or more, by
        # exactly one, and, from a segment covered by one, the next one covered by another one.
        self.next_many, self.next_one, self.next_other = [none] * (size + 1), [none] * (size + 1), [none] * size
        self.prev_many, self.prev_one, self.prev_other = [-1] * size, [-1] * size, [-1] * size
        for i in range(size - 1, -1, -1):
            self.next_many[i] = i if self.counts[i] >= 2 else self.next_many[i + 1]
            self.next_one[i] = i if self.counts[i] == 1 else self.next_one[i + 1]
            j = self.next_one[i + 1]
            if self.counts[i] == 1 and j < size:
                self.next_other[i] = j if self.sole[j] != self.sole[i] else self.next_other[j]
        for i in range(size):
            before = i - 1
            self.prev_many[i] = i if self.counts[i] >= 2 else (self.prev_many[before] if i else -1)
            self.prev_one[i] = i if self.counts[i] == 1 else (self.prev_one[before] if i else -1)
            j = self.prev_one[before] if i else -1
            if self.counts[i] == 1 and j >= 0:
                self.prev_other[i] = j if self.sole[j] != self.sole[i] else self.prev_other[j]

    def _next(self, i: int, rank: int) -> int:
        """The first segment from i on covered by a rank other than ``rank``."""
        one = self.next_one[i]
        if one < len(self.starts) and self.sole[one] == rank:
            one = self.next_other[one]
        return min(self.next_many[i], one)

    def _prev(self, i: int, rank: int) -> int:
        """The last segment up to i covered by a rank other than ``rank``."""
        one = self.prev_one[i]
        if one >= 0 and self.sole[one] == rank:
            one = self.prev_other[one]
        return max(self.prev_many[i], one)

    def overlap(self, first: int, last: int, rank: int) -> Optional[tuple]:
        """The first and last step in [first, last] at which another rank trained in train mode."""
        starts = self.starts
        i = self._next(max(bisect_right(starts, first) - 1, 0), rank)
        if i >= len(starts) or starts[i] > last:
            return None
        j = self._prev(bisect_right(starts, last) - 1, rank)  # j >= i: segment i qualifies
        end = starts[j + 1] - 1  # a covered segment always has a next boundary, where it ends
        return max(first, starts[i]), min(last, end)


def _union(pairs: Any) -> list:
    """The (first, last) pairs of a flat array, sorted and merged where they overlap or touch."""
    spans = sorted(zip(pairs[0::2], pairs[1::2]))
    merged: list = []
    for first, last in spans:
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1][1] = last
        else:
            merged.append([first, last])
    return merged


Mismatch = collections.namedtuple("Mismatch", "rank mode layers count first last site order batches")
Mismatch.__doc__ = """The steps at which one rank trained layers in eval mode, set by one mode call (`mode`: a
ModeSet, None for no call), while other ranks trained them in train mode: the data of one rank-mode-mismatch finding.
`layers`: plain names, in order of first mismatch; `count`: layer calls; `first`, `last`: the first and last step in
which the modes differed; `site`: the line that called the model, first time; `order`: where in the job it first
happened; `batches`: forwards of the layer that saw most."""


def mismatches(timelines: Timelines) -> list:
    """The rank-mode-mismatches of a job, one per rank and mode call that caused it, in order."""
    grouped: dict = {}
    for rank, name, span, (first, last) in timelines.mismatches():
        key = (rank, span.mode)
        entry = grouped.setdefault(key, {"count": 0, "first": first, "last": last,
                                         "order": span.order, "site": span.site, "batches": {}})
        entry["count"] += span.calls
        entry["batches"][name] = entry["batches"].get(name, 0) + span.forwards
        entry["first"], entry["last"] = min(entry["first"], first), max(entry["last"], last)
        if span.order < entry["order"]:
            entry["order"], entry["site"] = span.order, span.site
    return [Mismatch(rank, mode, list(entry["batches"]), entry["count"], entry["first"], entry["last"], entry["site"],
                     entry["order"], max(entry["batches"].values()))
            for (rank, mode), entry in sorted(grouped.items(), key=lambda item: item[1]["order"])]


def same_on_every_rank(findings: list, ranks: set) -> list:
    """The findings in groups: a group of several is one finding the same on every rank of the
    job (same rule, severity, mode call, calling line and layers); a finding on some ranks only,
    or of a single process, is a group of its own."""
    if len(ranks) < 2:
        return [[finding] for finding in findings]
    groups: dict = {}
    for finding in findings:
        if finding.rank is None:
            groups[id(finding)] = [finding]
            continue
        key = (finding.rule, finding.severity, _site_key(finding.mode_site), _site_key(finding.forward_site),
               tuple(sorted(plain_name(name) for name in finding.layers)))
        groups.setdefault(key, []).append(finding)
    found = []
    for group in groups.values():
        if len(group) > 1 and {f.rank for f in group} == ranks:
            found.append(group)
        else:
            found.extend([finding] for finding in group)
    return found


def _site_key(site: Optional[dict]) -> Optional[tuple]:
    return None if site is None else tuple(sorted(site.items()))
