"""Reporters: an Analysis in, a string out. No analysis happens here."""

from __future__ import annotations

import json
import os

from ._version import __version__
from .analysis import Analysis, Finding


def json_report(analysis: Analysis) -> str:
    """The document of CONTRACT.md (``modewatch analyze --format json``)."""
    document = {
        "modewatch": __version__,
        "findings": [finding.as_dict() for finding in analysis.findings],
        "summary": analysis.summary,
    }
    return json.dumps(document, indent=2)


def _site(site: dict) -> str:
    return f"{site['file']}:{site['line']} in {site['function']}()"


def _steps(finding: Finding) -> str:
    if finding.first_step == finding.last_step:
        return f"after step {finding.first_step}"
    return f"steps {finding.first_step}-{finding.last_step}"


def _headline(finding: Finding, logs: int) -> str:
    if finding.rank is not None:
        return f"rank {finding.rank}: {finding.cause}"
    if finding.ranks is not None:
        return f"ranks {', '.join(map(str, finding.ranks))}: {finding.cause}"
    if logs > 1 and finding.log:  # separate runs analyzed together: say which
        return f"{os.path.basename(finding.log)}: {finding.cause}"
    return finding.cause


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
    if summary.get("skipped_lines"):
        lines.append(f"note: {summary['skipped_lines']} damaged or cut-off log line(s) were skipped")
    for path in summary.get("truncated_logs", []):
        lines.append(f"note: {path} ends mid-line (the job was killed?); analyzed up to there")
    for path in summary.get("unclosed_logs", []):
        if path not in summary.get("truncated_logs", []):
            lines.append(f"note: {path} was not closed (the job was killed or is still running); "
                         f"calls of its last second may be missing")
    if not summary.get("layer_calls"):
        lines.append("note: no Dropout/BatchNorm call was recorded: no watched model ran one (under MODEWATCH=1, "
                     "models are found at their first .train()/.eval() call or when an optimizer is made for them)")
    if not analysis.findings:
        lines.append("No mode problems found.")
        return "\n".join(lines) + "\n"
    groups: dict = {}
    for finding in analysis.findings:
        groups.setdefault(_headline(finding, logs), []).append(finding)
    for headline, findings in groups.items():
        lines.append("")
        lines.append(f"{headline}:")
        for finding in findings:
            lines.append(f"  {finding.severity:<7} {finding.rule:<21} {finding.summary}")
            where = f"first at {_site(finding.forward_site)}" if finding.forward_site else "first at an unknown line"
            lines.append(f"  {'':<29} {finding.count:,} layer calls, {_steps(finding)}, {where}")
        actionable = [f for f in findings if f.severity != "info" or f.rule == "eval-with-grad"]
        if actionable:  # deliberate freezing and recalibration need no fix
            lines.append(f"  fix: {actionable[0].fix}")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    """Text from a log, safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("<", "&lt;").replace("\n", " ")


def markdown_report(analysis: Analysis) -> str:
    """For CI job summaries (GitHub's $GITHUB_STEP_SUMMARY and the like): a table per cause."""
    counts = analysis.summary.get("findings", {})
    lines = [f"## modewatch: {counts.get('error', 0)} error(s), {counts.get('warning', 0)} warning(s), "
             f"{counts.get('info', 0)} info", ""]
    if not analysis.findings:
        return "\n".join(lines + ["No mode problems found.", ""])
    groups: dict = {}
    logs = analysis.summary.get("logs", 0)
    for finding in analysis.findings:
        groups.setdefault(_headline(finding, logs), []).append(finding)
    for headline, findings in groups.items():
        lines += [f"**{_md(headline)}**", "", "| severity | rule | what happened | first forward |", "|---|---|---|---|"]
        for f in findings:
            where = _md(_site(f.forward_site)) if f.forward_site else ""
            lines.append(f"| {f.severity} | `{f.rule}` | {_md(f.summary or f.message)} | {where} |")
        lines += ["", f"Fix: {_md(findings[0].fix)}", ""]
    return "\n".join(lines)


SARIF_LEVELS = {"error": "error", "warning": "warning", "info": "note"}


def _sarif_location(site: dict) -> dict:
    path = site["file"]
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        relative = path
    inside = not relative.startswith("..") and not os.path.isabs(relative)
    artifact = {"uri": relative.replace(os.sep, "/"), "uriBaseId": "%SRCROOT%"} if inside else {
        "uri": "file://" + os.path.abspath(path).replace(os.sep, "/")}
    return {"physicalLocation": {"artifactLocation": artifact, "region": {"startLine": max(site["line"], 1)}},
            "message": {"text": f"in {site['function']}()"}}


def sarif_report(analysis: Analysis) -> str:
    """SARIF 2.1.0, for code-scanning annotations: each finding at its mode_site (the line to
    change), with the forward_site as a related location; paths under the working directory are
    relative to it (%SRCROOT%)."""
    from .rules import RULES

    rules = [{"id": rule, "name": rule, "shortDescription": {"text": rule.replace("-", " ")},
              "help": {"text": f"{fix} (docs/rules/{rule}.md)"},
              "defaultConfiguration": {"level": SARIF_LEVELS[severity]}}
             for rule, (severity, fix) in RULES.items()]
    results = []
    for finding in analysis.findings:
        primary = finding.mode_site or finding.forward_site
        result = {"ruleId": finding.rule, "level": SARIF_LEVELS[finding.severity],
                  "message": {"text": f"{finding.message} Fix: {finding.fix}"},
                  "properties": {"count": finding.count, "first_step": finding.first_step,
                                 "last_step": finding.last_step, "layers": finding.layers,
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
