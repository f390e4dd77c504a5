"""``modewatch`` / ``python -m modewatch``: a thin layer over the analysis and the reporters.

Exit codes: 0 no finding at or above --fail-on; 1 there are such findings; 2 usage or input
error, told in one line on stderr. Imports no torch (``run`` leaves that to the program it runs).
"""

from __future__ import annotations

import argparse
import os
import sys

TYPE_CHECKING = False  # typing is for annotations only: the CLI starts without importing it
if TYPE_CHECKING:
    from typing import Any, Callable, Optional, Sequence

from ._version import __version__
from .errors import LogFormatError, ModewatchError
from .rules import RULES, SEVERITIES
from .safetext import neutralise

OK, FINDINGS, USAGE = 0, 1, 2


def _error(message: str) -> None:
    """One line on stderr. Messages name files, and a file's name is text from outside."""
    sys.stderr.write(f"modewatch: error: {neutralise(message)}\n")


class _Formatter(argparse.HelpFormatter):
    """argparse's, sized without importing shutil (and with it bz2 and lzma) at every start."""

    def __init__(self, prog: str) -> None:
        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns - 2
        except (AttributeError, OSError, ValueError):
            width = 78
        super().__init__(prog, width=max(width, 40))


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default is the same code)
        _error(f"{message} (see 'modewatch {self.prog.split()[-1]} --help')")
        self.exit(USAGE)


def _parser() -> argparse.ArgumentParser:
    from .analysis import SMALL_BATCH
    from .report import FORMATS

    parser = _Parser(prog="modewatch", description="Find PyTorch models that train or evaluate in the wrong mode.")
    parser.add_argument("--version", action="version", version=f"modewatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    analyze = commands.add_parser("analyze", help="report the mode bugs recorded in logs",
                                  description="Report the mode bugs recorded in modewatch logs.")
    analyze.add_argument("paths", nargs="+", metavar="LOG_OR_DIR", help="a log, or a directory of *.jsonl logs")
    analyze.add_argument("--format", choices=list(FORMATS), default="text",
                         help=", ".join(f"{name} ({what})" for name, (_, what) in FORMATS.items()))
    analyze.add_argument("--fail-on", choices=[*SEVERITIES[::-1], "never"], default="error",
                         help="exit 1 when a finding is at least this severe (default: error)")
    analyze.add_argument("--ignore", action="append", default=[], metavar="RULE", choices=sorted(RULES),
                         help="do not report this rule (repeatable)")
    analyze.add_argument("--small-batch", type=int, default=SMALL_BATCH, metavar="N",
                         help=f"bn-small-batch fires under N samples (default: {SMALL_BATCH})")
    report = commands.add_parser("report", help="write a self-contained HTML report with a timeline",
                                 description="Write one self-contained HTML file: findings with their source "
                                             "lines, and a timeline per watched layer.")
    report.add_argument("paths", nargs="+", metavar="LOG_OR_DIR")
    report.add_argument("-o", "--output", default="modewatch-report.html", metavar="FILE",
                        help="where to write it (default: modewatch-report.html; never one of the logs)")
    report.add_argument("--source-root", action="append", default=[], metavar="DIR",
                        help="a folder whose .py files the report may show (repeatable); the working "
                             "directory and each log's folder always are")
    commands.add_parser("run", help="run a program instrumented, as MODEWATCH=1 would", usage=RUN_USAGE[7:],
                        description="Run a Python program with every model watched, as MODEWATCH=1 would.")
    return parser


def _progress_line(every: float = 0.5) -> Optional[Callable]:
    """On a terminal, a progress line on stderr at most every `every` seconds; else nothing."""
    try:
        if not sys.stderr.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    import time

    last = [time.monotonic()]

    def show(path: str, done: int) -> None:
        now = time.monotonic()
        if now - last[0] < every:
            return
        last[0] = now
        try:
            size = os.path.getsize(path)
            sys.stderr.write(f"\rmodewatch: analyzing {neutralise(os.path.basename(path))}: "
                             f"{100 * done // max(size, 1)}% "
                             f"({done / 1e6:.1f} of {size / 1e6:.1f} MB)\x1b[K")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    return show


def _report(args: argparse.Namespace) -> int:
    from .analysis import analyze
    from .reader import expand_paths
    from .report import html_report
    from .sources import Sources
    from .timeline import Timeline

    logs = [path for path, _ in expand_paths(args.paths)]
    for log in logs:
        if _same_file(args.output, log):
            raise ModewatchError(f"{args.output}: is the log {log}; the report must go elsewhere (-o)",
                                 "report-output")
    timeline = Timeline()
    analysis = analyze(*args.paths, tap=timeline)  # one pass over each log feeds both
    document = html_report(analysis, timeline, Sources.for_logs(analysis.logs, args.source_root))
    try:
        with open(args.output, "w", encoding="utf-8") as output:
            output.write(document)
    except OSError as exc:
        raise ModewatchError(f"cannot write {args.output}: {exc.strerror or exc}", "report-output") from None
    sys.stdout.write(neutralise(f"modewatch: report written to {args.output} "
                                f"({len(document.encode()) / 1024:.0f} KiB)") + "\n")
    return _bad_logs(analysis) or OK


def _same_file(output: str, log: str) -> bool:
    """Whether writing ``output`` would overwrite ``log`` (through a link, or by another name)."""
    try:
        return os.path.samefile(output, log)
    except (OSError, ValueError):  # no output file yet: compare where the names lead
        try:
            return os.path.realpath(output) == os.path.realpath(log)
        except (OSError, ValueError):
            return False


def _bad_logs(analysis: object) -> int:
    """Name each log of a directory that could not be analyzed, one line each: exit 2, which
    wins over findings (the rest was reported all the same)."""
    bad = getattr(analysis, "summary", {}).get("bad_logs", [])
    for message in bad:
        _error(str(LogFormatError(message)))
    return USAGE if bad else OK


def _analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze

    result = analyze(*args.paths, ignore=args.ignore, small_batch=args.small_batch, progress=_progress_line())
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")  # clear the progress line, if one was shown
    from .report import FORMATS

    report = FORMATS[args.format][0](result)
    sys.stdout.write(report if report.endswith("\n") else report + "\n")
    sys.stdout.flush()  # the report first, then what was left out of it
    return _bad_logs(result) or (FINDINGS if result.failing(args.fail_on) else OK)


RUN_USAGE = "usage: modewatch run [--log PATH] script.py [args...]  |  modewatch run [--log PATH] -m module [args...]"
RUN_HELP = """Run a Python program with every model watched, exactly as MODEWATCH=1 would: models are found
at their first .train()/.eval() call or when an optimizer is made for them.

  --log PATH   where the log goes (sets MODEWATCH_LOG; {rank} and {pid} are substituted)

The program gets its arguments untouched; its exit status is this command's.
Then: modewatch analyze LOG"""


def _run(argv: list) -> int:
    """``modewatch run``: the program, instrumented exactly as MODEWATCH=1 would instrument it.

    Options end at the script or ``-m module``; everything after belongs to the program, whose
    own exit status (or exception) is this command's.
    """
    log = None
    while argv and argv[0].startswith("--log"):
        if argv[0] == "--log" and len(argv) > 1:
            log, argv = argv[1], argv[2:]
        elif argv[0].startswith("--log="):
            log, argv = argv[0][len("--log="):], argv[1:]
        else:
            break
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(f"{RUN_USAGE}\n\n{RUN_HELP}\n")
        return OK
    if not argv or argv == ["-m"] or (argv[0].startswith("-") and argv[0] != "-m"):
        sys.stderr.write(RUN_USAGE + "\n")
        return USAGE
    os.environ["MODEWATCH"] = "1"  # also for the program's own child processes
    if log is not None:
        os.environ["MODEWATCH_LOG"] = log
    from . import _startup

    _startup.install()
    if argv[0] == "-m":
        sys.argv = argv[1:]
        sys.path[0] = os.getcwd()  # as `python -m` has it
        if not _module_exists(argv[1]):
            sys.stderr.write(f"modewatch: error: no module named {argv[1]!r} (see 'modewatch run --help')\n")
            return USAGE
        import runpy

        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return OK
    script = argv[0]
    if not os.path.isfile(script):
        what = "is a directory, not a script" if os.path.isdir(script) else "no such file"
        sys.stderr.write(f"modewatch: error: {script}: {what} (see 'modewatch run --help')\n")
        return USAGE
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` has it
    # An absolute path, as `python script.py` gives __main__: call sites read the same either way.
    import runpy

    runpy.run_path(os.path.abspath(script), run_name="__main__")
    return OK


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or a bad name
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # not argparse: the program's own arguments must pass untouched
        return _run(argv[1:])
    for stream in (sys.stdout, sys.stderr):  # a name from a log that the terminal cannot encode: escaped
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    if argv == ["--version"]:  # at once, without building the parser (and importing the analysis)
        sys.stdout.write(f"modewatch {__version__}\n")
        return OK
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    try:
        if args.command == "report":
            return _report(args)
        return _analyze(args)
    except ModewatchError as exc:
        _error(str(exc))
        return USAGE
    except BrokenPipeError:  # `modewatch analyze ... | head`
        return OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
