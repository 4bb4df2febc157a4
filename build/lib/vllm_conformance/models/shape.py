"""The arithmetic of a model's shape: parameters, weight and KV-cache bytes, prefill FLOPs.

Computed from a Hugging Face ``config.json`` (Llama 4 text, Llama 4 multimodal's
``text_config``, or a dense Llama), never typed in, so that what the suites and the cost
plan predict follows the model a matrix entry serves. Llama 4 terms:

- every ``interleave_moe_layer_step``-th layer is a mixture of experts (routed experts of
  ``intermediate_size`` plus one shared expert of the same width); the others are dense
  MLPs of ``intermediate_size_mlp``;
- layers with RoPE attend within chunks of ``attention_chunk_size`` tokens (local); every
  ``no_rope_layer_interval``-th layer has no RoPE and attends to the whole context (global).

FLOPs count a multiply-add as 2. Attention is causal: a prompt of ``n`` tokens costs
``2 n^2 d`` per global layer (``d`` = heads x head size, the QK^T and AV products over half
the square), and ``2 n c d`` per local layer with chunk ``c``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Bytes per stored element of a weight precision or KV-cache dtype.
DTYPE_BYTES: dict[str, float] = {
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "auto": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "int4": 0.5,
    "fp4": 0.5,
}


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs of a decoder-only (Llama-family) model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    #: width of each routed expert and of the shared expert (MoE layers)
    intermediate_size: int
    #: width of the MLP of dense layers
    intermediate_size_mlp: int
    num_experts: int = 0
    experts_per_token: int = 1
    moe_layers: tuple[int, ...] = ()
    global_layers: tuple[int, ...] = ()
    attention_chunk: int | None = None
    tied_embeddings: bool = False
    max_position_embeddings: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Shape:
        """From a ``config.json`` mapping (Llama 4's ``text_config`` is looked into)."""
        cfg = dict(config.get("text_config") or config)
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        experts = int(cfg.get("num_local_experts") or 0)
        if experts:
            step = int(cfg.get("interleave_moe_layer_step") or 1)
            moe = cfg.get("moe_layers") or list(range(step - 1, layers, step))
        else:
            moe = []
        chunk = cfg.get("attention_chunk_size")
        if chunk:
            no_rope = cfg.get("no_rope_layers")
            if no_rope:  # 1 = this layer uses RoPE (local), 0 = no RoPE (global)
                global_layers = [i for i, uses_rope in enumerate(no_rope) if not uses_rope]
            else:
                interval = int(cfg.get("no_rope_layer_interval") or 4)
                global_layers = [i for i in range(layers) if (i + 1) % interval == 0]
        else:
            global_layers = list(range(layers))
        intermediate = int(cfg["intermediate_size"])
        return cls(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            intermediate_size=intermediate,
            intermediate_size_mlp=int(cfg.get("intermediate_size_mlp") or intermediate),
            num_experts=experts,
            experts_per_token=int(cfg.get("num_experts_per_tok") or 1),
            moe_layers=tuple(int(i) for i in moe),
            global_layers=tuple(global_layers),
            attention_chunk=int(chunk) if chunk else None,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        )

    @classmethod
    def from_model_dir(cls, path: Path) -> Shape:
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))

    # -- parameters -----------------------------------------------------------------

    @property
    def attention_params(self) -> int:
        """Per layer: the q, k, v and o projections."""
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        return q_and_o + k_and_v

    def _mlp(self, width: int) -> int:
        return 3 * self.hidden_size * width  # gate, up, down

    def _ffn_params(self, layer: int, active: bool) -> int:
        if layer not in self.moe_layers:
            return self._mlp(self.intermediate_size_mlp)
        routed = self.experts_per_token if active else self.num_experts
        router = self.hidden_size * self.num_experts
        return (routed + 1) * self._mlp(self.intermediate_size) + router

    @property
    def embedding_params(self) -> int:
        """Input embedding plus output head (once if tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def layer_params(self, active: bool = False) -> int:
        """Linear parameters of all decoder layers (all experts, or those one token uses)."""
        return sum(
            self.attention_params + self._ffn_params(i, active) for i in range(self.num_layers)
        )

    @property
    def total_params(self) -> int:
        return self.layer_params() + self.embedding_params

    @property
    def active_params(self) -> int:
        """Parameters one token passes through (routed top-k experts plus the shared one)."""
        return self.layer_params(active=True) + self.embedding_params

    def weight_bytes(self, precision: str) -> float:
        """Weight memory: decoder linears at ``precision``, embeddings and head in bf16."""
        return self.layer_params() * DTYPE_BYTES[precision] + self.embedding_params * 2

    @property
    def rope_cache_bytes(self) -> float:
        """vLLM's RoPE cos/sin table: ``max_position_embeddings x head_dim`` in bf16, held
        with the weights (it is part of "Model loading took N GiB")."""
        return self.max_position_embeddings * self.head_dim * 2

    # -- KV cache -------------------------------------------------------------------

    @property
    def local_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.global_layers)

    def kv_bytes_per_token_layer(self, kv_dtype: str = "auto") -> float:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * DTYPE_BYTES[kv_dtype]

    def kv_bytes(self, tokens: int, kv_dtype: str = "auto", in_flight: int = 0) -> float:
        """KV memory one request of ``tokens`` holds.

        Local layers keep one attention chunk plus the tokens scheduled but not yet
        processed (``in_flight``), which is what vLLM reserves for them.
        """
        per = self.kv_bytes_per_token_layer(kv_dtype)
        local_tokens = min(tokens, (self.attention_chunk or tokens) + in_flight)
        return per * (len(self.global_layers) * tokens + len(self.local_layers) * local_tokens)

    # -- compute --------------------------------------------------------------------

    def attention_flops(self, tokens: int) -> float:
        d = self.num_heads * self.head_dim
        global_ = len(self.global_layers) * 2.0 * tokens * tokens * d
        chunk = min(tokens, self.attention_chunk or tokens)
        return global_ + len(self.local_layers) * 2.0 * tokens * chunk * d

    def linear_flops(self, tokens: int) -> float:
        """Decoder linears for ``tokens`` tokens, plus the output head for the last one."""
        return (
            2.0 * self.layer_params(active=True) * tokens + 2.0 * self.vocab_size * self.hidden_size
        )

    def prefill_flops(self, tokens: int) -> float:
        """FLOPs of one prefill of ``tokens`` prompt tokens."""
        return self.linear_flops(tokens) + self.attention_flops(tokens)
