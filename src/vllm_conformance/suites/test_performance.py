"""Performance: the entry's workload under load, against its thresholds and its baseline.

The workload runs once per deployment (a session fixture); the tests are verdicts over that
one measurement. Metrics are named and defined as ``vllm bench serve`` defines them, failed
requests are counted beside every latency, and vLLM's own ``/metrics`` histograms are read
before and after the run for a server-side cross-check.

Verdicts fail closed: a percentile gated on fewer requests than support it, a baseline of
another workload, or too few samples to compare fail with the reason; an entry without
thresholds or without a baseline skips, saying so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from vllm_conformance import plan, plugin
from vllm_conformance.fixtures.recorder import Recorder
from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.matrix import Deployment, PerformanceExpect, settings
from vllm_conformance.perf import baseline, loadgen, stats, workload
from vllm_conformance.perf.metrics import BenchMetrics, client_bottleneck, compute_metrics
from vllm_conformance.perf.report import write_report
from vllm_conformance.perf.server_metrics import ServerLatency, scrape_metrics, server_latencies
from vllm_conformance.progress import EntryProgress

pytestmark = pytest.mark.needs_expect("performance")


@dataclass
class PerfRun:
    expect: PerformanceExpect
    spec: workload.WorkloadSpec
    result: loadgen.RunResult
    metrics: BenchMetrics
    server: dict[str, ServerLatency]
    #: why the load generator may have set the numbers (None: it kept up)
    client_bottleneck: str | None

    def refuse_if_client_bound(self, recorder: Recorder, check: str) -> None:
        """Fail the verdict, with the reason, when the client was the bottleneck."""
        if self.client_bottleneck is None:
            return
        why = f"no verdict, the client may have set the numbers: {self.client_bottleneck}"
        health = self.result.health
        recorder.record(check, "fail", unmeasured=why, health=asdict(health) if health else None)
        pytest.fail(why, pytrace=False)


def _expect(deployment: Deployment) -> PerformanceExpect:
    assert deployment.expect.performance is not None
    return deployment.expect.performance


@pytest.fixture(scope="session")
def perf_run(
    server: Endpoint,
    deployment: Deployment,
    tokenizer: Any,
    progress: EntryProgress,
    request: pytest.FixtureRequest,
) -> PerfRun:
    """Run the entry's workload once; write its report and (if asked) its baseline."""
    expect = _expect(deployment)
    spec = workload.WorkloadSpec.from_matrix(
        expect.workload, name=deployment.id, source=expect.source
    )
    requests = workload.build_requests(spec, tokenizer)
    config = loadgen.LoadConfig.from_workload(
        spec, request_timeout_s=server.request_timeout, drain_timeout_s=server.request_timeout
    )
    before = scrape_metrics(server.base_url)
    with progress.phase(plan.LOAD_RUN, total=len(requests), unit="requests") as step:
        result = loadgen.run_load_sync(
            server.base_url, server.model, requests, config,
            progress=lambda p: step.update(p.done, f"{p.failed} failed"),
            headers=server.headers(),
        )  # fmt: skip
    after = scrape_metrics(server.base_url)
    gated = {workload.percentile_of(t.metric) for t in expect.thresholds}
    percentiles = sorted({90.0, 99.0} | {q for q in gated if q is not None and q != 50.0})
    metrics = compute_metrics(result, goodput=expect.slo or None, percentiles=percentiles)
    latencies = server_latencies(before, after)
    st = plugin.state(request.config)
    write_report(st.run_dir / deployment.id / "perf", result, name="perf",
                 goodput=expect.slo or None, server=[latencies],
                 context={"entry": deployment.id, "vllm": server.version})  # fmt: skip
    if save_dir := settings.resolve(request.config, "save-baseline"):
        baseline.save_baseline(
            Path(save_dir) / f"{deployment.id}.json",
            result,
            meta={"entry": deployment.id, "vllm": server.version, "workload": spec.to_dict()},
        )
    return PerfRun(expect, spec, result, metrics, latencies, client_bottleneck(result, metrics))


def test_no_failed_requests(perf_run: PerfRun, recorder: Recorder) -> None:
    """Every request of the workload completes; a refused request is a finding."""
    m = perf_run.metrics
    per_request = baseline.baseline_from_run(perf_run.result).samples
    health = perf_run.result.health
    recorder.record(
        "performance.metrics",
        "pass" if m.failed == 0 and m.not_sent == 0 else "fail",
        measured=m.to_json_dict(),
        client={
            "health": asdict(health) if health else None,
            "bottleneck": perf_run.client_bottleneck,
        },
        samples=per_request,
        server={k: v.to_dict() for k, v in perf_run.server.items()},
        source=perf_run.expect.source,
    )
    assert m.failed == 0, f"{m.failed} of {m.completed + m.failed} requests failed: {m.errors}"
    assert m.not_sent == 0
    assert m.completed == perf_run.expect.workload.num_prompts


def test_thresholds(perf_run: PerfRun, recorder: Recorder) -> None:
    """Each threshold of the entry holds; a failure names metric, value, bound and source.

    A percentile measured on fewer completed requests than support it (MLPerf's rule,
    :func:`~vllm_conformance.perf.workload.min_requests`) fails, whatever its value, and so
    does every threshold of a run with failed requests (its latencies leave them out).
    """
    if not perf_run.expect.thresholds:
        pytest.skip("the entry declares no performance thresholds")
    perf_run.refuse_if_client_bound(recorder, "performance.thresholds")
    values = perf_run.metrics.as_dict()
    completed = perf_run.metrics.completed
    lost = perf_run.metrics.failed + perf_run.metrics.not_sent
    broken = [f"could not measure: {lost} requests failed or were not sent"] if lost else []
    for t in perf_run.expect.thresholds:
        value = values.get(t.metric)
        q = workload.percentile_of(t.metric)
        need = workload.min_requests(q) if q is not None else 1
        ok = value is not None and not math.isnan(value) and completed >= need and not lost
        ok = ok and (t.min is None or value >= t.min) and (t.max is None or value <= t.max)
        bound = f">= {t.min}" if t.min is not None else f"<= {t.max}"
        recorder.record(f"performance.threshold.{t.metric}", "pass" if ok else "fail",
                        measured={t.metric: value, "completed": completed},
                        expected={"min": t.min, "max": t.max, "min_requests": need},
                        source=t.source)  # fmt: skip
        if completed < need:
            broken.append(f"{t.metric}: {completed} completed requests cannot support it "
                          f"(needs {need}; {t.source})")  # fmt: skip
        elif not ok:
            broken.append(f"{t.metric} = {value} (threshold {bound}; {t.source})")
    assert not broken, "performance thresholds not met:\n" + "\n".join(broken)


def test_server_side_cross_check(perf_run: PerfRun, recorder: Recorder) -> None:
    """vLLM's own TTFT histogram saw every request, and its mean is not above the client's.

    The server's TTFT excludes the HTTP and queueing overhead that the client sees, so a
    server mean above the client mean would mean one of the two measures something else.
    """
    ttft = perf_run.server.get("ttft")
    assert ttft is not None, "the server exports no TTFT histogram (--disable-log-stats?)"
    client = perf_run.metrics.ttft.mean
    completed, failed = perf_run.metrics.completed, perf_run.metrics.failed
    expected_count = completed + perf_run.result.config.num_warmups
    counted = completed <= ttft.count <= expected_count + failed
    below = ttft.mean_ms <= client * 1.05
    recorder.record("performance.server_ttft", "pass" if counted and below else "fail",
                    measured={"server_mean_ttft_ms": ttft.mean_ms, "client_mean_ttft_ms": client,
                              "server_count": ttft.count},
                    expected={"server_count": [completed, expected_count + failed],
                              "server_mean_at_most": client * 1.05})  # fmt: skip
    assert counted, f"the server counted {ttft.count} first tokens for {completed} requests"
    assert below, f"server mean TTFT {ttft.mean_ms:.1f} ms above the client's {client:.1f} ms"


def test_no_regression_against_baseline(perf_run: PerfRun, recorder: Recorder) -> None:
    """Per-request latencies are not significantly slower than the committed baseline of
    the same workload (:mod:`vllm_conformance.perf.stats`, the project's one rule)."""
    if perf_run.expect.baseline is None:
        pytest.skip("the entry declares no performance baseline")
    perf_run.refuse_if_client_bound(recorder, "performance.baseline")
    path = Path(perf_run.expect.baseline)
    assert path.exists(), f"baseline {path} named by the matrix does not exist"
    base = baseline.load_baseline(path)
    mismatch = baseline.workload_mismatch(base, perf_run.spec)
    comparisons = [] if mismatch else stats.compare_to_baseline(
        base, perf_run.result, metrics=perf_run.expect.compare_metrics,
        min_effect=perf_run.expect.min_effect,
    )  # fmt: skip
    worse = stats.regressions(comparisons)
    unmeasured = [c for c in comparisons if c.verdict == "insufficient data"]
    recorder.record(
        "performance.baseline",
        "fail" if worse or unmeasured or mismatch else "pass",
        comparisons=[c.to_dict() for c in comparisons],
        baseline=str(path),
        unmeasured=mismatch or [c.describe() for c in unmeasured] or None,
    )
    assert mismatch is None, f"baseline {path}: {mismatch}"
    assert not unmeasured, "could not compare:\n" + "\n".join(c.describe() for c in unmeasured)
    assert not worse, "significant regressions:\n" + "\n".join(c.describe() for c in worse)
