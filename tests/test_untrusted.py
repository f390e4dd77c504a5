"""Logs are untrusted input (docs/threat-model.md): whoever analyzes a log they did not write
discloses no file, gets no terminal or markup injected, and gets an answer (exit 0, 1 or 2, never
a traceback) in bounded time, whatever the log holds."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import modewatch
from modewatch.cli import main
from helpers import DEFINITIONS, HEADER, environment, row, unsafe, write


HOSTILE = "x\x1b[2J\x1b[H\x9b31mNo mode problems found.\r\x08\t\n\u202eevil\u2066\u200f\ud800"


def cli(*args, timeout=60, cwd=None):
    """``python -m modewatch ARGS`` in a child process, where a hang, a crash or a real stdout's
    encoder cannot be hidden: (exit status, stdout, stderr, seconds)."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "modewatch", *args], capture_output=True, timeout=timeout,
                            cwd=cwd, env=environment())
    return (result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"),
            time.monotonic() - start)


def hostile_log(path, name=HOSTILE, file="train.py", function="train"):
    """A log of one train-without-dropout finding whose layer name and call site are ``name``,
    ``file`` and ``function``."""
    return write(path, [HEADER, dict(DEFINITIONS[0], name=name),
                        dict(DEFINITIONS[1], file=file, function=function), *DEFINITIONS[2:],
                        {"event": "calls", "rows": [row(1, 9, 5)]}])


# ----------------------------------------------------------------------------- what a report shows

@pytest.mark.parametrize("fmt", ["text", "json", "markdown", "sarif"])
def test_every_format_neutralises_what_the_log_says(tmp_path, capsys, fmt):
    """Terminal escapes, C1 controls, CR, backspace, bidi overrides and lone surrogates in a layer
    name, a file path or a function name reach no output: each shows as a visible escape."""
    log = hostile_log(tmp_path / "a.jsonl", file=HOSTILE + ".py", function=HOSTILE)
    assert main(["analyze", log, "--format", fmt]) == 1
    out = capsys.readouterr().out
    assert unsafe(out) == []
    if fmt in ("json", "sarif"):
        json.loads(out)
        out = out.replace("\\\\", "\\")
    assert "\\x1b" in out and "\\u202e" in out and "\\ud800" in out and "\\x0a" in out


def test_html_report_neutralises_what_the_log_says(tmp_path):
    """The HTML report: no bidi override or control character from the log, escaped markup."""
    log = hostile_log(tmp_path / "a.jsonl", name=HOSTILE + "<b>", file=HOSTILE + ".py")
    assert main(["report", log, "-o", os.fspath(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert unsafe(page) == [] and "\\u202e" in page and "&lt;b&gt;" in page


def test_a_lone_surrogate_is_no_traceback_on_a_real_stdout(tmp_path):
    """A lone surrogate in a layer name and in a file path: a real UTF-8 stdout prints the text
    report (exit 1: a finding), with no traceback."""
    log = hostile_log(tmp_path / "a.jsonl", name="drop\ud800", file="/tmp/x\udcff.py")
    code, out, err, _ = cli("analyze", log)
    assert (code, err) == (1, "") and "drop\\ud800" in out and "x\\udcff.py" in out


def test_a_log_named_with_invalid_utf8_is_reported_safely(tmp_path):
    """A log whose file name is not UTF-8 (bytes \\xff, \\x1b), found in a directory: its name
    shows escaped in the report's notes, no traceback."""
    folder = os.fsencode(tmp_path)
    name = os.path.join(folder, b"run\xff\x1b.jsonl")
    with open(name, "wb") as f:
        f.write(json.dumps(HEADER).encode() + b"\n")  # not closed: a note names the log
    code, out, err, _ = cli("analyze", os.fspath(tmp_path))
    assert code == 0 and err == "" and "run\\udcff\\x1b.jsonl was not closed" in out


def test_markdown_links_and_images_are_inert(tmp_path, capsys):
    """A layer name holding a Markdown image or link (remote content in a CI job summary) prints
    as text: no `![`, no `](`, no raw `<`."""
    name = "![x](https://evil.example/p.png)[click](https://evil.example) <img src=x> **b** # h _i_"
    log = hostile_log(tmp_path / "a.jsonl", name=name)
    assert main(["analyze", log, "--format", "markdown"]) == 1
    out = capsys.readouterr().out
    assert "![" not in out and "](" not in out and "<img" not in out and "**b**" not in out
    assert "\\!\\[x\\]\\(https://evil.example/p.png\\)" in out


def test_sarif_file_uris_are_percent_encoded(tmp_path, monkeypatch, capsys):
    """SARIF locations are URIs (RFC 3986): a space, a '#' or a non-ASCII letter in a path from
    the log is percent-encoded, inside the working directory (relative) and outside it."""
    monkeypatch.chdir(tmp_path)
    events = [HEADER, dict(DEFINITIONS[1], file=os.fspath(tmp_path / "dir x" / "é.py")),
              dict(DEFINITIONS[2], file="/elsewhere/a b#c.py"), DEFINITIONS[0], DEFINITIONS[3],
              {"event": "calls", "rows": [row(1, 9, 5)]}]
    assert main(["analyze", write(tmp_path / "a.jsonl", events), "--format", "sarif"]) == 1
    (result,) = json.loads(capsys.readouterr().out)["runs"][0]["results"]
    mode = result["locations"][0]["physicalLocation"]["artifactLocation"]
    forward = result["relatedLocations"][0]["physicalLocation"]["artifactLocation"]
    assert mode == {"uri": "file:///elsewhere/a%20b%23c.py"}
    assert forward == {"uri": "dir%20x/%C3%A9.py", "uriBaseId": "%SRCROOT%"}


def test_report_shows_source_only_from_allowed_folders(tmp_path, monkeypatch):
    """The HTML report shows a file a log names only if it is a regular .py file of at most 2 MiB
    inside the working directory, a log's folder or a --source-root (symlinks resolved), never
    under /proc; otherwise it says why, and nothing of the file is in the page."""
    work, logs, elsewhere = (tmp_path / name for name in ("work", "logs", "elsewhere"))
    for folder in (work, logs, elsewhere):
        folder.mkdir()
    (elsewhere / "secret.py").write_text("TOKEN = 'outside-secret'\n")
    (work / "notes.txt").write_text("notes-secret\n")
    os.symlink(elsewhere / "secret.py", work / "link.py")  # inside by its name, outside in fact
    with open(work / "big.py", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: costs no disk
    os.mkfifo(work / "pipe.py")
    (logs / "train.py").write_text("first = 1\nmodel.eval()\nlast = 3\n")
    files = [elsewhere / "secret.py", work / "link.py", "/proc/self/environ", work / "notes.txt",
             work / "big.py", work / "pipe.py", logs / "train.py"]
    sites = [dict(DEFINITIONS[1], id=i, file=os.fspath(f), line=2) for i, f in enumerate(files)]
    modes = [dict(DEFINITIONS[3], id=i, site=i) for i in range(len(files))]
    rows = [row(1, 2)[:5] + [i, len(files) - 1] + row(1, 2)[7:] for i in range(len(files))]  # called in train.py
    log = write(logs / "a.jsonl", [HEADER, DEFINITIONS[0], *sites, *modes, {"event": "calls", "rows": rows}])
    monkeypatch.chdir(work)

    assert main(["report", log, "-o", "r.html"]) == 0
    page = (work / "r.html").read_text()
    assert "secret" not in page.replace("secret.py", "")
    assert page.count("(source not shown: outside the allowed folders)") == 3
    for reason in ("not a .py file", "too large", "not a regular file"):
        assert f"(source not shown: {reason})" in page
    assert "model.eval()" in page  # the log's own folder is allowed

    assert main(["report", log, "-o", "r.html", "--source-root", os.fspath(elsewhere)]) == 0
    page = (work / "r.html").read_text()
    assert page.count("TOKEN = &#x27;outside-secret&#x27;") == 2  # the file, and the link to it
    assert page.count("(source not shown: outside the allowed folders)") == 1  # /proc, always


def test_report_never_overwrites_a_log(tmp_path, capsys):
    """`modewatch report LOG -o LOG` (by the same name, a link, or the log of a directory given)
    is refused with exit 2, and the log is left as it was."""
    log = hostile_log(tmp_path / "a.jsonl", name="drop")
    before = open(log, "rb").read()
    os.symlink(log, tmp_path / "link.html")
    for paths, output in (([log], log), ([log], tmp_path / "link.html"), ([tmp_path], log)):
        assert main(["report", *map(os.fspath, paths), "-o", os.fspath(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and err.count("the report must go elsewhere") == 3
    assert open(log, "rb").read() == before


# ----------------------------------------------------------------------------- bounded time

def test_a_long_chain_of_kept_mode_calls_is_resolved_once(tmp_path):
    """150,000 `mode` definitions each keeping the previous one, then 50,000 rows using the last:
    analyzed in seconds (it crashed the interpreter, and time grew as chain x rows)."""
    chain = [dict(DEFINITIONS[3], id=i, **({"kept": i - 1} if i else {})) for i in range(150_000)]
    rows = [row(s, s)[:5] + [149_999] + row(s, s)[6:] for s in range(50_000)]
    log = write(tmp_path / "chain.jsonl", [HEADER, *DEFINITIONS[:3], *chain, {"event": "calls", "rows": rows}])
    code, out, err, seconds = cli("analyze", log)
    assert (code, err) == (1, "") and "train-without-dropout" in out
    assert seconds < 40, seconds  # about 3 s here


def rank_log(path, rank, ranks, steps, phase):
    """A rank's log: two layers trained every step, the mode switching every step (train mode on
    even steps, or on odd ones with ``phase``)."""
    header = dict(HEADER, rank=rank, world_size=ranks)
    layers = [dict(DEFINITIONS[0], id=i, name=f"module.drop{i}") for i in range(2)]
    rows = [[layer, 3, 2 | ((s + phase) % 2 == 0), None, 0.5, 0, 0, 0, s, s, s, 1, 1]
            for s in range(steps) for layer in range(2)]
    return write(path, [header, *layers, *DEFINITIONS[1:], {"event": "calls", "rows": rows}])


def test_rank_mode_mismatch_time_is_not_quadratic(tmp_path):
    """4 ranks x 2 layers alternating modes every step, out of phase (a mismatch at every step):
    analyzed in about a second (it took minutes: every span of a rank against every span of the
    others)."""
    for rank in range(4):
        rank_log(tmp_path / f"rank{rank}.jsonl", rank, 4, 8000, rank % 2)
    start = time.process_time()
    analysis = modewatch.analyze(os.fspath(tmp_path))
    seconds = time.process_time() - start
    mismatches = [f for f in analysis.findings if f.rule == "rank-mode-mismatch"]
    assert sorted(f.rank for f in mismatches) == [0, 1, 2, 3]
    assert all((f.first_step, f.last_step, f.count) == ((1, 7999, 8000) if f.rank % 2 == 0 else (0, 7998, 8000))
               for f in mismatches)
    assert seconds < 15, seconds  # about 1.5 s here


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/full"])
def test_a_device_is_refused_at_once(device):
    """/dev/zero and /dev/full (endless input) are not logs: exit 2 at once, one line."""
    code, out, err, seconds = cli("analyze", device, timeout=30)
    assert (code, out) == (2, "") and err == f"modewatch: error: {device}: not a regular file " \
                                             f"(see modewatch's docs/errors.md#bad-log)\n"


def test_a_fifo_with_no_writer_does_not_hang(tmp_path):
    """A FIFO nobody writes to: named, it reads as empty (exit 2); in a folder, it is named as
    not a regular file and the folder's good log is still analyzed (exit 2)."""
    fifo = tmp_path / "waiting.jsonl"
    os.mkfifo(fifo)
    code, _, err, _ = cli("analyze", os.fspath(fifo), timeout=30)
    assert code == 2 and "waiting.jsonl: is empty" in err
    hostile_log(tmp_path / "good.jsonl", name="drop")
    code, out, err, _ = cli("analyze", os.fspath(tmp_path), timeout=30)
    assert code == 2 and "waiting.jsonl: not a regular file" in err and "(in layer drop)" in out


# ----------------------------------------------------------------------------- damaged input

def test_huge_numbers_are_skipped_lines(tmp_path, capsys):
    """An integer of 400 digits as dropout p, and counts whose sum would pass Python's int-to-str
    digit limit, are damaged rows: skipped and counted, never a traceback."""
    huge = 10 ** 4299
    bad_rows = [[0, 3, 2, None, 10 ** 400, 0, 0, 0, 1, 1, 1, 1, 1]] + [row(1, 2)[:12] + [huge]] * 3
    log = write(tmp_path / "a.jsonl", [HEADER, *DEFINITIONS, {"event": "calls", "rows": [row(1, 9, 5)]}]
                + [{"event": "calls", "rows": [bad]} for bad in bad_rows])
    for fmt in ("text", "json"):
        assert main(["analyze", log, "--format", fmt]) == 1
    out = capsys.readouterr().out
    assert "note: 4 damaged or cut-off log line(s) were skipped" in out and '"skipped_lines": 4' in out


def test_a_mostly_damaged_log_is_an_input_error(tmp_path, capsys):
    """A valid header followed by 1 MB of junk is not 'no problems': exit 2, naming the file and
    its first bad line. A killed job's cut-off last line alone is not damage."""
    junk = bytes((i * 7919 + 13) % 251 for i in range(1 << 20))
    log = write(tmp_path / "junk.jsonl", [HEADER], junk)
    assert main(["analyze", log]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.jsonl: mostly damaged" in err and "(the first: line 2)" in err
    cut = write(tmp_path / "cut.jsonl", [HEADER], b'{"event":"calls","rows":[[0,3,')
    assert main(["analyze", cut]) == 0


def test_the_report_reads_each_log_once(tmp_path):
    """`modewatch report <(cat run.jsonl)`: a pipe can be read only once, and the report (findings
    and timeline) comes from that one reading."""
    data = open(hostile_log(tmp_path / "a.jsonl", name="drop"), "rb").read()
    read_end, write_end = os.pipe()

    def feed():
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        assert main(["report", f"/dev/fd/{read_end}", "-o", os.fspath(tmp_path / "r.html")]) == 0
    finally:
        writer.join()
        os.close(read_end)
    page = (tmp_path / "r.html").read_text()
    assert "train-without-dropout" in page and "<td>drop</td>" in page


def test_one_bad_log_in_a_directory_does_not_stop_the_others(tmp_path, capsys):
    """A directory with a good log, a foreign file and a mostly damaged log: the good one is
    reported on stdout, each bad one named on stderr, exit 2 (input error wins over findings).
    The Python API leaves them out and names them in summary["bad_logs"]; a bad log named
    directly still raises."""
    hostile_log(tmp_path / "a-good.jsonl", name="drop")
    (tmp_path / "b-foreign.jsonl").write_text("hello\n")
    damaged = write(tmp_path / "c-damaged.jsonl", [HEADER, *DEFINITIONS], b"junk\n" * 10)
    for fmt in ("text", "json"):
        assert main(["analyze", os.fspath(tmp_path), "--format", fmt]) == 2
        captured = capsys.readouterr()
        assert "(in layer drop)" in captured.out
        assert captured.err.count("\n") == 2
        assert "b-foreign.jsonl: not a modewatch log" in captured.err and "c-damaged.jsonl: mostly" in captured.err
    assert json.loads(captured.out)["summary"]["logs"] == 1
    analysis = modewatch.analyze(os.fspath(tmp_path))
    assert len(analysis.findings) == 1 and len(analysis.summary["bad_logs"]) == 2
    with pytest.raises(modewatch.LogFormatError, match="c-damaged.jsonl: mostly damaged"):
        modewatch.analyze(damaged)
