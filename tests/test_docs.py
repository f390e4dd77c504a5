"""The documentation builds, every Python example in it runs and shows what it says, and every
report it shows is what the program prints.

The examples run in one interpreter (helpers.run_examples), each as a program of its own in a
folder of its own, with one result per example here, named by its page and block.
"""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

import helpers
from helpers import ROOT, environment

DOCS = os.path.join(ROOT, "docs")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
ANY_BLOCK = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
REPORT_START = re.compile(r"^modewatch \d+\.\d+\.\d+: \d+ error\(s\)", re.M)  # a text report's first line
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))]


def examples():
    """(id, code) of every Python block of the docs, its id the page and the block's number."""
    found = []
    for folder, _, files in sorted(os.walk(DOCS)):
        for name in sorted(files):
            if name.endswith(".md"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    for number, code in enumerate(PYTHON_BLOCK.findall(f.read()), 1):
                        found.append((f"{os.path.relpath(path, DOCS)}#{number}", code))
    return found


EXAMPLES = examples()

# The reports the README and the docs show, each with the program that prints it and what varies
# from one machine to the next: the folder it ran in, shown as the folder named here.
DEMO = "python scripts/demo.py --log demo.jsonl, then modewatch analyze demo.jsonl"
SHOWN = {
    "README.md#1": dict(job=DEMO, folder=lambda result: ROOT, shown_as="/home/you/modewatch"),
    "getting-started.md#1": dict(job="getting-started.md#1", folder=lambda result: result["folder"],
                                 shown_as="/home/you"),
}


def jobs():
    """What helpers.run_examples runs: every example, the getting-started one saved as run.py and
    followed by `modewatch analyze run.jsonl` (its report is shown), and the README's demo."""
    found = []
    for name, code in EXAMPLES:
        job = {"id": name, "code": code, "file": "test_example.py" if re.search(r"^def test_", code, re.M)
               else "example.py"}
        if name == "getting-started.md#1":
            job.update(file="run.py", then=[["analyze", "run.jsonl"]])
        found.append(job)
    found.append({"id": DEMO, "script": os.path.join(ROOT, "scripts", "demo.py"), "argv": ["--log", "demo.jsonl"],
                  "then": [["analyze", "demo.jsonl"]]})
    return found


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Every job run once, in one fresh interpreter (MODEWATCH* cleared): {id: result}, and the
    interpreter's own output, for a job that never reported."""
    folder = tmp_path_factory.mktemp("examples")
    (folder / "jobs.json").write_text(json.dumps(jobs()))
    results = folder / "results.json"
    process = subprocess.run([sys.executable, helpers.__file__, str(folder / "jobs.json"), str(results)],
                             cwd=folder, env=environment(), capture_output=True, text=True, timeout=900)
    done = json.loads(results.read_text()) if results.exists() else {}
    return done, f"exit status {process.returncode}; " + (process.stdout + process.stderr)[-3000:]


def result_of(ran, name):
    done, runner = ran
    assert name in done, f"{name} never ran: the interpreter running the examples stopped ({runner})"
    return done[name]


def test_there_are_examples_to_run():
    """The rule pages alone have two examples each (buggy and fixed): they are found."""
    assert len(EXAMPLES) >= 15
    assert sum(name.startswith("rules/") for name, _ in EXAMPLES) >= 2 * 10


@pytest.mark.parametrize("name, code", EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs_and_shows_what_it_says(ran, name, code):
    """Each example runs on its own, as `python example.py` would (`pytest test_example.py` for an
    example of a test), and leaves no watcher open; one marked `# buggy: RULE` reports RULE, and
    one marked `# fixed: RULE` does not."""
    result = result_of(ran, name)
    assert result["error"] is None, f"{result['error']}\n{result['stdout'][-2000:]}"
    tag = re.match(r"# (buggy|fixed): ([a-z-]+)\n", code)
    if tag:
        reported = result["stdout"].strip().splitlines()[-1]
        assert (f"'{tag.group(2)}'" in reported) == (tag.group(1) == "buggy"), reported


def test_the_first_example_prints_what_the_page_says(ran):
    """Getting started shows what its 30-second example prints: those lines, exactly."""
    with open(os.path.join(DOCS, "getting-started.md")) as f:
        page = f.read()
    shown = re.search(r"called the model:\n\n```text\n(.*?)```", page, re.S).group(1)
    assert result_of(ran, "getting-started.md#1")["stdout"] == shown


def shown_reports():
    """{"PAGE#N": text} of the N-th block of each page that shows a text report, the command line
    above it (`$ ...`) left out."""
    shown = {}
    for page in PAGES:
        with open(page) as f:
            blocks = [block for block in ANY_BLOCK.findall(f.read()) if REPORT_START.search(block)]
        for number, block in enumerate(blocks, 1):
            name = os.path.relpath(page, DOCS if page.startswith(DOCS + os.sep) else ROOT)
            shown[f"{name}#{number}"] = "".join(line for line in block.splitlines(keepends=True)
                                                if not line.startswith("$ "))
    return shown


def test_every_shown_report_is_checked():
    """A report shown in the README or the docs is regenerated by the test below: none is shown
    that no program printed."""
    assert set(shown_reports()) == set(SHOWN)


@pytest.mark.parametrize("name", sorted(SHOWN))
def test_shown_report_is_what_the_program_prints(ran, name):
    """The report a page shows is, line for line, what `modewatch analyze` prints for the run it
    says it comes from; only the folder the program ran in differs (and is shown as a made-up
    one)."""
    how = SHOWN[name]
    result = result_of(ran, how["job"])
    assert result["error"] is None, result["error"]
    (analyze,) = result["then"]
    printed = analyze["stdout"].replace(how["folder"](result) + os.sep, how["shown_as"] + "/")
    assert shown_reports()[name] == printed


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: no broken link, no missing page, the API reference renders."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment())
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "site" / "api" / "index.html") as f:
        assert "record the mode of every Dropout" in f.read()
