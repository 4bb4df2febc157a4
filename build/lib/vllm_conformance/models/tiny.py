"""Recipe ``tiny-llama4``: a tiny, randomly initialised text-only Llama 4 model.

The model is a ``Llama4ForCausalLM`` (``model_type: llama4_text``) shaped like Llama 4 Scout
in every way that changes which vLLM code runs: every layer is a mixture of experts with a
shared expert and sigmoid top-k routing, RoPE layers use chunked local attention with QK
L2-norm, and every fourth layer is a global attention layer without RoPE (iRoPE). Only the
sizes are small: the weights are 13 MB and a vLLM CPU server starts in about 1.5 minutes on
a quiet 2-core machine (see ``max_position_embeddings`` in ``build`` for what dominates it).

The weights are random (seeded), so the text it writes is gibberish; what the suites rely on
is that the real Llama 4 code paths run, that greedy decoding is reproducible, and that the
tokenizer and chat template behave like Llama 4's. Two details differ from a trained model on
purpose: the output rows of the special tokens are zero, so greedy decoding never ends a
completion by itself (it always runs to ``max_tokens``), and the tokenizer is a byte-level BPE
trained on a synthetic corpus while the model is built, so it needs no download.

Use it through ``models.materialize("tiny-llama4", options)`` or from the shell::

    python -m vllm_conformance.models.tiny [--out DIR] [--head-dim N] ...
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Bump when a change to this file changes what ``build`` writes (it is part of the cache key).
RECIPE_VERSION: int = 1

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
HEADER_START_TOKEN = "<|header_start|>"
HEADER_END_TOKEN = "<|header_end|>"
EOM_TOKEN = "<|eom|>"
EOT_TOKEN = "<|eot|>"
PAD_TOKEN = "<|finetune_right_pad|>"

#: The special tokens, in id order; they take the last ids of the vocabulary, as in Llama 4.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    END_OF_TEXT_TOKEN,
    HEADER_START_TOKEN,
    HEADER_END_TOKEN,
    EOM_TOKEN,
    EOT_TOKEN,
    PAD_TOKEN,
)

#: Llama 4's chat template, text parts only (no images, tools or ``ipython`` role).
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages and messages[0]['role'] == 'system' %}\n"
    "    {%- if messages[0]['content'] is string %}\n"
    "        {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- else %}\n"
    "        {%- set system_message = messages[0]['content'][0]['text'] | trim %}\n"
    "    {%- endif %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "    {{- '<|header_start|>system<|header_end|>\\n\\n' + system_message + '<|eot|>' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}\n"
    "    {%- if message['content'] is string %}\n"
    "        {{- message['content'] | trim }}\n"
    "    {%- else %}\n"
    "        {%- for content in message['content'] %}\n"
    "            {%- if content['type'] == 'text' %}\n"
    "                {{- content['text'] | trim }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "    {{- '<|eot|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|header_start|>assistant<|header_end|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

_WORD_LIST = (
    "the of and to in is that it for was on are as with his they at be this from have or by"
    " one had not but what all were when we there can an your which their said if do will"
    " each about how up out them then she many some so these would other into has more her"
    " two like him see time could no make than first been its who now people my made over"
    " did down only way find use may water long little very after words called just where"
    " most know get through back much before go good new write our used me man too any day"
    " same right look think also around another came come work three word must because does"
    " part even place well such here take why things help put years different away again"
    " off went old number great tell men say small every found still between name should"
    " home big give air line set own under read last never us left end along while might"
    " next sound below saw something thought both few those always looked show large often"
    " together asked house world going want school important until form food keep children"
    " feet land side without boy once animals life enough took sometimes four head above"
    " kind began almost live page got earth need far hand high year mother light parts"
    " country father let night following picture being study second eyes soon times story"
    " boys since white days ever paper hard near sentence better best across during today"
    " others however sure means knew try told young miles sun ways thing whole hear example"
    " heard several change answer room sea against top turned learn point city play toward"
    " five using himself usually model server request token tokens prompt context length"
    " cache memory chunk expert layer attention window batch stream answer question"
)
_WORDS = _WORD_LIST.split()

_SYLLABLES = (
    *(c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"),
    *("th", "sh", "ch", "st", "er", "in", "on", "an", "re", "ed", "ing", "ly", "tion"),
)


def _corpus(seed: int, sentences: int = 6000) -> list[str]:
    """A seeded synthetic corpus: English words, pseudo-words, numbers, code-ish strings."""
    rng = random.Random(seed)
    pseudo = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(2500)]
    alnum = string.ascii_letters + string.digits
    lines: list[str] = []
    for _ in range(sentences):
        words: list[str] = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.55:
                word = rng.choice(_WORDS)
            elif r < 0.8:
                word = rng.choice(pseudo)
            elif r < 0.88:
                word = str(rng.randint(0, 10 ** rng.randint(1, 6)))
            elif r < 0.96:
                word = "".join(rng.choices(alnum, k=rng.randint(1, 12)))
            else:
                word = rng.choice(string.punctuation) * rng.randint(1, 3)
            if rng.random() < 0.1:
                word = word.capitalize()
            words.append(word)
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice(".!?,;:") + rng.choice(["", "\n"]))
    lines.append(string.printable)
    return lines


def build_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """Train the byte-level BPE tokenizer; returns a ``tokenizers.Tokenizer``.

    The special tokens take the last ``len(SPECIAL_TOKENS)`` ids of ``vocab_size``. Encoding
    adds ``<|begin_of_text|>`` in front, as Llama 4's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    learned = tokenizer.get_vocab_size()
    if learned != vocab_size - len(SPECIAL_TOKENS):
        raise RuntimeError(
            f"BPE training learned {learned} tokens, wanted {vocab_size - len(SPECIAL_TOKENS)}:"
            " the synthetic corpus is too small for this vocab_size"
        )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def text_config(
    *,
    hidden_size: int = 256,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 64,
    num_local_experts: int = 4,
    num_experts_per_tok: int = 1,
    intermediate_size: int = 256,
    interleave_moe_layer_step: int = 1,
    attention_chunk_size: int = 8192,
    no_rope_layer_interval: int = 4,
    vocab_size: int = 4096,
    max_position_embeddings: int = 10485760,
) -> Any:
    """The ``Llama4TextConfig`` of the model (no weights, no tokenizer needed).

    Args:
        hidden_size: model width.
        num_hidden_layers: decoder layers.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention).
        head_dim: size of one attention head. Not validated on purpose: vLLM CPU supports
            head sizes 32, 64, 80, ... and a model with ``head_dim=16`` is how the self-tests
            get a server that starts but fails its first request.
        num_local_experts: routed experts per MoE layer (each MoE layer also has one shared
            expert).
        num_experts_per_tok: routed experts per token (top-k).
        intermediate_size: width of each expert's MLP; dense layers use twice this.
        interleave_moe_layer_step: every this-many-th layer is MoE, the others dense. 1 (every
            layer MoE) is Scout; 2 is Maverick.
        attention_chunk_size: chunk of the local attention of the RoPE layers (Scout: 8192).
        no_rope_layer_interval: every this-many-th layer is a global attention layer without
            RoPE (Scout: 4).
        vocab_size: tokens in the vocabulary, the special tokens included.
        max_position_embeddings: Scout's 10485760 by default, so a deployment must set
            ``--max-model-len``. vLLM sizes its RoPE cos/sin table by this value, not by
            ``--max-model-len``: at 10485760 positions and ``head_dim=64`` it is 1.25 GiB
            (bf16) held for the server's lifetime, built through several GiB of float32
            temporaries that take 10-150 s of a busy 2-core machine at startup. A CPU run that
            does not need more than, say, 131072 positions starts faster with that value.
    """
    from transformers import Llama4TextConfig

    # The tokenizer's special tokens take the last ids of the vocabulary (build_tokenizer).
    ids = {t: vocab_size - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
    config = Llama4TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        intermediate_size_mlp=2 * intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=[ids[END_OF_TEXT_TOKEN], ids[EOM_TOKEN], ids[EOT_TOKEN]],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=False,
        num_local_experts=num_local_experts,
        num_experts_per_tok=num_experts_per_tok,
        interleave_moe_layer_step=interleave_moe_layer_step,
        use_qk_norm=True,
        no_rope_layers=[
            int((i + 1) % no_rope_layer_interval != 0) for i in range(num_hidden_layers)
        ],
        no_rope_layer_interval=no_rope_layer_interval,
        attention_chunk_size=attention_chunk_size,
        attn_temperature_tuning=True,
        floor_scale=8192,
        attn_scale=0.1,
        # Scout's RoPE: Llama 3 scaling by 16 of an 8192-token original context.
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    )
    config.architectures = ["Llama4ForCausalLM"]
    return config


def config(**options: int) -> dict[str, Any]:
    """The ``config.json`` that ``build`` writes for these options."""
    from transformers.utils import logging as hf_logging

    options = {k: v for k, v in options.items() if k not in ("seed", "tokenizer_seed")}
    # Scout's own RoPE parameters make transformers warn on every config it builds.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return text_config(**options).to_dict()  # type: ignore[no-any-return]
    finally:
        hf_logging.set_verbosity(level)


def build(out_dir: Path, *, seed: int = 0, tokenizer_seed: int = 0, **shape: int) -> None:
    """Write the model directory (config, safetensors weights, tokenizer, chat template).

    ``seed`` seeds the random weights; ``tokenizer_seed`` the tokenizer's training corpus
    (kept apart so models with different weights tokenize text the same way). ``shape``
    takes the options of :func:`text_config`.
    """
    import torch
    from transformers import Llama4ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = text_config(**shape)
    tokenizer = build_tokenizer(config.vocab_size, tokenizer_seed)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    if ids[BOS_TOKEN] != config.bos_token_id:
        raise RuntimeError("the tokenizer's special tokens are not at the end of its vocabulary")

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(config)
    with torch.no_grad():
        # Greedy decoding then never picks a special token: random logits of the ordinary
        # tokens are almost surely above 0 somewhere, so completions run to max_tokens.
        model.lm_head.weight[config.vocab_size - len(SPECIAL_TOKENS) :] = 0
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out_dir, safe_serialization=True)

    write_tokenizer(
        out_dir, config.vocab_size, config.max_position_embeddings, tokenizer, config.eos_token_id
    )


def write_tokenizer(
    out_dir: Path,
    vocab_size: int,
    max_length: int,
    tokenizer: Any = None,
    eos_ids: Sequence[int] | None = None,
) -> None:
    """Write the tokenizer (trained now unless given), its config and a generation config.

    The generation config has no sampling defaults on purpose: vLLM would apply them to
    every request.
    """
    tokenizer = tokenizer or build_tokenizer(vocab_size)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    if eos_ids is None:
        eos_ids = [ids[END_OF_TEXT_TOKEN], ids[EOM_TOKEN], ids[EOT_TOKEN]]
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": ids[BOS_TOKEN],
            "eos_token_id": list(eos_ids),
            "pad_token_id": ids[PAD_TOKEN],
        },
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    # Written by hand so transformers 4.x and 5.x both load it as PreTrainedTokenizerFast.
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOT_TOKEN,
            "pad_token": PAD_TOKEN,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": max_length,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOT_TOKEN, "pad_token": PAD_TOKEN},
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_conformance.models.tiny",
        description="Build the tiny-llama4 model and print its directory.",
    )
    parser.add_argument(
        "--out", type=Path, help="build into this directory instead of the modelgen cache"
    )
    for name, help_ in (
        ("seed", "weights seed"),
        ("tokenizer-seed", "tokenizer corpus seed"),
        ("hidden-size", None),
        ("num-hidden-layers", None),
        ("num-attention-heads", None),
        ("num-key-value-heads", None),
        ("head-dim", "16 gives a model vLLM CPU starts but cannot run"),
        ("num-local-experts", None),
        ("num-experts-per-tok", None),
        ("intermediate-size", None),
        ("interleave-moe-layer-step", None),
        ("attention-chunk-size", None),
        ("no-rope-layer-interval", None),
        ("vocab-size", None),
        ("max-position-embeddings", None),
    ):
        parser.add_argument(f"--{name}", type=int, help=help_)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build (or find in the cache) the model and print its path."""
    args = _parse_args(argv)
    # Only options given on the command line, so the cache key matches the matrix's.
    options = {k: v for k, v in vars(args).items() if k != "out" and v is not None}
    if args.out is not None:
        build(args.out, **options)
        path = args.out
    else:
        from vllm_conformance import models

        path = models.materialize("tiny-llama4", options)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
