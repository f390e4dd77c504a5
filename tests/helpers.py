"""What the tests share: tiny models and data, the seed bug's run, hand-written log pieces, line
numbers found by marker comments, a clean environment for child processes, and the characters no
report may pass on. Imported as ``import helpers`` (``pythonpath = tests`` in setup.cfg), in either
import mode; fixtures live in conftest.py.
"""

import inspect
import json
import os
import subprocess
import sys

import torch
from torch import nn

import modewatch
from modewatch import format as logformat
from modewatch.collector import Watcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- models and data

class Net(nn.Module):
    """The smallest model with both kinds of mode-sensitive layer."""

    def __init__(self, p=0.5):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn1(self.fc1(x)))))


def batches(n=8, size=16, features=8, seed=0):
    """``n`` (inputs, labels) pairs, the same for the same arguments."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, features, generator=generator), torch.randint(0, 2, (size,), generator=generator))
            for _ in range(n)]


def train_step(model, optimizer, x, y):
    loss = nn.functional.cross_entropy(model(x), y)  # <- train forward
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def seed_bug_run(log, evaluate_at=2, steps=6):
    """The seed bug: Net trained watched for ``steps`` steps; at step ``evaluate_at`` an
    evaluation calls model.eval() and nobody calls model.train() again, and it runs one forward
    with grad enabled (eval-with-grad, an info finding). ``evaluate_at=None``: a correct run."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with modewatch.watch(model, log=log):
        model.train()
        for step, (x, y) in enumerate(batches(steps)):
            train_step(model, optimizer, x, y)
            if step == evaluate_at:
                model.eval()  # <- seed eval
                model(x)  # <- seed evaluation forward
    return os.fspath(log)


def watch_everything(log):
    """Every model of the process watched as it shows up, as MODEWATCH=1 does (in-process)."""
    watcher = Watcher(None, log=log, discover=True)
    watcher.always_log = True
    return watcher


def analyze_run(log, model, body, **analyze_options):
    """Run ``body()`` with ``model`` watched into ``log``; the analysis of that log."""
    with modewatch.watch(model, log=log):
        body()
    return modewatch.analyze(log, **analyze_options)


# ----------------------------------------------------------------------------- looking at results

def line_of(marker, obj=None):
    """The line number of the line holding ``# <- marker`` in the file of ``obj`` (default: caller's),
    or in the file at path ``obj``."""
    if obj is None:
        filename = inspect.stack()[1].filename
    elif isinstance(obj, (str, os.PathLike)):
        filename = os.fspath(obj)
    else:
        filename = inspect.getsourcefile(obj)
    with open(filename) as f:
        for number, text in enumerate(f, 1):
            if f"# <- {marker}" in text:
                return number
    raise AssertionError(f"no marker {marker!r} in {filename}")


def findings_by_rule(analysis):
    return {f.rule: f for f in analysis.findings}


def rules_and_severities(analysis):
    return {(f.rule, f.severity) for f in analysis.findings}


# The characters no report may pass on from a log: C0 controls (a report's own line breaks
# aside), DEL, C1 controls, bidi controls and lone surrogates.
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def unsafe(text):
    """The characters of ``text`` that a terminal, a browser or an encoder would act on."""
    return [c for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F or c in BIDI
            or 0xD800 <= ord(c) <= 0xDFFF]


# ----------------------------------------------------------------------------- logs written by hand

HEADER = {"event": "modewatch", "schema": logformat.SCHEMA, "modewatch": "0.1.0", "pid": 1, "argv": [],
          "rank": None, "world_size": None}
DEFINITIONS = [
    {"event": "layer", "id": 0, "name": "drop", "kind": "Dropout", "category": "dropout", "model": 0, "copy_of": None},
    {"event": "site", "id": 0, "file": "train.py", "line": 20, "function": "train"},
    {"event": "site", "id": 1, "file": "train.py", "line": 29, "function": "test"},
    {"event": "mode", "id": 0, "site": 1, "call": "eval", "mode": False, "target": "", "scope": "model"},
]


def optimized(*models):
    """The event that says an optimizer trains ``models`` (default model 0), as the log of a
    training run says: a model no optimizer trains gets no train-without-dropout or
    bn-frozen-in-train (see rules._settle_training)."""
    return {"event": "optimized", "step": 0, "models": list(models or (0,)), "layers": []}


DEFINITIONS.append(optimized())


def row(first_step, last_step, calls=1, kind=logformat.PARAM_GRAD, training=False):
    """A calls row of layer 0 ("drop", p 0.5) called from site 0; in eval mode, set by mode 0."""
    flags = (logformat.TRAINING if training else 0) | logformat.GRAD_ENABLED
    return [0, kind, flags, None, 0.5, None if training else 0, 0, 0, first_step, last_step, first_step,
            calls, calls]


def write(path, events, tail=b""):
    """A log made of ``events`` (one JSON line each), then the bytes ``tail``; its path."""
    with open(path, "wb") as f:
        for event in events:
            f.write(json.dumps(event).encode() + b"\n")
        f.write(tail)
    return os.fspath(path)


# ----------------------------------------------------------------------------- child processes

def environment(**extra):
    """os.environ without any MODEWATCH* variable (a developer's MODEWATCH=1 must not leak into
    what a test starts), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEWATCH")}
    env.update(extra)
    return env


def python(args, cwd, env=None, timeout=120, **kwargs):
    """``python ARGS`` in a fresh interpreter in ``cwd``, MODEWATCH* cleared then ``env`` added;
    the CompletedProcess, output as text."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment(**(env or {})), capture_output=True,
                          text=True, timeout=timeout, **kwargs)


# ----------------------------------------------------------------------------- running the docs' examples

def run_examples(jobs_path, results_path):
    """Run each job of the JSON list at ``jobs_path`` in this one interpreter, as if each were a
    program of its own: a fresh module namespace, a fresh temporary working directory, torch's
    random generator as a new process has it, the warning filters put back after it. A job is
    ``{"id", "file", "code"}``: ``code`` written to ``file`` there and run as ``python file``
    (or, for a file named ``test_*.py``, as ``pytest file``), or ``{"id", "script", "argv"}``: an
    existing script run as ``python script ARGV``; then, in the same folder, each ``modewatch``
    command line of its ``then``. Each job's folder is ``job-N`` beside ``results_path``. Results
    go to ``results_path`` after each job, so that a job that hangs or kills the interpreter
    leaves those before it: ``{id: {"error", "stdout", "then", "folder"}}``, ``error`` null when
    the job ran to the end with exit status 0 and left no watcher behind."""
    import contextlib
    import io
    import runpy
    import traceback
    import warnings

    import pytest

    from modewatch import patches
    from modewatch.cli import main as cli

    with open(jobs_path) as f:
        jobs = json.load(f)
    seed = torch.initial_seed()  # what a new interpreter starts with
    results, home = {}, os.getcwd()
    for number, job in enumerate(jobs):
        folder = os.path.join(os.path.dirname(os.path.abspath(results_path)), f"job-{number}")
        os.mkdir(folder)
        os.chdir(folder)
        out, error, then = io.StringIO(), None, []
        argv, path = sys.argv[:], sys.path[:]
        torch.manual_seed(seed)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                if "code" in job:
                    with open(job["file"], "w") as f:
                        f.write(job["code"])
                    script, args = os.path.join(folder, job["file"]), []
                else:
                    script, args = job["script"], job.get("argv", [])
                sys.argv, sys.path[0] = [script, *args], os.path.dirname(script)
                code = 0
                try:
                    if os.path.basename(script).startswith("test_"):
                        code = pytest.main(["-q", "-p", "no:cacheprovider", "--import-mode=importlib", script])
                    else:
                        runpy.run_path(script, run_name="__main__")
                except SystemExit as exc:
                    code = exc.code
                if code not in (0, None):
                    error = f"exit status {code}"
                left = patches.active_watchers()
                for watcher in left:
                    watcher.close()
                if left and not error:
                    error = f"left {len(left)} watcher(s) open"
            for command in job.get("then", []):
                shown = io.StringIO()
                with contextlib.redirect_stdout(shown):
                    status = cli(command)
                then.append({"command": command, "stdout": shown.getvalue(), "status": status})
        except BaseException:
            error = traceback.format_exc()
        finally:
            sys.argv, sys.path[:] = argv, path
            os.chdir(home)
        results[job["id"]] = {"error": error, "stdout": out.getvalue(), "then": then, "folder": folder}
        with open(results_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    run_examples(*sys.argv[1:])
