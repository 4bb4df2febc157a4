"""Long requests: each under a deadline derived from the entry, each counted as a prefill.

**Deadlines.** A request that can never fit the KV cache is retried forever by some vLLM
versions, and a very long prompt can stall the engine: neither may wait for the generic
request timeout. Every long request gets the bound
:func:`vllm_conformance.perf.estimate.request_deadline_seconds` computes from the entry
(prefill FLOPs of its model on its GPUs, decode steps, request overhead). Past it the
request fails with :class:`RequestHang`, which names the bound, how it was derived, and
what the server's ``/metrics`` say the request is doing (waiting for KV space, or running
in an engine that stopped answering).

**Prefills.** What makes a long-context run long is the number of full-length prefills.
Around every long request, vLLM's prefix-cache counters (``vllm:prefix_cache_queries`` and
``vllm:prefix_cache_hits``, in tokens) are read, so the :class:`PrefillLedger` knows how
many prompt tokens each request computed and how many the cache served. A request (or a
batch sent together) counts ``round(computed / max_model_len)`` full prefills. The counts
assume nothing else sends requests to the server meanwhile.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from vllm_conformance.client import calls
from vllm_conformance.launch.endpoint import Endpoint, ServerDiedError
from vllm_conformance.matrix import Deployment
from vllm_conformance.perf import estimate
from vllm_conformance.perf.server_metrics import MetricsSnapshot, scrape_metrics
from vllm_conformance.progress import EntryProgress

QUERIES = "vllm:prefix_cache_queries"
HITS = "vllm:prefix_cache_hits"


class RequestHang(AssertionError):
    """A long request did not finish within the bound derived from its entry."""


@dataclass(frozen=True)
class Prefill:
    """The prompt tokens one request (or a batch sent together) made the engine compute."""

    check: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int
    full_prefills: int
    #: wall time from sending to the last answer
    seconds: float


@dataclass
class PrefillLedger:
    """Every long request of one entry, with what the prefix cache served."""

    max_model_len: int
    items: list[Prefill] = field(default_factory=list)
    #: why the counts are unknown (the server exposes no prefix-cache counters), else None
    unmeasured: str | None = None

    @property
    def full_prefills(self) -> int:
        return sum(i.full_prefills for i in self.items)

    def add(
        self,
        check: str,
        requests: int,
        prompt_tokens: int,
        queried: float,
        hit: float,
        seconds: float,
    ) -> None:
        computed = int(queried - hit)
        full = round(computed / self.max_model_len)
        self.items.append(
            Prefill(check, requests, prompt_tokens, int(hit), computed, full, seconds)
        )

    def as_measured(self) -> dict[str, Any]:
        computed = sum(i.computed_tokens for i in self.items)
        return {
            "full_prefills": self.full_prefills,
            "full_prefill_requests": [i.check for i in self.items if i.full_prefills],
            "long_requests": sum(i.requests for i in self.items),
            "computed_tokens": computed,
            "cached_tokens": sum(i.cached_tokens for i in self.items),
            "full_prefill_equivalents": round(computed / self.max_model_len, 2),
            "requests": [asdict(i) for i in self.items],
        }


@dataclass
class LongRequests:
    """Sends an entry's long requests under their deadlines and books them in a ledger."""

    endpoint: Endpoint
    entry: Deployment
    ledger: PrefillLedger
    #: where each long request shows as a phase (a 3M-token prefill takes minutes)
    progress: EntryProgress | None = None

    def deadline(
        self, prompt_tokens: int, output_tokens: int, requests: int = 1
    ) -> tuple[float, str]:
        """The bound for these requests, and how it was derived (for the failure message)."""
        bound = estimate.request_deadline_seconds(
            self.entry, prompt_tokens, output_tokens, requests
        )
        if bound is None:
            return self.endpoint.request_timeout, "the request timeout (model shape unknown)"
        how = (
            f"{estimate.HANG_FACTOR:g} x the planned time on {self.entry.hardware.count} x "
            f"{self.entry.hardware.gpu} + {estimate.HANG_SLACK_SECONDS:.0f} s, perf.estimate"
        )
        return bound, how

    def _counters(self) -> MetricsSnapshot | None:
        if self.ledger.unmeasured is not None:
            return None
        try:
            snap = scrape_metrics(self.endpoint.base_url, headers=self.endpoint.headers())
        except httpx.HTTPError as exc:
            self.ledger.unmeasured = f"/metrics did not answer: {exc}"
            return None
        if QUERIES not in snap.counters or HITS not in snap.counters:
            self.ledger.unmeasured = f"/metrics has no {QUERIES} and {HITS} counters"
            return None
        return snap

    def send(
        self,
        check: str,
        path: str,
        body: dict[str, Any],
        prompt_tokens: int,
        first_token: bool = False,
    ) -> calls.Outcome:
        """One long request; ``prompt_tokens`` is what the client built."""
        return self.send_together(check, [(path, body)], prompt_tokens, first_token)[0]

    def send_together(
        self,
        check: str,
        requests: list[tuple[str, dict[str, Any]]],
        prompt_tokens: int,
        first_token: bool = False,
    ) -> list[calls.Outcome]:
        """Requests of ``prompt_tokens`` each, all in flight at once."""
        outputs = 1 if first_token else max(int(b.get("max_tokens") or 16) for _, b in requests)
        bound, how = self.deadline(prompt_tokens, outputs, len(requests))
        before = self._counters()
        started = time.monotonic()

        def one(request: tuple[str, dict[str, Any]]) -> calls.Outcome:
            path, body = request
            try:
                with self.endpoint.http(timeout=bound) as http:
                    return calls.post(http, path, body, first_token)
            except httpx.TimeoutException:
                raise self._hang(check, prompt_tokens, outputs, bound, how) from None

        with ThreadPoolExecutor(len(requests)) as pool, self._phase(check, prompt_tokens, requests):
            outcomes = list(pool.map(one, requests))
        seconds = time.monotonic() - started
        after = self._counters() if before is not None else None
        if before is not None and after is not None:
            self.ledger.add(
                check,
                len(requests),
                prompt_tokens,
                after.counters[QUERIES] - before.counters[QUERIES],
                after.counters[HITS] - before.counters[HITS],
                seconds,
            )
        return outcomes

    def _phase(
        self, check: str, prompt_tokens: int, requests: list[Any]
    ) -> AbstractContextManager[Any]:
        if self.progress is None:
            return nullcontext()
        planned = estimate.prefill_seconds(self.entry, prompt_tokens)
        return self.progress.phase(
            f"prefill {check} ({len(requests)} x {prompt_tokens:,} tokens)",
            planned_s=planned * len(requests) if planned is not None else None,
        )

    def _hang(
        self, check: str, prompt_tokens: int, outputs: int, bound: float, how: str
    ) -> BaseException:
        try:
            self.endpoint.check_alive()
        except ServerDiedError as exc:
            return exc
        return RequestHang(
            f"{check}: no answer within {bound:.0f} s, the bound for {prompt_tokens:,} prompt "
            f"plus {outputs:,} output tokens on {self.entry.id} ({how}): {self._doing()}"
        )

    def _doing(self) -> str:
        """What ``/metrics`` says the engine is doing with the request."""
        try:
            gauges = scrape_metrics(
                self.endpoint.base_url, headers=self.endpoint.headers(), timeout_s=5
            ).gauges
        except httpx.HTTPError as exc:
            return f"the server stopped answering /metrics too ({exc})"
        waiting = gauges.get("vllm:num_requests_waiting", 0)
        running = gauges.get("vllm:num_requests_running", 0)
        usage = gauges.get("vllm:kv_cache_usage_perc")
        state = f"{running:.0f} running, {waiting:.0f} waiting"
        if usage is not None:
            state += f", KV cache {usage:.0%} used"
        if waiting and not running:
            return f"it waits and is never scheduled ({state}): it cannot get KV space"
        if waiting:
            return f"requests wait for KV space or a slot ({state})"
        return f"the engine reports {state} and produced nothing in time: it stalled"
