"""modewatch report: one self-contained HTML file, safe against what logs contain, small for long
runs, and shown by a real browser."""

import os
import re
import shutil
import subprocess

import pytest

import modewatch
from modewatch.cli import main
import helpers
from helpers import DEFINITIONS, HEADER, line_of, row, write


def report(paths, out):
    assert main(["report", *paths, "-o", os.fspath(out)]) == 0
    return out.read_text()


def test_findings_with_their_source_lines_and_a_timeline(seed_log, tmp_path):
    """The findings, the eval() line in its source context, and one timeline row per layer."""
    page = report([seed_log], tmp_path / "r.html")
    assert "train-without-dropout" in page and "bn-frozen-in-train" in page
    assert f'<span class="here">{line_of("seed eval", helpers):5d}' in page and "model.eval()  # &lt;- seed eval" in page
    assert page.count("<svg") == 2 and "<td>bn1</td>" in page and "<td>drop</td>" in page
    assert not re.search(r"<script|https?://", page), "the report must not load or run anything"


def test_everything_from_the_log_is_escaped(tmp_path):
    """A layer named <script> is text, not markup."""
    hostile = dict(DEFINITIONS[0], name="<script>alert(1)</script>")
    log = write(tmp_path / "a.jsonl", [HEADER, hostile, *DEFINITIONS[1:], {"event": "calls", "rows": [row(1, 9)]}])
    page = report([log], tmp_path / "r.html")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_long_run_stays_small(tmp_path):
    """20,000 steps switching mode every 2 steps: a bounded number of rectangles, a small file."""
    rows = [row(s, s + 1, 2, training=(s // 2) % 2 == 0) for s in range(0, 20_000, 2)]
    log = write(tmp_path / "long.jsonl", [HEADER, *DEFINITIONS, {"event": "calls", "rows": rows}])
    page = report([log], tmp_path / "r.html")
    assert page.count("<rect") <= 300
    assert len(page.encode()) < 100_000


def test_the_timeline_keeps_few_spans_and_the_worst_state(tmp_path):
    """A layer whose state changes at every step keeps at most timeline.MAX_SPANS spans however
    long the run, covering every step; where neighbours are merged, the state that must show
    most wins: one wrong-mode step among 10,000 alternating good ones still shows, and only
    around that step."""
    from modewatch import format as logformat, timeline

    bad = 6_001
    rows = []
    for s in range(10_000):  # train mode while training, eval mode while evaluating: both fine
        training = s % 2 == 0
        kind = logformat.PARAM_GRAD if training or s == bad else logformat.NO_GRAPH
        rows.append(row(s, s, kind=kind, training=training))  # step 6,001: training in eval mode
    log = write(tmp_path / "long.jsonl", [HEADER, *DEFINITIONS, {"event": "calls", "rows": rows}])
    drawn = timeline.Timeline()
    modewatch.analyze(log, tap=drawn)
    (spans,) = drawn.layers.values()
    assert len(spans) <= timeline.MAX_SPANS
    assert spans[0][0] == 0 and spans[-1][1] == 9_999
    assert all(later[0] == earlier[1] + 1 for earlier, later in zip(spans, spans[1:]))
    (worst,) = [span for span in spans if span[2] == timeline.BAD]
    assert worst[0] <= bad <= worst[1] and worst[1] - worst[0] < 16


def test_the_timeline_draws_wrong_only_what_a_finding_says_is_wrong(seed_log, tmp_path):
    """Runs of calls are drawn before the whole log is read; a layer that ends in no error
    finding (here a training batch skipped on a non-finite loss, no evaluation) is drawn as worth
    a look, never in the colour of an error. The seed bug's layers still are."""
    import torch

    from modewatch.report import COLORS

    model = helpers.Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=tmp_path / "skips.jsonl"):
        for step, (x, y) in enumerate(helpers.batches(6)):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if step == 3:
                continue  # as if its loss were not finite
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    wrong, worth_a_look = f'fill="{COLORS["bad"]}"', f'fill="{COLORS["info"]}"'
    page = report([str(tmp_path / "skips.jsonl")], tmp_path / "skips.html")
    assert "No mode problems found." in page and wrong not in page and worth_a_look in page
    assert wrong in report([seed_log], tmp_path / "seed.html")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (.ci/run installs Debian's chromium)")
def test_a_browser_shows_the_findings(seed_log, tmp_path):
    """Headless Chromium loads the report without console errors, its DOM holds the findings,
    and a screenshot of it is taken (kept beside the report)."""
    page = tmp_path / "r.html"
    report([seed_log], page)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "train-without-dropout" in dom.stdout and "<svg" in dom.stdout
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,1200", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cli_errors(tmp_path, capsys):
    """A missing log or an unwritable output: exit 2 with one line."""
    assert main(["report", os.fspath(tmp_path / "missing.jsonl"), "-o", os.fspath(tmp_path / "r.html")]) == 2
    log = write(tmp_path / "a.jsonl", [HEADER, *DEFINITIONS])
    assert main(["report", log, "-o", os.fspath(tmp_path / "no" / "such" / "dir" / "r.html")]) == 2
    assert capsys.readouterr().err.count("\n") == 2
