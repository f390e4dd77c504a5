"""The documentation builds, and every Python example in it runs and shows what it says."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples():
    for folder, _, files in os.walk(DOCS):
        for name in sorted(files):
            if name.endswith(".md"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    for number, code in enumerate(BLOCK.findall(f.read()), 1):
                        yield pytest.param(code, id=f"{os.path.relpath(path, DOCS)}#{number}")


def test_there_are_examples_to_run():
    """The rule pages alone have two examples each (buggy and fixed): they are found."""
    assert len(list(examples())) >= 15


@pytest.mark.parametrize("code", list(examples()))
def test_example_runs_and_shows_what_it_says(code, tmp_path):
    """Each example runs on its own; one marked `# buggy: RULE` reports RULE, and one marked
    `# fixed: RULE` does not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEWATCH")}
    if re.search(r"^def test_", code, re.M):  # an example of a test: run it as pytest would
        (tmp_path / "test_example.py").write_text(code)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"]
    else:
        command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    tag = re.match(r"# (buggy|fixed): ([a-z-]+)\n", code)
    if tag:
        reported = result.stdout.strip().splitlines()[-1]
        assert (f"'{tag.group(2)}'" in reported) == (tag.group(1) == "buggy"), reported


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: no broken link, no missing page, the API reference renders."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "site" / "api" / "index.html") as f:
        assert "record the mode of every Dropout" in f.read()
