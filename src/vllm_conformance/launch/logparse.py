"""Read what vLLM prints at startup: KV-cache capacity and the reason a start failed.

vLLM up to 0.27.1 prints the capacity on two lines, later versions on one; the prefix names
the device (GPU, CPU, XPU). Each part is parsed on its own so both forms work::

    INFO ... [kv_cache_utils.py:578] GPU KV cache size: 538,512 tokens
    INFO ... [kv_cache_utils.py:581] Maximum concurrency for 200,000 tokens per request: 2.69x
    INFO ... CPU KV cache size: 98,304 tokens, Maximum concurrency for 32,768 tokens ...: 3.00x
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_ESTIMATED_LEN = re.compile(r"estimated maximum model length is (\d+)")
_KV_SIZE = re.compile(r"(?:(\w+) )?KV cache size: ([\d,]+) tokens")
_CONCURRENCY = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")
_STARTUP_COMPLETE = "Application startup complete"

#: failure kind -> patterns that identify it in a log (newest wording first).
FAILURE_PATTERNS: dict[str, tuple[re.Pattern[str], ...]] = {
    "kv_cache": (
        _ESTIMATED_LEN,
        re.compile(r"larger than the maximum number of tokens that can be stored in KV cache"),
        re.compile(r"No available memory for the cache blocks"),
        re.compile(r"KV cache (?:space|memory) .*(?:insufficient|not enough|too small)", re.I),
    ),
    "oom": (
        re.compile(r"CUDA out of memory|OutOfMemoryError|torch\.OutOfMemoryError"),
        re.compile(r"Cannot allocate memory|MemoryError"),
        # vLLM CPU: host memory too small for VLLM_CPU_KVCACHE_SPACE.
        re.compile(r"less than requested memory for kv"),
    ),
}


def _int(text: str) -> int:
    return int(text.replace(",", ""))


@dataclass(frozen=True)
class KvCacheInfo:
    """The KV-cache figures of one server start."""

    device: str | None
    tokens: int
    concurrency_tokens: int | None = None
    concurrency: float | None = None


def parse_kv_cache(lines: Iterable[str]) -> KvCacheInfo | None:
    """Find the KV-cache size and concurrency factor in a startup log (last one wins).

    With several engines (data parallel) vLLM prints one line per engine; the last start's
    figures are the ones in force.
    """
    device: str | None = None
    tokens: int | None = None
    conc_tokens: int | None = None
    conc: float | None = None
    for line in lines:
        if m := _KV_SIZE.search(line):
            device, tokens = m.group(1), _int(m.group(2))
        if m := _CONCURRENCY.search(line):
            conc_tokens, conc = _int(m.group(1)), float(m.group(2))
    if tokens is None:
        return None
    return KvCacheInfo(device, tokens, conc_tokens, conc)


def estimated_max_model_len(lines: Iterable[str]) -> int | None:
    """The longest ``max_model_len`` that vLLM, refusing a start, says its KV memory holds.

    vLLM finds it by binary search over its own per-request KV accounting, so for hybrid
    layouts (chunked local plus global layers) it is the real one-request capacity, unlike
    the "KV cache size" figure a successful start prints (last one wins).
    """
    found = None
    for line in lines:
        if m := _ESTIMATED_LEN.search(line):
            found = int(m.group(1))
    return found


def startup_complete(lines: Iterable[str]) -> bool:
    """Whether uvicorn reported that the API server is up."""
    return any(_STARTUP_COMPLETE in line for line in lines)


@dataclass(frozen=True)
class FailureReason:
    """Why a server did not start: a kind (``kv_cache``, ``oom``, ``other``) and the line."""

    kind: str
    line: str


def failure_reason(lines: Iterable[str]) -> FailureReason | None:
    """Classify a failed start by the first line that explains it.

    Falls back to the last ``Error``/``Exception`` line (kind ``other``) so that the user
    always sees vLLM's own words.
    """
    last_error: str | None = None
    explanation: str | None = None
    for line in lines:
        for kind, patterns in FAILURE_PATTERNS.items():
            if any(p.search(line) for p in patterns):
                return FailureReason(kind, line.strip())
        # A pydantic validation error puts vLLM's own explanation on the line after it.
        if m := re.match(r"\s*Value error, (.+)", line):
            explanation = explanation or m.group(1).strip()
        elif re.search(r"\b\w*(Error|Exception)\b", line):
            last_error = line.strip()
    last_error = explanation or last_error
    return FailureReason("other", last_error) if last_error else None


_GIB = 2**30
_STARTUP_FACTS: dict[str, re.Pattern[str]] = {
    "weights_gib": re.compile(r"Model loading took ([\d.]+) GiB"),
    "kv_memory_gib": re.compile(
        r"Available KV cache memory: ([\d.]+) GiB|Explicitly set \(([\d.]+)/[\d.]+\) GiB for KV"
    ),
    "max_num_batched_tokens": re.compile(r"max_num_batched_tokens=(\d+)"),
    "gpu_memory_utilization": re.compile(r"current --gpu-memory-utilization=([\d.]+)"),
}


@dataclass(frozen=True)
class StartupFacts:
    """Memory figures of one start, as vLLM logs them (None: not logged by this build)."""

    weights_bytes: float | None = None
    kv_memory_bytes: float | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    async_scheduling: bool = False


def parse_startup_facts(lines: Iterable[str]) -> StartupFacts:
    """Weights and KV memory, batch budget and scheduling mode from a startup log."""
    found: dict[str, float] = {}
    async_scheduling = False
    for line in lines:
        async_scheduling = async_scheduling or "Asynchronous scheduling is enabled" in line
        for name, pattern in _STARTUP_FACTS.items():
            if m := pattern.search(line):
                found[name] = float(next(g for g in m.groups() if g is not None))
    gib = {k: found[k] * _GIB for k in ("weights_gib", "kv_memory_gib") if k in found}
    batched = found.get("max_num_batched_tokens")
    return StartupFacts(
        weights_bytes=gib.get("weights_gib"),
        kv_memory_bytes=gib.get("kv_memory_gib"),
        max_num_batched_tokens=int(batched) if batched is not None else None,
        gpu_memory_utilization=found.get("gpu_memory_utilization"),
        async_scheduling=async_scheduling,
    )
