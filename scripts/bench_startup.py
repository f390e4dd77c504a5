"""Interpreter start-up with and without modewatch installed (MODEWATCH unset).

    python scripts/bench_startup.py [--runs 60]

Builds two fresh virtual environments in a temporary folder: one bare, one with this checkout
installed the regular way (``pip install --no-deps``: modewatch and its modewatch.pth, nothing
else, so that only modewatch's own cost is measured). Then times ``python -c pass`` in each,
interleaved, and reports medians and their ratio, and what the second one imported.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEWATCH")}
    with tempfile.TemporaryDirectory(prefix="modewatch-startup-") as folder:
        bare = venv(os.path.join(folder, "bare"), install=False)
        installed = venv(os.path.join(folder, "installed"), install=True)
        times = {bare: [], installed: []}
        for run in range(args.runs):
            for python in (bare, installed) if run % 2 else (installed, bare):
                start = time.perf_counter()
                subprocess.run([python, "-c", "pass"], check=True, env=env)
                times[python].append(time.perf_counter() - start)
        loaded = subprocess.run([installed, "-c", "import sys; print(sorted(m for m in sys.modules if 'modewatch' in m"
                                 " or m in ('torch', 'wrapt', 'structlog')))"], env=env, capture_output=True, text=True)
    a, b = statistics.median(times[bare]), statistics.median(times[installed])
    print(f"python -c pass, {args.runs} runs each, interleaved, MODEWATCH unset")
    print(f"  bare venv                {a * 1e3:7.2f} ms")
    print(f"  modewatch installed      {b * 1e3:7.2f} ms   ratio {b / a:.3f}")
    print(f"  modules imported at start-up by modewatch: {loaded.stdout.strip()}")


if __name__ == "__main__":
    main()
