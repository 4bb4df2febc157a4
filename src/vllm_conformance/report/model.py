"""The report model: records folded per entry (servers, checks, tests) with what is derived
from them (``serve_args``, ``counts``, ``outcomes``, ``unfinished``, ``build``). The report
keeps every record's fields, so older reports stay readable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vllm_conformance import plan
from vllm_conformance.report.records import read_records

SCHEMA_VERSION = 1

#: Arguments that differ between two starts of the same deployment for no reason of its own.
_VOLATILE_ARGS = frozenset({"--host", "--port"})


def serve_args(argv: Iterable[str]) -> dict[str, Any]:
    """``--flag value`` pairs of a server command line (host and port left out).

    A flag without a value maps to True; ``--model`` is kept (a different model is not
    like-for-like), the rest is what the matrix entry turned into vLLM arguments.
    """
    args = list(argv)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            i += 1
            continue
        name, eq, inline = arg.partition("=")
        if eq:
            value: Any = inline
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = True
            i += 1
        if name not in _VOLATILE_ARGS:
            out[name] = value
    return out


def _test_outcome(phases: list[dict[str, Any]]) -> str:
    """One outcome per test from its phase reports: error, failed, passed or skipped."""
    by_phase = {p.get("phase"): p.get("outcome") for p in phases}
    if any(p.get("outcome") == "failed" and p.get("phase") != "call" for p in phases):
        return "error"
    if by_phase.get("call") == "failed":
        return "failed"
    if by_phase.get("call") == "passed":
        return "passed"
    if "skipped" in by_phase.values():
        return "skipped"
    return str(by_phase.get("call") or next(iter(by_phase.values()), "unknown"))


def verdict_class(verdict: Any) -> str:
    """``pass``, ``fail`` or ``observed`` for a check's verdict (free text allowed)."""
    text = str(verdict or "").lower()
    if text.startswith(("fail", "error")):
        return "fail"
    if text.startswith("pass") or "confirmed" in text:
        return "pass"
    return "observed"


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("kind", "entry")}


def build_report(
    records: list[dict[str, Any]], *, build: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fold records into one report: environment, per-entry servers, checks and tests."""
    report: dict[str, Any] = {"schema": SCHEMA_VERSION, "environment": {}, "entries": {}}
    for record in records:
        kind = record.get("kind")
        if kind == "run":
            report["environment"] = record.get("environment", {})
            report["endpoint"] = record.get("endpoint")
            report["started"] = record.get("time")
            continue
        entry = report["entries"].setdefault(
            record.get("entry") or "(none)", {"server": None, "checks": [], "tests": []}
        )
        if kind == "server":
            fields = _strip(record)
            if fields.get("argv") is not None:
                fields["serve_args"] = serve_args(fields["argv"])
            previous = entry["server"]
            if fields.get("status") == "leftover" and previous:
                # A bad teardown must not hide the start's figures.
                entry["server"] = {
                    **previous,
                    "teardown": "leftover",
                    "teardown_message": fields.get("message"),
                }
            else:
                entry["server"] = fields
        elif kind == "check":
            entry["checks"].append(_strip(record))
        elif kind == "test":
            entry["tests"].append(_strip(record))
    for entry in report["entries"].values():
        phases: dict[str, list[dict[str, Any]]] = {}
        for test in entry["tests"]:
            phases.setdefault(test["nodeid"], []).append(test)
        entry["outcomes"] = {nodeid: _test_outcome(p) for nodeid, p in phases.items()}
        counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for outcome in entry["outcomes"].values():
            counts[outcome] = counts.get(outcome, 0) + 1
        checks = {"pass": 0, "fail": 0, "observed": 0}
        for check in entry["checks"]:
            checks[verdict_class(check.get("verdict"))] += 1
        entry["counts"] = {"tests": counts, "checks": checks}
        # Checks of a test that never reported: the run stopped inside it.
        entry["unfinished"] = sorted(
            {c["nodeid"] for c in entry["checks"] if c.get("nodeid")} - set(phases)
        )
    if records:
        report["finished"] = max(r.get("time", 0) for r in records)
    report["plan"] = [asdict(row) for row in plan.versus(records)]
    if build is not None:
        report["build"] = build
    return report


def load_report(run_dir: Path, *, complete: bool | None = None) -> dict[str, Any]:
    """The report of a run directory, rebuilt from its records where they exist.

    Works for a run killed half-way (no ``report.json``, torn last line); the ``build``
    section says whether the run finished (``complete``) and how many lines were torn.
    ``complete=None`` infers it: a run is complete when pytest wrote its report or its
    JUnit XML at the end of the session.
    """
    run_dir = Path(run_dir)
    previous: dict[str, Any] | None = None
    if (run_dir / "report.json").exists():
        try:
            previous = json.loads((run_dir / "report.json").read_text())
        except json.JSONDecodeError:
            previous = None
    if not (run_dir / "records").is_dir():
        if previous is None:
            raise FileNotFoundError(f"{run_dir}: neither records/ nor a readable report.json")
        return previous
    if complete is None:
        complete = (run_dir / "junit.xml").exists() or bool(
            previous and (previous.get("build") or {}).get("complete", True)
        )
    found = read_records(run_dir)
    return build_report(
        found.records,
        build={
            "run_id": run_dir.name,
            "complete": complete,
            "record_files": found.files,
            "records": len(found.records),
            "torn_lines": found.torn_lines,
        },
    )
