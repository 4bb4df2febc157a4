"""Prompts of an exact token count, counted with the served model's own tokenizer.

Three forms, as a client would send them:

- token ids (``prompt: [ids]`` on ``/v1/completions``): exactly ``n`` ids, no special tokens
  added by the server;
- text on ``/v1/completions``: the server adds the tokenizer's special tokens (BOS), so the
  text is sized for ``n`` tokens *including* them;
- chat messages: the chat template's tokens are counted too.

Text is built from words that are single tokens with a leading space, which every
byte-level BPE pre-tokenizer splits apart again, then corrected word by word until the
tokenizer agrees. Seeded, so the same call gives the same prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

Messages = list[dict[str, str]]


class PromptBuildError(RuntimeError):
    """No prompt of the requested length could be built with this tokenizer."""


@lru_cache(maxsize=8)
def _word_tokens(tokenizer: Any) -> tuple[tuple[int, str], ...]:
    """(id, text) of vocabulary entries that are one space plus ASCII letters."""
    special = set(tokenizer.all_special_ids)
    words = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        body = text[1:]
        if text.startswith(" ") and 2 <= len(body) <= 12 and body.isascii() and body.isalpha():
            words.append((token_id, text))
    if len(words) < 50:
        raise PromptBuildError("tokenizer has too few ' word' tokens to build exact prompts")
    return tuple(words)


def token_ids(tokenizer: Any, n: int, seed: int = 0) -> list[int]:
    """``n`` token ids of ordinary words (no special tokens)."""
    rng = random.Random(seed)
    words = _word_tokens(tokenizer)
    return [rng.choice(words)[0] for _ in range(n)]


def _fit(count: Callable[[list[str]], int], n: int, seed: int, tokenizer: Any) -> list[str]:
    """Words whose assembled prompt ``count``s exactly ``n`` tokens."""
    rng = random.Random(seed)
    words = [w for _, w in _word_tokens(tokenizer)]
    pieces = [rng.choice(words) for _ in range(max(n - count([]), 0))]
    for _ in range(64):
        have = count(pieces)
        if have == n:
            return pieces
        if have < n:
            pieces += [rng.choice(words) for _ in range(n - have)]
        else:
            del pieces[max(len(pieces) - (have - n), 0) :]
            if not pieces and count(pieces) > n:
                break
    raise PromptBuildError(f"could not build a prompt of exactly {n} tokens")


def completion_text(tokenizer: Any, n: int, seed: int = 0) -> str:
    """Text that ``/v1/completions`` counts as exactly ``n`` prompt tokens (BOS included)."""

    def count(pieces: list[str]) -> int:
        return len(tokenizer("".join(pieces), add_special_tokens=True)["input_ids"])

    return "".join(_fit(count, n, seed, tokenizer))


def chat_messages(
    tokenizer: Any, n: int, seed: int = 0, history: Sequence[dict[str, str]] = ()
) -> Messages:
    """``history`` plus one user message, ``n`` tokens in all with the chat template."""

    def messages(pieces: list[str]) -> Messages:
        return [*history, {"role": "user", "content": "".join(pieces)}]

    def count(pieces: list[str]) -> int:
        return chat_token_count(tokenizer, messages(pieces))

    return messages(_fit(count, n, seed, tokenizer))


def chat_token_count(tokenizer: Any, messages: Messages) -> int:
    """Prompt tokens of a chat request, as the server counts them (generation prompt on)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return len(ids)
