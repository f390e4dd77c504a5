"""Reading logs written by anyone: damaged, hostile or huge logs never crash the analyzer."""

import json
import tracemalloc

import pytest

import modewatch
from modewatch import format as logformat, reader
from helpers import DEFINITIONS, HEADER, row, write

def test_a_hand_written_log_gives_the_contract_finding(tmp_path):
    """The format documented in docs/ is enough to write a log the analyzer understands."""
    log = write(tmp_path / "a.jsonl", [HEADER, *DEFINITIONS, {"event": "calls", "step": 3, "rows": [row(1, 149, 100)]}])
    (finding,) = modewatch.analyze(log).findings
    assert finding.as_dict() | {"message": "", "fix": ""} == {
        "rule": "train-without-dropout", "severity": "error", "message": "", "layers": ["drop"], "count": 100,
        "first_step": 1, "last_step": 149, "rank": None,
        "forward_site": {"file": "train.py", "line": 20, "function": "train"},
        "mode_site": {"file": "train.py", "line": 29, "function": "test", "call": "eval"},
        "fix": "", "batches": 100, "ranks": None, "log": log, "model": None,
    }


@pytest.mark.parametrize("junk", [
    b"not json\n",
    b"[1, 2, 3]\n",
    b'{"event": "calls", "rows": [[0, 3, 2, null, 0.5, 0, 0, 0, 5, 1, 1, 1, 1]]}\n',  # last < first
    b'{"event": "calls", "rows": [[99, 3, 2, null, 0.5, 0, 0, 0, 1, 1, 1, 1, 1]]}\n',  # unknown layer
    b'{"event": "calls", "rows": [["0", 3, 2, null, 0.5, 0, 0, 0, 1, 1, 1, 1, 1]]}\n',  # wrong type
    b'{"event": "calls", "rows": [[0, 3, 2, null, 1e999, 0, 0, 0, 1, 1, 1, 1, 1]]}\n',  # infinity
    b'{"event": "layer", "id": -1, "name": "x", "kind": "x", "category": "norm", "model": 0}\n',
    b'{"event": "mode", "id": 5, "site": 77, "call": "eval", "mode": false, "target": "", "scope": "model"}\n',
    b"[" * 100_000 + b"\n",  # nesting bomb
    b'{"event": "modewatch", "schema": 1}\n',  # a second header
])
def test_damaged_lines_are_skipped_and_counted(tmp_path, junk):
    """Every kind of damaged line is skipped and counted; the good rows are still analyzed."""
    log = write(tmp_path / "a.jsonl", [HEADER, *DEFINITIONS], junk + json.dumps(
        {"event": "calls", "step": 1, "rows": [row(0, 0)]}).encode() + b"\n")
    analysis = modewatch.analyze(log)
    assert analysis.summary["skipped_lines"] == 1
    assert [f.rule for f in analysis.findings] == ["train-without-dropout"]


def test_an_overlong_line_is_skipped_without_being_held(tmp_path, monkeypatch):
    """A line longer than the limit is skipped; the rest of the log is read."""
    monkeypatch.setattr(reader, "MAX_LINE", 1024)
    log = write(tmp_path / "a.jsonl", [HEADER, *DEFINITIONS], b'{"x": "' + b"a" * 5000 + b'"}\n' + json.dumps(
        {"event": "calls", "step": 1, "rows": [row(0, 0)]}).encode() + b"\n")
    analysis = modewatch.analyze(log)
    assert analysis.summary["skipped_lines"] == 1 and len(analysis.findings) == 1


def test_tables_are_bounded(tmp_path, monkeypatch):
    """A log defining endless sites cannot grow the reader's tables past the limit."""
    monkeypatch.setattr(reader, "MAX_TABLE", 10)
    sites = [{"event": "site", "id": i + 10, "file": "f", "line": 1, "function": "f"} for i in range(50)]
    log = write(tmp_path / "a.jsonl", [HEADER, *DEFINITIONS, *sites])
    log_reader = reader.LogReader(log)
    list(log_reader)
    assert len(log_reader._sites) == 10 and log_reader.skipped == 42


@pytest.mark.slow
def test_memory_does_not_grow_with_the_log(tmp_path):
    """Analyzing a log ten times longer takes no more memory (streaming)."""
    def peak(steps):
        events = [HEADER, *DEFINITIONS] + [
            {"event": "calls", "step": s, "rows": [row(s, s), row(s, s, kind=logformat.NO_GRAPH, training=True)]}
            for s in range(steps)]
        log = write(tmp_path / f"{steps}.jsonl", events)
        tracemalloc.start()
        analysis = modewatch.analyze(log)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert analysis.findings[0].count == steps
        return top

    small, large = peak(2_000), peak(20_000)
    assert large < small * 1.5 + 50_000
