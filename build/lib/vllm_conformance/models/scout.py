"""Recipe ``scout-shaped``: Llama 4 Scout's (or Maverick's) real text config, no weights.

vLLM's ``--load-format dummy`` builds a model from its ``config.json`` alone, with random
weights, so memory use, KV-cache capacity, prefill time and throughput are those of the real
model (only the text is gibberish). This recipe writes that ``config.json`` (Scout's
published text config; Maverick's with ``variant: maverick``), the generation config and
a tokenizer trained on the spot (:mod:`vllm_conformance.models.tiny`'s: its ids stay below
the model's vocabulary). The entry chooses the dummy loader in ``serve`` (``load_format:
dummy``), never the recipe.

``quantization: fp8`` adds an FP8 *serialized-checkpoint* config, so vLLM allocates FP8
weights directly; online ``--quantization fp8`` would first allocate bf16 weights (218 GB
for Scout) and not fit one GPU.

Sizes (transformers' own count of this config, see the self-test): Scout 108B parameters,
17B active per token; weights about 102 GiB in FP8 with bf16 embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from vllm_conformance.models import tiny

RECIPE_VERSION: int = 1

#: The published text configs (meta-llama/Llama-4-{Scout-17B-16E,Maverick-17B-128E}-Instruct).
VARIANTS: dict[str, dict[str, Any]] = {
    "scout": {
        "num_local_experts": 16,
        "interleave_moe_layer_step": 1,
        "use_qk_norm": True,
        "max_position_embeddings": 10485760,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "maverick": {
        "num_local_experts": 128,
        "interleave_moe_layer_step": 2,
        "use_qk_norm": False,
        "max_position_embeddings": 1048576,
        "rope_scaling": None,
    },
}

TOKENIZER_VOCAB = 4096


def config(
    *,
    variant: Literal["scout", "maverick"] = "scout",
    num_hidden_layers: int = 48,
    num_local_experts: int | None = None,
    quantization: Literal["fp8"] | None = None,
    max_position_embeddings: int | None = None,
    vocab_size: int = 202048,
) -> dict[str, Any]:
    """The ``config.json`` of the model (``Llama4ForCausalLM``, ``llama4_text``).

    ``layer_types``, ``no_rope_layers`` and ``moe_layers`` are written out for the chosen
    number of layers: transformers refuses a config whose lists disagree with it.
    """
    base = VARIANTS[variant]
    experts = num_local_experts or base["num_local_experts"]
    step = base["interleave_moe_layer_step"]
    layers = num_hidden_layers
    # The tokenizer's special tokens take the last ids of its own (smaller) vocabulary.
    special = {
        t: TOKENIZER_VOCAB - len(tiny.SPECIAL_TOKENS) + i for i, t in enumerate(tiny.SPECIAL_TOKENS)
    }
    cfg: dict[str, Any] = {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "torch_dtype": "bfloat16",
        "vocab_size": vocab_size,
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "num_hidden_layers": layers,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": base["rope_scaling"],
        "max_position_embeddings": max_position_embeddings or base["max_position_embeddings"],
        "num_local_experts": experts,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": step,
        "moe_layers": list(range(step - 1, layers, step)),
        "use_qk_norm": base["use_qk_norm"],
        "attention_chunk_size": 8192,
        "no_rope_layer_interval": 4,
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(layers)],
        "layer_types": [
            "full_attention" if (i + 1) % 4 == 0 else "chunked_attention" for i in range(layers)
        ],
        "attn_temperature_tuning": True,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": special[tiny.BOS_TOKEN],
        "eos_token_id": [
            special[t] for t in (tiny.END_OF_TEXT_TOKEN, tiny.EOM_TOKEN, tiny.EOT_TOKEN)
        ],
        "pad_token_id": special[tiny.PAD_TOKEN],
    }
    if quantization == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    elif quantization is not None:
        raise ValueError(f"quantization {quantization!r}: only 'fp8' (serialized) is supported")
    return cfg


def build(out_dir: Path, **options: Any) -> None:
    """Write config, generation config and tokenizer; no weights (serve with dummy load)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config(**options)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tiny.write_tokenizer(out_dir, TOKENIZER_VOCAB, cfg["max_position_embeddings"])
