"""Aggregate a run under ``vllm bench serve``'s result names (vLLM 0.32 ``calculate_metrics``).

- ``completed`` / ``failed``: successful and failed requests (warm-up excluded).
- throughputs divide by the run's wall duration: ``request_throughput`` = completed / s,
  ``output_throughput`` = output tokens of successful requests / s,
  ``total_token_throughput`` = (prompt + output tokens of successful requests) / s.
- ``request_goodput``: successful requests that meet *every* SLO, per second. SLOs are in
  ms on ``ttft``, ``tpot`` and ``e2el``; a request with one output token has TPOT 0 for this
  purpose, as in vLLM. Failed requests are never good, so they count against goodput.
- ``{mean,median,std,p90,p99}_{ttft,tpot,itl,e2el}_ms`` over successful requests
  (``np.percentile``'s linear interpolation, population ``std``). TPOT only for requests
  with more than one output token; ITL pools every gap of every request.

Where vLLM reports 0 for a metric with no samples (all requests failed), this module gives
``NaN``: a threshold check on NaN fails, so a server that refuses load cannot look fast.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vllm_conformance.perf.loadgen import RequestResult, RunResult

#: Latency metric names, as in ``vllm bench serve --percentile-metrics``.
LATENCY_METRICS: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")
#: The run-level names of :meth:`BenchMetrics.as_dict`; per-latency names match
#: :data:`LATENCY_NAME` (any percentile: ``compute_metrics(percentiles=...)``).
AGGREGATES: tuple[str, ...] = (
    "completed", "failed", "failure_rate", "not_sent", "duration", "total_input_tokens",
    "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput",
    "request_goodput", "max_concurrency", "request_rate",
)  # fmt: skip
LATENCY_NAME = re.compile(
    rf"^(?:mean|median|std|p\d+(?:\.\d+)?)_(?:{'|'.join(LATENCY_METRICS)})_ms$"
)


def is_metric(name: str) -> bool:
    """Whether ``name`` is a metric a threshold can gate (a key of ``as_dict``)."""
    return name in AGGREGATES or LATENCY_NAME.match(name) is not None


#: Keys accepted in an SLO mapping for goodput.
SLO_KEYS: tuple[str, ...] = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one latency metric, in milliseconds."""

    n: int
    mean: float
    median: float
    std: float
    p90: float
    p99: float
    percentiles: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, seconds: Sequence[float], percentiles: Sequence[float] = (90, 99)) -> LatencyStats:
        """Stats of samples given in seconds (NaN everywhere when empty)."""
        if len(seconds) == 0:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, {_pkey(p): nan for p in percentiles})
        ms = np.asarray(seconds, dtype=float) * 1000.0
        return cls(
            n=int(ms.size),
            mean=float(np.mean(ms)),
            median=float(np.median(ms)),
            std=float(np.std(ms)),
            p90=float(np.percentile(ms, 90)),
            p99=float(np.percentile(ms, 99)),
            percentiles={_pkey(p): float(np.percentile(ms, p)) for p in percentiles},
        )


def _pkey(p: float) -> str:
    return f"p{int(p)}" if int(p) == p else f"p{p}"


@dataclass(frozen=True)
class BenchMetrics:
    """A run's aggregate, with ``vllm bench serve``'s names (see :meth:`as_dict`)."""

    completed: int
    failed: int
    not_sent: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None
    goodput_slos: dict[str, float]
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    errors: dict[str, int]
    max_concurrency: int | None = None
    request_rate: float = math.inf

    @property
    def failure_rate(self) -> float:
        """failed / (completed + failed); NaN when nothing was sent."""
        total = self.completed + self.failed
        return self.failed / total if total else math.nan

    def __getitem__(self, key: str) -> Any:
        """Look up by ``vllm bench serve`` key, e.g. ``m["median_ttft_ms"]``."""
        return self.as_dict()[key]

    def as_dict(self) -> dict[str, Any]:
        """A flat dict with ``vllm bench serve``'s result keys (plus ``failure_rate``,
        ``not_sent`` and ``errors``)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in AGGREGATES}
        out["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        for name in LATENCY_METRICS:
            s: LatencyStats = getattr(self, name)
            out[f"mean_{name}_ms"] = s.mean
            out[f"median_{name}_ms"] = s.median
            out[f"std_{name}_ms"] = s.std
            out[f"p90_{name}_ms"] = s.p90
            out[f"p99_{name}_ms"] = s.p99
            for k, v in s.percentiles.items():
                out[f"{k}_{name}_ms"] = v
        out["errors"] = dict(self.errors)
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """:meth:`as_dict` with NaN written as ``None`` (strict JSON) plus the SLOs."""
        d = {k: (None if isinstance(v, float) and math.isnan(v) else v)
             for k, v in self.as_dict().items()}  # fmt: skip
        d["goodput_slos"] = dict(self.goodput_slos)
        return d

    def to_dict(self) -> dict[str, Any]:
        """Structured form (the nested dataclasses)."""
        return asdict(self)


def _error_key(text: str) -> str:
    # Group by the first line so one error repeated for every request reads as one entry.
    return (text.strip().splitlines() or ["(no error text)"])[0][:300]


def compute_metrics(
    results: Sequence[RequestResult] | RunResult,
    duration_s: float | None = None,
    *,
    goodput: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = (90, 99),
) -> BenchMetrics:
    """Aggregate per-request results.

    ``results`` is a :class:`RunResult` (its duration is used) or a list of results with an
    explicit ``duration_s``. ``goodput`` maps SLO names (``ttft``, ``tpot``, ``e2el``) to
    limits in ms; without it ``request_goodput`` is ``None``, as in vLLM.
    """
    not_sent = 0
    max_conc: int | None = None
    rate = math.inf
    if isinstance(results, RunResult):
        run = results
        items: Sequence[RequestResult] = run.results
        duration = run.duration_s if duration_s is None else duration_s
        not_sent = run.not_sent
        max_conc = run.config.max_concurrency
        rate = run.config.request_rate
    else:
        items = results
        if duration_s is None:
            raise ValueError("duration_s is required with a plain list of results")
        duration = duration_s
    if duration <= 0:
        raise ValueError("duration must be > 0")
    slos = dict(goodput or {})
    unknown = set(slos) - set(SLO_KEYS)
    if unknown:
        raise ValueError(f"unknown SLO keys {sorted(unknown)}; use {SLO_KEYS}")

    ok = [r for r in items if r.success]
    bad = [r for r in items if not r.success]
    ttfts = [r.ttft for r in ok]
    e2els = [r.latency for r in ok]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    itls = [gap for r in ok for gap in r.itl]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)

    good: int | None = None
    if slos:
        good = 0
        for r in ok:
            values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
            if all(values[k] <= limit / 1000.0 for k, limit in slos.items()):
                good += 1

    return BenchMetrics(
        completed=len(ok),
        failed=len(bad),
        not_sent=not_sent,
        duration=duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration,
        output_throughput=total_out / duration,
        total_token_throughput=(total_in + total_out) / duration,
        request_goodput=None if good is None else good / duration,
        goodput_slos=slos,
        ttft=LatencyStats.of(ttfts, percentiles),
        tpot=LatencyStats.of(tpots, percentiles),
        itl=LatencyStats.of(itls, percentiles),
        e2el=LatencyStats.of(e2els, percentiles),
        errors=dict(Counter(_error_key(r.error) for r in bad).most_common()),
        max_concurrency=max_conc,
        request_rate=rate,
    )


def samples_ms(results: Sequence[RequestResult] | RunResult) -> dict[str, list[float]]:
    """Per-request samples in ms of successful requests: ``ttft``, ``tpot``, ``e2el``
    (one per request) and ``itl`` (every gap)."""
    items = results.results if isinstance(results, RunResult) else results
    ok = [r for r in items if r.success]
    return {
        "ttft": [r.ttft * 1000.0 for r in ok],
        "tpot": [t * 1000.0 for r in ok if (t := r.tpot) is not None],
        "itl": [g * 1000.0 for r in ok for g in r.itl],
        "e2el": [r.latency * 1000.0 for r in ok],
    }


def client_bottleneck(result: RunResult, metrics: BenchMetrics) -> str | None:
    """Why the load generator, not the server, may have set ``metrics`` (None: it kept up).

    A verdict on such numbers would judge the client: the suite and ``benchmarks/fidelity.py``
    refuse it.
    """
    if result.health is None:
        return "the load generator's own health was not measured"
    return result.health.bottleneck(metrics.itl.median / 1000, metrics.ttft.median / 1000)
