"""Baselines on disk: a run's per-request samples, its aggregate and the workload it ran.

Storage only (the comparison is :mod:`vllm_conformance.perf.stats`). A baseline says which
workload produced it (``meta.workload``, a :class:`~vllm_conformance.perf.workload.WorkloadSpec`
dict), so a comparison with a run of another workload is refused instead of reported as a
regression or, worse, as none (:func:`workload_mismatch`). Baselines written before the
workload was stored are read from their aggregate (tokens per request) and load config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_conformance.perf.loadgen import RunResult
from vllm_conformance.perf.metrics import compute_metrics, samples_ms
from vllm_conformance.perf.workload import WorkloadSpec

BASELINE_FORMAT = 1
#: The workload fields that change what a per-request latency means.
LIKE_FOR_LIKE: tuple[str, ...] = (
    "dataset", "input_len", "output_len", "range_ratio", "max_concurrency", "request_rate",
    "burstiness", "ignore_eos",
)  # fmt: skip


@dataclass(frozen=True)
class Baseline:
    """A saved run: per-request samples in ms, the aggregate and free-form metadata."""

    samples: dict[str, list[float]]
    summary: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (with a format version)."""
        return {"format": BASELINE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Baseline:
        """Inverse of :meth:`to_dict`."""
        if data.get("format", BASELINE_FORMAT) != BASELINE_FORMAT:
            raise ValueError(f"unsupported baseline format {data.get('format')!r}")
        return cls(
            samples={k: [float(x) for x in v] for k, v in data["samples"].items()},
            summary=dict(data.get("summary", {})),
            meta=dict(data.get("meta", {})),
            completed=int(data.get("completed", 0)),
            failed=int(data.get("failed", 0)),
        )


def baseline_from_run(
    run: RunResult,
    *,
    goodput: Mapping[str, float] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Baseline:
    """The baseline of a run (its samples, :func:`compute_metrics` summary and config)."""
    metrics = compute_metrics(run, goodput=goodput)
    info: dict[str, Any] = {
        "config": run.config.to_dict(),
        "model": run.model,
        "started_at": run.started_at,
    }
    info.update(meta or {})
    return Baseline(
        samples=samples_ms(run),
        summary=metrics.to_json_dict(),
        meta=info,
        completed=metrics.completed,
        failed=metrics.failed,
    )


def save_baseline(
    path: str | Path, run: RunResult | Baseline, *, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a run (or a baseline) as a JSON baseline file; returns the path."""
    baseline = run if isinstance(run, Baseline) else baseline_from_run(run, meta=meta)
    if isinstance(run, Baseline) and meta:
        baseline = Baseline(
            baseline.samples, baseline.summary, {**baseline.meta, **meta},
            baseline.completed, baseline.failed,
        )  # fmt: skip
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(baseline.to_dict(), indent=1, allow_nan=False) + "\n")
    return out


def load_baseline(path: str | Path) -> Baseline:
    """Read a baseline written by :func:`save_baseline`."""
    return Baseline.from_dict(json.loads(Path(path).read_text()))


def recorded_workload(baseline: Baseline) -> dict[str, Any] | None:
    """The like-for-like fields of the workload that made ``baseline``, or None if it does
    not say (neither ``meta.workload`` nor an aggregate with token counts)."""
    stored = baseline.meta.get("workload")
    if isinstance(stored, Mapping):
        spec = WorkloadSpec.from_dict(dict(stored))
        return {k: getattr(spec, k) for k in LIKE_FOR_LIKE}
    config, summary = baseline.meta.get("config") or {}, baseline.summary
    done = summary.get("completed") or baseline.completed
    if not done or "total_input_tokens" not in summary or not config:
        return None
    rate = config.get("request_rate", "inf")
    return {
        "dataset": "random",
        "input_len": round(summary["total_input_tokens"] / done),
        "output_len": round(summary["total_output_tokens"] / done),
        "range_ratio": 0.0,
        "max_concurrency": config.get("max_concurrency"),
        "request_rate": math.inf if rate in ("inf", None) else float(rate),
        "burstiness": float(config.get("burstiness", 1.0)),
        "ignore_eos": bool(config.get("ignore_eos", True)),
    }


def workload_mismatch(baseline: Baseline, spec: WorkloadSpec) -> str | None:
    """Why ``baseline`` is not like-for-like with a run of ``spec``, or None if it is."""
    recorded = recorded_workload(baseline)
    if recorded is None:
        return "the baseline records no workload, so it cannot be shown to be like-for-like"
    differ = [
        f"{k} {recorded[k]!r} vs {getattr(spec, k)!r}"
        for k in LIKE_FOR_LIKE
        if recorded[k] != getattr(spec, k)
    ]
    return f"the baseline ran another workload ({', '.join(differ)})" if differ else None
