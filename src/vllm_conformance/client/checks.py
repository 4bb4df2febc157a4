"""Verdicts shared by the suites, with failure messages an operator can act on."""

from __future__ import annotations

import httpx

from vllm_conformance.client.calls import Outcome
from vllm_conformance.client.errors import describe_error


class RejectionError(AssertionError):
    """A request that must be refused was not refused cleanly."""


def assert_clean_rejection(outcome: Outcome, limit: int) -> None:
    """HTTP 400 with an OpenAI-style error body whose message names ``limit``.

    Asserts on status, error type and the limit's number, not on wording: vLLM rewords its
    messages between versions (the wording is recorded in the report instead).
    """
    body = outcome.body_excerpt or (outcome.stream_error and outcome.stream_error.message)
    if outcome.status >= 500:
        raise RejectionError(
            f"over-limit request got a server error (HTTP {outcome.status}) instead of a "
            f"clean 400: {body}"
        )
    if outcome.status != 400:
        raise RejectionError(f"over-limit request got HTTP {outcome.status}, not 400: {body}")
    if outcome.error is None:
        raise RejectionError(f"HTTP 400 without an OpenAI-style error body: {body}")
    if not outcome.error.type:
        raise RejectionError(f"error body has no 'type': {body}")
    if str(limit) not in outcome.error.message.replace(",", ""):
        raise RejectionError(
            f"error message does not name the limit {limit}: {outcome.error.message!r}"
        )


class TokenCountError(AssertionError):
    """The server counts a prompt's tokens differently from the client's tokenizer."""


def assert_tokenize_agrees(response: httpx.Response, local: list[int]) -> None:
    """The server's ``/tokenize`` answer holds exactly the tokens the client counted.

    A client tokenizer that drifts from the server's makes every exact-length check
    meaningless, so a difference is a failure of its own, named with both counts.
    """
    if response.status_code != 200:
        raise TokenCountError(
            f"/tokenize answered HTTP {response.status_code}: "
            f"{describe_error(response.status_code, response.content)[:300]}"
        )
    data = response.json()
    count, tokens = data.get("count"), data.get("tokens")
    if count != len(local):
        raise TokenCountError(
            f"the server's /tokenize counts {count} tokens, the local tokenizer {len(local)}"
        )
    if tokens is not None and list(tokens) != local:
        where = next(i for i, (a, b) in enumerate(zip(tokens, local, strict=False)) if a != b)
        raise TokenCountError(
            f"the server's /tokenize gives other tokens than the local tokenizer from "
            f"position {where} on ({tokens[where]} vs {local[where]}), both {count} long"
        )
