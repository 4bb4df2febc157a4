"""Recipe ``tiny-idefics3``: a tiny, randomly initialised vision-language model for vLLM CPU.

Llama 4's vision tower does not run on the vLLM CPU backend, and most vision-language models
of vLLM 0.32 cannot even be imported there, because their modules (or transformers image
processors they import, such as Pixtral's through LLaVA, Qwen2-VL's, Gemma 3's) need
torchvision, which breaks beside the CPU torch and is uninstalled. Idefics3 (SigLIP-style
vision tower, pixel-shuffle connector, Llama text model) imports without torchvision, has no
per-prompt image limit of its own (PaliGemma, BLIP-2 and GLM-4V allow one image), and vLLM
drives transformers' PIL image processor for it. So the multimodal suite serves a tiny one.

Images are resized to ``image_size`` pixels (no tiling), and each becomes
``(image_size / patch_size) ** 2 / scale_factor ** 2`` ``<image>`` tokens plus three wrapper
tokens, so a prompt with several images stays a few dozen tokens long. The tokenizer is the
byte-level BPE of :mod:`vllm_conformance.models.tiny` plus Idefics3's special tokens; the chat
template emits ``<image>`` for each image part. The weights are random (seeded) and, as in
``tiny-llama4``, the output rows of the special tokens are zero so greedy decoding always
runs to ``max_tokens``.

Use it through ``modelgen.materialize("tiny-idefics3", options)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_conformance.models import tiny

#: Bump when a change to this file changes what ``build`` writes (it is part of the cache key).
RECIPE_VERSION: int = 2

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
#: Idefics3's tokens, appended after the text vocabulary (tile tags included, unused here).
VISION_TOKENS: tuple[str, ...] = (
    FAKE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    END_OF_UTTERANCE_TOKEN,
    GLOBAL_IMAGE_TOKEN,
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)

#: The tiny-llama4 header format; image parts become <image> (vLLM expands it).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] | trim }}"
    "{%- else %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}"
    "{{- '<image>' }}"
    "{%- elif content['type'] == 'text' %}"
    "{{- content['text'] | trim }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}"
    "{%- endif %}"
)


def build(
    out_dir: Path,
    *,
    seed: int = 0,
    tokenizer_seed: int = 0,
    hidden_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 64,
    intermediate_size: int = 512,
    vocab_size: int = 4096,
    vision_hidden_size: int = 128,
    vision_layers: int = 2,
    vision_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    scale_factor: int = 2,
    max_position_embeddings: int = 32768,
) -> None:
    """Write the model directory (config, weights, tokenizer, processor, chat template).

    Args:
        out_dir: directory to write into (created if missing).
        seed: seeds the random weights.
        tokenizer_seed: seeds the tokenizer's training corpus.
        hidden_size: width of the text model.
        num_hidden_layers: decoder layers of the text model.
        num_attention_heads: query heads of the text model.
        num_key_value_heads: key/value heads of the text model.
        head_dim: text attention head size (one vLLM CPU supports: 32, 64, 80, ...).
        intermediate_size: MLP width of the text model.
        vocab_size: text tokens including the tiny-llama4 special tokens; Idefics3's
            tokens are added after them.
        vision_hidden_size: width of the vision tower.
        vision_layers: layers of the vision tower.
        vision_heads: attention heads of the vision tower.
        image_size: side of the square every image is resized (and padded) to.
        patch_size: vision patch side.
        scale_factor: pixel-shuffle factor of the connector; an image costs
            ``(image_size // patch_size) ** 2 // scale_factor ** 2`` ``<image>`` tokens.
        max_position_embeddings: positions of the text model.
    """
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if image_size % (patch_size * scale_factor):
        raise ValueError("image_size must be a multiple of patch_size * scale_factor")
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2

    raw = tiny.build_tokenizer(vocab_size, tokenizer_seed)
    raw.add_special_tokens(list(VISION_TOKENS))
    full_vocab = vocab_size + len(VISION_TOKENS)
    ids = {t: raw.token_to_id(t) for t in (*tiny.SPECIAL_TOKENS, *VISION_TOKENS)}
    eos_ids = [
        ids[tiny.END_OF_TEXT_TOKEN],
        ids[tiny.EOM_TOKEN],
        ids[tiny.EOT_TOKEN],
    ]

    text_config = LlamaConfig(
        vocab_size=full_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=ids[tiny.BOS_TOKEN],
        eos_token_id=eos_ids,
        pad_token_id=ids[tiny.PAD_TOKEN],
        tie_word_embeddings=False,
    )
    vision_config = Idefics3VisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = Idefics3Config(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=ids[IMAGE_TOKEN],
        scale_factor=scale_factor,
        pad_token_id=ids[tiny.PAD_TOKEN],
        tie_word_embeddings=False,
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]

    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    with torch.no_grad():
        # As in tiny-llama4: greedy decoding never picks a special or vision token.
        model.lm_head.weight[vocab_size - len(tiny.SPECIAL_TOKENS) :] = 0
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out_dir, safe_serialization=True)

    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": ids[tiny.BOS_TOKEN],
            "eos_token_id": eos_ids,
            "pad_token_id": ids[tiny.PAD_TOKEN],
        },
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=tiny.BOS_TOKEN,
        eos_token=tiny.EOT_TOKEN,
        pad_token=tiny.PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=max_position_embeddings,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out_dir))
    # vLLM reads add_bos_token and the chat template from the tokenizer config.
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.update(add_bos_token=True, add_eos_token=False, chat_template=CHAT_TEMPLATE)
    _write_json(config_path, tok_config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
