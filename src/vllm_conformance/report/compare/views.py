"""The diff's views: the headline, Markdown, JSON and (through :mod:`..html`) HTML."""

from __future__ import annotations

import json
from typing import Any

from vllm_conformance.report import html as htmlview
from vllm_conformance.report.compare.model import KINDS, Diff, FailOn, Side
from vllm_conformance.report.tables import format_value

# -- rendering ----------------------------------------------------------------------


def _cell(value: Any, limit: int = 120) -> str:
    text = format_value(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def headline(diff: Diff, fail_on: FailOn = "regressions") -> str:
    """One line: counts and the exit verdict."""
    c = diff.counts()
    verdict = "FAIL" if diff.failing(fail_on) else "OK"
    return (
        f"{verdict} (--fail-on {fail_on}): {c['regression']} regression(s), {c['change']} "
        f"change(s), {c['improvement']} improvement(s), {c['note']} note(s)"
    )


def _side_line(label: str, side: Side) -> str:
    state = "complete" if side.complete else "**incomplete (killed half-way?)**"
    torn = f", {side.torn_lines} torn line(s) skipped" if side.torn_lines else ""
    return (
        f"- {label}: `{side.path}` (run `{side.run_id}`, vLLM {side.vllm}, {state}, "
        f"{side.records if side.records is not None else '?'} records{torn})"
    )


def to_markdown(diff: Diff, fail_on: FailOn = "regressions") -> str:
    """The diff as a Markdown page."""
    out = [
        f"# vLLM upgrade diff: {diff.old.vllm} → {diff.new.vllm}",
        "",
        _side_line("OLD", diff.old),
        _side_line("NEW", diff.new),
        "",
        f"**{headline(diff, fail_on)}**",
        "",
        "## Environment",
        "",
        "| | OLD | NEW |",
        "|---|---|---|",
    ]
    for row in diff.environment:
        mark = " **≠**" if row["changed"] else ""
        out.append(f"| {row['label']}{mark} | {_cell(row['old'])} | {_cell(row['new'])} |")
    titles = {
        "regression": "Regressions",
        "change": "Changes",
        "improvement": "Improvements",
        "note": "Notes",
    }
    for kind in KINDS:
        found = [f for f in diff.findings if f.kind == kind]
        if not found:
            continue
        out += [
            "",
            f"## {titles[kind]} ({len(found)})",
            "",
            "| area | entry | subject | field | OLD | NEW | detail |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in found:
            out.append(
                f"| {f.area} | {_cell(f.entry)} | {_cell(f.subject, 90)} | {_cell(f.field)} | "
                f"{_cell(f.old)} | {_cell(f.new)} | {_cell(f.detail, 200)} |"
            )
    if diff.capacity:
        out += [
            "",
            "## Capacity",
            "",
            "| entry | figure | OLD | NEW | Δ | finding |",
            "|---|---|---:|---:|---:|---|",
        ]
        for row in diff.capacity:
            out.append(
                f"| {row['entry']} | {row['field']} | {_cell(row['old'])} | "
                f"{_cell(row['new'])} | {row['delta']} | {row['kind'] or ''} |"
            )
    errors = [
        r for r in diff.checks if (r["old"] or {}).get("status") or (r["new"] or {}).get("status")
    ]
    if errors:
        out += [
            "",
            "## Checks: status and error contract",
            "",
            "| entry | check | OLD verdict | NEW verdict | OLD status/type/param | "
            "NEW status/type/param | finding |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in errors:
            o, n = row["old"] or {}, row["new"] or {}

            def contract(s: dict[str, Any]) -> str:
                if not s:
                    return "-"
                parts = [
                    s.get("status"),
                    s.get("error.type") or s.get("stream_error.type"),
                    s.get("error.param") or s.get("stream_error.param"),
                ]
                if s.get("policy"):
                    parts.append(s["policy"])
                return " / ".join(_cell(p) for p in parts)

            out.append(
                f"| {row['entry']} | {_cell(row['check'], 80)} | {_cell(o.get('verdict'))} | "
                f"{_cell(n.get('verdict'))} | {contract(o)} | {contract(n)} | "
                f"{row['kind'] or ''} |"
            )
    if diff.accuracy:
        out += [
            "",
            "## Accuracy",
            "",
            "| entry | check | metric | OLD ± se | NEW ± se | Δ | z | p | verdict |",
            "|---|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in diff.accuracy:
            out.append(
                f"| {r['entry']} | {r['check']} | {r['metric']} | {r['old']:.4f} ± "
                f"{r['old_stderr']:.4f} | {r['new']:.4f} ± {r['new_stderr']:.4f} | "
                f"{r['delta']:+.4f} | {r['z']:+.2f} | {r['p_value']:.3g} | {r['verdict']} |"
            )
    if diff.performance:
        out += [
            "",
            "## Performance",
            "",
            "| entry | check | metric | OLD | NEW | ratio | CI of ratio | p | verdict |",
            "|---|---|---|---:|---:|---:|---|---:|---|",
        ]
        for r in diff.performance:
            out.append(
                f"| {r['entry']} | {r['check']} | {r['metric']} ({r['statistic']}) | "
                f"{_cell(r['baseline'])} | {_cell(r['current'])} | {_cell(r['ratio'])} | "
                f"[{_cell(r['ci_low'])}, {_cell(r['ci_high'])}] | {_cell(r['p_value'])} | "
                f"{r['verdict']} |"
            )
    totals = {}
    for label, side in (("OLD", diff.old), ("NEW", diff.new)):
        t = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for e in side.report.get("entries", {}).values():
            for outcome in (e.get("outcomes") or {}).values():
                t[outcome] = t.get(outcome, 0) + 1
        totals[label] = t
    out += [
        "",
        "## Tests",
        "",
        "| | passed | failed | error | skipped |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, t in totals.items():
        out.append(f"| {label} | {t['passed']} | {t['failed']} | {t['error']} | {t['skipped']} |")
    if diff.tests:
        out += ["", "| entry | test | OLD | NEW | finding |", "|---|---|---|---|---|"]
        out += [
            f"| {r['entry']} | `{r['nodeid']}` | {_cell(r['old'])} | {_cell(r['new'])} | "
            f"{r['kind']} |"
            for r in diff.tests
        ]
    return "\n".join(out) + "\n"


def to_json(diff: Diff, fail_on: FailOn = "regressions") -> str:
    """The diff as JSON (strict: no NaN)."""
    data = diff.to_dict()
    data["fail_on"] = fail_on
    data["failing"] = diff.failing(fail_on)
    return json.dumps(data, indent=2, default=str, allow_nan=False) + "\n"


def render(diff: Diff, fmt: str, fail_on: FailOn = "regressions") -> str:
    """The diff in ``md``, ``html`` or ``json``."""
    if fmt == "md":
        return to_markdown(diff, fail_on)
    if fmt == "json":
        return to_json(diff, fail_on)
    if fmt == "html":
        return htmlview.render_compare(diff.to_dict(), headline(diff, fail_on))
    raise ValueError(f"unknown format {fmt!r}")
