"""Physical estimates against what real vLLM servers logged (no server here).

The logs are real: the CPU one from vLLM 0.32.0 on this kind of machine (tests/data), the GPU
ones from vLLM 0.26.0 on one H200 (reports/gpu, committed by the GPU run).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_conformance.launch import logparse
from vllm_conformance.matrix import Deployment, load_matrix
from vllm_conformance.perf import estimate

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = {e.id: e for e in load_matrix([])}

LOGS = [
    (ROOT / "tests/data/vllm-0.32.0-cpu-startup.log", "cpu"),
    (ROOT / "reports/gpu/h200-bf16/h200-tiny-bf16/server.log", "h200-tiny-bf16"),
    (ROOT / "reports/gpu/h200-fp8kv/h200-tiny-fp8kv/server.log", "h200-tiny-fp8kv"),
    (ROOT / "reports/gpu/h200-fp8/h200-tiny-fp8/server.log", "h200-tiny-fp8"),
]


def _check(path: Path, entry: Deployment) -> estimate.KvPlausibility:
    lines = path.read_text().splitlines()
    kv = logparse.parse_kv_cache(lines)
    assert kv is not None and kv.concurrency_tokens is not None
    result = estimate.kv_plausibility(
        entry, logparse.parse_startup_facts(lines), kv, kv.concurrency_tokens
    )
    assert result is not None
    return result


@pytest.mark.parametrize(("path", "entry_id"), LOGS, ids=[e for _, e in LOGS])
def test_logged_kv_capacity_is_what_the_shape_predicts(path: Path, entry_id: str) -> None:
    result = _check(path, ENTRIES[entry_id])
    assert result.problems == ()
    assert result.predicted_tokens == pytest.approx(result.logged_tokens, rel=1e-3)


def test_a_wrong_kv_dtype_is_caught() -> None:
    """The fp8-KV server's log read as if its KV cache were bf16: twice the tokens logged."""
    path, entry_id = LOGS[2]
    entry = ENTRIES[entry_id]
    as_bf16 = entry.model_copy(
        update={"serve": entry.serve.model_copy(update={"kv_cache_dtype": None})}
    )
    problems = _check(path, as_bf16).problems
    assert len(problems) == 1 and "KV tokens" in problems[0]


def test_weights_include_the_rope_table() -> None:
    """The tiny model's 13 MB of weights load as 1.26 GiB: Scout's 10M-position RoPE table."""
    path, entry_id = LOGS[1]
    result = _check(path, ENTRIES[entry_id])
    assert result.weights_bytes == pytest.approx(result.predicted_weights_bytes, rel=0.01)
    assert result.overhead_share is not None and 0 <= result.overhead_share < 0.05


def test_prefill_floor_counts_only_the_uncached_part() -> None:
    entry = ENTRIES["scout-h200-fp8-long"]
    whole = estimate.prefill_floor_seconds(entry, 262_144)
    suffix = estimate.prefill_floor_seconds(entry, 262_144, cached=262_144 - 1024)
    assert whole is not None and suffix is not None
    assert 0 < suffix < whole / 50
    # A measured full prefill below this floor is a measurement error; realistic is slower.
    planned = estimate.prefill_seconds(entry, 262_144)
    assert planned is not None and planned > whole
