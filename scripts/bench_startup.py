"""Start-up costs: the interpreter with modewatch installed, and the command line itself.

    python scripts/bench_startup.py [--runs 60]

Builds two fresh virtual environments in a temporary folder: one bare, one with this checkout
installed the regular way (``pip install --no-deps``: modewatch and its modewatch.pth, nothing
else, so that only modewatch's own cost is measured). Then times, interleaved, medians:

- ``python -c pass`` in each (MODEWATCH unset: installing modewatch must cost nothing);
- ``python -c "import json"`` (the budget's reference), ``modewatch --version`` and
  ``modewatch analyze`` on a small log (a few lines), with the console script (and the latter as
  ``python -m modewatch`` too) in the second: the CLI imports no torch, wrapt or structlog
  (budget: 1.2x the reference).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def venv(folder: str, install: bool) -> str:
    subprocess.run([sys.executable, "-m", "venv", folder], check=True)
    python = os.path.join(folder, "bin", "python")
    if install:
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", ROOT], check=True)
    return python


SMALL_LOG = "\n".join([
    '{"event":"modewatch","schema":1,"modewatch":"0.1.0","pid":1,"argv":[],"rank":null,"world_size":null}',
    '{"event":"layer","id":0,"name":"drop","kind":"Dropout","category":"dropout","model":0,"copy_of":null}',
    '{"event":"site","id":0,"file":"train.py","line":20,"function":"train"}',
    '{"event":"calls","step":3,"rows":[[0,3,3,null,0.5,null,0,0,0,2,1,3,3]]}',
    '{"event":"end","steps":3,"forwards":3}', ""])


def timed(commands: dict, runs: int, env: dict) -> dict:
    """Median seconds of each command, run interleaved (the order turns each round)."""
    names = list(commands)
    times: dict = {name: [] for name in names}
    for run in range(runs):
        for name in names[run % len(names):] + names[:run % len(names)]:
            start = time.perf_counter()
            subprocess.run(commands[name], check=False, env=env, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEWATCH")}
    with tempfile.TemporaryDirectory(prefix="modewatch-startup-") as folder:
        bare = venv(os.path.join(folder, "bare"), install=False)
        installed = venv(os.path.join(folder, "installed"), install=True)
        log = os.path.join(folder, "small.jsonl")
        with open(log, "w") as f:
            f.write(SMALL_LOG)
        pass_times = timed({"bare": [bare, "-c", "pass"], "installed": [installed, "-c", "pass"]}, args.runs, env)
        script = os.path.join(os.path.dirname(installed), "modewatch")  # the console script
        cli_times = timed({"json": [installed, "-c", "import json"],
                           "version": [script, "--version"],
                           "analyze": [script, "analyze", log],
                           "-m analyze": [installed, "-m", "modewatch", "analyze", log]}, args.runs, env)
        loaded = subprocess.run([installed, "-c", "import sys; print(sorted(m for m in sys.modules if 'modewatch' in m"
                                 " or m in ('torch', 'wrapt', 'structlog')))"], env=env, capture_output=True, text=True)
        cli_loaded = subprocess.run([installed, "-c", "import sys; from modewatch.cli import main; main(['analyze', "
                                     f"{log!r}]); print(sorted(m for m in sys.modules if m in ('torch', 'wrapt', "
                                     "'structlog')))"], env=env, capture_output=True, text=True)
    a, b = pass_times["bare"], pass_times["installed"]
    print(f"python -c pass, {args.runs} runs each, interleaved, MODEWATCH unset")
    print(f"  bare venv                {a * 1e3:7.2f} ms")
    print(f"  modewatch installed      {b * 1e3:7.2f} ms   ratio {b / a:.3f}")
    print(f"  modules imported at start-up by modewatch: {loaded.stdout.strip()}")
    reference = cli_times["json"]
    print(f"\nthe command line, {args.runs} runs each, interleaved (budget: 1.2x python -c 'import json')")
    print(f"  python -c 'import json'  {reference * 1e3:7.2f} ms")
    labels = {"version": "modewatch --version", "analyze": "modewatch analyze (small log)",
              "-m analyze": "python -m modewatch analyze"}
    for name, label in labels.items():
        print(f"  {label:29s} {cli_times[name] * 1e3:7.2f} ms   ratio {cli_times[name] / reference:.3f}")
    print(f"  torch, wrapt, structlog imported by the CLI: {cli_loaded.stdout.strip().splitlines()[-1:]}")


if __name__ == "__main__":
    main()
