"""Production use: MODEWATCH=1 with no code change, `modewatch run`, and a job that never breaks."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import pytest
import torch

import modewatch
from modewatch import _startup, reader
from modewatch.cli import main
from helpers import ROOT, Net, batches, environment, findings_by_rule, python, train_step

# A training script that knows nothing of modewatch, with the seed bug at step 2.
TRAIN = textwrap.dedent("""
    import sys
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    step = 0
    while step != steps:
        loss = model(torch.randn(16, 8)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 2:
            model.eval()
            print("evaluated", flush=True)
        step += 1
""")


@pytest.fixture
def train_py(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(TRAIN)
    return path


def only_log(folder):
    logs = glob.glob(os.path.join(folder, "*.jsonl"))
    assert len(logs) == 1, logs
    return logs[0]


def test_environment_variable_watches_a_script_that_does_not_import_modewatch(tmp_path, train_py):
    """MODEWATCH=1 python train.py: the model is found and the seed bug reported, with the
    script's own lines (this checkout's editable install carries modewatch.pth)."""
    result = python([str(train_py)], tmp_path, {"MODEWATCH": "1", "MODEWATCH_LOG": str(tmp_path / "log-{pid}.jsonl")})
    assert result.returncode == 0, result.stderr
    log = only_log(tmp_path)
    assert os.path.basename(log) != "log-{pid}.jsonl"
    found = findings_by_rule(modewatch.analyze(log))
    assert set(found) == {"train-without-dropout", "bn-frozen-in-train"}
    assert found["train-without-dropout"].mode_site["line"] == TRAIN.splitlines().index("        model.eval()") + 1
    assert found["train-without-dropout"].forward_site["file"] == str(train_py)
    # Nobody chose the log's name: the process says where it went, in one line.
    assert result.stderr.count(f"modewatch: wrote {log} (see: modewatch analyze {log})") == 1, result.stderr


@pytest.mark.parametrize("value", [None, "0", ""])
def test_unset_imports_nothing(tmp_path, value):
    """MODEWATCH unset, empty or 0: start-up imports none of modewatch, torch, wrapt, structlog."""
    env = {} if value is None else {"MODEWATCH": value}
    code = "import sys; print([m for m in ('modewatch', 'torch', 'wrapt', 'structlog') if m in sys.modules])"
    result = python(["-c", code], tmp_path, env)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result


def test_startup_runs_once_however_often_the_pth_line_runs(tmp_path, train_py):
    """In a venv the .pth line may run twice: one watcher, one log."""
    code = ("import modewatch._startup as s, runpy, sys; s.install(); s.install(); import torch\n"
            "from modewatch import patches; print(len(patches.active_watchers()))\n"
            f"sys.argv = ['train.py']; runpy.run_path({str(train_py)!r})")
    result = python(["-c", code], tmp_path, {"MODEWATCH": "1", "MODEWATCH_LOG": str(tmp_path / "x-{pid}.jsonl")})
    assert result.stdout.splitlines()[0] == "1", result.stderr
    assert len(glob.glob(str(tmp_path / "*.jsonl"))) == 1


def test_a_process_that_watches_nothing_leaves_a_clean_log(tmp_path, capsys):
    """Under MODEWATCH=1 a program that imports torch but trains no model still leaves a log, so
    that `modewatch analyze` in CI reads it, exits 0 and says no model was found."""
    result = python(["-c", "import torch; torch.ones(2) * 2"], tmp_path, {"MODEWATCH": "1"})
    (log,) = glob.glob(str(tmp_path / "*.jsonl"))
    assert result.returncode == 0 and f"modewatch: wrote {os.path.basename(log)}" in result.stderr, result.stderr
    assert main(["analyze", log]) == 0
    assert "no model was watched" in capsys.readouterr().out


def test_the_pth_line_itself_starts_watching(tmp_path):
    """The line in modewatch.pth, read by site from a site directory, starts modewatch."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "modewatch.pth").write_text(open(os.path.join(ROOT, "modewatch.pth")).read())
    code = (f"import site; site.addsitedir({str(site_dir)!r}); import sys; print('modewatch._startup' in sys.modules)")
    assert python(["-c", code], tmp_path, {"MODEWATCH": "1"}).stdout.strip() == "True"
    assert python(["-c", code], tmp_path).stdout.strip() == "False"


@pytest.mark.slow
def test_a_built_wheel_carries_the_pth_at_its_root(tmp_path):
    """A regular install gets modewatch.pth at the root of site-packages: it is in the wheel."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), ROOT],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = glob.glob(str(tmp_path / "modewatch-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("modewatch.pth").decode() == open(os.path.join(ROOT, "modewatch.pth")).read()
        assert "modewatch/_startup.py" in archive.namelist()


def test_modewatch_run_script_and_module(tmp_path, train_py):
    """`modewatch run script.py args` and `modewatch run -m module args` watch like MODEWATCH=1,
    pass the program its arguments, and end with its exit status."""
    logs = tmp_path / "logs"
    result = python(["-m", "modewatch", "run", "--log", str(logs / "s-{pid}.jsonl"), str(train_py), "5"], tmp_path)
    assert result.returncode == 0, result.stderr
    analysis = modewatch.analyze(str(logs))
    assert {f.rule for f in analysis.findings} == {"train-without-dropout", "bn-frozen-in-train"}
    assert analysis.summary["steps"] == 5
    result = python(["-m", "modewatch", "run", f"--log={logs / 'm-{pid}.jsonl'}", "-m", "train", "4"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(glob.glob(str(logs / "m-*.jsonl"))) == 1
    (tmp_path / "fails.py").write_text("import sys; sys.exit(3)")
    assert python(["-m", "modewatch", "run", "fails.py"], tmp_path).returncode == 3


def test_modewatch_run_usage_errors(tmp_path):
    """No program, or a missing script: exit 2 with one line."""
    for args in ([], ["missing.py"], ["-m"]):
        result = python(["-m", "modewatch", "run", *args], tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result)


@pytest.mark.parametrize("log", ["/dev/full", "{tmp}/file/sub/log.jsonl"])
def test_unwritable_log_under_the_environment_variable_warns_and_trains(tmp_path, train_py, log):
    """A full disk or an unwritable MODEWATCH_LOG: one warning on stderr, and the job finishes. A
    log that cannot be made at all is said at start-up, not when the program ends."""
    (tmp_path / "file").write_text("")
    result = python([str(train_py)], tmp_path, {"MODEWATCH": "1", "MODEWATCH_LOG": log.format(tmp=tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "evaluated" in result.stdout
    (warning,) = [line for line in result.stderr.splitlines() if "modewatch" in line]
    if "file" in log:
        assert "is not a folder; the program runs unwatched" in warning


def test_read_only_file_system_warns_and_trains(tmp_path, train_py):
    """MODEWATCH_LOG on a read-only file system (a tmpfs mounted read-only in a private mount
    namespace): one warning naming it, at start-up, and the job finishes."""
    mount = tmp_path / "ro"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro none {mount}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a read-only mount here (needs unshare and mount)")
    env = environment(MODEWATCH="1", MODEWATCH_LOG=str(mount / "log.jsonl"))
    result = subprocess.run(["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro none {mount} && exec "$0" "$1"',
                             sys.executable, str(train_py)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "evaluated" in result.stdout
    (warning,) = [line for line in result.stderr.splitlines() if "modewatch" in line]
    assert "read-only file system; the program runs unwatched" in warning


def test_disk_filling_up_during_training_is_one_warning(tmp_path, monkeypatch):
    """The disk fills up in the middle of training: one warning, and training goes on."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = modewatch.watch(model, log=tmp_path / "log.jsonl", flush_seconds=0)
    full = open("/dev/full", "w")
    monkeypatch.setattr(watcher._writer, "_file", full)  # from now on every flush fails: ENOSPC
    monkeypatch.setattr(watcher._writer._log._logger, "file", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [train_step(model, opt, x, y) for x, y in batches(40)]
        watcher.close()
    assert len(losses) == 40
    assert [str(w.message).count("No space left") for w in caught if "modewatch" in str(w.message)] == [1]


def test_too_old_torch_is_a_warning(tmp_path):
    """A torch outside the supported range: a warning, and the program runs."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '1.13.1'\n")
    result = python(["-c", "import torch; print(torch.__version__)"], tmp_path,
                    {"MODEWATCH": "1", "PYTHONPATH": str(tmp_path / "fake")})
    assert result.returncode == 0 and result.stdout.strip() == "1.13.1"
    assert "older than modewatch supports" in result.stderr


def test_no_torch_installed_is_a_warning(monkeypatch, capsys):
    """MODEWATCH=1 where torch is not installed: a warning, no exception."""
    import importlib.util

    monkeypatch.setenv("MODEWATCH", "1")
    monkeypatch.setattr(_startup, "_installed", False)
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    _startup.install()
    assert "torch is not installed" in capsys.readouterr().err


def test_a_forked_child_gets_its_own_log(tmp_path):
    """After fork, a child writes its own log: at its {pid} path, or beside a fixed path that the
    parent holds; the parent's log is never written twice."""
    for template, child_logs in (("p-{pid}.jsonl", 1), ("shared.jsonl", 1)):
        folder = tmp_path / template.split(".")[0].replace("{pid}", "")
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        watcher = modewatch.watch(model, log=folder / template)
        for x, y in batches(3):
            train_step(model, opt, x, y)
        pid = os.fork()
        if pid == 0:  # the child: train a little, close, leave without running the parent's atexit
            try:
                torch.set_num_threads(1)  # as DataLoader workers do: a forked OpenMP pool hangs
                model.eval()
                for x, y in batches(2):
                    train_step(model, opt, x, y)
                watcher.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        for x, y in batches(2):
            train_step(model, opt, x, y)
        watcher.close()
        logs = sorted(glob.glob(str(folder / "*.jsonl")))
        assert len(logs) == 1 + child_logs
        parent = modewatch.analyze(watcher.path)
        assert parent.findings == [] and parent.summary["skipped_lines"] == 0
        assert parent.summary["layer_calls"] == 2 * 5
        if child_logs:
            (child_log,) = [log for log in logs if log != watcher.path]
            child = modewatch.analyze(child_log)
            assert {f.rule for f in child.findings} == {"train-without-dropout", "bn-frozen-in-train"}
            assert child.summary["layer_calls"] == 2 * 2


@pytest.mark.slow
def test_killed_job_leaves_an_analyzable_log(tmp_path, train_py):
    """SIGKILL in the middle of training: the log up to the last second is analyzed."""
    env = environment(MODEWATCH="1", MODEWATCH_LOG=str(tmp_path / "k-{pid}.jsonl"))
    process = subprocess.Popen([sys.executable, str(train_py), "-1"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "evaluated"
    time.sleep(2.5)  # more than the flush interval
    process.kill()
    process.wait()
    analysis = modewatch.analyze(only_log(tmp_path))
    assert {f.rule for f in analysis.findings} == {"train-without-dropout", "bn-frozen-in-train"}
    assert analysis.summary["unclosed_logs"]


@pytest.mark.slow
def test_sigterm_closes_the_log_and_still_terminates(tmp_path, train_py):
    """SIGTERM (a scheduler ending the job): the log is closed properly, and the process still
    dies of SIGTERM as it would have without modewatch."""
    env = environment(MODEWATCH="1", MODEWATCH_LOG=str(tmp_path / "t-{pid}.jsonl"))
    process = subprocess.Popen([sys.executable, str(train_py), "-1"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "evaluated"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM
    log_reader = reader.LogReader(only_log(tmp_path))
    list(log_reader)
    assert log_reader.ended and not log_reader.truncated


def test_folded_and_unfolded_logs_give_the_same_findings(tmp_path):
    """Folding identical forwards into runs loses nothing: the seed bugs analyzed from a folded
    and from an unfolded record give exactly the same findings."""
    def run(fold):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        log = str(tmp_path / f"fold-{fold}.jsonl")
        with modewatch.watch(model, log=log, fold=fold):
            model.train()
            for step, (x, y) in enumerate(batches(30)):
                train_step(model, opt, x, y)
                if step in (5, 20):
                    with torch.no_grad():
                        model(x)  # validation without eval(): the second seed bug
                if step == 10:
                    model.eval()  # the first seed bug
        return log

    def rows(log):
        with open(log) as f:
            return sum(len(json.loads(line)["rows"]) for line in f if '"event":"calls"' in line)

    folded, unfolded = run(True), run(False)
    assert rows(folded) * 4 < rows(unfolded)
    as_dicts = [[{**f.as_dict(), "log": None} for f in modewatch.analyze(log).findings] for log in (folded, unfolded)]
    assert as_dicts[0] == as_dicts[1]
    assert {f["rule"] for f in as_dicts[0]} == {"train-without-dropout", "bn-frozen-in-train",
                                                "stat-update-in-eval", "dropout-in-eval"}
