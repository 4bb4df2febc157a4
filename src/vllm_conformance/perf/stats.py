"""Significance-tested comparisons of per-request samples (the baseline file is
:mod:`vllm_conformance.perf.baseline`).

The verdict follows the project's one rule (:mod:`vllm_conformance.verdicts`): a change is a
regression when the one-sided ``1 - ALPHA`` confidence bound of the ratio current / baseline
(of the median or mean; a seeded percentile bootstrap, each run resampled independently) is
beyond ``1 + min_effect`` the bad way (higher latency, or lower for a higher-is-better
metric); an improvement the same, the good way. A change that is significant but smaller
than ``min_effect`` is no regression. The Mann-Whitney U p-value and the rank-biserial
correlation are reported beside it.

Caveat: requests of one run are not independent (they share batches), so intervals are
somewhat optimistic; ``min_effect`` and comparing runs of the same length keep that from
turning noise into verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats as sps

from vllm_conformance import verdicts
from vllm_conformance.perf.baseline import Baseline, baseline_from_run
from vllm_conformance.perf.loadgen import RunResult

Statistic = Literal["median", "mean"]
Verdict = Literal["regression", "improvement", "no change", "insufficient data"]

#: Per-request sample sets compared by default (ITL is pooled per token, so its samples are
#: far from independent; compare it explicitly if wanted).
DEFAULT_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2el")
#: Two-sided confidence of the ratio's interval: each bound is one-sided ``1 - ALPHA``.
CONFIDENCE = 1.0 - 2.0 * verdicts.ALPHA


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
        """The ratio's interval excludes 1 (a rate, which has none: p < alpha), regardless
        of size or direction."""
        if math.isnan(self.ci_low) or math.isnan(self.ci_high):
            return not math.isnan(self.p_value) and self.p_value < self.alpha
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
    confidence: float = CONFIDENCE,
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
    alpha: float = verdicts.ALPHA,
    min_effect: float = verdicts.MIN_EFFECT,
    n_boot: int = 2000,
    seed: int = 0,
    min_samples: int = 5,
    max_samples: int = 20000,
) -> Comparison:
    """Compare two sample sets (e.g. TTFT in ms of a baseline and a current run).

    ``max_samples`` caps each side (a seeded subsample) to bound the bootstrap's cost.
    """
    confidence = 1.0 - 2.0 * alpha
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
    verdict: Verdict = verdicts.judge(
        lo - 1.0, hi - 1.0, baseline=1.0, min_effect=min_effect, higher_is_better=higher_is_better
    )
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
    alpha: float = verdicts.ALPHA,
) -> Comparison:
    """Did the failure rate go up? One-sided Fisher exact test at ``alpha``: any significant
    rise is a regression (a failed request is a finding, so nothing is tolerated)."""
    nan = math.nan
    common: dict[str, Any] = {
        "metric": "failure_rate", "statistic": "rate", "n_baseline": baseline_total,
        "n_current": current_total, "alpha": alpha, "min_effect": 0.0,
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
    if p < alpha and diff > 0:
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
    alpha: float = verdicts.ALPHA,
    min_effect: float = verdicts.MIN_EFFECT,
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
