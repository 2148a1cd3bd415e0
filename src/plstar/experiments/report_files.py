"""The files of ``plstar reproduce``: report.html, report.md, results.json and one PNG per figure.

Nothing here measures: it renders the results :func:`plstar.experiments.runner.reproduce` returned.
report.html is one self-contained page (every figure embedded as a base64 PNG); report.md links
the PNG files under ``figures/``. Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plstar.experiments as registry
from plstar.conditions import json_safe
from plstar.experiments.base import Check, ExperimentResult
from plstar.plots import png_bytes
from plstar.report import write_bytes, write_json

if TYPE_CHECKING:
    from plstar.experiments.runner import Reproduction

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def render_figures(result: ExperimentResult) -> dict[str, bytes]:
    """PNG bytes of every figure of ``result``'s experiment. A figure function that raises adds a
    failing check "figures render" to ``result.checks`` and yields no figures."""
    try:
        figures = registry.load(result.number).figures(result)
        return {name: png_bytes(figure) for name, figure in figures.items()}
    except Exception as error:
        result.checks.append(
            Check("figures render", False, f"{type(error).__name__}: {error}", "no error")
        )
        return {}


def figure_file(result: ExperimentResult, name: str) -> str:
    """Path of a figure's PNG relative to the output folder."""
    return f"figures/{result.number:02d}-{result.name}-{name}.png"


def write_report(out: str | Path, outcome: Reproduction, meta: dict[str, Any]) -> dict[str, Path]:
    """Write the figures, results.json, report.md and report.html into ``out``; their paths.

    ``meta``: the command, options, versions and wall time, shown at the top of each report.
    Cost: the figures' rendering (about a second each).
    """
    out = Path(out)
    pictures = {r.number: render_figures(r) for r in outcome.results}
    written: dict[str, Path] = {}
    for result in outcome.results:
        for name, content in pictures[result.number].items():
            written[figure_file(result, name)] = write_bytes(
                out / figure_file(result, name), content
            )
    payload = {
        "meta": meta, "passed": outcome.passed, "interrupted": outcome.interrupted,
        "runs_reused": outcome.reused, "runs_computed": outcome.computed,
        "failures": outcome.failures,
        "incomplete": {str(n): {"finished": f, "total": t} for n, (f, t) in outcome.incomplete.items()},
        "experiments": [
            r.to_dict() | {"figures": [figure_file(r, name) for name in pictures[r.number]]}
            for r in outcome.results
        ],
    }  # fmt: skip
    written["results.json"] = write_json(out / "results.json", json_safe(payload))
    markdown = _markdown(outcome, meta, pictures)
    written["report.md"] = write_bytes(out / "report.md", markdown.encode("utf-8"))
    page = _html(outcome, meta, pictures)
    written["report.html"] = write_bytes(out / "report.html", page.encode("utf-8"))
    return written


def _status(outcome: Reproduction) -> str:
    if outcome.interrupted:
        return "INTERRUPTED: the report covers what finished"
    failed = len(outcome.failed_checks)
    if outcome.passed:
        total = sum(len(r.checks) for r in outcome.results)
        evidence = sum(len(r.evidence) for r in outcome.results)
        return (f"PASSED: all {total} checks of {len(outcome.results)} experiments "
                f"({evidence} evidence for the claims, {total - evidence} controls)")  # fmt: skip
    return f"FAILED: {failed} check(s) failed, {len(outcome.failures)} error(s)"


def _kind(check: Check) -> str:
    """ "evidence" for the claim, or "control" (holds by construction; not counted as evidence)."""
    return "control" if check.control else "evidence"


def _meta_rows(meta: dict[str, Any], outcome: Reproduction) -> list[tuple[str, str]]:
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    rows = [(key, str(meta[key])) for key in ("command", "started", "quick", "seeds", "jobs",
                                              "resume", "threads") if key in meta]  # fmt: skip
    rows += [
        ("wall time", f"{outcome.seconds:.1f} s"),
        ("runs", f"{outcome.computed} computed, {outcome.reused} reused from disk"),
        ("versions", versions),
    ]
    return rows


def _config_text(config: dict[str, Any]) -> str:
    return json.dumps(json_safe(config), ensure_ascii=False, separators=(", ", ": "))


def _markdown(outcome: Reproduction, meta: dict[str, Any], pictures: dict[int, dict]) -> str:
    lines = ["# plstar reproduce", "", f"**{_status(outcome)}**", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _meta_rows(meta, outcome)]
    for text in outcome.failures:
        lines.append(f"\n- error: {text}")
    for number, (done, total) in sorted(outcome.incomplete.items()):
        lines.append(f"\n- experiment {number}: not finished ({done} of {total} runs on disk)")
    for result in outcome.results:
        verdict = "passed" if result.passed else "FAILED"
        lines += ["", f"## {result.number}. {result.title} ({verdict})", "", result.claim, ""]
        lines += ["| check | kind | measured | expected | |", "|---|---|---|---|---|"]
        for c in result.checks:
            mark = "pass" if c.passed else "**FAIL**"
            lines.append(f"| {c.name} | {_kind(c)} | {c.measured} | {c.expected} | {mark} |")
        lines.append("")
        lines += [f"![{name}]({figure_file(result, name)})" for name in pictures[result.number]]
        lines += ["", f"{len(result.runs)} configurations, {result.seconds:.1f} s of compute:", ""]
        lines += [f"- `{_config_text(r.config)}` ({r.seconds:.1f} s)" for r in result.runs]
    return "\n".join(lines) + "\n"


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
.pass { color: #146c2e; font-weight: bold; } .fail { color: #b3261e; font-weight: bold; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
code { font-size: 0.85em; }
"""


def _html(outcome: Reproduction, meta: dict[str, Any], pictures: dict[int, dict]) -> str:
    e = html.escape
    status_class = "pass" if outcome.passed else "fail"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>plstar reproduce</title>", f"<style>{_STYLE}</style></head><body>",
        "<h1>plstar reproduce</h1>", f'<p class="{status_class}">{e(_status(outcome))}</p>',
        "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>"
                            for k, v in _meta_rows(meta, outcome)) + "</table>",
    ]  # fmt: skip
    notes = [f"error: {text}" for text in outcome.failures] + [
        f"experiment {n}: not finished ({done} of {total} runs on disk)"
        for n, (done, total) in sorted(outcome.incomplete.items())
    ]
    if notes:
        parts.append("<ul>" + "".join(f'<li class="fail">{e(t)}</li>' for t in notes) + "</ul>")
    for result in outcome.results:
        verdict = ("pass", "passed") if result.passed else ("fail", "FAILED")
        parts += [
            f'<h2>{result.number}. {e(result.title)} <span class="{verdict[0]}">({verdict[1]})</span></h2>',
            f"<p>{e(result.claim)}</p>",
            "<table><tr><th>check</th><th>kind</th><th>measured</th><th>expected</th><th></th>"
            "</tr>",
        ]  # fmt: skip
        for c in result.checks:
            mark = '<td class="pass">pass</td>' if c.passed else '<td class="fail">FAIL</td>'
            parts.append(
                f"<tr><td>{e(c.name)}</td><td>{_kind(c)}</td><td>{e(c.measured)}</td>"
                f"<td>{e(c.expected)}</td>{mark}</tr>"
            )
        parts.append("</table>")
        for name, content in pictures[result.number].items():
            encoded = base64.b64encode(content).decode("ascii")
            parts.append(f'<img alt="{e(name)}" src="data:image/png;base64,{encoded}">')
        rows = "".join(
            f"<tr><td><code>{e(_config_text(r.config))}</code></td><td>{r.seconds:.1f} s</td></tr>"
            for r in result.runs
        )
        parts.append(
            f"<details><summary>{len(result.runs)} configurations, {result.seconds:.1f} s of "
            f"compute</summary><table>{rows}</table></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
