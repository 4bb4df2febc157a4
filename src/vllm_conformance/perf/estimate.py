"""Physical estimates for a matrix entry, from its model's shape and its hardware's datasheet.

Two kinds of number, never mixed up:

- **floors** (``*_floor``): what no run can beat (every FLOP at the peak of every GPU, every
  byte at full HBM bandwidth). A measurement below its floor is a measurement error.
- **estimates**: what a run is planned with and what deadlines are derived from: the floor
  divided by the efficiency that serving engines reach in practice (:data:`PREFILL_MFU`,
  :data:`DECODE_MBU`), stated here once, with their source.

An entry without a known model shape (a checkpoint path without a local ``config.json``, of
a family this package has no config for) gets ``None``: callers say so instead of guessing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_conformance.launch.gpus import SPECS, GpuSpec
from vllm_conformance.launch.logparse import KvCacheInfo, StartupFacts
from vllm_conformance.matrix import Deployment, Workload
from vllm_conformance.models.shape import DTYPE_BYTES, Shape

#: Fraction of peak FLOP/s a long prefill reaches (FlashAttention-3 and FP8 GEMMs on Hopper
#: run at 40-75 % of peak; a whole serving step, with MoE routing, lower).
PREFILL_MFU = 0.35
#: The vLLM CPU backend's share of its nominal peak (``SPECS["cpu"]``): a 32,752-token
#: prefill of the tiny Llama 4 took 3.1-3.2 s on vLLM 0.32.0 CPU, 2 cores (floor 0.14 s).
CPU_PREFILL_MFU = 0.04
#: Fraction of HBM bandwidth a decode step reaches (weights and KV read once per step).
DECODE_MBU = 0.5
#: Weights load from local NVMe or page cache at about this rate per node (bytes/s); with
#: ``load_format: dummy`` nothing is read, random initialisation runs on the GPU.
LOAD_BANDWIDTH = 2e9
#: Per prompt token, what a request costs besides the model: JSON, tokenizing text on the
#: server, detokenizing (measured about 2.3e-6 s on the CPU VM: 32,734 tokens in 0.074 s).
REQUEST_SECONDS_PER_TOKEN = 5e-6
#: A request is called hung after this many times its planned time plus
#: :data:`HANG_SLACK_SECONDS`: the plan is an estimate, machines are shared, and nothing a
#: healthy engine does (prefix caching, batching with a few others) makes it slower by more.
HANG_FACTOR = 4.0
HANG_SLACK_SECONDS = 30.0
#: Fixed cost of a server start: Python imports, torch.compile, CUDA graphs, warm-up.
STARTUP_FIXED_SECONDS = 120.0
#: A start may take this many times its planned time before it counts as hung ...
STARTUP_TIMEOUT_FACTOR = 3.0
#: ... and never less than this (the 900 s every start had before deadlines were derived;
#: vLLM CPU starts take 60-110 s alone, several times that beside a second server).
STARTUP_TIMEOUT_MIN_SECONDS = 900.0
#: Fixed cost of one engine step beyond its memory traffic (scheduling, sampling, kernel
#: launches): the tiny model on one H200, whose weights read in microseconds, decodes at a
#: median TPOT of 4.8-4.9 ms with 64 requests (README, verified on one H200, vLLM 0.26).
STEP_OVERHEAD_SECONDS = 0.005
#: vLLM's ``--max-num-seqs`` when an entry leaves it unset (GPU default since V1).
DEFAULT_MAX_NUM_SEQS = 256
#: A test of short requests (a robustness example, a rejected overflow, an auth probe) on a
#: GPU: a few round trips of milliseconds plus the harness. A planning assumption; the
#: planned-against-measured table of a run calibrates it.
SHORT_TEST_SECONDS = 3.0


@dataclass(frozen=True)
class Hardware:
    """What one entry runs on: the datasheet of its device kind, times the count."""

    spec: GpuSpec
    count: int

    @property
    def memory_bytes(self) -> float:
        return self.spec.memory_gib * 2**30 * self.count

    @property
    def bandwidth(self) -> float:
        return self.spec.bandwidth * self.count

    def peak(self, precision: str) -> float:
        return self.spec.peak(precision) * self.count


def _config(entry: Deployment) -> dict[str, Any] | None:
    model = entry.model
    if model.generate is not None:
        from vllm_conformance import models

        return models.config_of(model.generate, model.options)
    assert model.path is not None
    local = Path(model.path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())  # type: ignore[no-any-return]
    if model.family in ("scout", "maverick"):
        from vllm_conformance.models import scout

        quantization = "fp8" if model.precision == "fp8" else None
        return scout.config(variant=model.family, quantization=quantization)
    return None


def shape_of(entry: Deployment) -> Shape | None:
    """The shape of the entry's model, or None when it cannot be known without the model."""
    config = _config(entry)
    return Shape.from_config(config) if config is not None else None


def hardware_of(entry: Deployment) -> Hardware:
    return Hardware(SPECS[entry.hardware.gpu], entry.hardware.count)


def _kv_dtype(entry: Deployment) -> str:
    return entry.serve.kv_cache_dtype or "auto"


def prefill_floor_seconds(entry: Deployment, tokens: int, cached: int = 0) -> float | None:
    """No GPU set can prefill ``tokens`` faster (linears at the weights' peak, attention at
    the KV dtype's), of which the first ``cached`` come from the prefix cache: causal
    attention over positions ``[cached, tokens)`` costs F(tokens) - F(cached)."""
    shape = shape_of(entry)
    if shape is None:
        return None
    hw = hardware_of(entry)
    attention_precision = "fp8" if _kv_dtype(entry).startswith("fp8") else "bf16"
    linear = shape.linear_flops(tokens - cached)
    attention = shape.attention_flops(tokens) - shape.attention_flops(cached)
    return linear / hw.peak(entry.model.precision) + attention / hw.peak(attention_precision)


def prefill_seconds(entry: Deployment, tokens: int) -> float | None:
    """The planned time of one prefill of ``tokens`` tokens."""
    floor = prefill_floor_seconds(entry, tokens)
    mfu = CPU_PREFILL_MFU if entry.hardware.gpu == "cpu" else PREFILL_MFU
    return None if floor is None else floor / mfu


def decode_step_floor_seconds(entry: Deployment, batch: int, context: int) -> float | None:
    """One decode step of ``batch`` sequences of ``context`` tokens: every weight an active
    expert needs, and every sequence's KV cache, read once from HBM."""
    shape = shape_of(entry)
    if shape is None:
        return None
    per_param = DTYPE_BYTES[entry.model.precision]
    dense = shape.layer_params(active=True) - _routed_expert_params(shape, active=True)
    experts = _routed_expert_params(shape, active=False)
    # Distinct experts that a batch touches, with top-k routing spread evenly.
    touched = 1.0
    if shape.num_experts:
        k = shape.experts_per_token / shape.num_experts
        touched = 1 - (1 - k) ** batch
    weights = (dense + experts * touched) * per_param + shape.embedding_params * 2
    kv = batch * shape.kv_bytes(context, _kv_dtype(entry))
    return (weights + kv) / hardware_of(entry).bandwidth


def decode_step_seconds(entry: Deployment, batch: int, context: int) -> float | None:
    floor = decode_step_floor_seconds(entry, batch, context)
    return None if floor is None else floor / DECODE_MBU + STEP_OVERHEAD_SECONDS


def batch_seconds(
    entry: Deployment, requests: int, input_len: int, output_len: int, concurrency: int
) -> float | None:
    """The planned time of ``requests`` requests of ``input_len`` prompt and ``output_len``
    output tokens, at most ``concurrency`` at a time: every prompt is prefilled once, and
    each wave of ``concurrency`` requests decodes ``output_len`` steps at its mean context."""
    if requests <= 0:
        return 0.0
    batch = max(1, min(concurrency, requests))
    prefill = prefill_seconds(entry, input_len)
    step = decode_step_seconds(entry, batch, input_len + output_len // 2)
    if prefill is None or step is None:
        return None
    return requests * prefill + math.ceil(requests / batch) * output_len * step


def load_seconds(entry: Deployment, workload: Workload) -> float | None:
    """The planned time of the entry's load run (warm-up requests included)."""
    concurrency = workload.max_concurrency or entry.serve.max_num_seqs or DEFAULT_MAX_NUM_SEQS
    busy = batch_seconds(
        entry,
        workload.num_prompts + workload.warmup,
        workload.input_len,
        workload.output_len,
        concurrency,
    )
    if busy is None or workload.request_rate is None:
        return busy
    return max(busy, workload.num_prompts / workload.request_rate)


@dataclass(frozen=True)
class TaskTokens:
    """What one document of an lm-eval task costs in tokens (a planning assumption)."""

    #: the question (with its image, if any), without few-shot examples
    prompt: int
    #: tokens each few-shot example adds
    per_shot: int
    #: lm-eval's default ``num_fewshot`` of the task
    shots: int
    #: typical generated tokens per document, under the task's ``max_gen_toks``
    output: int
    source: str


#: Per lm-eval task of the matrix. The shot counts and output caps are lm-eval's task YAMLs;
#: the token counts are planning assumptions for Llama 4 that measured runs calibrate.
TASK_TOKENS: dict[str, TaskTokens] = {
    "gsm8k": TaskTokens(
        100, 150, 5, 130, "lm-eval gsm8k.yaml: 5-shot, stops at 'Question:'; ~130-token answers"
    ),
    "mmlu_pro": TaskTokens(
        250,
        400,
        5,
        400,
        "lm-eval mmlu_pro: 5-shot chain of thought, max_gen_toks 2048; ~400-token answers",
    ),
    "chartqa": TaskTokens(
        1200,
        0,
        0,
        300,
        "lm-eval chartqa.yaml: 0-shot, describe-then-reason prompt, max_gen_toks 512; "
        "~1,000 image tokens (Llama 4 tiles of 336 px)",
    ),
    "mmlu_pro_llama": TaskTokens(
        600,
        0,
        0,
        400,
        "lm-eval mmlu_pro_llama: 0-shot chat prompt, max_gen_toks 1024; ~400-token answers",
    ),
    "chartqa_llama_90": TaskTokens(
        1200,
        0,
        0,
        150,
        "lm-eval chartqa_llama_90: 0-shot, max_gen_toks 512; ~1,000 image tokens",
    ),
}


def lm_eval_seconds(
    entry: Deployment,
    task: str,
    documents: int,
    num_fewshot: int | None,
    max_gen_toks: int | None,
    concurrency: int,
) -> float | None:
    """The planned time of one lm-eval run of ``documents`` documents of ``task``."""
    tokens = TASK_TOKENS.get(task)
    if tokens is None:
        return None
    shots = tokens.shots if num_fewshot is None else num_fewshot
    output = min(tokens.output, max_gen_toks or tokens.output)
    return batch_seconds(
        entry, documents, tokens.prompt + shots * tokens.per_shot, output, concurrency
    )


def request_deadline_seconds(
    entry: Deployment, prompt_tokens: int, output_tokens: int, requests: int = 1
) -> float | None:
    """How long ``requests`` requests of ``prompt_tokens`` plus ``output_tokens`` sent
    together may take before they are called hung (None: the model's shape is unknown)."""
    prefill = prefill_seconds(entry, prompt_tokens)
    decode = decode_step_seconds(entry, requests, prompt_tokens + output_tokens)
    if prefill is None or decode is None:
        return None
    planned = requests * (prefill + prompt_tokens * REQUEST_SECONDS_PER_TOKEN)
    return HANG_SLACK_SECONDS + HANG_FACTOR * (planned + output_tokens * decode)


def position_limit(entry: Deployment) -> int | None:
    """The model's ``max_position_embeddings``: the longest ``--max-model-len`` it takes."""
    config = _config(entry)
    if config is None:
        return None
    value = (config.get("text_config") or config).get("max_position_embeddings")
    return int(value) if value else None


def _routed_expert_params(shape: Shape, active: bool) -> int:
    per_expert = 3 * shape.hidden_size * shape.intermediate_size
    routed = shape.experts_per_token if active else shape.num_experts
    return len(shape.moe_layers) * routed * per_expert


def weight_bytes(entry: Deployment) -> float | None:
    shape = shape_of(entry)
    return None if shape is None else shape.weight_bytes(entry.model.precision)


def startup_seconds(entry: Deployment) -> float:
    """The planned time of one server start (weights read, compile, warm-up)."""
    weights = weight_bytes(entry) or 0.0
    if entry.serve.load_format == "dummy":
        weights = 0.0
    return STARTUP_FIXED_SECONDS + weights / LOAD_BANDWIDTH


def startup_timeout_seconds(entry: Deployment) -> float:
    """How long a start of ``entry`` may take before it counts as hung: a multiple of its
    planned time, so a 400 GB checkpoint gets longer than a tiny model."""
    return max(STARTUP_TIMEOUT_MIN_SECONDS, STARTUP_TIMEOUT_FACTOR * startup_seconds(entry))


# -- KV capacity: what vLLM logs against what the shape predicts --------------------------

#: ``max_num_batched_tokens`` of vLLM's OpenAI server when the entry sets none (vLLM 0.26 and
#: 0.32: 8192 on GPUs, logged as "Chunked prefill is enabled with max_num_batched_tokens";
#: 2048 on the CPU backend, which does not log it).
DEFAULT_BATCHED_TOKENS = {"cpu": 2048}
DEFAULT_BATCHED_TOKENS_GPU = 8192
#: vLLM's default ``--gpu-memory-utilization``.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
#: The band: logged KV tokens within 1 % of those the logged KV memory holds (whole blocks
#: per layer group make vLLM's figure a little lower); weights within 5 % of the shape's;
#: what vLLM keeps back for activations, CUDA graphs and the allocator between 0 and 10 %
#: of the memory it may use.
KV_TOKENS_REL = 0.01
WEIGHTS_REL = 0.05
OVERHEAD_MAX = 0.10


@dataclass(frozen=True)
class KvPlausibility:
    """The logged KV capacity against the shape's prediction, and what disagrees."""

    logged_tokens: int
    predicted_tokens: float
    kv_memory_bytes: float
    kv_memory_source: str
    bytes_per_request: float
    in_flight_tokens: int
    weights_bytes: float | None
    predicted_weights_bytes: float
    overhead_share: float | None
    problems: tuple[str, ...]


def _kv_memory(entry: Deployment, facts: StartupFacts) -> tuple[float, str]:
    if facts.kv_memory_bytes is not None:
        return facts.kv_memory_bytes, "logged"
    space = entry.serve.env.get("VLLM_CPU_KVCACHE_SPACE")
    if entry.hardware.gpu == "cpu" and space:
        return float(space) * 2**30, "VLLM_CPU_KVCACHE_SPACE"
    raise ValueError("vLLM logged no KV cache memory and the entry sets none")


def kv_plausibility(
    entry: Deployment, facts: StartupFacts, kv: KvCacheInfo, max_model_len: int
) -> KvPlausibility | None:
    """Check the KV capacity vLLM logged against the entry's shape and hardware.

    Per GPU: tensor parallelism splits the weights and the KV heads (a head is never split,
    so at most ``num_kv_heads`` ways); the RoPE table is whole on every GPU. None when the
    shape is unknown or pipeline parallelism makes the per-GPU split uneven.
    """
    shape = shape_of(entry)
    if shape is None or entry.serve.pipeline_parallel_size > 1:
        return None
    tp = entry.serve.tensor_parallel_size
    gpu = entry.hardware.gpu
    batched = (
        facts.max_num_batched_tokens
        or entry.serve.max_num_batched_tokens
        or DEFAULT_BATCHED_TOKENS.get(gpu, DEFAULT_BATCHED_TOKENS_GPU)
    )
    in_flight = batched * (2 if facts.async_scheduling else 1)
    per_request = shape.kv_bytes(max_model_len, _kv_dtype(entry), in_flight)
    per_request /= min(tp, shape.num_kv_heads)
    kv_memory, source = _kv_memory(entry, facts)
    predicted = kv_memory / per_request * max_model_len
    problems = []
    if abs(kv.tokens - predicted) > KV_TOKENS_REL * predicted:
        problems.append(
            f"vLLM logged {kv.tokens:,} KV tokens; {kv_memory / 2**30:.2f} GiB of KV memory "
            f"({source}) holds {predicted:,.0f} at {per_request / 2**20:.1f} MiB per "
            f"{max_model_len:,}-token request (band {KV_TOKENS_REL:.0%})"
        )
    weights = shape.weight_bytes(entry.model.precision) / tp + shape.rope_cache_bytes
    overhead = None
    if gpu != "cpu" and facts.weights_bytes is not None:
        if abs(facts.weights_bytes - weights) > WEIGHTS_REL * weights:
            problems.append(
                f"vLLM loaded {facts.weights_bytes / 2**30:.2f} GiB of weights per GPU; the "
                f"shape predicts {weights / 2**30:.2f} GiB (band {WEIGHTS_REL:.0%})"
            )
        util = (
            facts.gpu_memory_utilization
            or entry.serve.gpu_memory_utilization
            or DEFAULT_GPU_MEMORY_UTILIZATION
        )
        budget = util * SPECS[gpu].memory_gib * 2**30
        overhead = (budget - facts.weights_bytes - kv_memory) / budget
        if not -0.01 <= overhead <= OVERHEAD_MAX:
            problems.append(
                f"of {budget / 2**30:.1f} GiB per GPU ({util:g} x {SPECS[gpu].memory_gib} GiB), "
                f"weights and KV cache leave {overhead:.1%} for activations and graphs "
                f"(band 0-{OVERHEAD_MAX:.0%})"
            )
    return KvPlausibility(
        logged_tokens=kv.tokens,
        predicted_tokens=predicted,
        kv_memory_bytes=kv_memory,
        kv_memory_source=source,
        bytes_per_request=per_request,
        in_flight_tokens=in_flight,
        weights_bytes=facts.weights_bytes,
        predicted_weights_bytes=weights,
        overhead_share=overhead,
        problems=tuple(problems),
    )
