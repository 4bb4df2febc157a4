"""Performance: the entry's workload under load, against its thresholds and its baseline.

The workload runs once per deployment (a session fixture); the tests are verdicts over that
one measurement. Metrics are named and defined as ``vllm bench serve`` defines them, failed
requests are counted beside every latency, and vLLM's own ``/metrics`` histograms are read
before and after the run for a server-side cross-check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vllm_conformance import plugin
from vllm_conformance.fixtures.recorder import Recorder
from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.matrix import Deployment, PerformanceExpect, settings
from vllm_conformance.perf import loadgen, stats, workload
from vllm_conformance.perf.metrics import BenchMetrics, compute_metrics
from vllm_conformance.perf.report import write_report
from vllm_conformance.perf.server_metrics import ServerLatency, scrape_metrics, server_latencies

pytestmark = pytest.mark.needs_expect("performance")


@dataclass
class PerfRun:
    expect: PerformanceExpect
    result: loadgen.RunResult
    metrics: BenchMetrics
    server: dict[str, ServerLatency]


def _expect(deployment: Deployment) -> PerformanceExpect:
    assert deployment.expect.performance is not None
    return deployment.expect.performance


@pytest.fixture(scope="session")
def perf_run(
    server: Endpoint, deployment: Deployment, tokenizer: Any, request: pytest.FixtureRequest
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
    result = loadgen.run_load_sync(
        server.base_url, server.model, requests, config,
        progress=loadgen.stderr_progress(), headers=server.headers(),
    )  # fmt: skip
    after = scrape_metrics(server.base_url)
    metrics = compute_metrics(result, goodput=expect.slo or None)
    latencies = server_latencies(before, after)
    st = plugin.state(request.config)
    write_report(st.run_dir / deployment.id / "perf", result, name="perf",
                 goodput=expect.slo or None, server=[latencies],
                 context={"entry": deployment.id, "vllm": server.version})  # fmt: skip
    if save_dir := settings.resolve(request.config, "save-baseline"):
        stats.save_baseline(
            Path(save_dir) / f"{deployment.id}.json",
            result,
            meta={"entry": deployment.id, "vllm": server.version},
        )
    return PerfRun(expect, result, metrics, latencies)


def test_no_failed_requests(perf_run: PerfRun, recorder: Recorder) -> None:
    """Every request of the workload completes; a refused request is a finding."""
    m = perf_run.metrics
    per_request = stats.baseline_from_run(perf_run.result).samples
    recorder.record(
        "performance.metrics",
        "pass" if m.failed == 0 and m.not_sent == 0 else "fail",
        measured=m.to_json_dict(),
        samples=per_request,
        server={k: v.to_dict() for k, v in perf_run.server.items()},
        source=perf_run.expect.source,
    )
    assert m.failed == 0, f"{m.failed} of {m.completed + m.failed} requests failed: {m.errors}"
    assert m.not_sent == 0
    assert m.completed == perf_run.expect.workload.num_prompts


def test_thresholds(perf_run: PerfRun, recorder: Recorder) -> None:
    """Each threshold of the entry holds; a failure names metric, value, bound and source."""
    values = perf_run.metrics.as_dict()
    broken = []
    for t in perf_run.expect.thresholds:
        value = values.get(t.metric)
        ok = value is not None and not math.isnan(value)
        ok = ok and (t.min is None or value >= t.min) and (t.max is None or value <= t.max)
        bound = f">= {t.min}" if t.min is not None else f"<= {t.max}"
        recorder.record(f"performance.threshold.{t.metric}", "pass" if ok else "fail",
                        measured={t.metric: value}, expected={"min": t.min, "max": t.max},
                        source=t.source)  # fmt: skip
        if not ok:
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
    recorder.record("performance.server_ttft", "observed",
                    measured={"server_mean_ttft_ms": ttft.mean_ms, "client_mean_ttft_ms": client,
                              "server_count": ttft.count})  # fmt: skip
    expected_count = perf_run.metrics.completed + perf_run.result.config.num_warmups
    assert ttft.count >= perf_run.metrics.completed
    assert ttft.count <= expected_count + perf_run.metrics.failed
    assert ttft.mean_ms <= client * 1.05


def test_no_regression_against_baseline(
    perf_run: PerfRun, request: pytest.FixtureRequest, recorder: Recorder
) -> None:
    """Per-request latencies are not significantly slower than the committed baseline."""
    if perf_run.expect.baseline is None:
        pytest.skip("the entry declares no performance baseline")
    path = Path(perf_run.expect.baseline)
    assert path.exists(), f"baseline {path} named by the matrix does not exist"
    comparisons = stats.compare_to_baseline(
        stats.load_baseline(path),
        perf_run.result,
        metrics=perf_run.expect.compare_metrics,
        min_effect=perf_run.expect.min_effect,
    )
    worse = stats.regressions(comparisons)
    recorder.record(
        "performance.baseline",
        "fail" if worse else "pass",
        comparisons=[c.to_dict() for c in comparisons],
        baseline=str(path),
    )
    assert not worse, "significant regressions:\n" + "\n".join(c.describe() for c in worse)
