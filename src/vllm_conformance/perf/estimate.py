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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_conformance.launch.gpus import SPECS, GpuSpec
from vllm_conformance.matrix import Deployment
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


def prefill_floor_seconds(entry: Deployment, tokens: int) -> float | None:
    """No GPU set can prefill ``tokens`` faster: linears at the weights' peak, attention at
    the KV dtype's."""
    shape = shape_of(entry)
    if shape is None:
        return None
    hw = hardware_of(entry)
    attention_precision = "fp8" if _kv_dtype(entry).startswith("fp8") else "bf16"
    return shape.linear_flops(tokens) / hw.peak(entry.model.precision) + shape.attention_flops(
        tokens
    ) / hw.peak(attention_precision)


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
    return None if floor is None else floor / DECODE_MBU


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
