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
