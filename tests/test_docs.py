"""The documentation builds, and every Python example in it runs and shows what it says.

The examples run in one interpreter (helpers.run_examples), each as a program of its own in a
folder of its own, with one result per example here, named by its page and block.
"""

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

def jobs():
    """What helpers.run_examples runs: every example."""
    found = []
    for name, code in EXAMPLES:
        job = {"id": name, "code": code, "file": "test_example.py" if re.search(r"^def test_", code, re.M)
               else "example.py"}
        found.append(job)
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


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: no broken link, no missing page, the API reference renders."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment())
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "site" / "api" / "index.html") as f:
        assert "record the mode of every Dropout" in f.read()
