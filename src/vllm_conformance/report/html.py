"""Self-contained HTML pages (no scripts, no external assets) for a run and for a diff.

:func:`render_report` shows a run report (``report.json``'s dict) and :func:`render_compare`
the JSON form of a :class:`vllm_conformance.report.compare.Diff`. Both are static tables that a CI
system can publish as an artifact and a person can open from disk.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

from vllm_conformance import plan
from vllm_conformance.report import tables
from vllm_conformance.report.model import verdict_class

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1f24}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:28px 0 8px}
table{border-collapse:collapse;margin:6px 0 12px;max-width:100%}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f6f8fa;padding:1px 3px}
.banner{padding:8px 12px;border-radius:6px;margin:10px 0;font-weight:600}
.ok{background:#dafbe1}.bad{background:#ffebe9}.warn{background:#fff8c5}
tr.regression td,tr.fail td,tr.failed td,tr.error td{background:#ffebe9}
tr.change td{background:#fff8c5}tr.improvement td,tr.pass td.v{background:#dafbe1}
tr.note td{color:#57606a}.small{color:#57606a;font-size:12px}
"""


def _e(value: Any, limit: int = 300) -> str:
    text = tables.format_value(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text)


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    classes: Iterable[str] = (),
    numeric: Sequence[int] = (),
) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    class_list = list(classes)
    for i, row in enumerate(rows):
        cls = class_list[i] if i < len(class_list) else ""
        cells = "".join(
            f'<td class="{"num" if j in numeric else ""}">{cell}</td>' for j, cell in enumerate(row)
        )
        body.append(f'<tr class="{html.escape(cls)}">{cells}</tr>')
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def _page(title: str, parts: Iterable[str]) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>'
        f"{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "".join(parts)
        + "</body></html>\n"
    )


def render_report(report: dict[str, Any]) -> str:
    """One run: environment, deployments, serve arguments, checks and failures."""
    build = report.get("build") or {}
    title = f"vllm-conformance run {build.get('run_id', '')}".strip()
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if build and not build.get("complete", True):
        parts.append(
            f'<div class="banner warn">Incomplete run: it stopped before pytest finished '
            f"({_e(build.get('records'))} records, {_e(build.get('torn_lines', 0))} torn "
            "line(s) skipped). Everything below is what was recorded until then.</div>"
        )
    parts.append("<h2>Environment</h2>")
    parts.append(
        _table(
            ["", ""],
            [(_e(k), _e(v)) for k, v in tables.environment_rows(report.get("environment", {}))],
        )
    )
    rows = tables.entry_rows(report)
    parts.append("<h2>Deployments</h2>")
    parts.append(
        _table(
            [
                "entry",
                "server",
                "vLLM",
                "max_model_len",
                "KV cache tokens",
                "concurrency",
                "startup s",
                "passed",
                "failed",
                "skipped",
                "checks pass/fail/observed",
            ],
            [
                [
                    _e(r["entry"]),
                    _e(r["server"]),
                    _e(r["vllm"]),
                    _e(r["max_model_len"]),
                    _e(r["kv_cache_tokens"]),
                    _e(r["concurrency"]),
                    _e(round(r["startup_seconds"]) if r["startup_seconds"] else None),
                    _e(r["passed"]),
                    _e(r["failed"]),
                    _e(r["skipped"]),
                    _e(r["checks"]),
                ]
                for r in rows
            ],
            classes=["failed" if r["failed"] or r["server"] == "failed" else "" for r in rows],
            numeric=(3, 4, 5, 6, 7, 8, 9),
        )
    )
    entries = sorted(report.get("entries", {}).items())
    served = [(n, (e.get("server") or {}).get("serve_args")) for n, e in entries]
    if any(a for _, a in served):
        parts.append("<h2>Serve arguments</h2><ul>")
        for name, args in served:
            if args:
                flags = " ".join(k if v is True else f"{k} {v}" for k, v in args.items())
                parts.append(f"<li><b>{_e(name)}</b>: <code>{_e(flags, 2000)}</code></li>")
        parts.append("</ul>")
    if accuracy := tables.accuracy_rows(report):
        parts.append("<h2>Accuracy</h2>")
        parts.append(
            _table(
                tables.ACCURACY_HEADERS,
                [[_e(cell) for cell in row] for row in accuracy],
                [verdict_class(row[-1]) for row in accuracy],
                numeric=(4, 5, 6, 7),
            )
        )
    if report.get("plan"):
        parts.append("<h2>Planned against measured</h2>")
        parts.append(
            _table(
                plan.VERSUS_HEADERS,
                [[_e(c) for c in plan.versus_cells(row)] for row in report["plan"]],
                numeric=tuple(range(1, len(plan.VERSUS_HEADERS))),
            )
        )
    for name, entry in entries:
        checks = entry.get("checks") or []
        if not checks:
            continue
        parts.append(f"<h2>Checks: {_e(name)}</h2>")
        table_rows, classes = [], []
        for c in checks:
            err = c.get("error") or c.get("stream_error") or {}
            table_rows.append(
                [
                    _e(c.get("check")),
                    _e(c.get("verdict")),
                    _e(c.get("status")),
                    _e(err.get("type")),
                    _e(err.get("param")),
                    _e(err.get("message"), 160),
                    _e(tables.measured_text(c.get("measured"), 240)),
                ]
            )
            classes.append(verdict_class(c.get("verdict")))
        parts.append(
            _table(
                ["check", "verdict", "status", "error type", "param", "message", "measured"],
                table_rows,
                classes,
            )
        )
    failures = []
    for name, entry in entries:
        messages = {
            t["nodeid"]: t.get("message", "")
            for t in entry.get("tests", [])
            if t.get("outcome") == "failed"
        }
        for nodeid, outcome in (entry.get("outcomes") or {}).items():
            if outcome in ("failed", "error"):
                failures.append(
                    [
                        _e(name),
                        f"<code>{_e(nodeid)}</code>",
                        _e(outcome),
                        f"<code>{_e(messages.get(nodeid, ''), 600)}</code>",
                    ]
                )
    if failures:
        parts.append("<h2>Failures</h2>")
        parts.append(
            _table(["entry", "test", "outcome", "message"], failures, ["failed"] * len(failures))
        )
    unfinished = [
        [_e(n), f"<code>{_e(u)}</code>"] for n, e in entries for u in e.get("unfinished", [])
    ]
    if unfinished:
        parts.append("<h2>Tests that did not finish</h2>")
        parts.append(_table(["entry", "test"], unfinished))
    return _page(title, parts)


def render_compare(diff: dict[str, Any], headline: str) -> str:
    """A diff (``Diff.to_dict()``): verdict banner, findings by kind, then the tables."""
    old, new = diff["old"], diff["new"]
    title = f"vLLM upgrade diff: {old.get('vllm')} → {new.get('vllm')}"
    bad = diff.get("counts", {}).get("regression", 0) > 0
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for label, side in (("OLD", old), ("NEW", new)):
        state = "complete" if side.get("complete") else "INCOMPLETE (killed half-way?)"
        parts.append(
            f'<div class="small">{label}: <code>{_e(side.get("path"))}</code> run '
            f"<code>{_e(side.get('run_id'))}</code>, vLLM {_e(side.get('vllm'))}, {state}, "
            f"{_e(side.get('records'))} records, {_e(side.get('torn_lines'))} torn line(s)</div>"
        )
    parts.append(f'<div class="banner {"bad" if bad else "ok"}">{html.escape(headline)}</div>')
    parts.append("<h2>Environment</h2>")
    env = diff.get("environment", [])
    parts.append(
        _table(
            ["", "OLD", "NEW"],
            [[_e(r["label"]), _e(r["old"]), _e(r["new"])] for r in env],
            ["change" if r["changed"] else "" for r in env],
        )
    )
    findings = diff.get("findings", [])
    titles = {
        "regression": "Regressions",
        "change": "Changes",
        "improvement": "Improvements",
        "note": "Notes",
    }
    for kind, heading in titles.items():
        found = [f for f in findings if f["kind"] == kind]
        if not found:
            continue
        parts.append(f"<h2>{heading} ({len(found)})</h2>")
        parts.append(
            _table(
                ["area", "entry", "subject", "field", "OLD", "NEW", "detail"],
                [
                    [
                        _e(f["area"]),
                        _e(f["entry"]),
                        _e(f["subject"]),
                        _e(f["field"]),
                        _e(f["old"], 800),
                        _e(f["new"], 800),
                        _e(f["detail"], 600),
                    ]
                    for f in found
                ],
                [kind] * len(found),
            )
        )
    cap = diff.get("capacity", [])
    if cap:
        parts.append("<h2>Capacity</h2>")
        parts.append(
            _table(
                ["entry", "figure", "OLD", "NEW", "Δ", "finding"],
                [
                    [
                        _e(r["entry"]),
                        _e(r["field"]),
                        _e(r["old"]),
                        _e(r["new"]),
                        _e(r["delta"]),
                        _e(r["kind"] or ""),
                    ]
                    for r in cap
                ],
                [r["kind"] or "" for r in cap],
                numeric=(2, 3, 4),
            )
        )
    checks = diff.get("checks", [])
    if checks:
        parts.append("<h2>Checks</h2>")

        def side(s: dict[str, Any] | None) -> str:
            if not s:
                return "-"
            bits = [
                s.get("verdict"),
                s.get("status"),
                s.get("error.type") or s.get("stream_error.type"),
                s.get("error.param"),
                s.get("policy"),
            ]
            return " / ".join(_e(b) for b in bits if b is not None)

        parts.append(
            _table(
                [
                    "entry",
                    "check",
                    "OLD verdict / status / type / param",
                    "NEW verdict / status / type / param",
                    "finding",
                ],
                [
                    [
                        _e(r["entry"]),
                        _e(r["check"]),
                        side(r["old"]),
                        side(r["new"]),
                        _e(r["kind"] or ""),
                    ]
                    for r in checks
                ],
                [r["kind"] or "" for r in checks],
            )
        )
    acc = diff.get("accuracy", [])
    if acc:
        parts.append("<h2>Accuracy</h2>")
        parts.append(
            _table(
                [
                    "entry",
                    "check",
                    "metric",
                    "OLD",
                    "± se",
                    "NEW",
                    "± se",
                    "Δ",
                    "z",
                    "p",
                    "verdict",
                ],
                [
                    [
                        _e(r["entry"]),
                        _e(r["check"]),
                        _e(r["metric"]),
                        _e(r["old"]),
                        _e(r["old_stderr"]),
                        _e(r["new"]),
                        _e(r["new_stderr"]),
                        _e(r["delta"]),
                        _e(r["z"]),
                        _e(r["p_value"]),
                        _e(r["verdict"]),
                    ]
                    for r in acc
                ],
                [r["verdict"] for r in acc],
                numeric=(3, 4, 5, 6, 7, 8, 9),
            )
        )
    perf = diff.get("performance", [])
    if perf:
        parts.append("<h2>Performance</h2>")
        parts.append(
            _table(
                ["entry", "check", "metric", "OLD", "NEW", "ratio", "CI of ratio", "p", "verdict"],
                [
                    [
                        _e(r["entry"]),
                        _e(r["check"]),
                        _e(f"{r['metric']} ({r['statistic']})"),
                        _e(r["baseline"]),
                        _e(r["current"]),
                        _e(r["ratio"]),
                        f"[{_e(r['ci_low'])}, {_e(r['ci_high'])}]",
                        _e(r["p_value"]),
                        _e(r["verdict"]),
                    ]
                    for r in perf
                ],
                [r["verdict"] for r in perf],
                numeric=(3, 4, 5, 7),
            )
        )
    tests = diff.get("tests", [])
    if tests:
        parts.append("<h2>Tests whose outcome changed</h2>")
        parts.append(
            _table(
                ["entry", "test", "OLD", "NEW", "finding"],
                [
                    [
                        _e(r["entry"]),
                        f"<code>{_e(r['nodeid'])}</code>",
                        _e(r["old"]),
                        _e(r["new"]),
                        _e(r["kind"]),
                    ]
                    for r in tests
                ],
                [r["kind"] for r in tests],
            )
        )
    return _page(title, parts)
