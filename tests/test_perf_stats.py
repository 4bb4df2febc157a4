"""Statistics, metrics and workloads of ``vllm_conformance.perf``, then real regressions.

The first part is pure functions on synthetic samples (seeded, so verdicts are stable),
plus a cross-check of our aggregation against vLLM's own ``calculate_metrics``. The last
part runs the real vLLM CPU server (the tiny Llama 4): a run at concurrency 8 against a
server that batches at most 2 sequences must be called a regression of a run at
concurrency 1, and two runs of the same config must not be. One test replays vLLM's
in-stream error shape from a synthetic SSE server, since a real server cannot be made to
fail mid-stream on demand.

Set ``VLLM_CONFORMANCE_PERF_URL`` (and ``..._MODEL``, ``..._TOKENIZER``) to use a server
that is already running instead of starting one; its ``--max-num-seqs`` should be small.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vllm_conformance.perf.baseline import (
    Baseline,
    baseline_from_run,
    load_baseline,
    save_baseline,
    workload_mismatch,
)
from vllm_conformance.perf.loadgen import (
    LOOP_HELD_LIMIT,
    GeneratorHealth,
    LoadConfig,
    RequestResult,
    RunResult,
    arrival_offsets,
    run_load_sync,
    server_token_counts,
)
from vllm_conformance.perf.metrics import client_bottleneck, compute_metrics, samples_ms
from vllm_conformance.perf.server_metrics import (
    find_histogram,
    histogram_quantile,
    parse_metrics,
    server_latencies,
)
from vllm_conformance.perf.stats import (
    bootstrap_ratio_ci,
    compare_failure_rate,
    compare_samples,
    compare_to_baseline,
    regressions,
)
from vllm_conformance.perf.workload import (
    SEED_WORKLOAD,
    PromptFormat,
    WorkloadSpec,
    build_requests,
    load_tokenizer,
    min_requests,
    percentile_of,
    random_requests,
)

# --- synthetic samples ------------------------------------------------------------------


def lognormal(seed: int, n: int = 200, median_ms: float = 50.0, sigma: float = 0.3) -> list[float]:
    """Latency-like samples: right-skewed, positive."""
    rng = np.random.default_rng(seed)
    return (median_ms * np.exp(rng.normal(0.0, sigma, n))).tolist()


def test_same_distribution_is_rarely_a_regression() -> None:
    # Two samples of one distribution: at alpha 0.01 about 1 pair in 100 is significant, and
    # the 5 % minimum effect removes some of those; allow 3 in 100 before calling it broken.
    verdicts = [
        compare_samples(lognormal(1000 + 2 * i), lognormal(1001 + 2 * i), n_boot=500)
        for i in range(100)
    ]
    assert sum(c.regression for c in verdicts) <= 3
    assert all(abs(c.effect_size) < 0.15 for c in verdicts)


@pytest.mark.parametrize("seed", range(5))
def test_same_distribution_is_not_a_regression(seed: int) -> None:
    c = compare_samples(lognormal(seed), lognormal(seed + 50), metric="ttft_ms")
    assert c.verdict == "no change"
    assert not c.regression


@pytest.mark.parametrize("seed", range(5))
def test_shift_of_30_percent_is_a_regression(seed: int) -> None:
    base = lognormal(seed)
    cur = [x * 1.3 for x in lognormal(seed + 100)]
    c = compare_samples(base, cur, metric="ttft_ms")
    assert c.regression
    assert c.significant
    assert c.ci_low > 1.0
    assert c.p_value < 1e-6
    assert 0.2 < c.effect_size < 0.4
    # A 30 % shift of a lognormal with sigma 0.3: P(cur > base) ~ 0.73, so r ~ 0.46.
    assert 0.3 < c.rank_biserial < 0.65


def test_faster_is_an_improvement_not_a_regression() -> None:
    c = compare_samples(lognormal(1), [x * 0.7 for x in lognormal(2)])
    assert c.verdict == "improvement"
    assert not c.regression
    assert c.ci_high < 1.0


def test_tiny_but_significant_change_is_not_a_regression() -> None:
    # 2 % slower with 20,000 samples a side: significant, but below the 5 % minimum effect.
    base = lognormal(3, n=20000, sigma=0.1)
    cur = [x * 1.02 for x in lognormal(4, n=20000, sigma=0.1)]
    c = compare_samples(base, cur, min_effect=0.05, n_boot=300)
    assert c.significant
    assert c.verdict == "no change"
    strict = compare_samples(base, cur, min_effect=0.01, n_boot=300)
    assert strict.regression


def test_higher_is_better_flips_the_direction() -> None:
    base = lognormal(5, median_ms=1000)
    lower = [x * 0.7 for x in lognormal(6, median_ms=1000)]
    assert compare_samples(base, lower, higher_is_better=True).regression
    assert compare_samples(base, lower).verdict == "improvement"


def test_mean_statistic_and_insufficient_data() -> None:
    c = compare_samples(lognormal(7), [x * 1.3 for x in lognormal(8)], statistic="mean")
    assert c.regression and c.statistic == "mean"
    few = compare_samples([1.0, 2.0], [3.0, 4.0, 5.0])
    assert few.verdict == "insufficient data"
    assert not few.regression
    assert math.isnan(few.ratio)


def test_identical_constant_samples() -> None:
    c = compare_samples([5.0] * 20, [5.0] * 20)
    assert c.verdict == "no change"
    assert c.p_value == 1.0
    assert c.ratio == 1.0


def test_bootstrap_is_seeded() -> None:
    a, b = lognormal(9), lognormal(10)
    assert bootstrap_ratio_ci(a, b, seed=3) == bootstrap_ratio_ci(a, b, seed=3)
    assert bootstrap_ratio_ci(a, b, seed=3) != bootstrap_ratio_ci(a, b, seed=4)
    lo, hi = bootstrap_ratio_ci(a, b)
    assert lo < float(np.median(b) / np.median(a)) < hi
    lo30, hi30 = bootstrap_ratio_ci(a, [x * 1.3 for x in a])
    assert lo30 < 1.3 < hi30


def test_failure_rate() -> None:
    assert compare_failure_rate(0, 100, 10, 100).regression
    assert not compare_failure_rate(0, 100, 1, 100).regression  # one failure is not evidence
    assert not compare_failure_rate(10, 100, 0, 100).regression
    assert compare_failure_rate(0, 0, 1, 1).verdict == "insufficient data"


# --- runs built by hand -----------------------------------------------------------------


def fake_run(
    seed: int, n: int = 60, scale: float = 1.0, failed: int = 0, out_tokens: int = 16
) -> RunResult:
    """A run whose requests have lognormal TTFT and ITL (seconds)."""
    rng = np.random.default_rng(seed)
    results = []
    for i in range(n):
        ttft = 0.05 * scale * math.exp(rng.normal(0, 0.2))
        itl = (0.01 * scale * np.exp(rng.normal(0, 0.2, out_tokens - 1))).tolist()
        results.append(
            RequestResult(
                index=i, success=True, prompt_len=128, expected_output_len=out_tokens,
                output_tokens=out_tokens, ttft=ttft, itl=itl, latency=ttft + sum(itl),
                start_time=i * 0.1, status=200,
            )
        )  # fmt: skip
    for j in range(failed):
        results.append(RequestResult(index=n + j, status=500, error="HTTP 500: boom\nmore"))
    return RunResult(LoadConfig(max_concurrency=4), "http://x", "m", results, duration_s=10.0)


def test_metrics_names_and_values() -> None:
    run = fake_run(0, failed=3)
    m = compute_metrics(run, goodput={"ttft": 1e9, "tpot": 1e9, "e2el": 1e9})
    d = m.as_dict()
    assert d["completed"] == 60 and d["failed"] == 3
    assert d["failure_rate"] == pytest.approx(3 / 63)
    assert d["request_throughput"] == pytest.approx(6.0)
    assert d["output_throughput"] == pytest.approx(60 * 16 / 10.0)
    assert d["total_token_throughput"] == pytest.approx(60 * (128 + 16) / 10.0)
    # Failed requests never meet an SLO: goodput counts only the 60 successes.
    assert d["request_goodput"] == pytest.approx(6.0)
    assert m.errors == {"HTTP 500: boom": 3}
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p90", "p99"):
            assert math.isfinite(d[f"{stat}_{name}_ms"])
    ttfts = [r.ttft * 1000 for r in run.results if r.success]
    assert d["median_ttft_ms"] == pytest.approx(float(np.median(ttfts)))
    assert d["p99_ttft_ms"] == pytest.approx(float(np.percentile(ttfts, 99)))
    tight = compute_metrics(run, goodput={"ttft": d["median_ttft_ms"]})
    assert tight.request_goodput == pytest.approx(3.0, abs=0.11)


def test_all_failed_gives_nan_not_zero() -> None:
    run = fake_run(1, n=0, failed=5)
    m = compute_metrics(run, goodput={"ttft": 100})
    assert m.completed == 0 and m.failed == 5
    assert math.isnan(m.ttft.median) and math.isnan(m.tpot.p99)
    assert m.request_goodput == 0.0
    assert m.to_json_dict()["median_ttft_ms"] is None


def test_metrics_match_vllm_calculate_metrics() -> None:
    """Our aggregation against vLLM's own, on the same per-request outputs."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    run = fake_run(2, failed=2)
    outs = [
        RequestFuncOutput(
            success=r.success, latency=r.latency, output_tokens=r.output_tokens, ttft=r.ttft,
            itl=list(r.itl), prompt_len=r.prompt_len, error=r.error, start_time=r.start_time,
        )
        for r in run.results
    ]  # fmt: skip
    slos = {"ttft": 55.0, "tpot": 10.5, "e2el": 220.0}
    theirs, _ = calculate_metrics(
        input_requests=[], outputs=outs, dur_s=run.duration_s, tokenizer=None,
        selected_percentiles=[90.0, 99.0], goodput_config_dict=slos,
    )  # fmt: skip
    ours = compute_metrics(run, goodput=slos)
    for key in ("completed", "failed", "request_throughput", "output_throughput",
                "total_token_throughput", "request_goodput"):  # fmt: skip
        assert ours[key] == pytest.approx(getattr(theirs, key)), key
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std"):
            key = f"{stat}_{name}_ms"
            assert ours[key] == pytest.approx(getattr(theirs, key)), key
        for p, value in getattr(theirs, f"percentiles_{name}_ms"):
            assert ours[f"p{int(p)}_{name}_ms"] == pytest.approx(value)


def test_baseline_round_trip_and_comparison(tmp_path: Path) -> None:
    base_run = fake_run(3)
    path = save_baseline(tmp_path / "b" / "baseline.json", base_run, meta={"vllm": "0.32.0"})
    base = load_baseline(path)
    assert base.meta["vllm"] == "0.32.0"
    assert base.samples["ttft"] == pytest.approx(samples_ms(base_run)["ttft"])
    assert base.completed == 60

    same = compare_to_baseline(base, fake_run(4))
    assert regressions(same) == []
    slower = compare_to_baseline(base, fake_run(5, scale=1.3, failed=10))
    flagged = {c.metric for c in regressions(slower)}
    assert flagged == {"ttft_ms", "tpot_ms", "e2el_ms", "failure_rate"}
    assert all(c.to_dict()["significant"] for c in slower)
    assert "points" in slower[-1].describe()
    assert "regression" in slower[0].describe()
    assert Baseline.from_dict(base.to_dict()) == base


def test_a_baseline_of_another_workload_is_refused(tmp_path: Path) -> None:
    spec = WorkloadSpec(name="w", input_len=128, output_len=16, num_prompts=60, max_concurrency=4)
    run = fake_run(3)
    saved = load_baseline(
        save_baseline(tmp_path / "b.json", run, meta={"workload": spec.to_dict()})
    )
    assert workload_mismatch(saved, spec) is None
    assert workload_mismatch(saved, spec.replace(num_prompts=600)) is None  # more of the same
    longer = workload_mismatch(saved, spec.replace(output_len=1024))
    assert longer is not None and "output_len 16 vs 1024" in longer
    # a baseline that records no workload cannot be shown to be like-for-like
    assert "records no workload" in str(workload_mismatch(Baseline(samples={}), spec))


def test_old_baselines_are_read_from_their_aggregate() -> None:
    """The committed H200 baseline predates meta.workload: its tokens per request and load
    config say which workload it was (the entry's)."""
    from vllm_conformance.matrix import load
    from vllm_conformance.perf import baseline

    entry = load([]).known["h200-tiny-bf16"]
    assert entry.expect.performance is not None and entry.expect.performance.baseline
    saved = load_baseline(entry.expect.performance.baseline)
    assert "workload" not in saved.meta
    spec = WorkloadSpec.from_matrix(entry.expect.performance.workload, name=entry.id)
    assert baseline.workload_mismatch(saved, spec) is None
    assert "input_len 1024 vs 2048" in str(
        baseline.workload_mismatch(saved, spec.replace(input_len=2048))
    )


def test_percentile_gates_need_mlperf_sample_sizes() -> None:
    # MLPerf LoadGen: "Processed at least 64 queries" (p90), "at least 662 queries" (p99)
    assert (min_requests(90), min_requests(99), min_requests(50)) == (64, 662, 11)
    assert percentile_of("p99_e2el_ms") == 99 and percentile_of("median_ttft_ms") == 50
    assert percentile_of("mean_ttft_ms") is None and percentile_of("output_throughput") is None


# --- load model and server metrics ------------------------------------------------------


def test_arrival_offsets() -> None:
    offs = arrival_offsets(1000, 50.0, burstiness=1.0, seed=0)
    assert offs[-1] == pytest.approx(1000 / 50.0)  # rescaled like vLLM
    gaps = np.diff(offs)
    assert np.all(gaps >= 0)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.1)  # Poisson: CV 1
    smooth = np.diff(arrival_offsets(1000, 50.0, burstiness=4.0, seed=0))
    assert np.std(smooth) / np.mean(smooth) == pytest.approx(0.5, abs=0.07)  # CV 1/sqrt(k)
    assert np.array_equal(arrival_offsets(10, 5.0, seed=1), arrival_offsets(10, 5.0, seed=1))
    assert not np.any(arrival_offsets(5, math.inf))


def metrics_text(
    ttft: tuple[float, float, float], ttft_sum: float, itl: float, itl_sum: float
) -> str:
    """vLLM-style exposition: a TTFT histogram (counts at 10 ms, 100 ms, +Inf) and the old
    ``time_per_output_token`` name for inter-token latency."""
    lab = 'engine="0",model_name="m"'
    t10, t100, tinf = ttft
    return f"""\
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.01",model_name="m"}} {t10}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.1",model_name="m"}} {t100}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {tinf}
vllm:time_to_first_token_seconds_count{{{lab}}} {tinf}
vllm:time_to_first_token_seconds_sum{{{lab}}} {ttft_sum}
# HELP vllm:time_per_output_token_seconds Histogram of time per output token in seconds.
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{{engine="0",le="0.01",model_name="m"}} {itl}
vllm:time_per_output_token_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {itl}
vllm:time_per_output_token_seconds_count{{{lab}}} {itl}
vllm:time_per_output_token_seconds_sum{{{lab}}} {itl_sum}
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{{lab}}} 10.0
"""


def test_server_histogram_delta_and_old_names() -> None:
    before_text = metrics_text((1, 2, 2), 0.06, 0, 0.0)
    before = parse_metrics(before_text)
    after = parse_metrics(metrics_text((3, 12, 12), 0.56, 4, 0.02))
    assert find_histogram(after, "itl") == "vllm:time_per_output_token_seconds"  # old name
    lat = server_latencies(before, after)
    assert lat["ttft"].count == 10
    assert lat["ttft"].mean_ms == pytest.approx(50.0)
    # 2 of 10 new samples below 10 ms, 8 in (10, 100] ms: the median interpolates to 43.75.
    assert lat["ttft"].p50_ms == pytest.approx(10 + 90 * (5 - 2) / 8)
    assert lat["ttft"].p50_bucket_ms == pytest.approx((10.0, 100.0))
    assert lat["itl"].mean_ms == pytest.approx(5.0)
    assert parse_metrics(before_text, labels={"model_name": "other"}).histograms == {}
    assert parse_metrics(before_text).counters["vllm:generation_tokens"] == 10.0


def test_histogram_quantile_edges() -> None:
    assert math.isnan(histogram_quantile(0.5, []))
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) != histogram_quantile(
        0.5, [(1.0, 4.0), (math.inf, 4.0)]
    )
    assert histogram_quantile(0.99, [(1.0, 1.0), (math.inf, 10.0)]) == 1.0  # +Inf bucket


def test_error_chunk_in_a_200_stream_is_a_failure() -> None:
    """vLLM reports a failure after the stream began as an error message inside HTTP 200;
    a synthetic SSE server replays that shape (and a clean stream, and a 400)."""
    import asyncio
    import socket

    from aiohttp import web

    ok = b'data: {"choices":[{"index":0,"text":" a"}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    err = b'data: {"error":{"message":"boom","type":"InternalServerError","code":500}}\n\n'

    async def handler(request: web.Request) -> web.StreamResponse:
        kind = (await request.json())["prompt"]
        if kind == "bad":
            return web.json_response(
                {"error": {"message": "nope", "type": "BadRequestError", "code": 400}}, status=400
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(ok)
        await resp.write(err if kind == "err" else ok + usage)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def scenario() -> list[RequestResult]:
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        try:
            from vllm_conformance.perf.loadgen import run_load
            from vllm_conformance.perf.workload import RequestSpec

            reqs = [RequestSpec(i, p, 3, 2) for i, p in enumerate(["ok", "err", "bad"])]
            run = await run_load(f"http://127.0.0.1:{port}", "m", reqs, LoadConfig(num_warmups=0))
            return run.results
        finally:
            await runner.cleanup()

    good, streamed_error, rejected = asyncio.run(scenario())
    assert good.success and good.output_tokens == 2 and good.prompt_len == 3
    assert len(good.itl) == 1 and good.tpot is not None
    assert not streamed_error.success and streamed_error.status == 200
    assert "InternalServerError: boom" in streamed_error.error
    assert not rejected.success and rejected.status == 400
    assert rejected.error == "HTTP 400: BadRequestError: nope"
    m = compute_metrics([good, streamed_error, rejected], 1.0, goodput={"e2el": 1e6})
    assert (m.completed, m.failed, m.request_goodput) == (1, 2, 1.0)


# --- workloads ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from vllm_conformance import models

    return models.materialize("tiny-llama4")


def test_seed_workload_names_the_recipe() -> None:
    w = SEED_WORKLOAD
    assert (w.dataset, w.input_len, w.output_len) == ("random", 1024, 1024)
    assert (w.max_concurrency, w.num_prompts, w.ignore_eos) == (512, 2560, True)
    args = w.vllm_bench_args()
    assert args[args.index("--max-concurrency") + 1] == "512"
    assert "--ignore-eos" in args
    assert WorkloadSpec.from_dict(w.to_dict()) == w
    small = w.replace(input_len=64, output_len=8, num_prompts=10, max_concurrency=2)
    assert small.name == w.name and small.input_len == 64


def test_workload_from_matrix_entry() -> None:
    from vllm_conformance.matrix import Workload

    m = Workload(
        input_len=1024, output_len=1024, num_prompts=2560, max_concurrency=512,
        request_rate=None, burstiness=1.0, warmup=2,
    )  # fmt: skip
    spec = WorkloadSpec.from_matrix(m, name="scout")
    assert spec.replace(name=SEED_WORKLOAD.name, source=SEED_WORKLOAD.source,
                        num_warmups=SEED_WORKLOAD.num_warmups) == SEED_WORKLOAD  # fmt: skip
    assert spec.num_warmups == m.warmup
    assert math.isinf(spec.request_rate)
    cfg = LoadConfig.from_workload(spec)
    assert cfg.max_concurrency == 512 and cfg.ignore_eos and cfg.temperature == 0.0


@pytest.mark.parametrize("fmt", ["token_ids", "text"])
def test_prompts_have_exact_lengths_and_are_seeded(tiny_model_dir: Path, fmt: PromptFormat) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    reqs = random_requests(
        tok, num_prompts=20, input_len=100, output_len=7, seed=5, prompt_format=fmt
    )
    for r in reqs:
        assert r.prompt_len == 100
        assert r.output_len == 7
        if isinstance(r.prompt, str):
            assert len(tok.encode(r.prompt, add_special_tokens=True)) == 100
        else:
            assert len(r.prompt) == 100
    again = random_requests(
        tok, num_prompts=20, input_len=100, output_len=7, seed=5, prompt_format=fmt
    )
    assert again == reqs
    other = random_requests(
        tok, num_prompts=20, input_len=100, output_len=7, seed=6, prompt_format=fmt
    )
    assert other != reqs
    assert len({str(r.prompt) for r in reqs}) == 20


def test_range_ratio(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    spec = WorkloadSpec("r", input_len=101, output_len=40, num_prompts=200, range_ratio=0.5)
    reqs = build_requests(spec, tok)
    ins = [r.prompt_len for r in reqs]
    outs = [r.output_len for r in reqs]
    # vLLM samples the body (input_len - 1 BOS) on [floor(100*0.5), ceil(100*1.5)], adds BOS.
    assert 51 <= min(ins) < 70 and 130 < max(ins) <= 151
    assert 20 <= min(outs) < 26 and 54 < max(outs) <= 60


# --- the real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def perf_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[str, str, str]]:
    """(base_url, served model, tokenizer path) of a server that batches at most 2 sequences."""
    url = os.environ.get("VLLM_CONFORMANCE_PERF_URL")
    if url:
        yield (
            url,
            os.environ.get("VLLM_CONFORMANCE_PERF_MODEL", "tiny-llama4"),
            os.environ.get("VLLM_CONFORMANCE_PERF_TOKENIZER", str(tiny_model_dir)),
        )
        return
    from vllm_conformance.launch import procs
    from vllm_conformance.launch.local import LaunchSpec, VllmServer

    spec = LaunchSpec(
        model=str(tiny_model_dir),
        served_model_name="tiny-llama4",
        args=["--max-model-len", "2048", "--max-num-seqs", "2"],
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        startup_timeout=600.0,
    )
    srv = VllmServer(spec, tmp_path_factory.mktemp("perf") / "server.log")
    srv.start()
    try:
        yield (srv.endpoint.base_url.removesuffix("/v1"), "tiny-llama4", str(tiny_model_dir))
    finally:
        srv.stop()
        assert procs.tagged_pids(srv.tag) == []


def _run(
    server: tuple[str, str, str], concurrency: int, seed: int, num_prompts: int = 40
) -> RunResult:
    url, model, tokenizer = server
    tok = load_tokenizer(tokenizer)
    reqs = random_requests(tok, num_prompts=num_prompts, input_len=128, output_len=16, seed=seed)
    run = run_load_sync(url, model, reqs, LoadConfig(max_concurrency=concurrency, num_warmups=2))
    assert not run.failures, compute_metrics(run).errors
    return run


#: The noise floor between two identical runs on a shared 2-core machine is large; a real
#: regression here (queueing behind --max-num-seqs 2) is several times larger than this.
NOISY_MIN_EFFECT = 0.25
#: On this CPU server the split of E2EL into TTFT and TPOT is bimodal at concurrency 1: the
#: API server shares a core with the engine, and a run either streams (TTFT ~9 ms, TPOT
#: ~1.7 ms) or gets every token in one burst at the end (TTFT ~ E2EL, TPOT ~0), and which
#: one happens changes from run to run. E2EL does not depend on it, so the repeat check
#: compares E2EL (and failures); the regression check also asserts on TTFT.
STABLE_METRICS = ("e2el",)


@pytest.mark.timeout(900)
def test_real_regression_is_flagged_and_repeat_is_not(perf_server: tuple[str, str, str]) -> None:
    url, model, tokenizer = perf_server
    tok = load_tokenizer(tokenizer)
    sample = random_requests(tok, num_prompts=3, input_len=128, output_len=16, prompt_format="text")
    assert server_token_counts(url, model, [r.prompt for r in sample]) == [128, 128, 128]

    # Baseline and repeat alternate in halves, so a machine that slows down during the test
    # (measured on a CI VM: every latency +30-50 % from one run to the next) slows both.
    halves = [baseline_from_run(_run(perf_server, 1, 10 + i, num_prompts=20)) for i in range(4)]
    base, second = (
        Baseline(
            samples={m: a.samples[m] + b.samples[m] for m in a.samples},
            completed=a.completed + b.completed,
            failed=a.failed + b.failed,
        )
        for a, b in ((halves[0], halves[2]), (halves[1], halves[3]))
    )
    loaded = _run(perf_server, concurrency=8, seed=1)

    repeat = compare_to_baseline(base, second, metrics=STABLE_METRICS, min_effect=NOISY_MIN_EFFECT)
    worse = compare_to_baseline(base, loaded, min_effect=NOISY_MIN_EFFECT)
    for label, comparisons in (
        ("repeat c1", compare_to_baseline(base, second, min_effect=NOISY_MIN_EFFECT)),
        ("c8 vs c1", worse),
    ):
        for c in comparisons:
            print(f"{label}: {c.describe()}")
    assert regressions(repeat) == [], [c.describe() for c in repeat]
    flagged = {c.metric for c in regressions(worse)}
    assert {"ttft_ms", "e2el_ms"} <= flagged, [c.describe() for c in worse]
    e2el = next(c for c in worse if c.metric == "e2el_ms")
    assert e2el.ci_low > 1 + NOISY_MIN_EFFECT and e2el.p_value < 1e-6


def _health(**changes: float) -> GeneratorHealth:
    kept_up = {
        "loop_lag_p50_s": 0.0006, "loop_lag_p99_s": 0.002, "loop_lag_max_s": 0.4,
        "loop_held_share": 0.06, "dispatch_lag_p50_s": 0.00001, "dispatch_lag_p99_s": 0.017,
        "client_cpu": 0.05,
    }  # fmt: skip
    return GeneratorHealth(**(kept_up | changes))


def test_the_client_bound_rule_judges_medians_and_held_time() -> None:
    """Tails are the OS's (a 2-core CI VM beside the CPU server: p99 dispatch lag 16.9 ms,
    a 0.4 s pause); a client late on most requests, or held most of the run, is refused."""
    itl, ttft = 0.004, 0.02
    assert _health().bottleneck(itl, ttft) is None
    assert "median dispatch lag was 7.1 ms" in str(
        _health(dispatch_lag_p50_s=0.0071).bottleneck(itl, ttft)
    )
    assert "median event-loop lag" in str(_health(loop_lag_p50_s=0.0025).bottleneck(itl, ttft))
    assert "held 90% of the run" in str(_health(loop_held_share=0.9).bottleneck(itl, ttft))
    assert "95% of its one core" in str(_health(client_cpu=0.95).bottleneck(itl, ttft))


def _busy(_: object) -> None:
    """A progress callback that holds the client's event loop for 3 s per request: longer
    than the server takes for one (at 200 ms a slow CI VM's server kept the client idle
    enough for a median loop lag of 1 ms)."""
    end = time.perf_counter() + 3.0
    while time.perf_counter() < end:
        pass


def test_a_busy_client_is_named_the_bottleneck(perf_server: tuple[str, str, str]) -> None:
    """The same workload against the same server: with the client's loop held by a busy
    callback the run is refused as client-bound, and its loop lagged and worked far more
    than the same client's without it. (Whether the plain run is refused depends on what
    else runs on the machine: with the CPU server's threads on both cores of a loaded 2-core
    VM the client is starved and its timestamps are late; idle, its median lag is ~0.5 ms.)"""
    url, model, tokenizer = perf_server
    reqs = random_requests(
        load_tokenizer(tokenizer), num_prompts=6, input_len=128, output_len=16, seed=3
    )
    runs = {}
    for label, progress in (("plain", None), ("busy", _busy)):
        run = run_load_sync(url, model, reqs, LoadConfig(max_concurrency=2), progress=progress)
        assert not run.failures and run.health is not None
        runs[label] = run
    busy, plain = runs["busy"].health, runs["plain"].health
    assert busy is not None and plain is not None
    why = client_bottleneck(runs["busy"], compute_metrics(runs["busy"]))
    assert why is not None and "load generator" in why, busy
    # The probes sample the loop while it is free, so a held loop shows in the tail, the
    # held share and the CPU share (which the rule reads), not in the probes' median.
    assert busy.loop_lag_max_s > 0.5 > plain.loop_lag_max_s, runs
    assert busy.loop_held_share > max(LOOP_HELD_LIMIT, plain.loop_held_share), runs
    assert busy.client_cpu > 2 * plain.client_cpu, runs


def test_a_wait_for_a_slot_is_queueing_not_dispatch_lag(perf_server: tuple[str, str, str]) -> None:
    """One slot, many requests due at once: each waits for the one before it to end, and
    that wait is its queue time, measured from its due time. (Measured from its task's first
    step, it left out the loop's creating of all the tasks, which then showed as ~7 ms of
    dispatch lag on every one of 160 requests.)"""
    url, model, tokenizer = perf_server
    reqs = random_requests(
        load_tokenizer(tokenizer), num_prompts=100, input_len=16, output_len=2, seed=4
    )
    run = run_load_sync(url, model, reqs, LoadConfig(max_concurrency=1))
    assert not run.failures
    first, *queued = sorted(run.results, key=lambda r: r.start_time)
    for before, r in zip([first, *queued], queued, strict=False):
        slot_free = r.scheduled_time + r.queue_time
        assert slot_free >= before.start_time + before.latency, (before, r)
        assert r.start_time >= slot_free
    assert first.queue_time == 0.0
