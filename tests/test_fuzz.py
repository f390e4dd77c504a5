"""Fuzzing the analyzer with hypothesis: whatever a log holds (generated records, or a real log
with bytes flipped, cut, values swapped for other types, surrogates, huge numbers, deep nesting,
long chains), `modewatch analyze` and `modewatch report` answer 0, 1 or 2, never with a
traceback, in bounded time and memory, with nothing unsafe in what they print.

Repeatable in CI: derandomized (the same examples on every run) and without an example database.
"""

import io
import json
import os
import time
import tracemalloc
from contextlib import redirect_stderr, redirect_stdout

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from modewatch.cli import main
from helpers import DEFINITIONS, HEADER, row, unsafe

SETTINGS = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SECONDS = 10  # per example; each takes a few milliseconds
MEMORY = 64 << 20  # bytes traced per example; the inputs are a few kilobytes

HOSTILE_TEXT = st.sampled_from(["\ud800", "a\udcffb", "\x1b[2J\x1b[H", "\u202eevil", "a|b`<i>[x](y)", "\r\n\t\x08"])
TEXT = st.one_of(HOSTILE_TEXT, st.sampled_from(["drop", "module.bn", "train.py", "test"]), st.text(max_size=8))
HUGE = st.sampled_from([2 ** 63, -(2 ** 63), 10 ** 400, 10 ** 4299, 1e308, float("inf"), float("nan")])
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 2 ** 40), st.floats(), TEXT, HUGE)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)


def field(valid):
    """A field's value: mostly one the format allows, one time in twenty-five anything (a wrong
    type, a huge number): enough for a few damaged lines per log, rarely a mostly damaged one."""
    return st.integers(0, 24).flatmap(lambda n: SCALAR if n == 24 else valid)  # 0, the simplest: valid


ID = field(st.integers(0, 3))
STEP = field(st.integers(0, 40))
COUNT = field(st.integers(1, 1000))
@st.composite
def valid_row(draw):
    """A calls row in a state that often makes a finding, its fields sometimes of any type."""
    first = draw(st.integers(0, 40))
    last = first + draw(st.integers(0, 10))
    state = [ID, field(st.sampled_from([3, 0, 1, 2])), field(st.sampled_from([0, 2, 1, 9, 3, 11]) | st.integers(0, 15)),
             field(st.none() | st.integers(1, 64)), field(st.sampled_from([0.5, 0.1, None, 0.0])),
             field(st.none() | st.integers(0, 3)), ID, field(st.integers(0, 2)),
             field(st.just(first)), field(st.just(last)), field(st.just(first)), COUNT, COUNT]
    return [draw(strategy) for strategy in state]


ROW = st.one_of(valid_row(), valid_row(), valid_row(), st.lists(SCALAR, max_size=14))

DEFINITIONS_ = [  # in the order the writer writes them
    st.fixed_dictionaries({"event": st.just("site"), "id": ID, "file": TEXT, "line": field(st.integers(1, 99)),
                           "function": TEXT}),
    st.fixed_dictionaries({"event": st.just("layer"), "id": ID, "name": TEXT, "kind": TEXT,
                           "category": field(st.sampled_from(["dropout", "norm"])), "model": ID,
                           "copy_of": field(st.none())}, optional={"site": ID}),
    st.fixed_dictionaries({"event": st.just("mode"), "id": ID, "site": field(st.none() | st.integers(0, 3)),
                           "call": field(st.sampled_from(["train", "eval"])), "mode": field(st.booleans()),
                           "target": field(st.none() | TEXT),
                           "scope": field(st.sampled_from(["model", "submodule", "layer", "outside"]))},
                          optional={"initial": field(st.booleans()), "via": TEXT, "kept": ID}),
    st.fixed_dictionaries({"event": st.just("context"), "id": field(st.integers(1, 2)),
                           "allow": field(st.lists(st.sampled_from(["dropout-in-eval", "x"]) | TEXT, max_size=3)),
                           "recalibration": field(st.booleans())}),
]
OTHER_EVENTS = st.one_of(
    st.fixed_dictionaries({"event": st.just("end"), "steps": STEP}),
    st.fixed_dictionaries({"event": st.just("calls"), "step": STEP, "rows": SCALAR}),
    JSON,
)
HEADERS = st.one_of(st.just(HEADER), st.builds(lambda rank, size: dict(HEADER, rank=rank, world_size=size),
                                                field(st.integers(0, 3)), field(st.integers(1, 4))))


def lines(events):
    return b"".join(json.dumps(event).encode() + b"\n" for event in events)


@st.composite
def generated(draw):
    """A header, definitions of each kind and calls rows that refer to them, their fields mostly
    valid, some of any type or hostile; or a long chain of `kept` mode calls."""
    head = draw(HEADERS)
    if draw(st.integers(0, 4)):
        events = [dict(draw(kind), id=i) for kind in DEFINITIONS_ for i in range(4)]
        events += [{"event": "calls", "step": 0, "rows": draw(st.lists(ROW, min_size=1, max_size=8))}
                   for _ in range(draw(st.integers(1, 3)))]
        events += draw(st.lists(OTHER_EVENTS, max_size=3))
        return lines([head, *draw(st.permutations(events))] if not draw(st.integers(0, 3)) else [head, *events])
    length = draw(st.integers(1, 3000))
    chain = [dict(DEFINITIONS[3], id=i, kept=i - 1 if i else None) for i in range(length)]
    rows = [row(s, s)[:5] + [length - 1] + row(s, s)[6:] for s in range(draw(st.integers(0, 50)))]
    return lines([head, *DEFINITIONS[:3], *chain, {"event": "calls", "rows": rows}])


JUNK = [b"\\ud800", b'"\\udcff\\u202e\\u001b"', b"9" * 5000, b"1e999", b"-1", b"null", b"{}", b"[" * 50_000,
        b'{"a":' * 3000, b"\n", b"\x00", b"\xff\xfe", b"\r", b",", b'"', b"]]"]


@st.composite
def mutated(draw, logs):
    """A real log with one to four damages: bytes flipped, cut, junk inserted, a line repeated,
    or a value of a record swapped for one of another type."""
    data = bytearray(draw(st.sampled_from(logs)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "swap"]))
        if how == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.sampled_from(JUNK))
        else:
            text = bytes(data).split(b"\n")
            line = draw(st.integers(0, len(text) - 1))
            if how == "repeat":
                text.insert(line, text[line])
            else:
                text[line] = _swap(text[line], draw)
            data = bytearray(b"\n".join(text))
    return bytes(data)


def _swap(line, draw):
    """The line with one of its values (or a row's) replaced by a value of any type."""
    try:
        event = json.loads(line)
    except ValueError:
        return line
    if not isinstance(event, dict) or not event:
        return line
    key = draw(st.sampled_from(sorted(event)))
    rows = event.get("rows")
    if key == "rows" and isinstance(rows, list) and rows and isinstance(rows[0], list) and rows[0]:
        rows[0][draw(st.integers(0, len(rows[0]) - 1))] = draw(SCALAR)
    else:
        event[key] = draw(SCALAR)
    return json.dumps(event).encode()


@pytest.fixture(scope="module")
def real_logs(seed_log):
    """A recorded run of the seed bug (eval() left on, one grad-enabled eval forward), and the
    logs of a two-rank job in which rank 0 alone stays in eval mode."""
    ranks = [lines([dict(HEADER, rank=rank, world_size=2), *DEFINITIONS,
                    {"event": "calls", "rows": [row(0, 9, 10, training=rank == 1 or s < 5)[:8] + [s, s, s, 1, 1]
                                                for s in range(10)]}, {"event": "end", "steps": 10}])
             for rank in range(2)]
    return [open(seed_log, "rb").read(), *ranks]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def run(folder, data, how, companion=None):
    """Run the CLI on ``data`` (alone, or in a folder beside a good log) under a clock and a
    memory tracer; check what a user and CI rely on."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "fuzz.jsonl")
    with open(path, "wb") as f:
        f.write(data)
    other = os.path.join(folder, "other.jsonl")
    if companion is not None:
        with open(other, "wb") as f:
            f.write(companion)
    elif os.path.exists(other):
        os.remove(other)
    target = folder if companion is not None else path
    html = os.path.join(folder, "r.html")
    args = ["report", target, "-o", html] if how == "report" else ["analyze", target, "--format", how]
    out, err = io.StringIO(), io.StringIO()
    tracemalloc.start()
    start = time.monotonic()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(args)
        seconds = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    out, err = out.getvalue(), err.getvalue()
    assert code in (0, 1, 2), (code, err)
    assert seconds < SECONDS and peak < MEMORY, (seconds, peak)
    assert unsafe(out) == [] and unsafe(err) == []
    assert all(line.startswith("modewatch: error: ") and "docs/errors.md#" in line for line in err.splitlines())
    assert (code == 2) == bool(err)
    if how == "report" and code == 0:
        with open(html, encoding="utf-8") as f:
            assert unsafe(f.read().replace("\n", "")) == []
    elif how in ("json", "sarif") and out:
        json.loads(out)


@SETTINGS
@given(data=generated(), how=st.sampled_from(["text", "json", "markdown", "sarif", "report"]))
def test_generated_logs(folder, data, how):
    """Generated records of every kind, with fields of any type and long chains: 0, 1 or 2."""
    run(folder, data, how)


def test_mutated_real_logs(folder, real_logs):
    """Real logs, damaged: 0, 1 or 2, alone and in a folder beside a good rank log."""

    @SETTINGS
    @given(data=mutated(real_logs), how=st.sampled_from(["text", "json", "markdown", "sarif", "report"]),
           beside=st.booleans())
    def check(data, how, beside):
        run(folder, data, how, real_logs[2] if beside else None)

    check()
