"""Verdicts shared by the suites, with failure messages an operator can act on."""

from __future__ import annotations

from vllm_conformance.client.calls import Outcome


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
