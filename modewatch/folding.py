"""Folding resolved forwards into rows: the log grows with changes, not with steps.

Consecutive forwards of the same kind, call site and context that made exactly the same layer
calls become one *run* (counts and a step range); when a different forward breaks it, the run
becomes one row per distinct layer call (``format.row``). Steady training compares one list per
step and writes nothing. Torch-free: calls are plain tuples (``format.CALL_FIELDS``).
"""

from __future__ import annotations

import collections

from .format import GRAPH_UNUSED, row


class Run:
    """Consecutive forwards of one kind, site and context that made exactly the same calls.
    Forwards are resolved roughly, not strictly, in order (a late backward): the steps and the
    first forward are a minimum and a maximum (kept by Folder.add)."""

    __slots__ = ("calls", "first_step", "last_step", "first_forward", "forwards")

    def __init__(self, calls: list, step: int, seq: int):
        self.calls = calls
        self.first_step = self.last_step = step
        self.first_forward = seq
        self.forwards = 1

    def rows(self, key: tuple) -> list:
        """The log rows of this run: one per distinct layer call of its forwards."""
        kind, site, context = key
        return [row(call, kind, site, context, self.first_step, self.last_step, self.first_forward, self.forwards,
                    self.forwards * times)
                for call, times in collections.Counter(self.calls).items()]


class Folder:
    """The open run of each (kind, site, context), and the rows of the runs that have ended."""

    def __init__(self, fold: bool = True):
        self.fold = fold  # False: every forward is a run of its own (the unfolded record, for tests)
        self.runs: dict = {}  # (kind, site, context) -> Run
        self.rows: list = []  # rows of ended runs, not yet taken

    def add(self, key: tuple, calls: list, step: int, seq: int) -> None:
        """One resolved forward, keyed by (kind, site, context)."""
        run = self.runs.get(key)
        # Forwards whose graphs no backward used are not folded across steps: the analysis tells
        # a training batch skipped before its backward (one between two steps) from evaluation.
        if (run is not None and self.fold and run.calls == calls
                and (step == run.last_step or key[0] != GRAPH_UNUSED)):  # steady training: Run.add, inline
            if step < run.first_step:
                run.first_step = step
            elif step > run.last_step:
                run.last_step = step
            if seq < run.first_forward:
                run.first_forward = seq
            run.forwards += 1
            return
        if run is not None:
            self.rows.extend(run.rows(key))
        self.runs[key] = Run(calls, step, seq)

    def end_runs(self) -> None:
        """End every open run (a flush: what is written must be complete)."""
        for key, run in self.runs.items():
            self.rows.extend(run.rows(key))
        self.runs.clear()

    def take(self) -> list:
        rows, self.rows = self.rows, []
        return rows

    def clear(self) -> None:
        self.runs.clear()
        self.rows = []


def forward_rows(key: tuple, calls: list, step: int, seq: int) -> list:
    """The rows of one forward alone (what a live analysis is fed)."""
    return Run(calls, step, seq).rows(key)

