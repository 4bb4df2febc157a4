"""The Markdown view of a run report (``summary.md``)."""

from __future__ import annotations

from typing import Any

from vllm_conformance import plan, verdicts
from vllm_conformance.report.tables import (
    ACCURACY_HEADERS,
    accuracy_rows,
    entry_rows,
    environment_rows,
    fmt,
    md,
    measured_text,
)


def accuracy_markdown(report: dict[str, Any]) -> list[str]:
    rows = accuracy_rows(report)
    if not rows:
        return []
    return [
        "",
        "## Accuracy",
        "",
        f"Each check asks whether the served model is worse than expected, one-sided at "
        f"alpha {verdicts.ALPHA:g}; the tolerance is rtol x expected plus the noise; the "
        f"smallest detectable drop is the true drop found with {verdicts.POWER:.0%} power.",
        "",
        "| " + " | ".join(ACCURACY_HEADERS) + " |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
        *("| " + " | ".join(md(cell) for cell in row) + " |" for row in rows),
    ]


def summary_markdown(report: dict[str, Any]) -> str:
    """A page a person reads at a glance."""
    env = report.get("environment", {})
    build = report.get("build") or {}
    title = f"# vllm-conformance run {build.get('run_id', '')}".rstrip()
    out = [title, ""]
    if build and not build.get("complete", True):
        out += [
            f"**Incomplete run**: the run stopped before pytest finished ({build.get('records')} "
            f"records, {build.get('torn_lines', 0)} torn line(s) skipped); everything below is "
            "what was recorded until then.",
            "",
        ]
    out += ["## Environment", "", "| | |", "|---|---|"]
    out += [f"| {k} | {md(v)} |" for k, v in environment_rows(env)]
    out += [
        "",
        "## Deployments",
        "",
        "| entry | server | vLLM | max_model_len | KV cache tokens | concurrency | startup s | "
        "passed | failed | skipped | checks pass/fail/observed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in entry_rows(report):
        out.append(
            f"| {row['entry']} | {row['server']} | {fmt(row['vllm'])} | "
            f"{fmt(row['max_model_len'])} | {fmt(row['kv_cache_tokens'])} | "
            f"{fmt(row['concurrency'])} | {fmt(row['startup_seconds'], 0)} | {row['passed']} | "
            f"{row['failed']} | {row['skipped']} | {row['checks']} |"
        )
    served = [
        (name, (e.get("server") or {}).get("serve_args"))
        for name, e in sorted(report.get("entries", {}).items())
    ]
    served = [(n, a) for n, a in served if a]
    if served:
        out += ["", "## Serve arguments", ""]
        for name, args in served:
            flags = " ".join(f"{k}" if v is True else f"{k} {v}" for k, v in args.items())
            out.append(f"- `{name}`: `{flags}`")
    out += accuracy_markdown(report)
    if report.get("plan"):
        out += [
            "",
            "## Planned against measured",
            "",
            "| " + " | ".join(plan.VERSUS_HEADERS) + " |",
            "|---|" + "---:|" * (len(plan.VERSUS_HEADERS) - 1),
            *("| " + " | ".join(plan.versus_cells(row)) + " |" for row in report["plan"]),
        ]
    for name, entry in sorted(report.get("entries", {}).items()):
        if not entry.get("checks"):
            continue
        out += [
            "",
            f"## Checks: {name}",
            "",
            "| check | verdict | status | error type | param | measured |",
            "|---|---|---:|---|---|---|",
        ]
        for check in entry["checks"]:
            err = check.get("error") or check.get("stream_error") or {}
            out.append(
                f"| {md(check.get('check'))} | {md(check.get('verdict'))} | "
                f"{fmt(check.get('status'))} | {md(fmt(err.get('type')))} | "
                f"{md(fmt(err.get('param')))} | {md(measured_text(check.get('measured')))} |"
            )
    failures = [
        (name, nodeid)
        for name, e in sorted(report.get("entries", {}).items())
        for nodeid, outcome in (e.get("outcomes") or {}).items()
        if outcome in ("failed", "error")
    ]
    if failures:
        messages = {
            t["nodeid"]: t.get("message", "")
            for e in report["entries"].values()
            for t in e["tests"]
            if t.get("outcome") == "failed"
        }
        out += ["", "## Failures", ""]
        out += [f"- `{n}`: {md(messages.get(n, ''))[:300]}" for _, n in failures]
    unfinished = [
        (n, u) for n, e in report.get("entries", {}).items() for u in e.get("unfinished", [])
    ]
    if unfinished:
        out += ["", "## Tests that did not finish", ""]
        out += [f"- `{u}`" for _, u in unfinished]
    return "\n".join(out) + "\n"
