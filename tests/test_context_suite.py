"""The context suite against the real vLLM CPU server: boundaries, policy, budget, hangs.

One pytest run of ``vllm_conformance.suites.test_context`` in a subprocess, on a two-entry
matrix (two server starts):

- ``ctx-16k``: the ``cpu`` entry (tiny Llama 4, hybrid chunked-local plus global KV, its
  versioned overflow policy and known issues) at 16,384 tokens: longer than one chunk of
  the local layers, so the hybrid KV manager is in play. A conftest hook stops the engine
  core (SIGSTOP) for the whole of one long-prompt test and resumes it afterwards: that test
  must fail at the deadline derived from the entry, naming the stall, and the rest of the
  suite must run on.
- ``ctx-was-oom``: a small entry that the matrix says does not start (as the seeds' OOM
  rows, measured on vLLM 0.8.3) but starts on today's vLLM: a finding with its capacity.

Every assertion reads the run's records and server log, as the report and the upgrade diff
do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_conformance import report
from vllm_conformance.matrix import load
from vllm_conformance.perf import estimate

pytestmark = pytest.mark.timeout(1500)

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 16384
STALLED = "test_fits_exactly[ctx-16k-completions-ids-1]"

MATRIX = {
    "deployments": [
        {
            "id": "ctx-16k",
            "extends": "cpu",
            "serve": {"max_model_len": LIMIT, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
        },
        {
            "id": "ctx-was-oom",
            "source": "self-test",
            "model": {"family": "tiny", "precision": "bf16", "generate": "tiny-llama4",
                      "served_model_name": "tiny-llama4",
                      "options": {"max_position_embeddings": 65536}},
            "hardware": {"gpu": "cpu"},
            "serve": {"max_model_len": 2048, "max_num_seqs": 2, "compilation_config": {"mode": 0},
                      "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
            "expect": {"context": {"startup": "fails", "failure_reasons": ["kv_cache"],
                                   "source": "self-test: measured as OOM on vLLM 0.8.3"}},
        },
    ]
}  # fmt: skip

# Stops the engine core of the served entry (found by the launcher's tag) for one test.
STALL_PLUGIN = textwrap.dedent(
    f"""
    import os
    import signal
    from pathlib import Path

    import pytest

    from vllm_conformance.launch import procs


    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(item):
        if item.name != {STALLED!r}:
            return (yield)
        server = item.funcargs["endpoint"].server
        (engine,) = [
            pid for pid in procs.tagged_pids(server.tag, session=server.proc.pid)
            if Path(f"/proc/{{pid}}/cmdline").read_bytes().startswith(b"VLLM::EngineCore")
        ]
        os.kill(engine, signal.SIGSTOP)
        try:
            return (yield)
        finally:
            os.kill(engine, signal.SIGCONT)
    """
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]], str]:
    """The inner run: its directory, its records, and its output."""
    tmp = tmp_path_factory.mktemp("context-suite")
    (tmp / "m.yaml").write_text(yaml.safe_dump(MATRIX, sort_keys=False))
    (tmp / "stall_plugin.py").write_text(STALL_PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(tmp)])}
    for name in ("VLLM_CONFORMANCE_ENTRY", "VLLM_CONFORMANCE_ENDPOINT", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    out = subprocess.run(
        [
            sys.executable, "-m", "pytest", "--pyargs", "vllm_conformance.suites.test_context",
            "--matrix", str(tmp / "m.yaml"), "--reports-dir", str(tmp), "--run-id", "run",
            "-p", "stall_plugin", "-p", "no:cacheprovider", "-q",
        ],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=1400,
    )  # fmt: skip
    run_dir = tmp / "run"
    return run_dir, report.load_records(run_dir), out.stdout + out.stderr


def checks(records: list[dict[str, Any]], entry: str, prefix: str) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r["kind"] == "check" and r["entry"] == entry and r["check"].startswith(prefix)
    ]


def outcome(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    tests = [r for r in records if r["kind"] == "test" and r["nodeid"].endswith(f"::{name}")]
    assert tests, f"{name} did not run"
    return next((t for t in tests if t["outcome"] != "passed"), tests[-1])


def test_both_sides_of_every_limit(run: tuple[Path, list[dict[str, Any]], str]) -> None:
    """prompt + max_tokens == max_model_len is served in every form; one token more is 400."""
    _, records, out = run
    fits = checks(records, "ctx-16k", "context.fits.")
    assert len(fits) == 7, out[-3000:]  # 8 cases, one of them stalled on purpose
    for rec in fits:
        assert rec["verdict"] == "pass", rec
        usage = rec["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == LIMIT, rec
    over = {r["check"]: r for r in checks(records, "ctx-16k", "context.overflow.")}
    for form in ("completions-ids", "completions-text", "chat", "completions-text.stream",
                 "chat.stream"):  # fmt: skip
        rec = over[f"context.overflow.prompt=limit+1.{form}"]
        assert rec["status"] == 400 and str(LIMIT) in rec["error"]["message"], rec
    # A prompt of exactly max_model_len is sent now; vLLM 0.32 refuses it without naming
    # the limit, a known issue of the entry (a strict expected failure).
    for form in ("completions-ids", "completions-text", "chat"):
        assert over[f"context.overflow.prompt=limit.{form}"]["status"] == 400
        name = f"test_one_token_over_is_rejected[ctx-16k-prompt=limit.{form}]"
        assert outcome(records, name)["outcome"] == "xfailed"
    assert over["context.overflow.max_tokens=limit+1"]["status"] == 400
    alone = checks(records, "ctx-16k", "context.max_tokens_alone.fits")
    assert alone and alone[0]["verdict"] == "pass"


def test_server_tokenize_cross_checks_the_prompts(
    run: tuple[Path, list[dict[str, Any]], str],
) -> None:
    """Every text and chat prompt at the boundary was counted by the server's /tokenize."""
    run_dir, _, _ = run
    log = (run_dir / "ctx-16k" / "server.log").read_text()
    # exact-token text and chat, and 6 text or chat cases of test_fits_exactly
    assert log.count('"POST /tokenize HTTP/1.1" 200') >= 8


def test_the_policy_of_the_served_version_applied(
    run: tuple[Path, list[dict[str, Any]], str],
) -> None:
    _, records, _ = run
    for name in ("context.prompt_plus_max_tokens", "context.max_tokens_alone_policy"):
        (rec,) = checks(records, "ctx-16k", name)
        assert rec["verdict"] == "pass", rec
        applied = rec["expected"]["applied"]
        assert applied["served_vllm"] == "0.32.0"
        assert (applied["value"], applied["vllm"]) == ("clamp", ">=0.32.0")
        assert applied["source"].startswith("measured on vLLM 0.32.0")
        assert rec["measured"]["policy"] == "clamp"


def test_at_most_three_full_prefills(run: tuple[Path, list[dict[str, Any]], str]) -> None:
    """The prefix cache serves every long prompt but the shared one and the concurrent ones."""
    _, records, _ = run
    (rec,) = checks(records, "ctx-16k", "context.prefill_budget")
    measured = rec["measured"]
    assert rec["verdict"] == "pass", measured
    assert measured["full_prefills"] <= 3
    assert measured["long_requests"] >= 25
    # Reuse, proven by vLLM's own counters: most long prompt tokens came from the cache.
    assert measured["cached_tokens"] > 8 * LIMIT, measured
    (concurrent,) = [r for r in measured["requests"] if r["check"] == "concurrent_near_max"]
    # The shared prompt comes from the cache, the other one is computed.
    assert concurrent["requests"] == 2 and concurrent["full_prefills"] == 1


def test_a_stalled_engine_fails_at_the_entrys_bound(
    run: tuple[Path, list[dict[str, Any]], str],
) -> None:
    run_dir, records, out = run
    entry = load([run_dir.parent / "m.yaml"]).known["ctx-16k"]
    bound = estimate.request_deadline_seconds(entry, LIMIT - 1, 1)
    assert bound is not None and bound < 120, bound  # the generic timeout is 600 s
    stalled = outcome(records, STALLED)
    assert stalled["outcome"] == "failed", stalled
    assert f"no answer within {bound:.0f} s" in stalled["message"], stalled["message"]
    assert "stalled" in stalled["message"] and "perf.estimate" in stalled["message"]
    assert bound - 1 < stalled["duration"] < bound + 30
    # The engine resumed: the tests after it passed.
    assert outcome(records, "test_prefill_budget[ctx-16k]")["outcome"] == "passed", out[-3000:]


def test_an_expected_failure_that_starts_is_a_finding(
    run: tuple[Path, list[dict[str, Any]], str],
) -> None:
    _, records, _ = run
    (rec,) = checks(records, "ctx-was-oom", "context.expected_startup_failure")
    assert rec["verdict"] == "fail: expected to fail, started"
    measured = rec["measured"]
    assert measured["started"] is True and measured["vllm"] == "0.32.0"
    assert measured["kv_cache_tokens"] > 2048 and measured["max_model_len"] == 2048
    assert rec["finding"].startswith("expected to fail (self-test: measured as OOM")
    assert f"started: KV capacity {measured['kv_cache_tokens']:,} tokens" in rec["finding"]
    assert report.verdict_class(rec["verdict"]) == "fail"


def test_one_server_start_per_entry(run: tuple[Path, list[dict[str, Any]], str]) -> None:
    """The suite's session-scoped server is not restarted (the budget's premise)."""
    _, records, _ = run
    starts = [r for r in records if r["kind"] == "server" and r["status"] == "started"]
    assert [r["entry"] for r in starts] == ["ctx-16k"]


def test_the_logged_kv_capacity_is_the_shapes(
    run: tuple[Path, list[dict[str, Any]], str],
) -> None:
    """The capacity vLLM logged agrees with the tiny model's bytes per token for the 1 GiB
    of VLLM_CPU_KVCACHE_SPACE, computed from its config, not typed in."""
    _, records, _ = run
    (rec,) = checks(records, "ctx-16k", "context.kv_plausibility")
    assert rec["verdict"] == "pass", rec
    logged, predicted = rec["measured"]["kv_cache_tokens"], rec["expected"]["kv_cache_tokens"]
    assert abs(logged - predicted) <= estimate.KV_TOKENS_REL * predicted
    assert rec["measured"]["kv_memory_gib"] == 1.0


def test_every_long_request_took_longer_than_the_flop_floor(
    run: tuple[Path, list[dict[str, Any]], str],
) -> None:
    _, records, _ = run
    (rec,) = checks(records, "ctx-16k", "context.prefill_floor")
    assert rec["verdict"] == "pass", rec
    rows = rec["measured"]["requests"]
    # The first long request computes the shared prompt: a floor well above the clock's grain.
    assert rows and rows[0]["floor_seconds"] > 0.01, rows
    assert all(r["seconds"] >= r["floor_seconds"] for r in rows)
