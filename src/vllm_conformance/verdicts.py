"""One rule for every statistical verdict: the significance level, the minimum effect, the tests.

Every gate of the project asks one question, "is it worse?", and answers it the same way,
whether the suite compares a served score with a reported one, a latency with a baseline,
or ``vllm-conformance compare`` two runs:

- the null hypothesis is "worse by at most the tolerated change" (``min_effect``: an
  accuracy entry's ``rtol``, a performance entry's ``min_effect``, 0 against a reference
  run); the verdict is "worse" only when the data reject it, at one level :data:`ALPHA`,
  one-sided;
- equivalently: the one-sided ``1 - ALPHA`` confidence bound of the change lies beyond the
  tolerated change. A change that is significant but smaller than the tolerance is no
  regression, and a large change measured too noisily to be sure of is none either; the
  report states the smallest drop each check could have detected (:data:`POWER`).

A shortfall against a reported value is ``expected * rtol`` (a setup difference that no
sample size removes) plus ``z * se`` (sampling noise), added, not the larger of the two: at
a true drop of exactly ``rtol`` the check fails with probability ``ALPHA``, not one half.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

#: One-sided significance level of every gate (suites and compare alike).
ALPHA = 0.01
#: Probability of detecting a drop of the reported "minimal detectable drop".
POWER = 0.8
#: Smallest relative slow-down of a performance figure that is a regression.
MIN_EFFECT = 0.05

Change = Literal["regression", "improvement", "no change"]

_NORMAL = NormalDist()


def z_value(alpha: float = ALPHA) -> float:
    """The one-sided critical value: ``P(Z > z) = alpha``."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return _NORMAL.inv_cdf(1.0 - alpha)


def binomial_stderr(p: float, n: int) -> float:
    """lm-eval's standard error of a mean of 0/1 scores: ``sqrt(p (1 - p) / (n - 1))``."""
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 samples, got n={n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a proportion, got {p}")
    return math.sqrt(p * (1.0 - p) / (n - 1))


@dataclass(frozen=True)
class Score:
    """A proportion with its standard error and sample size."""

    value: float
    stderr: float
    n: int


@dataclass(frozen=True)
class Difference:
    """An estimated change ``new - old`` with its standard error."""

    estimate: float
    stderr: float
    n: int
    paired: bool
    #: documents scored differently by the two sides (paired only)
    discordant: int = 0

    @property
    def z(self) -> float:
        if self.stderr == 0:
            return 0.0 if self.estimate == 0 else math.copysign(math.inf, self.estimate)
        return self.estimate / self.stderr

    @property
    def p_value(self) -> float:
        """One-sided p-value in the direction the estimate points."""
        return _NORMAL.cdf(-abs(self.z)) if math.isfinite(self.z) else 0.0

    def bounds(self, alpha: float = ALPHA) -> tuple[float, float]:
        """The one-sided ``1 - alpha`` lower and upper confidence bounds of the change."""
        half = z_value(alpha) * self.stderr
        return self.estimate - half, self.estimate + half

    @property
    def method(self) -> str:
        if self.paired:
            return f"paired over {self.n} documents ({self.discordant} differ)"
        return "independent samples"


def paired_difference(
    new: Mapping[str, float], old: Mapping[str, float], *, common_only: bool = False
) -> Difference:
    """``mean(new_i - old_i)`` over the same documents (with 0/1 scores, McNemar's test in
    its normal form). Pairing removes the variance between documents, which both runs share.

    Documents scored by one side only are an error (the runs did not see the same data),
    unless ``common_only`` restricts the test to the documents both scored.
    """
    keys = sorted(set(new) & set(old))
    if not common_only and set(new) != set(old):
        only = sorted(set(new) ^ set(old))[:5]
        raise ValueError(f"the runs scored different documents (e.g. {only})")
    if len(keys) < 2:
        raise ValueError(f"a paired comparison needs at least 2 common documents, got {len(keys)}")
    diffs = [new[k] - old[k] for k in keys]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return Difference(mean, math.sqrt(var / n), n, True, sum(1 for d in diffs if d))


def independent_difference(new: Score, old: Score) -> Difference:
    """``new - old`` of two independent measurements: standard errors add in quadrature."""
    return Difference(
        new.value - old.value, math.hypot(new.stderr, old.stderr), min(new.n, old.n), False
    )


def judge(
    low: float, high: float, *, baseline: float, min_effect: float, higher_is_better: bool
) -> Change:
    """The verdict on a change whose one-sided ``1 - ALPHA`` bounds are ``low``..``high``
    (in the units of ``baseline``; ``min_effect`` is relative to ``|baseline|``)."""
    tolerated = min_effect * abs(baseline)
    if higher_is_better:
        low, high = -high, -low  # from here on, positive is worse
    if low > tolerated:
        return "regression"
    if high < -tolerated:
        return "improvement"
    return "no change"


def minimal_detectable_drop(
    difference: Difference,
    expected: float,
    *,
    tolerated: float = 0.0,
    expected_stderr: float | None = None,
    alpha: float = ALPHA,
    power: float = POWER,
    one_sided: bool = True,
) -> float:
    """The true drop below ``expected`` that fails the check with probability ``power``.

    Independent samples: the served score's spread is taken at the dropped value itself
    (a proportion's variance grows towards 0.5), solved as a fixed point of ``drop =
    tolerated + z_alpha * se_test + z_power * se(expected - drop)``. Paired: the standard
    error grows with the drop (with ``d`` documents lost, ``se ~ sqrt(d) / n``), so the drop
    is at least ``(z_alpha + z_power)^2 / n``: about ten lost documents at the defaults.
    """
    z_a = z_value(alpha if one_sided else alpha / 2)
    z_b = _NORMAL.inv_cdf(power)
    n = difference.n
    if difference.paired:
        k = z_a + z_b
        return tolerated + max(k * difference.stderr, k * k / n)
    drop = tolerated
    for _ in range(50):
        p = min(max(expected - drop, 0.0), 1.0)
        se = math.sqrt(p * (1 - p) / max(n - 1, 1))
        drop = tolerated + z_a * math.hypot(se, expected_stderr or 0.0) + z_b * se
    return drop


def documents_needed(
    expected: float,
    drop: float,
    *,
    rtol: float = 0.0,
    alpha: float = ALPHA,
    power: float = POWER,
) -> int:
    """Documents a check against ``expected`` needs to detect a true ``drop`` with ``power``
    (``drop`` must exceed the tolerated ``rtol * expected``); the inverse of
    :func:`minimal_detectable_drop` for independent samples."""
    margin = drop - rtol * expected
    if margin <= 0:
        raise ValueError(f"a drop of {drop:g} is within the tolerance {rtol * expected:g}")
    k = z_value(alpha) + _NORMAL.inv_cdf(power)
    p = min(max(expected - drop, 0.0), 1.0)
    return math.ceil(k * k * p * (1 - p) / (margin * margin)) + 1


@dataclass(frozen=True)
class AccuracyVerdict:
    """One accuracy check, with every number that decided it."""

    passed: bool
    value: float
    expected: float
    difference: Difference
    #: standard error of the expected value (a reported value's, when its source gives one)
    expected_stderr: float | None
    #: the largest shortfall (one-sided) or difference (two-sided) that passes
    tolerance: float
    #: ``tolerance - shortfall``; negative when the check fails
    margin: float
    alpha: float
    rtol: float
    one_sided: bool
    #: the smallest true drop this check detects with probability :data:`POWER`
    minimal_detectable_drop: float
    rule: str


def check_accuracy(
    difference: Difference,
    value: float,
    expected: float,
    *,
    rtol: float = 0.0,
    one_sided: bool = True,
    expected_stderr: float | None = None,
    alpha: float = ALPHA,
) -> AccuracyVerdict:
    """Is ``value`` (``difference`` = value - expected) worse than ``expected`` allows?

    One-sided (the default): fails when the shortfall exceeds ``rtol * expected + z * se``,
    so doing better than expected passes. Two-sided: any difference beyond the tolerance
    fails (a served model that scores much *higher* than its reference is not the same
    model either).
    """
    z = z_value(alpha if one_sided else alpha / 2)
    tolerated = rtol * expected
    tolerance = tolerated + z * difference.stderr
    shortfall = -difference.estimate if one_sided else abs(difference.estimate)
    margin = tolerance - max(shortfall, 0.0)
    what = "expected - measured" if one_sided else "|measured - expected|"
    rule = f"{what} <= {rtol:g} * {expected:.4f} + {z:.3f} * {difference.stderr:.4f}"
    if difference.paired:
        rule += f" ({difference.method})"
    mdd = minimal_detectable_drop(
        difference, expected, tolerated=tolerated, expected_stderr=expected_stderr,
        alpha=alpha, one_sided=one_sided,
    )  # fmt: skip
    return AccuracyVerdict(
        passed=margin >= 0, value=value, expected=expected, difference=difference,
        expected_stderr=expected_stderr, tolerance=tolerance, margin=margin, alpha=alpha,
        rtol=rtol, one_sided=one_sided, minimal_detectable_drop=mdd, rule=rule,
    )  # fmt: skip


def against_reported(
    served: Score,
    reported: float,
    *,
    reported_stderr: float | None = None,
    rtol: float = 0.0,
    one_sided: bool = True,
    alpha: float = ALPHA,
) -> AccuracyVerdict:
    """A served score against a published one (with the published standard error, if any)."""
    diff = independent_difference(served, Score(reported, reported_stderr or 0.0, served.n))
    return check_accuracy(
        diff, served.value, reported, rtol=rtol, one_sided=one_sided,
        expected_stderr=reported_stderr, alpha=alpha,
    )  # fmt: skip


def against_reference(
    served: Mapping[str, float],
    reference: Mapping[str, float],
    *,
    one_sided: bool = True,
    alpha: float = ALPHA,
) -> AccuracyVerdict:
    """Served against the reference implementation on the same documents, paired."""
    diff = paired_difference(served, reference)
    value = sum(served.values()) / len(served)
    expected = sum(reference.values()) / len(reference)
    return check_accuracy(diff, value, expected, one_sided=one_sided, alpha=alpha)
