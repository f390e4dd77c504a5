"""The command line: exit codes, formats, and one clear line for every bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import modewatch
from modewatch.cli import main
import helpers
from helpers import DEFINITIONS, HEADER, environment, line_of, row, seed_bug_run, write

FINDING_KEYS = {"rule", "severity", "message", "layers", "count", "first_step", "last_step", "rank",
                "forward_site", "mode_site", "fix", "batches", "ranks", "log", "model"}


@pytest.fixture(scope="module")
def clean_log(tmp_path_factory):
    """A log of a correct training loop."""
    return seed_bug_run(tmp_path_factory.mktemp("cli") / "clean.jsonl", evaluate_at=None)


def test_exit_codes_follow_fail_on(seed_log, clean_log, capsys):
    """0 when nothing reaches --fail-on, 1 when something does."""
    assert main(["analyze", clean_log]) == 0
    assert main(["analyze", seed_log]) == 1
    assert main(["analyze", seed_log, "--fail-on", "never"]) == 0
    assert main(["analyze", seed_log, "--ignore", "train-without-dropout", "--ignore", "bn-frozen-in-train"]) == 0
    assert main(["analyze", seed_log, "--ignore", "train-without-dropout", "--ignore", "bn-frozen-in-train",
                 "--fail-on", "info"]) == 1


def test_json_output_has_the_documented_shape(seed_log, capsys):
    """--format json prints the document docs/cli.md describes: version, findings with every key,
    summary."""
    assert main(["analyze", seed_log, "--format", "json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["modewatch"] == modewatch.__version__
    assert isinstance(document["summary"], dict)
    rules = {f["rule"]: f for f in document["findings"]}
    assert set(rules) == {"train-without-dropout", "bn-frozen-in-train", "eval-with-grad"}
    for finding in document["findings"]:
        assert set(finding) == FINDING_KEYS
        assert set(finding["forward_site"]) == {"file", "line", "function"}
    assert set(rules["train-without-dropout"]["mode_site"]) == {"file", "line", "function", "call"}
    assert rules["train-without-dropout"]["mode_site"]["call"] == "eval"
    assert rules["train-without-dropout"]["rank"] is None
    assert [f["severity"] for f in document["findings"]] == ["error", "error", "info"]


def test_text_output_groups_by_cause_with_each_fix(seed_log, capsys):
    """The text report names the mode call that caused the findings, then each rule under it with
    its layers, then each distinct fix of the group once, in order: eval-with-grad's too (an info
    finding, but one with something to change); a fix that another begins with may be left out."""
    found = {f.rule: f for f in modewatch.analyze(seed_log).findings}
    main(["analyze", seed_log])
    out = capsys.readouterr().out
    eval_line = line_of("seed eval", helpers)
    assert f"\nmodel.eval() at {helpers.__file__}:{eval_line} in seed_bug_run() left the model in eval mode:\n" in out
    assert "train-without-dropout" in out and "(in layer drop)" in out and "(in layer bn1)" in out
    fixes = [line[len("  fix: "):] for line in out.splitlines() if line.startswith("  fix: ")]
    wanted = [found[rule].fix for rule in ("train-without-dropout", "bn-frozen-in-train", "eval-with-grad")]
    # A fix that another one begins with says nothing more, and may be left out.
    wanted = [fix for fix in wanted if not any(other != fix and other.startswith(fix.rstrip(".")) for other in wanted)]
    assert fixes == wanted and found["eval-with-grad"].fix in fixes


def test_each_finding_says_its_calls_steps_and_first_forward(seed_log, capsys):
    """Under its summary, each finding says how many layer calls, the optimizer steps they came
    after (a range, or "after step N" when all came after the same one) and the line that first
    called the model."""
    main(["analyze", seed_log])
    out = capsys.readouterr().out
    training = f"{helpers.__file__}:{line_of('train forward', helpers)} in train_step()"
    evaluation = f"{helpers.__file__}:{line_of('seed evaluation forward', helpers)} in seed_bug_run()"
    # The seed run: 6 steps, eval() after the third; the evaluation's one forward (2 layers) after it.
    assert out.count(f"  3 layer calls, steps 3-5, first at {training}\n") == 2  # Dropout, BatchNorm
    assert out.count(f"  2 layer calls, after step 3, first at {evaluation}\n") == 1  # eval-with-grad


def test_a_directory_is_analyzed_as_its_logs(seed_log, capsys):
    """analyze DIR reads the *.jsonl logs in it."""
    assert main(["analyze", os.path.dirname(seed_log), "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["summary"]["logs"] == 1


@pytest.mark.parametrize("content, says", [
    (None, "no such file"),
    (b"", "is empty"),
    (b"hello world\n", "not a modewatch log"),
    (b'{"event": "something else"}\n', "not a modewatch log"),
    (b'{"event": "modewatch", "schema": 99}\n', "schema 99 is not supported"),
    (b"\xff\xfe\x00binary", "not a modewatch log"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, says):
    """A missing, empty, foreign or future log: exit 2, one line on stderr naming the file."""
    path = tmp_path / "input.jsonl"
    if content is not None:
        path.write_bytes(content)
    assert main(["analyze", os.fspath(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and says in err
    assert "Traceback" not in err
    assert ("is empty" in err) == (content == b"")


@pytest.mark.parametrize("argv, says", [
    (["analyze", "x.jsonl", "--ignore", "no-such-rule"], "argument --ignore: invalid choice: 'no-such-rule'"),
    (["analyze", "x.jsonl", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
])
def test_usage_errors_exit_2(capsys, argv, says):
    """An unknown rule or format: exit 2, nothing on stdout, one line on stderr that names the
    bad value and where help is."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"modewatch: error: {says} ")
    assert err.count("\n") == 1 and err.endswith("(see 'modewatch analyze --help')\n")


def test_no_command_exits_2_with_the_commands_on_stderr(capsys):
    """`modewatch` alone: exit 2, and the usage with every command on stderr (stdout stays empty)."""
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: modewatch ")
    for command in ("analyze", "report", "run"):
        assert f"\n    {command} " in err


def test_log_of_a_killed_job_says_so(seed_log, tmp_path, capsys):
    """A log with no closing event (the job was killed) is analyzed, and the report says it."""
    lines = open(seed_log).read().splitlines(keepends=True)
    cut = tmp_path / "killed.jsonl"
    cut.write_text("".join(lines[:-1]))
    assert main(["analyze", os.fspath(cut)]) == 1
    assert "was not closed" in capsys.readouterr().out


def test_cut_off_log_is_analyzed_and_the_skip_is_said(seed_log, tmp_path, capsys):
    """A log cut mid-line (a killed job) is analyzed; the report says a line was skipped."""
    data = open(seed_log, "rb").read()
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(data[: data.rindex(b'{"event":"end"') + 10])
    assert main(["analyze", os.fspath(cut)]) == 1
    out = capsys.readouterr().out
    assert "skipped" in out and "ends mid-line" in out


def test_cli_and_analyzer_import_no_torch(seed_log):
    """Logs can be analyzed where torch is not installed: the CLI never imports it."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['modewatch', 'analyze', sys.argv[1]]\n"
        "try:\n    runpy.run_module('modewatch', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, seed_log], capture_output=True, text=True,
                            env=environment())
    assert result.returncode == 1, result.stderr
    assert "train-without-dropout" in result.stdout


def test_console_script_and_module_agree(seed_log):
    """`modewatch` (console script) and `python -m modewatch` give the same report and code."""
    script = os.path.join(os.path.dirname(sys.executable), "modewatch")
    by_module = subprocess.run([sys.executable, "-m", "modewatch", "analyze", seed_log, "--format", "json"],
                               capture_output=True, text=True, env=environment())
    by_script = subprocess.run([script, "analyze", seed_log, "--format", "json"], capture_output=True, text=True,
                               env=environment())
    assert by_module.returncode == by_script.returncode == 1
    assert by_module.stdout == by_script.stdout


def test_separate_runs_analyzed_together_stay_apart(seed_log, tmp_path, capsys):
    """Two runs (not ranks of one job) in one folder: one finding per run, each naming its log."""
    for name in ("first.jsonl", "second.jsonl"):
        shutil.copyfile(seed_log, tmp_path / name)
    analysis = modewatch.analyze(os.fspath(tmp_path))
    dropout = [f for f in analysis.findings if f.rule == "train-without-dropout"]
    assert sorted(os.path.basename(f.log) for f in dropout) == ["first.jsonl", "second.jsonl"]
    assert [f.count for f in dropout] == [3, 3]
    main(["analyze", os.fspath(tmp_path)])
    out = capsys.readouterr().out
    assert "first.jsonl: model.eval() at" in out and "second.jsonl: model.eval() at" in out


def test_a_log_with_no_layer_call_says_why(tmp_path, capsys):
    """A log in which nothing was recorded says so, with the likely reason, instead of a bare
    'no problems'."""
    log = tmp_path / "empty.jsonl"
    modewatch.watch(torch.nn.Linear(2, 2), log=log).close()
    assert main(["analyze", os.fspath(log)]) == 0
    assert "no Dropout/BatchNorm call was recorded" in capsys.readouterr().out


def test_markdown_is_a_table_per_cause_with_log_text_escaped(tmp_path, capsys):
    """--format markdown: a heading, one table per cause, and a layer name from the log that
    holds Markdown or HTML cannot break the table or inject markup."""

    hostile = dict(DEFINITIONS[0], name="x|<script>alert(1)</script>`")
    log = write(tmp_path / "a.jsonl", [HEADER, hostile, *DEFINITIONS[1:], {"event": "calls", "rows": [row(1, 9, 5)]}])
    assert main(["analyze", log, "--format", "markdown"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("## modewatch: 1 error(s)")
    assert "| error | `train-without-dropout` |" in out
    assert "<script>" not in out and "x\\|&lt;script>" in out


@pytest.mark.parametrize("where", ["tests folder", "checkout", "elsewhere"])
def test_sarif_places_findings_at_the_line_to_change(seed_log, tmp_path, monkeypatch, capsys, where):
    """--format sarif: SARIF 2.1.0 with every rule described, each result at its mode_site and the
    forward_site related. A file under the working directory is a path relative to it
    (%SRCROOT%); one outside it, an absolute file:// URI, never a path climbing out with '..'."""
    cwd = {"tests folder": os.path.dirname(helpers.__file__), "checkout": helpers.ROOT, "elsewhere": tmp_path}[where]
    monkeypatch.chdir(cwd)
    assert main(["analyze", seed_log, "--format", "sarif"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["version"] == "2.1.0"
    (run,) = document["runs"]
    assert {rule["id"] for rule in run["tool"]["driver"]["rules"]} == set(modewatch.rules.RULES)
    result = next(r for r in run["results"] if r["ruleId"] == "train-without-dropout")
    assert result["level"] == "error"
    artifact = {"tests folder": {"uri": "helpers.py", "uriBaseId": "%SRCROOT%"},
                "checkout": {"uri": "tests/helpers.py", "uriBaseId": "%SRCROOT%"},
                "elsewhere": {"uri": pathlib.Path(helpers.__file__).as_uri()}}[where]
    location = result["locations"][0]["physicalLocation"]
    assert location == {"artifactLocation": artifact, "region": {"startLine": line_of("seed eval", helpers)}}
    related = result["relatedLocations"][0]["physicalLocation"]
    assert related == {"artifactLocation": artifact, "region": {"startLine": line_of("train forward", helpers)}}
    info = next(r for r in run["results"] if r["ruleId"] == "eval-with-grad")
    assert info["level"] == "note"


def test_progress_on_a_terminal_and_not_in_a_pipe(tmp_path, monkeypatch, capsys):
    """A long analysis shows a progress line on stderr when it is a terminal, never otherwise."""
    from modewatch import cli

    log = write(tmp_path / "long.jsonl", [HEADER, *DEFINITIONS] + [
        {"event": "calls", "rows": [row(s, s) for s in range(i * 1000, (i + 1) * 1000)]} for i in range(10)])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    show = cli._progress_line(every=0)
    modewatch.analyze(log, progress=show)
    assert "modewatch: analyzing long.jsonl:" in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert cli._progress_line() is None
    assert main(["analyze", log]) == 1 and "analyzing" not in capsys.readouterr().err
