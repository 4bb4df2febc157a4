"""The scout-shaped recipe and the shape arithmetic, checked against transformers' own count."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_conformance import models
from vllm_conformance.models import scout
from vllm_conformance.models.shape import Shape


@pytest.fixture(scope="module", params=["scout", "maverick"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    scout.build(out, variant=request.param, quantization="fp8")
    return out


def test_transformers_accepts_the_config_and_counts_what_shape_counts(built: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(built)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counted = sum(p.numel() for p in model.parameters())
    shape = Shape.from_model_dir(built)
    # Only the RMSNorm weights (hidden-size vectors) are left out of Shape's count.
    assert 0 <= counted - shape.total_params < 2 * shape.hidden_size * (shape.num_layers + 1)


def test_published_sizes() -> None:
    scout_shape = Shape.from_config(scout.config())
    maverick = Shape.from_config(scout.config(variant="maverick"))
    # Meta: Scout 109B total / 17B active, Maverick 400B / 17B (vision tower included there).
    assert 107e9 < scout_shape.total_params < 109e9
    assert 398e9 < maverick.total_params < 402e9
    assert 16.5e9 < scout_shape.active_params < 17.5e9
    assert 16.5e9 < maverick.active_params < 17.5e9
    assert scout_shape.global_layers == tuple(range(3, 48, 4))
    assert len(maverick.moe_layers) == 24


def test_prefill_flops_of_a_million_tokens() -> None:
    """REFERENCE-NUMBERS: ~1.6e17 FLOPs for a 1M Scout prefill, ~78 % in global layers."""
    shape = Shape.from_config(scout.config())
    total = shape.prefill_flops(1_000_000)
    assert total == pytest.approx(1.6e17, rel=0.05)
    d = shape.num_heads * shape.head_dim
    global_part = len(shape.global_layers) * 2.0 * 1e12 * d
    assert global_part / total == pytest.approx(0.78, abs=0.02)


def test_kv_bytes_follow_the_hybrid_layout() -> None:
    shape = Shape.from_config(scout.config(num_hidden_layers=24))
    per = 2 * 8 * 128 * 2
    # 6 global layers keep every token; 18 local layers at most one 8192-token chunk.
    assert shape.kv_bytes(100_000) == per * (6 * 100_000 + 18 * 8192)
    assert shape.kv_bytes(100, "fp8") == per / 2 * 24 * 100


def test_fewer_layers_and_experts() -> None:
    small = Shape.from_config(scout.config(num_hidden_layers=24, num_local_experts=4))
    assert small.num_layers == 24 and small.num_experts == 4
    with pytest.raises(ValueError, match="only 'fp8'"):
        scout.config(quantization="int8")  # type: ignore[arg-type]


def test_recipe_is_registered() -> None:
    assert "scout-shaped" in models.RECIPES
