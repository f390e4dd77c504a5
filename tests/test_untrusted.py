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
from helpers import DEFINITIONS, HEADER, environment, optimized, row, unsafe, write


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
    name = "![x](https://evil.example/p.png)[click](https://evil.example) <img src=x> **b** # h _i_ &rlm;"
    log = hostile_log(tmp_path / "a.jsonl", name=name)
    assert main(["analyze", log, "--format", "markdown"]) == 1
    out = capsys.readouterr().out
    assert "![" not in out and "](" not in out and "<img" not in out and "**b**" not in out
    assert "\\!\\[x\\]\\(https://evil.example/p.png\\)" in out
    assert "&rlm;" not in out and "&amp;rlm;" in out  # a named entity would render a bidi mark


def test_sarif_file_uris_are_percent_encoded(tmp_path, monkeypatch, capsys):
    """SARIF locations are URIs (RFC 3986): a space, a '#' or a non-ASCII letter in a path from
    the log is percent-encoded, inside the working directory (relative) and outside it."""
    monkeypatch.chdir(tmp_path)
    events = [HEADER, dict(DEFINITIONS[1], file=os.fspath(tmp_path / "dir x" / "é.py")),
              dict(DEFINITIONS[2], file="/elsewhere/a b#c.py"), DEFINITIONS[0], DEFINITIONS[3], optimized(),
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
    log = write(logs / "a.jsonl", [HEADER, DEFINITIONS[0], *sites, *modes, optimized(), {"event": "calls", "rows": rows}])
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


def test_a_link_beside_a_log_allows_no_other_folder(tmp_path, monkeypatch):
    """A log's folder is allowed because the log was found there, not where a link of that
    folder leads: a link named *.jsonl planted beside the log (dangling, or to a file elsewhere)
    allows nothing more, and the secret it points near stays out of the page."""
    shared, victim, work = (tmp_path / name for name in ("shared", "victim", "work"))
    for folder in (shared, victim, work):
        folder.mkdir()
    (victim / "settings.py").write_text("PASSWORD = 'hunter2'\n")
    (victim / "notes.jsonl").write_text("not a log\n")
    site = dict(DEFINITIONS[1], file=os.fspath(victim / "settings.py"), line=1)
    write(shared / "run.jsonl", [HEADER, DEFINITIONS[0], site, DEFINITIONS[2], DEFINITIONS[3], optimized(),
                                 {"event": "calls", "rows": [row(1, 9, 5)]}])
    os.symlink("/nonexistent-anything/x", shared / "x.jsonl")  # "/" by its target's folder
    os.symlink(victim / "notes.jsonl", shared / "y.jsonl")  # the victim's folder by its target's
    monkeypatch.chdir(work)
    assert main(["report", os.fspath(shared), "-o", "r.html"]) == 2  # the links are no logs
    page = (work / "r.html").read_text()
    assert "hunter2" not in page and "(source not shown: outside the allowed folders)" in page


def test_report_source_is_bounded_however_many_findings_cite_it(tmp_path, monkeypatch):
    """A log whose 250 findings all cite one long-lined file beside it (a folder its author may
    write to): the page shows a few hundred snippets of cut lines, not 250 copies of the file
    (a 7 KB log made a 640 MB page)."""
    (tmp_path / "big.py").write_text(("<" * 10_000 + "\n") * 5)
    site = dict(DEFINITIONS[1], file=os.fspath(tmp_path / "big.py"), line=3)
    events = [HEADER, site, dict(DEFINITIONS[3], site=0), optimized(*range(250))]
    for model in range(250):  # findings of different models are never merged
        events += [dict(DEFINITIONS[0], id=model, model=model),
                   {"event": "calls", "rows": [[model, *row(1, 1)[1:]]]}]
    log = write(tmp_path / "run.jsonl", events)
    monkeypatch.chdir(tmp_path)
    assert main(["report", log, "-o", "r.html"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert len(page) < 3_000_000, len(page)
    assert "(source not shown: 200 snippets shown already)" in page and "&lt;&lt;..." in page


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
    log = write(tmp_path / "chain.jsonl", [HEADER, *DEFINITIONS[:3], *chain, optimized(),
                                           {"event": "calls", "rows": rows}])
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


def colliding_rows(count):
    """``count`` valid rows whose states (their first eight fields) differ but share one hash:
    the hashes of ints are the same in every process, and CPython's tuple hash can be solved
    for the last field that varies (dropout p, given as an int)."""
    mask, p1, p2, p5, prime = (1 << 64) - 1, 11400714785074694791, 14029467366897019727, 2870177450012600261, \
        (1 << 61) - 1

    def step(acc, lane):
        acc = (acc + (lane & mask) * p2) & mask
        return ((((acc << 31) | (acc >> 33)) & mask) * p1) & mask

    acc = p5
    for field in (0, 3, 2):  # layer 0, a training forward, eval mode with grad
        acc = step(acc, hash(field))
    target = step(step(acc, hash(1)), hash(1))  # that of batch 1, p 1
    inverse1, inverse2 = pow(p1, -1, 1 << 64), pow(p2, -1, 1 << 64)
    rows, batch = [], 1
    while len(rows) < count:
        before = step(acc, hash(batch))
        lane = (target * inverse1) & mask
        lane = ((((lane >> 31) | (lane << 33)) & mask) - before) * inverse2 & mask
        p = lane if lane < prime else lane - (1 << 64) if lane > (1 << 64) - prime else None
        if p is not None and p >= 0 and hash(p) & mask == lane:
            rows.append([0, 3, 2, batch, p, 0, 0, 0, 1, 1, 1, 1, 1])
        batch += 1
    assert len({hash(tuple(r[:8])) for r in rows}) == 1
    return rows


def test_rows_made_to_collide_in_one_hash_are_read_in_linear_time(tmp_path):
    """20,000 rows whose states were chosen to share one hash value: analyzed in a fraction of a
    second (the reader's cache of states made every look-up walk all of them: 27 s)."""
    rows = colliding_rows(20_000)
    log = write(tmp_path / "collide.jsonl", [HEADER, *DEFINITIONS]
                + [{"event": "calls", "rows": rows[i:i + 1000]} for i in range(0, len(rows), 1000)])
    start = time.process_time()
    analysis = modewatch.analyze(log)
    seconds = time.process_time() - start
    assert analysis.summary["layer_calls"] == 20_000 and analysis.summary["skipped_lines"] == 0
    assert seconds < 8, seconds  # about 0.3 s here


def test_likeness_of_models_is_worked_out_once_per_model(tmp_path, monkeypatch):
    """A trained model with many norm layers and many untrained look-alikes (each an
    EMA-target candidate): the trained model's layers are gathered once, not once per finding
    (1,000 findings against 200,000 layers took 400 s)."""
    from modewatch import analysis as analysis_module

    events = [HEADER, {"event": "model", "id": 0, "name": "M", "site": None, "copy_of": None, "parameters": 1}]
    events += [dict(DEFINITIONS[0], id=0, name=f"bn{i}", kind="BatchNorm1d", category="norm") for i in range(2000)]
    events.append({"event": "calls", "rows": [[0, 3, 3, 8, 0.1, None, None, 0, 0, 0, 0, 1, 1]]})
    for model in range(1, 101):
        events += [{"event": "model", "id": model, "name": "M", "site": None, "copy_of": None, "parameters": 1},
                   dict(DEFINITIONS[0], id=1, name="bn", kind="BatchNorm1d", category="norm", model=model),
                   dict(DEFINITIONS[0], id=2, model=model),
                   {"event": "calls", "rows": [[2, 0, 1, None, 0.5, None, None, 0, 1, 1, 1, 1, 1]]}]
    log = write(tmp_path / "alike.jsonl", events)
    gathered = []
    plain_layers = analysis_module._plain_layers
    monkeypatch.setattr(analysis_module, "_plain_layers", lambda layers: gathered.append(len(layers or ())) or
                        plain_layers(layers))
    analysis = modewatch.analyze(log)
    assert len(analysis.findings) == 100 and {f.rule for f in analysis.findings} == {"dropout-in-eval"}
    assert gathered.count(2000) == 1


def test_the_lowest_trained_model_is_looked_for_once_per_settling(tmp_path, monkeypatch):
    """Many trained models and many EMA targets (``updated``): the online model of each target is
    the lowest trained one, found once, not once per finding (190,000 trained models and 10,000
    targets took 39 s)."""
    from modewatch import analysis as analysis_module

    trained, targets = 300, 100
    events = [HEADER, DEFINITIONS[1]]
    events += [dict(DEFINITIONS[0], id=i, model=i) for i in range(trained + targets)]
    events += [{"event": "updated", "model": trained + j, "step": 1} for j in range(targets)]
    rows = [[i, 3, 3, None, 0.5, None, 0, 0, 1, 1, 0, 1, 1] for i in range(trained)]
    rows += [[trained + j, 0, 1, None, 0.5, None, 0, 0, 1, 1, 0, 1, 1] for j in range(targets)]
    log = write(tmp_path / "targets.jsonl", events + [{"event": "calls", "rows": rows}])
    looked = []
    monkeypatch.setattr(analysis_module, "min", lambda items: looked.append(1) or min(items), raising=False)
    findings = modewatch.analyze(log).findings
    assert len(findings) == targets and {f.rule for f in findings} == {"ema-target"}
    assert len(looked) == 1


def test_a_job_of_many_logs_keeps_no_logs_tables(tmp_path):
    """Each log of a job fills its tables as far as their bounds (here many training lines), and
    one of its findings lasts to the end: what the job holds does not grow with each log read
    (it kept each log's tables: ~20 MB a log)."""
    import tracemalloc

    sites = 60
    events = [HEADER] + [dict(DEFINITIONS[1], id=s, line=s) for s in range(sites)]
    events += [dict(DEFINITIONS[0], id=m, model=m) for m in range(sites)]
    events += [{"event": "calls", "rows": [[m, 3, 3, None, 0.5, None, s, 0, 5, 5, 0, 1, 1] for m in range(sites)]}
               for s in range(sites)]
    events.append({"event": "calls", "rows": [[0, 0, 1, None, 0.5, None, 0, 0, 9, 9, 0, 1, 1]]})
    peaks = []
    for count in (2, 8):
        folder = tmp_path / str(count)
        folder.mkdir()
        for k in range(count):
            write(folder / f"r{k}.jsonl", events)
        tracemalloc.start()
        analysis = modewatch.analyze(str(folder))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(analysis.findings) == count
    assert peaks[1] < 1.3 * peaks[0], peaks


def test_text_notes_on_many_logs_take_linear_time():
    """Tens of thousands of cut-off and unclosed logs in one analysis: the text report's notes
    take well under a second (each unclosed log was looked for in the list of cut-off ones)."""
    from modewatch.analysis import Analysis
    from modewatch.report import text_report

    paths = [f"/logs/rank{i}.jsonl" for i in range(80_000)]
    summary = {"logs": len(paths), "truncated_logs": paths[::2], "unclosed_logs": paths, "layer_calls": 1}
    start = time.process_time()
    text = text_report(Analysis([], paths, summary))
    seconds = time.process_time() - start
    assert text.count("ends mid-line") == 40_000 and text.count("was not closed") == 40_000
    assert seconds < 5, seconds  # about 0.06 s here; it took 17 s


LOG_BOMBS = {
    # one norm layer redefined with a new name (and model) on each line: the likeness facts
    "norm layers": lambda i: [dict(DEFINITIONS[0], name=f"{'x' * 200}{i}", category="norm", model=i % 1000)],
    # one dropout redefined, each name with a row whose parameters moved (flag 32)
    "moved rows": lambda i: [dict(DEFINITIONS[0], name=f"{'y' * 200}{i}"),
                             {"event": "calls", "rows": [[0, 3, 35, None, 0.5, None, None, 0, 0, 0, 0, 1, 1]]}],
    # a rank's log: one dropout redefined, each name trained once (rank-mode-mismatch's spans)
    "rank spans": lambda i: [dict(DEFINITIONS[0], name=f"{'z' * 200}{i}"),
                             {"event": "calls", "rows": [[0, 3, 3, None, 0.5, None, None, 0, i, i, i, 1, 1]]}],
    # who feeds whom and which optimizer holds which model (is it a GAN's generator?)
    "feeds and optimizers": lambda i: [{"event": "feeds", "model": i, "into": i + 1},
                                       {"event": "optimized", "step": i, "models": [i, i + 2], "layers": []}],
}


@pytest.mark.parametrize("bomb", sorted(LOG_BOMBS))
def test_memory_does_not_grow_with_a_log_that_defines_names_forever(tmp_path, monkeypatch, bomb):
    """Logs that keep defining new names (with every table's bound made small): the analysis's
    peak memory for a log four times longer is about the same (it grew with the log: 1 GB for
    a 619 MB log)."""
    import tracemalloc

    from modewatch import analysis as analysis_module, ranks, reader

    monkeypatch.setattr(reader, "MAX_TABLE", 500)
    monkeypatch.setattr(analysis_module, "MAX_TABLE", 500)
    monkeypatch.setattr(reader, "MAX_TEXT_KEPT", 200_000)
    monkeypatch.setattr(ranks, "MAX_COMPARED_LAYERS", 500)
    header = dict(HEADER, rank=0, world_size=2) if bomb == "rank spans" else HEADER
    peaks = []
    for count in (5_000, 20_000):
        log = write(tmp_path / f"{count}.jsonl", [header] + [e for i in range(count) for e in LOG_BOMBS[bomb](i)])
        tracemalloc.start()
        modewatch.analyze(log)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.25 * peaks[0] + 200_000, peaks


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

def test_a_link_to_a_system_file_in_a_folder_is_not_read(tmp_path):
    """A *.jsonl link to a file under /proc in a folder of logs (reading /proc/kmsg consumes the
    kernel's messages): refused unread, named on stderr; the folder's good log is analyzed."""
    hostile_log(tmp_path / "good.jsonl", name="drop")
    os.symlink("/proc/self/status", tmp_path / "status.jsonl")
    code, out, err, _ = cli("analyze", os.fspath(tmp_path))
    assert code == 2 and "status.jsonl: a system file, not a log" in err and "(in layer drop)" in out


def test_a_terminal_that_cannot_encode_a_name_gets_it_escaped(tmp_path):
    """A layer name in Chinese on a stdout that writes Latin-1 (Windows, redirected): escaped,
    exit 1 for the finding (a traceback exited 1 too, and CI read it as findings)."""
    log = hostile_log(tmp_path / "a.jsonl", name="编码器.drop")
    result = subprocess.run([sys.executable, "-m", "modewatch", "analyze", log], capture_output=True,
                            env=environment(PYTHONIOENCODING="latin-1"), timeout=60)
    assert (result.returncode, result.stderr) == (1, b"")
    assert b"\\u7f16\\u7801\\u5668.drop" in result.stdout


def test_a_header_whose_schema_is_not_a_number_is_refused(tmp_path, capsys):
    """``"schema": true`` equals 1 in Python, but it is not the schema number: not read."""
    log = write(tmp_path / "a.jsonl", [dict(HEADER, schema=True), *DEFINITIONS])
    assert main(["analyze", log]) == 2
    assert "log schema True is not supported" in capsys.readouterr().err


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


@pytest.mark.parametrize("told", ["5", -1, 10 ** 40, True, None, 9])
def test_steps_a_log_tells_are_believed_only_when_plausible(tmp_path, told):
    """Training batches in eval mode after step 5, in a log whose calls events tell a number of
    steps: an implausible number (not an int, negative, past 2**63, a bool) is ignored, as if the
    log told none, and the finding stays; a plausible one after the batches keeps it too. Only a
    log telling that no step followed them (5 here) drops it: an attack once training was over."""
    def analyzed(steps):
        log = write(tmp_path / "a.jsonl", [HEADER, *DEFINITIONS,
                                           {"event": "calls", "step": steps, "rows": [row(5, 5, 3)]}])
        return {f.rule for f in modewatch.analyze(log).findings}

    assert analyzed(told) == {"train-without-dropout"}
    assert analyzed(5) == set()


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
