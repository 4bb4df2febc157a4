"""Server-side latency from vLLM's Prometheus ``/metrics``, to report beside client numbers.

Scrape before and after a run, subtract the histograms, and read the mean (exact:
``sum / count``) and approximate quantiles (linear interpolation inside a bucket, as
Prometheus's ``histogram_quantile`` does; the bucket bounds are reported too, because vLLM's
buckets are coarse: the first inter-token bucket ends at 10 ms).

Names changed across vLLM versions, so each quantity is looked up by the first name that the
server exposes: inter-token latency is ``vllm:inter_token_latency_seconds`` in newer
versions and ``vllm:time_per_output_token_seconds`` in older ones. A server started with
``--disable-log-stats`` exposes no ``vllm:*`` metric at all; the result is then empty.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: Candidate histogram names per quantity, newest first.
HISTOGRAM_NAMES: dict[str, tuple[str, ...]] = {
    "ttft": ("vllm:time_to_first_token_seconds",),
    "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "tpot": ("vllm:request_time_per_output_token_seconds",),
    "e2el": ("vllm:e2e_request_latency_seconds",),
    "queue": ("vllm:request_queue_time_seconds",),
    "prefill": ("vllm:request_prefill_time_seconds",),
    "decode": ("vllm:request_decode_time_seconds",),
}
#: Counters worth a delta in reports (``_total`` stripped, as the Prometheus parser does).
COUNTER_NAMES: tuple[str, ...] = (
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:request_success",
    "vllm:num_preemptions",
)


@dataclass
class Histogram:
    """A cumulative histogram: ``buckets`` are ``(upper bound, cumulative count)``."""

    name: str
    buckets: list[tuple[float, float]] = field(default_factory=list)
    count: float = 0.0
    sum: float = 0.0

    def __sub__(self, other: Histogram) -> Histogram:
        before = dict(other.buckets)
        return Histogram(
            name=self.name,
            buckets=[(le, c - before.get(le, 0.0)) for le, c in self.buckets],
            count=self.count - other.count,
            sum=self.sum - other.sum,
        )

    @property
    def mean(self) -> float:
        """sum / count (NaN when empty)."""
        return self.sum / self.count if self.count > 0 else math.nan

    def quantile(self, q: float) -> float:
        """Prometheus ``histogram_quantile``: linear interpolation within the bucket."""
        return histogram_quantile(q, self.buckets)

    def bucket_of(self, q: float) -> tuple[float, float]:
        """(lower, upper) bounds of the bucket where quantile ``q`` falls."""
        if not self.buckets or self.count <= 0:
            return (math.nan, math.nan)
        rank = q * self.buckets[-1][1]
        lower = 0.0
        for le, c in self.buckets:
            if c >= rank:
                return (lower, le)
            lower = le
        return (lower, math.inf)


@dataclass
class MetricsSnapshot:
    """Histograms and counters from one scrape, summed over label sets that match."""

    histograms: dict[str, Histogram] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)

    def names(self) -> set[str]:
        """Every metric family name seen."""
        return set(self.histograms) | set(self.counters) | set(self.gauges)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Quantile ``q`` of cumulative ``buckets`` like Prometheus (NaN when empty; the highest
    finite bound when ``q`` falls in the ``+Inf`` bucket)."""
    if not buckets:
        return math.nan
    ordered = sorted(buckets)
    total = ordered[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    lower, prev = 0.0, 0.0
    for le, c in ordered:
        if c >= rank:
            if math.isinf(le):
                return lower
            if c == prev:
                return le
            return lower + (le - lower) * (rank - prev) / (c - prev)
        lower, prev = le, c
    return lower


def _labels_match(labels: Mapping[str, str], want: Mapping[str, str] | None) -> bool:
    return not want or all(labels.get(k) == v for k, v in want.items())


_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _samples_fallback(text: str) -> list[tuple[str, str, dict[str, str], float]]:
    """(family, sample name, labels, value) without prometheus_client (simple text only)."""
    types: dict[str, str] = {}
    out: list[tuple[str, str, dict[str, str], float]] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name, labels = m.group(1), dict(_LABEL.findall(m.group(3) or ""))
        family = name
        for suffix in ("_bucket", "_count", "_sum", "_total"):
            if name.endswith(suffix) and name.removesuffix(suffix) in types:
                family = name.removesuffix(suffix)
                break
        out.append((family, name, labels, float(m.group(4))))
    return out


def _samples(text: str) -> tuple[list[tuple[str, str, dict[str, str], float]], dict[str, str]]:
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        types = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                types[name.removesuffix("_total") if kind == "counter" else name] = kind
        return _samples_fallback(text), types
    samples: list[tuple[str, str, dict[str, str], float]] = []
    types = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples.append((fam.name, s.name, dict(s.labels), float(s.value)))
    return samples, types


def parse_metrics(text: str, *, labels: Mapping[str, str] | None = None) -> MetricsSnapshot:
    """Parse Prometheus text; ``labels`` (e.g. ``{"model_name": "tiny"}``) filters series.

    Series of the same family that pass the filter (one per engine, say) are summed.
    """
    samples, types = _samples(text)
    snap = MetricsSnapshot()
    bucket_acc: dict[str, dict[float, float]] = {}
    for family, name, lab, value in samples:
        kind = types.get(family, "")
        if not _labels_match({k: v for k, v in lab.items() if k != "le"}, labels):
            continue
        if kind == "histogram":
            h = snap.histograms.setdefault(family, Histogram(family))
            if name.endswith("_bucket"):
                le = float(lab["le"].replace("+Inf", "inf"))
                acc = bucket_acc.setdefault(family, {})
                acc[le] = acc.get(le, 0.0) + value
            elif name.endswith("_count"):
                h.count += value
            elif name.endswith("_sum"):
                h.sum += value
        elif kind == "counter":
            if name.endswith("_created"):
                continue
            snap.counters[family] = snap.counters.get(family, 0.0) + value
        elif kind == "gauge" and not family.endswith("_created"):
            snap.gauges[family] = snap.gauges.get(family, 0.0) + value
    for family, acc in bucket_acc.items():
        snap.histograms[family].buckets = sorted(acc.items())
    return snap


def scrape_metrics(
    base_url: str,
    *,
    labels: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> MetricsSnapshot:
    """GET ``{base_url}/metrics`` and parse it (``/metrics`` needs no API key in vLLM)."""
    import httpx

    resp = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout_s, headers=headers)
    resp.raise_for_status()
    return parse_metrics(resp.text, labels=labels)


@dataclass(frozen=True)
class ServerLatency:
    """Server-side summary of one quantity over a run, in ms (quantiles approximate)."""

    quantity: str
    source: str
    count: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p50_bucket_ms: tuple[float, float]
    p99_bucket_ms: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (NaN and inf as None)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, tuple):
                return [clean(x) for x in v]
            return v

        return {k: clean(v) for k, v in asdict(self).items()}


def find_histogram(snapshot: MetricsSnapshot, quantity: str) -> str | None:
    """The first name for ``quantity`` (a key of :data:`HISTOGRAM_NAMES`) the server has."""
    for name in HISTOGRAM_NAMES[quantity]:
        if name in snapshot.histograms:
            return name
    return None


def server_latencies(
    before: MetricsSnapshot,
    after: MetricsSnapshot,
    quantities: Sequence[str] = ("ttft", "itl", "tpot", "e2el", "queue"),
) -> dict[str, ServerLatency]:
    """Per-quantity server-side latency over the interval between two scrapes."""
    out: dict[str, ServerLatency] = {}
    for q in quantities:
        name = find_histogram(after, q)
        if name is None:
            continue
        h = after.histograms[name] - before.histograms.get(name, Histogram(name))
        if h.count <= 0:
            continue

        def ms(b: tuple[float, float]) -> tuple[float, float]:
            return (b[0] * 1000.0, b[1] * 1000.0)

        out[q] = ServerLatency(
            quantity=q,
            source=name,
            count=h.count,
            mean_ms=h.mean * 1000.0,
            p50_ms=h.quantile(0.5) * 1000.0,
            p90_ms=h.quantile(0.9) * 1000.0,
            p99_ms=h.quantile(0.99) * 1000.0,
            p50_bucket_ms=ms(h.bucket_of(0.5)),
            p99_bucket_ms=ms(h.bucket_of(0.99)),
        )
    return out


def counter_deltas(before: MetricsSnapshot, after: MetricsSnapshot) -> dict[str, float]:
    """Increase of the counters in :data:`COUNTER_NAMES` that the server has."""
    return {
        n: after.counters[n] - before.counters.get(n, 0.0)
        for n in COUNTER_NAMES
        if n in after.counters
    }
