"""Reports: JSON with every raw sample, a Markdown summary, PNG plots (matplotlib, Agg).

:func:`write_report` is the one-call entry point; the pieces are public for suites that
want to compose their own report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from vllm_conformance.perf.loadgen import RunResult
from vllm_conformance.perf.metrics import LATENCY_METRICS, BenchMetrics, compute_metrics
from vllm_conformance.perf.server_metrics import ServerLatency
from vllm_conformance.perf.stats import Comparison

SweepAxis = Literal["max_concurrency", "request_rate"]


def _clean(value: Any) -> Any:
    """Strict-JSON values: NaN and infinities become None (rates: ``"inf"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def run_record(
    run: RunResult,
    metrics: BenchMetrics | None = None,
    *,
    server: Mapping[str, ServerLatency] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One run as a JSON-ready dict: metrics, server-side latency and every raw sample."""
    m = metrics or compute_metrics(run)
    record: dict[str, Any] = {
        "label": run.config.label,
        "metrics": m.to_json_dict(),
        "server": {k: v.to_dict() for k, v in (server or {}).items()},
        "run": run.to_dict(),
    }
    if extra:
        record.update(extra)
    return _clean(record)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_summary(
    metrics: BenchMetrics,
    *,
    title: str = "Performance run",
    server: Mapping[str, ServerLatency] | None = None,
    comparisons: Sequence[Comparison] | None = None,
    context: Mapping[str, Any] | None = None,
) -> str:
    """A Markdown summary: counts and throughputs, a latency table with failures beside it,
    server-side latency, baseline comparisons and the error texts."""
    d = metrics.as_dict()
    lines = [f"# {title}", ""]
    for k, v in (context or {}).items():
        lines.append(f"- {k}: {v}")
    lines += [
        f"- completed: {metrics.completed}, failed: {metrics.failed} "
        f"(failure rate {_fmt(metrics.failure_rate * 100, 1)} %), not sent: {metrics.not_sent}",
        f"- duration: {metrics.duration:.2f} s; max concurrency: {metrics.max_concurrency}; "
        f"request rate: {d['request_rate']}",
        f"- request throughput: {metrics.request_throughput:.2f} req/s; output throughput: "
        f"{metrics.output_throughput:.2f} tok/s; total token throughput: "
        f"{metrics.total_token_throughput:.2f} tok/s",
    ]
    if metrics.request_goodput is not None:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in metrics.goodput_slos.items())
        lines.append(f"- request goodput ({slos}): {metrics.request_goodput:.2f} req/s")
    lines += [
        "",
        "| metric (ms) | n | failed | mean | median | std | p90 | p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in LATENCY_METRICS:
        s = getattr(metrics, name)
        lines.append(
            f"| {name} | {s.n} | {metrics.failed} | {_fmt(s.mean)} | {_fmt(s.median)} | "
            f"{_fmt(s.std)} | {_fmt(s.p90)} | {_fmt(s.p99)} |"
        )
    if server:
        lines += [
            "",
            "Server-side (from `/metrics` histogram deltas; quantiles interpolated in buckets):",
            "",
            "| quantity | source | count | mean | p50 | p90 | p99 | p50 bucket |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for q, s in server.items():
            lo, hi = s.p50_bucket_ms
            lines.append(
                f"| {q} | `{s.source}` | {s.count:.0f} | {_fmt(s.mean_ms)} | {_fmt(s.p50_ms)} | "
                f"{_fmt(s.p90_ms)} | {_fmt(s.p99_ms)} | ({_fmt(lo)}, {_fmt(hi)}] |"
            )
    if comparisons:
        lines += ["", "Baseline comparison:", ""]
        lines += [f"- {c.describe()}" for c in comparisons]
    if metrics.errors:
        lines += ["", "Errors (first line, count):", ""]
        lines += [f"- {n} x `{text}`" for text, n in metrics.errors.items()]
    return "\n".join(lines) + "\n"


def markdown_sweep(metrics: Sequence[BenchMetrics], axis: SweepAxis) -> str:
    """A Markdown table of a sweep, one row per point."""
    lines = [
        f"| {axis} | completed | failed | req/s | output tok/s | median TTFT ms | "
        "p99 TTFT ms | median TPOT ms | p99 TPOT ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in metrics:
        x = m.as_dict()[axis]
        lines.append(
            f"| {x} | {m.completed} | {m.failed} | {m.request_throughput:.2f} | "
            f"{m.output_throughput:.2f} | {_fmt(m.ttft.median)} | {_fmt(m.ttft.p99)} | "
            f"{_fmt(m.tpot.median)} | {_fmt(m.tpot.p99)} |"
        )
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_distributions(
    runs: Sequence[RunResult], path: str | Path, *, labels: Sequence[str] | None = None
) -> Path:
    """TTFT and TPOT distributions (empirical CDFs) of one or more runs, side by side."""
    from vllm_conformance.perf.metrics import samples_ms

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(labels) if labels else [r.config.label or f"run {i}" for i, r in enumerate(runs)]
    for run, label in zip(runs, names, strict=True):
        s = samples_ms(run)
        for ax, key in zip(axes, ("ttft", "tpot"), strict=True):
            xs = sorted(s[key])
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")
    for ax, key in zip(axes, ("TTFT", "TPOT"), strict=True):
        ax.set_xlabel(f"{key} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{key} distribution")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_sweep(metrics: Sequence[BenchMetrics], path: str | Path, axis: SweepAxis) -> Path:
    """Output throughput and median/p99 TTFT and TPOT against concurrency or request rate."""
    plt = _pyplot()
    xs = [float(m.as_dict()[axis]) if m.as_dict()[axis] != "inf" else math.inf for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(xs, [m.output_throughput for m in metrics], "o-")
    ax1.set_xlabel(axis)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("Throughput")
    for key, style in (("ttft", "o-"), ("tpot", "s-")):
        ax2.plot(xs, [getattr(m, key).median for m in metrics], style, label=f"median {key}")
        ax2.plot(xs, [getattr(m, key).p99 for m in metrics], style, alpha=0.4, label=f"p99 {key}")
    ax2.set_xlabel(axis)
    ax2.set_ylabel("ms")
    ax2.set_yscale("log")
    ax2.set_title("Latency")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def write_report(
    out_dir: str | Path,
    runs: RunResult | Sequence[RunResult],
    *,
    name: str = "perf",
    axis: SweepAxis | None = None,
    goodput: Mapping[str, float] | None = None,
    server: Sequence[Mapping[str, ServerLatency] | None] | None = None,
    comparisons: Sequence[Comparison] | None = None,
    context: Mapping[str, Any] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``{name}.json``, ``{name}.md`` and PNGs (``{name}-dist.png``, and for a sweep
    given ``axis``, ``{name}-sweep.png``) under ``out_dir``; returns the paths by kind."""
    run_list = [runs] if isinstance(runs, RunResult) else list(runs)
    if not run_list:
        raise ValueError("no runs to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [compute_metrics(r, goodput=goodput) for r in run_list]
    servers = list(server) if server is not None else [None] * len(run_list)
    records = [
        run_record(r, m, server=s) for r, m, s in zip(run_list, metrics, servers, strict=True)
    ]
    payload: dict[str, Any] = {
        "name": name,
        "context": dict(context or {}),
        "runs": records,
        "comparisons": [c.to_dict() for c in comparisons or []],
    }
    paths: dict[str, Path] = {}
    paths["json"] = out / f"{name}.json"
    paths["json"].write_text(json.dumps(_clean(payload), indent=1, allow_nan=False) + "\n")

    parts = []
    for i, (r, m, s) in enumerate(zip(run_list, metrics, servers, strict=True)):
        title = f"{name}: {r.config.label or f'run {i}'}"
        parts.append(
            markdown_summary(
                m, title=title, server=s,
                comparisons=comparisons if i == len(run_list) - 1 else None,
                context=context if i == 0 else None,
            )
        )  # fmt: skip
    if axis is not None and len(run_list) > 1:
        parts.insert(0, f"# {name}: sweep over {axis}\n\n" + markdown_sweep(metrics, axis))
    paths["md"] = out / f"{name}.md"
    paths["md"].write_text("\n".join(parts))

    if plots:
        paths["dist_png"] = plot_distributions(run_list, out / f"{name}-dist.png")
        if axis is not None and len(run_list) > 1:
            paths["sweep_png"] = plot_sweep(metrics, out / f"{name}-sweep.png", axis)
    return paths
