"""Baselines and significance-tested comparisons of per-request samples.

A regression is called only when all of these hold:

1. the change is statistically significant: the two-sided Mann-Whitney U p-value is below
   ``alpha`` (default 0.01: a gate compares several metrics per run, and a false alarm costs
   more than a late one) *and* the bootstrap confidence interval of the ratio (current /
   baseline of the median or mean) excludes 1;
2. it goes the bad way (higher latency, or lower for a higher-is-better metric);
3. its size, ``|ratio - 1|``, is at least ``min_effect`` (default 5 %), so a tiny change that
   is significant only because there are many samples is not a regression.

The bootstrap resamples each run independently with a seeded ``numpy`` generator, so the same
inputs always give the same interval. Caveat: requests of one run are not independent
(they share batches), so p-values are somewhat optimistic; ``min_effect`` and comparing runs
of the same length keep that from turning noise into verdicts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats as sps

from vllm_conformance.perf.loadgen import RunResult
from vllm_conformance.perf.metrics import compute_metrics, samples_ms

Statistic = Literal["median", "mean"]
Verdict = Literal["regression", "improvement", "no change", "insufficient data"]

#: Per-request sample sets compared by default (ITL is pooled per token, so its samples are
#: far from independent; compare it explicitly if wanted).
DEFAULT_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2el")
BASELINE_FORMAT = 1


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


@dataclass(frozen=True)
class Comparison:
    """The verdict on one metric, with the numbers it rests on."""

    metric: str
    statistic: str
    verdict: Verdict
    baseline: float
    current: float
    ratio: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float
    effect_size: float
    rank_biserial: float
    n_baseline: int
    n_current: int
    alpha: float
    min_effect: float
    higher_is_better: bool = False

    @property
    def regression(self) -> bool:
        """True when the verdict is a regression."""
        return self.verdict == "regression"

    @property
    def significant(self) -> bool:
        """p < alpha and the ratio's CI (when there is one) excludes 1, regardless of size
        or direction."""
        if math.isnan(self.p_value) or self.p_value >= self.alpha:
            return False
        if math.isnan(self.ci_low) or math.isnan(self.ci_high):
            return True
        return not (self.ci_low <= 1.0 <= self.ci_high)

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.verdict == "insufficient data":
            return f"{self.metric}: insufficient data (n={self.n_baseline}/{self.n_current})"
        if self.statistic == "rate":
            return (
                f"{self.metric}: {self.baseline:.3f} -> {self.current:.3f} "
                f"({self.effect_size * 100:+.1f} points, one-sided Fisher p={self.p_value:.3g}, "
                f"n={self.n_baseline}/{self.n_current}): {self.verdict}"
            )
        return (
            f"{self.metric} {self.statistic}: {self.baseline:.3f} -> {self.current:.3f} "
            f"({self.effect_size:+.1%}, {self.confidence:.0%} CI of ratio "
            f"[{self.ci_low:.3f}, {self.ci_high:.3f}], p={self.p_value:.3g}, "
            f"r={self.rank_biserial:+.2f}): {self.verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        d = asdict(self)
        d["significant"] = self.significant
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _stat(values: np.ndarray, statistic: Statistic, axis: int | None = None) -> Any:
    if statistic == "median":
        return np.median(values, axis=axis)
    if statistic == "mean":
        return np.mean(values, axis=axis)
    raise ValueError(f"unknown statistic {statistic!r}")


def bootstrap_ratio_ci(
    baseline: Sequence[float],
    current: Sequence[float],
    *,
    statistic: Statistic = "median",
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 250,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(current) / stat(baseline)``, each run resampled
    independently with a seeded generator."""
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(current, dtype=float)
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        sa = _stat(a[rng.integers(0, a.size, size=(k, a.size))], statistic, axis=1)
        sb = _stat(b[rng.integers(0, b.size, size=(k, b.size))], statistic, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios[start : start + k] = sb / sa
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.nanquantile(ratios, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _subsample(x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return x if x.size <= limit else rng.choice(x, size=limit, replace=False)


def compare_samples(
    baseline: Sequence[float],
    current: Sequence[float],
    *,
    metric: str = "",
    statistic: Statistic = "median",
    higher_is_better: bool = False,
    alpha: float = 0.01,
    min_effect: float = 0.05,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    min_samples: int = 5,
    max_samples: int = 20000,
) -> Comparison:
    """Compare two sample sets (e.g. TTFT in ms of a baseline and a current run).

    ``max_samples`` caps each side (a seeded subsample) to bound the bootstrap's cost.
    """
    rng = np.random.default_rng(seed)
    a = _subsample(np.asarray(baseline, dtype=float), max_samples, rng)
    b = _subsample(np.asarray(current, dtype=float), max_samples, rng)
    a = a[np.isfinite(a)]
    b = b[np.isfinite(b)]
    nan = math.nan
    common: dict[str, Any] = {
        "metric": metric, "statistic": statistic, "n_baseline": int(a.size),
        "n_current": int(b.size), "alpha": alpha, "min_effect": min_effect,
        "confidence": confidence, "higher_is_better": higher_is_better,
    }  # fmt: skip
    if a.size < min_samples or b.size < min_samples:
        return Comparison(
            verdict="insufficient data", baseline=nan, current=nan, ratio=nan, ci_low=nan,
            ci_high=nan, p_value=nan, effect_size=nan, rank_biserial=nan, **common,
        )  # fmt: skip
    base_v = float(_stat(a, statistic))
    cur_v = float(_stat(b, statistic))
    ratio = cur_v / base_v if base_v != 0 else (math.inf if cur_v > 0 else 1.0)
    lo, hi = bootstrap_ratio_ci(
        a, b, statistic=statistic, n_boot=n_boot, confidence=confidence, seed=seed
    )
    if np.all(a == a[0]) and np.all(b == b[0]) and a[0] == b[0]:
        p = 1.0
        u = a.size * b.size / 2.0
    else:
        res = sps.mannwhitneyu(b, a, alternative="two-sided")
        p, u = float(res.pvalue), float(res.statistic)
    # Rank-biserial correlation: P(current > baseline) - P(current < baseline).
    rank_biserial = 2.0 * u / (a.size * b.size) - 1.0
    effect = ratio - 1.0
    significant = p < alpha and not (lo <= 1.0 <= hi)
    worse = effect < 0 if higher_is_better else effect > 0
    verdict: Verdict = "no change"
    if significant and abs(effect) >= min_effect:
        verdict = "regression" if worse else "improvement"
    return Comparison(
        verdict=verdict, baseline=base_v, current=cur_v, ratio=ratio, ci_low=lo, ci_high=hi,
        p_value=p, effect_size=effect, rank_biserial=rank_biserial, **common,
    )  # fmt: skip


def compare_failure_rate(
    baseline_failed: int,
    baseline_total: int,
    current_failed: int,
    current_total: int,
    *,
    alpha: float = 0.01,
    min_effect: float = 0.0,
) -> Comparison:
    """Did the failure rate go up? One-sided Fisher exact test; ``min_effect`` is the
    smallest increase in failure *rate* (absolute, e.g. 0.01 = one point) to call it."""
    nan = math.nan
    common: dict[str, Any] = {
        "metric": "failure_rate", "statistic": "rate", "n_baseline": baseline_total,
        "n_current": current_total, "alpha": alpha, "min_effect": min_effect,
        "confidence": 1.0 - alpha, "higher_is_better": False,
    }  # fmt: skip
    if baseline_total <= 0 or current_total <= 0:
        return Comparison(
            verdict="insufficient data", baseline=nan, current=nan, ratio=nan, ci_low=nan,
            ci_high=nan, p_value=nan, effect_size=nan, rank_biserial=nan, **common,
        )  # fmt: skip
    rb = baseline_failed / baseline_total
    rc = current_failed / current_total
    table = [
        [current_failed, current_total - current_failed],
        [baseline_failed, baseline_total - baseline_failed],
    ]
    p = float(sps.fisher_exact(table, alternative="greater").pvalue)
    diff = rc - rb
    verdict: Verdict = "no change"
    if p < alpha and diff > 0 and diff >= min_effect:
        verdict = "regression"
    ratio = rc / rb if rb > 0 else (math.inf if rc > 0 else 1.0)
    # No interval here: the exact test's p-value carries the significance on its own.
    return Comparison(
        verdict=verdict, baseline=rb, current=rc, ratio=ratio, ci_low=nan, ci_high=nan,
        p_value=p, effect_size=diff, rank_biserial=nan, **common,
    )  # fmt: skip


def compare_to_baseline(
    baseline: Baseline,
    current: Baseline | RunResult,
    *,
    metrics: Iterable[str] = DEFAULT_METRICS,
    statistic: Statistic = "median",
    alpha: float = 0.01,
    min_effect: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    include_failures: bool = True,
) -> list[Comparison]:
    """Compare a run (or a second baseline) with a baseline, one :class:`Comparison` per
    latency metric, plus the failure rate."""
    cur = current if isinstance(current, Baseline) else baseline_from_run(current)
    out = [
        compare_samples(
            baseline.samples.get(m, []),
            cur.samples.get(m, []),
            metric=f"{m}_ms",
            statistic=statistic,
            alpha=alpha,
            min_effect=min_effect,
            n_boot=n_boot,
            seed=seed,
        )
        for m in metrics
    ]
    if include_failures:
        out.append(
            compare_failure_rate(
                baseline.failed, baseline.completed + baseline.failed,
                cur.failed, cur.completed + cur.failed, alpha=alpha,
            )
        )  # fmt: skip
    return out


def regressions(comparisons: Iterable[Comparison]) -> list[Comparison]:
    """The comparisons whose verdict is a regression."""
    return [c for c in comparisons if c.regression]
