"""A distributed job seen as a whole: findings merged across ranks, and rank-mode-mismatch.

Each rank writes its own log; the analysis reads them one after the other. What it keeps of
each rank for the cross-rank rule is, per layer, the step ranges of its training forwards in
each mode, merged as they come: memory grows with mode changes, never with steps, and is capped.
Imports no torch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from .logfile import PARAM_GRAD, Calls

MAX_SPANS = 4096  # per rank, layer and mode; past it that layer is no longer compared
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A layer's name without wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``),
    so that ranks that wrapped the model differently still compare."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


class _Span:
    """Consecutive training steps of one rank in which a layer ran in one mode."""

    __slots__ = ("first", "last", "calls", "forwards", "site", "mode", "order")

    def __init__(self, calls: Calls, order: tuple):
        self.first, self.last, self.calls, self.forwards = calls.first_step, calls.last_step, calls.calls, calls.forwards
        self.site, self.mode, self.order = calls.site, calls.mode, order


class Timelines:
    """Per layer and rank, the spans of training steps in train mode and in eval mode."""

    def __init__(self) -> None:
        self.spans: dict = {}  # (plain layer name, rank, training) -> [_Span]
        self.dropped: set = set()  # plain layer names no longer compared (too many mode changes)

    def add(self, calls: Calls, rank: Optional[int], log_index: int) -> None:
        if rank is None or calls.forward_kind != PARAM_GRAD:
            return
        name = plain_name(calls.layer.name)
        if name in self.dropped:
            return
        spans = self.spans.setdefault((name, rank, calls.training), [])
        last = spans[-1] if spans else None
        if last is not None and calls.first_step <= last.last + 1 and calls.last_step >= last.first - 1:
            last.first, last.last = min(last.first, calls.first_step), max(last.last, calls.last_step)
            last.calls += calls.calls
            last.forwards += calls.forwards
        elif len(spans) >= MAX_SPANS:
            self.dropped.add(name)
        else:
            spans.append(_Span(calls, (log_index, calls.first_step, calls.first_forward)))

    def mismatches(self) -> list:
        """(rank, layer, span in eval mode, overlapping steps) wherever a rank trained a layer in
        eval mode at steps where another rank trained it in train mode."""
        found = []
        names = {name for name, _, _ in self.spans} - self.dropped
        for name in sorted(names):
            ranks = sorted({rank for n, rank, _ in self.spans if n == name})
            for rank in ranks:
                for span in self.spans.get((name, rank, False), []):
                    overlap = None
                    for other in ranks:
                        if other == rank:
                            continue
                        for train in self.spans.get((name, other, True), []):
                            first, last = max(span.first, train.first), min(span.last, train.last)
                            if first <= last:
                                overlap = (first, last) if overlap is None else (
                                    min(overlap[0], first), max(overlap[1], last))
                    if overlap is not None:
                        found.append((rank, name, span, overlap))
        return found


def mismatch_findings(timelines: Timelines, finding: Any, site_dict: Any, mode_dict: Any, why: Any,
                      headline: Any) -> list:
    """rank-mode-mismatch findings, one per rank and mode call that caused it. The callables
    make the Finding and its words, as the analysis makes them for the other rules."""
    grouped: dict = {}
    for rank, name, span, (first, last) in timelines.mismatches():
        key = (rank, span.mode)
        entry = grouped.setdefault(key, {"layers": [], "count": 0, "first": first, "last": last,
                                         "order": span.order, "site": span.site, "batches": {}})
        if name not in entry["layers"]:
            entry["layers"].append(name)
        entry["count"] += span.calls
        entry["batches"][name] = entry["batches"].get(name, 0) + span.forwards
        entry["first"], entry["last"] = min(entry["first"], first), max(entry["last"], last)
        if span.order < entry["order"]:
            entry["order"], entry["site"] = span.order, span.site
    findings = []
    for (rank, mode), entry in sorted(grouped.items(), key=lambda item: item[1]["order"]):
        layers = ", ".join(entry["layers"][:6]) + (", ..." if len(entry["layers"]) > 6 else "")
        layers = f"layer {layers}" if len(entry["layers"]) == 1 else f"layers {layers}"
        summary = (f"Rank {rank} trained {layers} in eval mode at steps {entry['first']}-{entry['last']}, "
                   f"while other ranks trained them in train mode.")
        findings.append(finding(
            rule="rank-mode-mismatch", severity="error", message=f"{summary} {why(mode)} on rank {rank}.",
            layers=entry["layers"], count=entry["count"], first_step=entry["first"], last_step=entry["last"],
            rank=rank, forward_site=site_dict(entry["site"]), mode_site=mode_dict(mode), summary=summary,
            cause=headline(mode), batches=max(entry["batches"].values()),
        ))
    return findings


def merge_across_ranks(findings: list, ranks: set) -> list:
    """Findings that are the same on every rank of the job become one, with ``ranks`` listing
    them; a finding on some ranks only stays per rank."""
    if len(ranks) < 2:
        return findings
    groups: dict = {}
    for finding in findings:
        if finding.rank is None:
            groups[id(finding)] = [finding]
            continue
        key = (finding.rule, finding.severity, _site_key(finding.mode_site), _site_key(finding.forward_site),
               tuple(sorted(plain_name(name) for name in finding.layers)))
        groups.setdefault(key, []).append(finding)
    merged = []
    for group in groups.values():
        if len(group) > 1 and {f.rank for f in group} == ranks:
            first = group[0]
            merged.append(replace(
                first, rank=None, ranks=sorted(f.rank for f in group), count=sum(f.count for f in group),
                first_step=min(f.first_step for f in group), last_step=max(f.last_step for f in group),
                layers=[plain_name(name) for name in first.layers],
                batches=max(f.batches for f in group), log=None,
                message=first.message.replace(first.summary, first.summary + f" (on all {len(group)} ranks)"),
            ))
        else:
            merged.extend(group)
    return merged


def _site_key(site: Optional[dict]) -> Optional[tuple]:
    return None if site is None else tuple(sorted(site.items()))
