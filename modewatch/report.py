"""Reporters: an Analysis in, a string out. No analysis happens here.

Every string that came from a log (names, paths, functions, messages built from them) passes
through ``safetext.neutralise`` here, at the boundary, in every format: a log cannot put a
control character, a bidi override or a lone surrogate into a terminal, a page or a file.
"""

from __future__ import annotations

import json
import os
import re

TYPE_CHECKING = False  # typing is for annotations only: the CLI starts without importing it
if TYPE_CHECKING:
    from typing import Any, Optional

from ._version import __version__
from .analysis import Analysis, Finding, plural
from .rules import RULES
from .safetext import neutralise


def json_report(analysis: Analysis) -> str:
    """The findings document of ``modewatch analyze --format json`` (docs/cli.md lists its keys)."""
    document = {
        "modewatch": __version__,
        "findings": [finding.as_dict() for finding in analysis.findings],
        "summary": analysis.summary,
    }
    return json.dumps(_neutral(document), indent=2)


def _neutral(value: Any) -> Any:
    """A document with every string in it neutralised (keys are modewatch's own)."""
    if isinstance(value, str):
        return neutralise(value)
    if isinstance(value, dict):
        return {key: _neutral(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_neutral(item) for item in value]
    return value


def _site(site: dict) -> str:
    return f"{site['file']}:{site['line']} in {site['function']}()"


def _steps(finding: Finding) -> str:
    if finding.first_step == finding.last_step:
        return f"after step {finding.first_step}"
    return f"steps {finding.first_step}-{finding.last_step}"


def _model_label(model: Optional[dict]) -> str:
    """``Generator (train.py:12)``: a model's class and the line that watched (or made) it."""
    if not model:
        return "a model"
    site = model.get("site")
    return f"{model['name']} ({site['file']}:{site['line']})" if site else model["name"]


def _headline(finding: Finding, logs: int, models: int = 1) -> str:
    cause = finding.cause
    if models > 1:  # several models in the run: say whose layers these are
        cause = f"{_model_label(finding.model)}: {cause}"
    if finding.rank is not None:
        return f"rank {finding.rank}: {cause}"
    if finding.ranks is not None:
        return f"ranks {', '.join(map(str, finding.ranks))}: {cause}"
    if logs > 1 and finding.log:  # separate runs analyzed together: say which
        return f"{os.path.basename(finding.log)}: {cause}"
    return cause


def _models(analysis: Analysis) -> int:
    """The most models one log watched (or, from older summaries, the most distinct models the
    findings of one log belong to): with several, each finding says whose layers it names (a
    teacher and a student both have a ``classifier.2``)."""
    per_log: dict = {}
    for f in analysis.findings:
        per_log.setdefault(f.log, set()).add(json.dumps(f.model, sort_keys=True))
    return max(max(map(len, per_log.values()), default=0), analysis.summary.get("models", 0))


def _by_cause(analysis: Analysis) -> dict:
    """The findings grouped under the headline of their cause, in order."""
    logs = analysis.summary.get("logs", 0)
    models = _models(analysis)
    groups: dict = {}
    for finding in analysis.findings:
        groups.setdefault(_headline(finding, logs, models), []).append(finding)
    return groups


def text_report(analysis: Analysis) -> str:
    """For people: findings grouped by the mode call that caused them, each with its fix."""
    summary = analysis.summary
    counts = summary.get("findings", {})
    logs = summary.get("logs", 0)
    lines = [
        f"modewatch {__version__}: {counts.get('error', 0)} error(s), {counts.get('warning', 0)} warning(s), "
        f"{counts.get('info', 0)} info in {logs} log{'s' if logs != 1 else ''} "
        f"({summary.get('steps', 0):,} optimizer steps, {summary.get('layer_calls', 0):,} layer calls)"
    ]
    if summary.get("bad_logs"):
        lines.append(f"note: {len(summary['bad_logs'])} log(s) could not be analyzed and were left out "
                     f"(each is named on stderr)")
    if summary.get("skipped_lines"):
        lines.append(f"note: {summary['skipped_lines']} damaged or cut-off log line(s) were skipped")
    for path in summary.get("truncated_logs", []):
        lines.append(f"note: {path} ends mid-line (the job was killed?); analyzed up to there")
    truncated = set(summary.get("truncated_logs", []))
    for path in summary.get("unclosed_logs", []):
        if path not in truncated:
            lines.append(f"note: {path} was not closed (the job was killed or is still running); "
                         f"calls of its last second may be missing")
    if summary.get("logs_without_models") and len(summary["logs_without_models"]) == logs:
        lines.append("note: no model was watched: the program made no optimizer and called no .train()/.eval() "
                     "(under MODEWATCH=1, that is how models are found)")
    elif not summary.get("layer_calls"):
        lines.append("note: no Dropout/BatchNorm call was recorded: no watched model ran one (under MODEWATCH=1, "
                     "models are found at their first .train()/.eval() call or when an optimizer is made for them)")
    if not analysis.findings:
        lines.append("No mode problems found." if logs else "No log was analyzed.")
    for headline, findings in _by_cause(analysis).items():
        lines.append("")
        lines.append(f"{headline}:")
        for finding in findings:
            lines.append(f"  {finding.severity:<7} {finding.rule:<21} {finding.summary}")
            where = f"first at {_site(finding.forward_site)}" if finding.forward_site else "first at an unknown line"
            lines.append(f"  {'':<29} {plural(finding.count, 'layer call')}, {_steps(finding)}, {where}")
        lines += [f"  fix: {fix}" for fix in _fixes(findings)]
    # Each element is one line of the report: neutralised whole, a newline inside a field shows.
    return "".join(neutralise(line) + "\n" for line in lines)


def _fixes(findings: list) -> list:
    """The distinct fixes of a group of findings, in order; an info finding's only where its
    rule says it is worth fixing (deliberate freezing and recalibration need none)."""
    fixes = list(dict.fromkeys(f.fix for f in findings if f.severity != "info" or RULES[f.rule].fix_for_info))
    # A fix that another one begins with says nothing more (train-without-dropout's, beside
    # bn-frozen-in-train's, which adds what to do for deliberate freezing).
    return [fix for fix in fixes if not any(other != fix and other.startswith(fix[:-1]) for other in fixes)]


# Markdown that text from a log could open: links and images ([...](...), ![...](...)), raw
# HTML and autolinks (<...>), emphasis, headings, table cells, code spans. Each is
# backslash-escaped, < and & written as entities (a named entity such as &rlm; would print a
# bidi mark), so it shows as written and opens nothing. (A `>` mid-line opens nothing once `<`
# is escaped, and a field never starts a line.)
_MARKDOWN = re.compile(r"([\\\[\]()!*_#|`~])")


def _md(text: str) -> str:
    """Text from a log, inert inside Markdown (a table cell, a heading in bold)."""
    return _MARKDOWN.sub(r"\\\1", neutralise(text)).replace("&", "&amp;").replace("<", "&lt;")


def markdown_report(analysis: Analysis) -> str:
    """For CI job summaries (GitHub's $GITHUB_STEP_SUMMARY and the like): a table per cause."""
    counts = analysis.summary.get("findings", {})
    lines = [f"## modewatch: {counts.get('error', 0)} error(s), {counts.get('warning', 0)} warning(s), "
             f"{counts.get('info', 0)} info", ""]
    bad = analysis.summary.get("bad_logs", [])
    lines += [f"- Not analyzed: {_md(error)}" for error in bad] + ([""] if bad else [])
    if not analysis.findings:
        done = "No mode problems found." if analysis.summary.get("logs", 0) else "No log was analyzed."
        return "\n".join(lines + [done, ""])
    for headline, findings in _by_cause(analysis).items():
        lines += [f"**{_md(headline)}**", "", "| severity | rule | what happened | first forward |", "|---|---|---|---|"]
        for f in findings:
            where = _md(_site(f.forward_site)) if f.forward_site else ""
            lines.append(f"| {f.severity} | `{f.rule}` | {_md(f.summary or f.message)} | {where} |")
        lines += [""] + [f"Fix: {_md(fix)}" for fix in _fixes(findings)] + [""]
    return "\n".join(lines)


SARIF_LEVELS = {"error": "error", "warning": "warning", "info": "note"}


def _sarif_location(site: dict) -> dict:
    from urllib.parse import quote  # SARIF alone needs it: kept out of the CLI's start-up

    path = neutralise(site["file"])
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        relative = path
    inside = relative != os.pardir and not relative.startswith(os.pardir + os.sep) and not os.path.isabs(relative)
    # URIs per RFC 3986: every character outside the unreserved set and "/" percent-encoded.
    artifact = {"uri": quote(relative.replace(os.sep, "/"), safe="/"), "uriBaseId": "%SRCROOT%"} if inside else {
        "uri": "file://" + quote(os.path.abspath(path).replace(os.sep, "/"), safe="/")}
    return {"physicalLocation": {"artifactLocation": artifact, "region": {"startLine": max(site["line"], 1)}},
            "message": {"text": f"in {neutralise(site['function'])}()"}}


def sarif_report(analysis: Analysis) -> str:
    """SARIF 2.1.0, for code-scanning annotations: each finding at its mode_site (the line to
    change), with the forward_site as a related location; paths under the working directory are
    relative to it (%SRCROOT%)."""
    rules = [{"id": rule.id, "name": rule.id, "shortDescription": {"text": rule.id.replace("-", " ")},
              "help": {"text": f"{rule.fix} (docs/rules/{rule.id}.md)"},
              "defaultConfiguration": {"level": SARIF_LEVELS[rule.severity]}}
             for rule in RULES.values()]
    results = []
    for finding in analysis.findings:
        primary = finding.mode_site or finding.forward_site
        result = {"ruleId": finding.rule, "level": SARIF_LEVELS[finding.severity],
                  "message": {"text": neutralise(f"{finding.message} Fix: {finding.fix}")},
                  "properties": {"count": finding.count, "first_step": finding.first_step,
                                 "last_step": finding.last_step, "layers": [neutralise(n) for n in finding.layers],
                                 "rank": finding.rank}}
        if primary:
            result["locations"] = [_sarif_location(primary)]
        if finding.mode_site and finding.forward_site:
            result["relatedLocations"] = [{"id": 1, **_sarif_location(finding.forward_site)}]
        results.append(result)
    document = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{"tool": {"driver": {"name": "modewatch", "version": __version__, "rules": rules}},
                  "results": results}],
    }
    return json.dumps(document, indent=2)


BUCKETS = 300  # columns of the timeline, however many steps the run had
COLORS = {"train": "#43a047", "eval": "#1e88e5", "info": "#fbc02d", "bad": "#e53935"}
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.finding{border-left:4px solid #999;padding:6px 12px;margin:10px 0;background:#fafafa}
.error{border-color:#e53935}.warning{border-color:#fbc02d}.info{border-color:#1e88e5}
.rule{font-weight:600}.site{color:#555;font-size:13px}
pre{background:#f3f3f3;padding:6px 8px;margin:4px 0;font-size:12px;overflow-x:auto}
pre .here{background:#ffe0e0;display:inline-block;width:100%}
table.timeline{border-collapse:collapse}table.timeline td{padding:1px 6px;font-size:12px;white-space:nowrap}
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:12px;height:12px;margin-right:4px}
"""


def _source(site: dict, sources: Any) -> str:
    """The lines around a call site, when the user allows that file to be shown (escaped), or
    why it is not shown."""
    import html

    if sources is None:
        return ""
    snippet = sources.snippet(site["file"], site["line"])
    if isinstance(snippet, str):
        return f'<div class="site">(source not shown: {html.escape(snippet)})</div>'
    lines = []
    for number, text in snippet:
        mark = ' class="here"' if number == site["line"] else ""
        lines.append(f"<span{mark}>{number:5d}  {html.escape(neutralise(text))}</span>")
    return "<pre>" + "\n".join(lines) + "</pre>" if lines else ""


def _bar(spans: list, last_step: int) -> str:
    """One layer's row: an SVG of at most BUCKETS columns over the steps, a rectangle per stretch
    of one state (a column shows the state that must show most)."""
    from .timeline import RANK

    count = min(BUCKETS, last_step + 1)
    width = -(-(last_step + 1) // count)  # steps per column
    pixels = BUCKETS * 3 / count
    columns = [None] * count
    for first, last, state in spans:
        for column in range(min(first // width, count - 1), min(last // width, count - 1) + 1):
            if columns[column] is None or RANK[state] > RANK[columns[column]]:
                columns[column] = state
    rects, start = [], 0
    for column in range(1, count + 1):
        if column == count or columns[column] != columns[start]:
            if columns[start] is not None:
                rects.append(f'<rect x="{start * pixels:.1f}" width="{(column - start) * pixels:.1f}" height="12" '
                             f'fill="{COLORS[columns[start]]}"><title>steps {start * width}-'
                             f'{min(column * width, last_step + 1) - 1}: {columns[start]}</title></rect>')
            start = column
    return f'<svg width="{BUCKETS * 3}" height="12" role="img">{"".join(rects)}</svg>'


# The formats of `modewatch analyze --format`, with what each is for (the CLI's choices and help).
FORMATS = {
    "text": (text_report, "for people"),
    "json": (json_report, "the findings document"),
    "markdown": (markdown_report, "CI job summaries"),
    "sarif": (sarif_report, "SARIF 2.1.0, for code-scanning annotations"),
}


def html_report(analysis: Analysis, timeline: Any, sources: Optional[Any] = None) -> str:
    """One self-contained HTML file (no script, no network): the findings with their call sites
    and source lines (those ``sources`` allows, a ``sources.Sources``), and a timeline per
    watched layer over the optimizer steps. Everything that comes from a log is neutralised
    and escaped."""
    import html

    from .timeline import STATE_NAMES

    def e(text: object) -> str:
        return html.escape(neutralise(text))

    counts = analysis.summary.get("findings", {})
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>modewatch report</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>modewatch {e(__version__)}: {counts.get('error', 0)} error(s), {counts.get('warning', 0)} "
             f"warning(s), {counts.get('info', 0)} info</h1>",
             f"<p>{analysis.summary.get('logs', 0)} log(s), {analysis.summary.get('steps', 0):,} optimizer steps, "
             f"{analysis.summary.get('layer_calls', 0):,} layer calls.</p>"]
    parts += [f"<p class=site>Not analyzed: {e(error)}</p>" for error in analysis.summary.get("bad_logs", [])]
    parts.append("<h2>Findings</h2>")
    logs = analysis.summary.get("logs", 0)
    if not analysis.findings:
        parts.append("<p>No mode problems found.</p>" if logs else "<p>No log was analyzed.</p>")
    for f in analysis.findings:
        parts.append(f'<div class="finding {e(f.severity)}"><div><span class="rule">{e(f.severity)} '
                     f'{e(f.rule)}</span> — {e(_headline(f, logs))}</div><div>{e(f.message)}</div>'
                     f'<div class="site">{f.count:,} layer calls, {e(_steps(f))}. Fix: {e(f.fix)}</div>')
        for title, site in (("mode set at", f.mode_site), ("model called at", f.forward_site)):
            if site:
                parts.append(f'<div class="site">{title} {e(_site(site))}</div>{_source(site, sources)}')
        parts.append("</div>")
    parts.append("<h2>Timeline</h2><p class=legend>" + "".join(
        f'<span><i style="background:{COLORS[state]}"></i>{e(name)}</span>' for state, name in STATE_NAMES.items())
        + f"</p><p class=site>Optimizer steps 0-{timeline.last_step:,}, left to right.</p><table class=timeline>")
    erring = {name for f in analysis.findings if f.severity == "error" for name in f.layers}
    for label, spans in timeline.rows(logs, erring):
        parts.append(f"<tr><td>{e(label)}</td><td>{_bar(spans, timeline.last_step)}</td></tr>")
    parts.append("</table>")
    if timeline.dropped_layers:
        parts.append(f"<p class=site>{timeline.dropped_layers} more layer(s) not drawn.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
