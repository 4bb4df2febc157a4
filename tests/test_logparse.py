"""Parsing real vLLM startup lines: the two-line GPU form and the one-line form of 0.28+."""

from __future__ import annotations

import pytest

from vllm_conformance.launch.logparse import (
    KvCacheInfo,
    estimated_max_model_len,
    failure_reason,
    parse_kv_cache,
    startup_complete,
)

# Verbatim from the Fixstars seed (vLLM 0.8.3, 4 x H100): the two-line GPU form.
FIXSTARS = """\
INFO 04-07 00:16:33 [kv_cache_utils.py:578] GPU KV cache size: 538,512 tokens
INFO 04-07 00:16:33 [kv_cache_utils.py:581] Maximum concurrency for 200,000 tokens per request: 2.69x
"""
# Verbatim from vLLM 0.32.0 CPU serving the tiny Llama 4 in this project: the one-line form.
CPU_0_32 = """\
(EngineCore pid=11245) INFO 12-01 06:54:23 [utils.py:347] Using LBHNC KV cache layout.
(Worker pid=11296) INFO 12-01 06:54:46 [cpu_worker.py:260] Explicitly set (2.0/23.21) GiB for KV cache on node 0.
(EngineCore pid=11245) INFO 12-01 06:54:46 [kv_cache_utils.py:2327] CPU KV cache size: 2,164,802 tokens, Maximum concurrency for 32,768 tokens per request: 66.06x
(EngineCore pid=11245) INFO 12-01 06:54:46 [kv_cache_utils.py:853] kv cache group sizes (128, 128, 128, 128)
(APIServer pid=11200) INFO:     Application startup complete.
"""
# Verbatim from vLLM 0.26.0 serving the tiny Llama 4 on one H200 in this project
# (reports/gpu/h200-bf16/h200-tiny-bf16/server.log): the two-line form with a process prefix.
GPU_0_26 = """\
(EngineCore pid=1035) INFO 12-01 14:40:26 [gpu_worker.py:560] Available KV cache memory: 125.63 GiB
(EngineCore pid=1035) INFO 12-01 14:40:26 [kv_cache_utils.py:2177] GPU KV cache size: 254,527,356 tokens
(EngineCore pid=1035) INFO 12-01 14:40:26 [kv_cache_utils.py:2178] Maximum concurrency for 2,097,152 tokens per request: 121.37x
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (FIXSTARS, KvCacheInfo("GPU", 538_512, 200_000, 2.69)),
        (CPU_0_32, KvCacheInfo("CPU", 2_164_802, 32_768, 66.06)),
        (GPU_0_26, KvCacheInfo("GPU", 254_527_356, 2_097_152, 121.37)),
    ],
    ids=["two-line-gpu-0.8.3", "one-line-cpu-0.32.0", "two-line-h200-0.26.0"],
)
def test_kv_cache_lines(text: str, expected: KvCacheInfo) -> None:
    assert parse_kv_cache(text.splitlines()) == expected


def test_no_kv_line() -> None:
    assert parse_kv_cache(["INFO starting", "Using LBHNC KV cache layout."]) is None


def test_startup_complete() -> None:
    assert startup_complete(CPU_0_32.splitlines())
    assert not startup_complete(FIXSTARS.splitlines())


# The kv_cache line is verbatim from vLLM 0.32.0 CPU refusing --max-model-len 8000000 with
# 1 GiB of KV space (this project's cpu-oversized entry); the others are shaped like
# torch's and vLLM's messages.
@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (
            "(EngineCore pid=14792) ERROR 12-01 07:02:20 [core.py:1510] ValueError: To serve at least"
            " one request with the model's max seq len (8000000), (3.83 GiB KV cache is needed, which"
            " is larger than the available KV cache memory (1.0 GiB). Based on the available memory, "
            "the estimated maximum model length is 2066304. Try increasing `gpu_memory_utilization` ("
            "which also controls CPU memory on the CPU backend) or decreasing `max_model_len` when in"
            "itializing the engine. See https://docs.vllm.ai/en/latest/configuration/conserving_memor"
            "y/ for more details.",
            "kv_cache",
        ),
        (
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
            "total capacity of 79.19 GiB",
            "oom",
        ),
        ("RuntimeError: Engine core initialization failed. See root cause above.", "other"),
    ],
)
def test_failure_reason_kinds(line: str, kind: str) -> None:
    reason = failure_reason(["INFO loading weights", line])
    assert reason is not None
    assert reason.kind == kind
    assert reason.line == line


def test_failure_reason_prefers_the_cause_over_the_last_error() -> None:
    lines = [
        "ValueError: ... the estimated maximum model length is 1048576. Try increasing ...",
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ]
    reason = failure_reason(lines)
    assert reason is not None and reason.kind == "kv_cache"


def test_validation_error_reports_vllms_explanation() -> None:
    lines = [
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
        "  Value error, User-specified max_model_len (20000000) is greater than the derived "
        "max_model_len (max_position_embeddings=65536.0 or model_max_length=None in model's "
        "config.json).",
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ]
    reason = failure_reason(lines)
    assert reason is not None and reason.kind == "other"
    assert reason.line.startswith("User-specified max_model_len (20000000)")


# Verbatim from vLLM 0.32.0 CPU refusing --max-model-len 32768 for the tiny Llama 4 (hybrid:
# chunked local plus global layers) with --num-gpu-blocks-override 100, in this project.
HYBRID_REFUSAL = (
    "(EngineCore pid=2511) ERROR 12-07 08:40:02 [core.py:1510] ValueError: To serve at least one "
    "request with the model's max seq len (32768), (0.03 GiB KV cache is needed, which is larger "
    "than the available KV cache memory (0.01 GiB). Based on the available memory, the estimated "
    "maximum model length is 3072. Try increasing `gpu_memory_utilization` (which also controls "
    "CPU memory on the CPU backend) or decreasing `max_model_len` when initializing the engine."
)


def test_estimated_max_model_len() -> None:
    lines = ["INFO loading weights", HYBRID_REFUSAL, "RuntimeError: Engine core initialization"]
    assert estimated_max_model_len(lines) == 3072
    assert estimated_max_model_len(CPU_0_32.splitlines()) is None
