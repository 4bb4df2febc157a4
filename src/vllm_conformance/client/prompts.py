"""Prompts of an exact token count, counted with the served model's own tokenizer.

Three forms, as a client would send them:

- token ids (``prompt: [ids]`` on ``/v1/completions``): exactly ``n`` ids, no special tokens
  added by the server;
- text on ``/v1/completions``: the server adds the tokenizer's special tokens (BOS), so the
  text is sized for ``n`` tokens *including* them;
- chat messages: the chat template's tokens are counted too.

**One token sequence under every form.** For a seed, every prompt is a prefix of one
sequence: the chat template's tokens before a user message, an anchor word, then words
that are single tokens with a leading space (which every byte-level BPE pre-tokenizer
splits apart again). The token-id prompt of ``n`` tokens is its first ``n`` tokens, the text
prompt decodes to exactly those tokens, and a chat request's tokens are the same up to the
template's closing tokens. So vLLM's prefix cache serves every form after the first long
prompt of a seed; only different seeds cost another full prefill. The anchor starts the
user message with a letter, so templates that trim the message (Llama 4's) keep its tokens.

Prompts are built once and cached by (tokenizer, length, form, seed); each is checked
against the tokenizer once, token for token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

Messages = list[dict[str, str]]

#: The first word of every user message (no leading space: see the module docstring).
ANCHOR = "Context:"
_CACHE = 16


class PromptBuildError(RuntimeError):
    """No prompt of the requested length could be built with this tokenizer."""


@lru_cache(maxsize=8)
def _word_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of vocabulary entries that are one space plus ASCII letters."""
    special = set(tokenizer.all_special_ids)
    words = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        body = text[1:]
        if text.startswith(" ") and 2 <= len(body) <= 12 and body.isascii() and body.isalpha():
            words.append(token_id)
    if len(words) < 50:
        raise PromptBuildError("tokenizer has too few ' word' tokens to build exact prompts")
    return tuple(words)


def _words(tokenizer: Any, seed: int, count: int) -> list[int]:
    """``count`` word ids; the first ``k`` are the same for any ``count >= k``."""
    return random.Random(seed).choices(_word_ids(tokenizer), k=max(count, 0))


def _ids(value: Any) -> list[int]:
    if isinstance(value, dict) or hasattr(value, "input_ids"):
        value = value["input_ids"]
    return list(value)


def chat_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Prompt tokens of a chat request, as the server builds them (generation prompt on)."""
    try:
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
    except ValueError as exc:  # transformers: no chat template
        raise PromptBuildError(f"cannot apply the chat template: {exc}") from None
    return _ids(rendered)


def chat_token_count(tokenizer: Any, messages: Messages) -> int:
    return len(chat_ids(tokenizer, messages))


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Prompt tokens of a text completion, as the server counts them (special tokens added)."""
    return _ids(tokenizer(text, add_special_tokens=True))


@lru_cache(maxsize=8)
def _head(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tokens every prompt starts with, tokens that close a chat user message).

    The head is what the chat template writes before the message, plus the anchor; when the
    template does not begin with the special tokens the tokenizer adds to text, the head is
    those tokens plus the anchor, and chat requests share no prefix with completions.
    """
    added = text_ids(tokenizer, "")
    try:
        one = chat_ids(tokenizer, [{"role": "user", "content": ANCHOR}])
    except PromptBuildError:
        return (*added, *text_ids(tokenizer, ANCHOR)[len(added) :]), ()
    word = _word_ids(tokenizer)[0]
    two = chat_ids(tokenizer, [{"role": "user", "content": ANCHOR + tokenizer.decode([word])}])
    cut = next((i for i, (a, b) in enumerate(zip(one, two, strict=False)) if a != b), len(one))
    closing = tuple(one[cut:])
    if two != [*one[:cut], word, *closing] or one[: len(added)] != added:
        return (*added, *text_ids(tokenizer, ANCHOR)[len(added) :]), closing
    return tuple(one[:cut]), closing


@lru_cache(maxsize=_CACHE)
def _token_ids(tokenizer: Any, n: int, seed: int) -> tuple[int, ...]:
    head = _head(tokenizer)[0]
    if n < len(head):
        raise PromptBuildError(f"a prompt of {n} tokens is shorter than its {len(head)}-token head")
    return (*head, *_words(tokenizer, seed, n - len(head)))


def token_ids(tokenizer: Any, n: int, seed: int = 0) -> list[int]:
    """The first ``n`` tokens of the seed's sequence (ids for ``/v1/completions``)."""
    return list(_token_ids(tokenizer, n, seed))


@lru_cache(maxsize=_CACHE)
def completion_text(tokenizer: Any, n: int, seed: int = 0) -> str:
    """Text that ``/v1/completions`` turns into :func:`token_ids` (BOS included)."""
    ids = _token_ids(tokenizer, n, seed)
    added = len(text_ids(tokenizer, ""))
    text = tokenizer.decode(ids[added:])
    back = text_ids(tokenizer, text)
    if back != list(ids):
        where = next((i for i, (a, b) in enumerate(zip(back, ids, strict=False)) if a != b), None)
        raise PromptBuildError(
            f"text of {n} tokens does not tokenize back to them ({len(back)} tokens, first "
            f"difference at position {where})"
        )
    return text


@lru_cache(maxsize=_CACHE)
def _chat(
    tokenizer: Any, n: int, seed: int, history: tuple[tuple[str, str], ...]
) -> tuple[tuple[tuple[str, str], ...], tuple[int, ...]]:
    """(role, content) pairs of the messages, and their tokens with the template."""

    def messages(words: int) -> Messages:
        content = ANCHOR + tokenizer.decode(_words(tokenizer, seed, words))
        earlier = [{"role": r, "content": c} for r, c in history]
        return [*earlier, {"role": "user", "content": content}]

    # Each word is one token wherever it stands, so the count grows one per word.
    words = n - chat_token_count(tokenizer, messages(0))
    built = messages(words)
    ids = chat_ids(tokenizer, built)
    if words < 0 or len(ids) != n:
        raise PromptBuildError(f"could not build a chat prompt of exactly {n} tokens")
    return tuple((m["role"], m["content"]) for m in built), tuple(ids)


def _history_key(history: Sequence[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in history)


def chat_messages(
    tokenizer: Any, n: int, seed: int = 0, history: Sequence[dict[str, str]] = ()
) -> Messages:
    """``history`` plus one user message, ``n`` tokens in all with the chat template.

    Without history, the request's tokens are :func:`token_ids` of the same seed up to the
    template's closing tokens.
    """
    pairs = _chat(tokenizer, n, seed, _history_key(history))[0]
    return [{"role": r, "content": c} for r, c in pairs]


def chat_prompt_ids(
    tokenizer: Any, n: int, seed: int = 0, history: Sequence[dict[str, str]] = ()
) -> list[int]:
    """The tokens of :func:`chat_messages` (as counted when it was built)."""
    return list(_chat(tokenizer, n, seed, _history_key(history))[1])
