"""Async load generator for an OpenAI-compatible ``/v1/completions`` endpoint (aiohttp).

Per request it measures exactly what ``vllm bench serve`` measures (vLLM 0.32,
``async_request_openai_completions``):

- the clock starts just before the POST (``time.perf_counter``);
- TTFT: arrival of the first SSE message that carries ``choices`` (even with empty text);
- ITL: the gap between consecutive messages that carry ``choices``;
- E2EL (``latency``): from the start to the *last* message that carries ``choices`` (the
  trailing usage message and ``[DONE]`` are not counted);
- prompt and output token counts come from the final ``usage`` message
  (``stream_options.include_usage``);
- TPOT = (E2EL - TTFT) / (output_tokens - 1), for output_tokens > 1.

Two deliberate differences, both about failures: an error message inside an HTTP 200 stream
(vLLM sends ``data: {"error": ...}`` when generation fails after the stream started) marks
the request failed, where ``vllm bench serve`` would count it as a success; and an error
records the status code and the server's message rather than a traceback.

Load models, as in ``vllm bench serve``: a fixed maximum concurrency (a semaphore), and/or a
request rate with gamma-distributed gaps (``burstiness`` 1 = Poisson), pre-computed from a
seeded RNG and rescaled so the last arrival is at ``n / rate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import aiohttp
import numpy as np

from vllm_conformance.client import sse
from vllm_conformance.client.errors import describe_error
from vllm_conformance.perf.workload import RequestSpec, WorkloadSpec

#: Cap on the error text kept per request (a server can return a page of HTML).
MAX_ERROR_CHARS = 2000
#: How often the event-loop monitor wakes up; its overshoot is the loop's lag.
LOOP_PROBE_S = 0.01
#: The client is the bottleneck when its one Python thread is this busy ...
CLIENT_CPU_LIMIT = 0.9
#: ... or when the event loop or the sending of due requests lags, at the median, by more
#: than this share of what is measured (median ITL, median TTFT): a timestamp taken that late
#: is no longer the server's time. The p99s are reported, not judged: on a shared machine the
#: OS preempts any process now and then (a CI run on 2 cores beside the CPU server read a
#: 16.9 ms p99 dispatch lag against a 19.6 ms median TTFT), which moves tail latencies of
#: both clients alike (benchmarks/fidelity.py measures that side by side); a client that
#: cannot keep up is late on most requests, not a few.
LAG_SHARE_LIMIT = 0.25
#: Lags below this are timer noise whatever the latencies (a 1 ms ITL is not resolvable).
LAG_FLOOR_S = 0.002
#: ... or when its loop was late for more than this share of the run's wall time. The
#: probes' median cannot show a loop held for long stretches (held 3 s per request, it wakes
#: one probe late per hold and a hundred on time in between: median 0.5 ms); the held time
#: can (95 % there). On a 2-core VM beside the CPU server the OS alone held the loop 6-37 %
#: of a run (the process runnable, not running, for up to 1 s), hence three quarters.
LOOP_HELD_LIMIT = 0.75


@dataclass
class RequestResult:
    """What one request measured. Times are in seconds; ``start_time`` and
    ``scheduled_time`` are relative to the start of the run."""

    index: int
    success: bool = False
    prompt_len: int = 0
    expected_output_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    scheduled_time: float = 0.0
    #: from due to the moment a taken concurrency slot came free (0: a slot was free)
    queue_time: float = 0.0
    status: int | None = None
    error: str = ""
    generated_text: str = ""

    @property
    def dispatch_lag(self) -> float:
        """How late the POST went out after the request was due and had a free slot."""
        return max(0.0, self.start_time - self.scheduled_time - self.queue_time)

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (output_tokens - 1), or ``None`` when undefined."""
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_dict(self, *, keep_text: bool = False) -> dict[str, Any]:
        """JSON-safe form (text dropped unless asked for)."""
        d = asdict(self)
        if not keep_text:
            d.pop("generated_text")
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestResult:
        """Inverse of :meth:`to_dict`."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class LoadConfig:
    """How to send a list of requests.

    ``time_limit_s`` stops *sending* new requests; requests already sent get up to
    ``drain_timeout_s`` more to finish, and any still running then are cancelled and counted
    as failed (a request that slow is a finding, not noise). Requests never sent are counted
    in :attr:`RunResult.not_sent`.
    """

    max_concurrency: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    seed: int = 0
    num_warmups: int = 1
    max_requests: int | None = None
    time_limit_s: float | None = None
    drain_timeout_s: float = 600.0
    request_timeout_s: float = 6 * 60 * 60.0
    ignore_eos: bool = True
    temperature: float | None = 0.0
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 or None")
        if self.request_rate <= 0 or self.burstiness <= 0:
            raise ValueError("request_rate and burstiness must be > 0")

    @classmethod
    def from_workload(cls, spec: WorkloadSpec, **overrides: Any) -> LoadConfig:
        """The load model a :class:`WorkloadSpec` names."""
        base: dict[str, Any] = {
            "max_concurrency": spec.max_concurrency,
            "request_rate": spec.request_rate,
            "burstiness": spec.burstiness,
            "seed": spec.seed,
            "num_warmups": spec.num_warmups,
            "ignore_eos": spec.ignore_eos,
            "temperature": spec.temperature,
            "label": spec.name,
        }
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> LoadConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        d = asdict(self)
        d["extra_body"] = dict(self.extra_body)
        if math.isinf(self.request_rate):
            d["request_rate"] = "inf"
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(data)
        if d.get("request_rate") in ("inf", None):
            d["request_rate"] = math.inf
        return cls(**d)


@dataclass(frozen=True)
class GeneratorHealth:
    """Whether the load generator itself kept up, measured during the run.

    - ``loop_lag_*``: how late the event loop woke a probe that sleeps :data:`LOOP_PROBE_S`
      (a loop busy parsing streams wakes everything late, timestamps included);
    - ``loop_held_share``: the probes' lateness summed, per second of run: the share of the
      run the loop was busy or its process not scheduled;
    - ``dispatch_lag_*``: from the moment a request was due and allowed (its arrival time
      and a free concurrency slot) to its POST;
    - ``client_cpu``: CPU seconds of this process per second of run (1.0 = one core, all
      the asyncio loop can use).
    """

    loop_lag_p50_s: float
    loop_lag_p99_s: float
    loop_lag_max_s: float
    loop_held_share: float
    dispatch_lag_p50_s: float
    dispatch_lag_p99_s: float
    client_cpu: float

    def bottleneck(self, median_itl_s: float | None, median_ttft_s: float | None) -> str | None:
        """Why the client, not the server, may have set the numbers; None if it kept up."""
        if self.client_cpu >= CLIENT_CPU_LIMIT:
            return f"the load generator used {self.client_cpu:.0%} of its one core"
        if self.loop_held_share > LOOP_HELD_LIMIT:
            return (
                f"the load generator's event loop was held {self.loop_held_share:.0%} of the "
                f"run (its CPU: {self.client_cpu:.0%} of a core; the rest, not scheduled)"
            )
        for what, lag, measured in (
            ("median event-loop lag", self.loop_lag_p50_s, median_itl_s),
            ("median dispatch lag", self.dispatch_lag_p50_s, median_ttft_s),
        ):
            limit = max(LAG_FLOOR_S, LAG_SHARE_LIMIT * (measured or 0.0))
            if lag > limit:
                return (
                    f"the load generator's {what} was {lag * 1000:.1f} ms, above "
                    f"{limit * 1000:.1f} ms ({LAG_SHARE_LIMIT:.0%} of the median it measures)"
                )
        return None


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the objects that exist now out of the garbage collector's scans while inside.

    A pytest process holds about half a million objects (transformers, the plugins, the
    collected tests); each full collection scanned them all and stopped the event loop for
    about 0.2 s, a stop that landed in the latencies measured. vLLM's engine core freezes
    its heap after start-up for the same reason.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    if not values:
        return 0.0, 0.0, 0.0
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99), float(max(values))


class _LoopMonitor:
    """Samples the event loop's lag until stopped."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(LOOP_PROBE_S)
            self.lags.append(max(0.0, time.perf_counter() - before - LOOP_PROBE_S))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclass
class RunResult:
    """One run: the per-request results (warm-up excluded) and the run's bounds."""

    config: LoadConfig
    base_url: str
    model: str
    results: list[RequestResult]
    duration_s: float
    started_at: str = ""
    not_sent: int = 0
    time_limited: bool = False
    client_cpu_s: float = 0.0
    warmup_failed: int = 0
    health: GeneratorHealth | None = None

    @property
    def failures(self) -> list[RequestResult]:
        """The failed requests."""
        return [r for r in self.results if not r.success]

    def to_dict(self, *, keep_text: bool = False) -> dict[str, Any]:
        """JSON-safe form with every raw sample."""
        return {
            "config": self.config.to_dict(),
            "base_url": self.base_url,
            "model": self.model,
            "duration_s": self.duration_s,
            "started_at": self.started_at,
            "not_sent": self.not_sent,
            "time_limited": self.time_limited,
            "client_cpu_s": self.client_cpu_s,
            "warmup_failed": self.warmup_failed,
            "health": asdict(self.health) if self.health else None,
            "results": [r.to_dict(keep_text=keep_text) for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            config=LoadConfig.from_dict(data["config"]),
            base_url=data["base_url"],
            model=data["model"],
            results=[RequestResult.from_dict(r) for r in data["results"]],
            duration_s=float(data["duration_s"]),
            started_at=data.get("started_at", ""),
            not_sent=int(data.get("not_sent", 0)),
            time_limited=bool(data.get("time_limited", False)),
            client_cpu_s=float(data.get("client_cpu_s", 0.0)),
            warmup_failed=int(data.get("warmup_failed", 0)),
            health=GeneratorHealth(**data["health"]) if data.get("health") else None,
        )


@dataclass(frozen=True)
class Progress:
    """A progress report, given to the ``progress`` callback after each request."""

    done: int
    failed: int
    total: int
    elapsed_s: float
    label: str = ""


ProgressCallback = Callable[[Progress], None]


def arrival_offsets(
    n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> np.ndarray:
    """When each request is due, in seconds from the start: vLLM's ``get_request`` schedule.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)); the cumulative sum is
    rescaled so the last request is due at ``n / rate`` (vLLM does this to steady the
    achieved rate across seeds). ``inf`` rate: all due at 0.
    """
    if n <= 0:
        return np.zeros(0)
    if math.isinf(request_rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / request_rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    offsets = np.cumsum(gaps)
    if offsets[-1] > 0:
        offsets *= (n / request_rate) / offsets[-1]
    return offsets


def _headers(extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    api_key = os.environ.get("OPENAI_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if extra:
        headers.update(extra)
    return headers


def completion_payload(model: str, req: RequestSpec, config: LoadConfig) -> dict[str, Any]:
    """The JSON body sent for one request (the same fields ``vllm bench serve`` sends)."""
    payload: dict[str, Any] = {
        "model": model,
        "prompt": req.prompt,
        "repetition_penalty": 1.0,
        "max_tokens": req.output_len,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.temperature is not None:
        payload["temperature"] = config.temperature
    if config.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(config.extra_body)
    return payload


async def send_completion(
    session: aiohttp.ClientSession,
    url: str,
    payload: Mapping[str, Any],
    result: RequestResult,
    *,
    t0: float,
    headers: Mapping[str, str] | None = None,
) -> RequestResult:
    """Send one streaming completion and fill ``result`` in place (also returned).

    ``result`` is filled as the stream arrives, so a caller that cancels the task still
    holds what was measured so far.
    """
    st = time.perf_counter()
    result.start_time = st - t0
    last = st
    first = False
    text_parts: list[str] = []
    try:
        async with session.post(url, json=payload, headers=_headers(headers)) as resp:
            result.status = resp.status
            if resp.status != 200:
                msg = describe_error(resp.status, await resp.text()) or (resp.reason or "")
                result.error = f"HTTP {resp.status}: {msg}"[:MAX_ERROR_CHARS]
                return result
            stream = sse.SSEBuffer()
            # Raw chunks: the buffer needs the blank lines that end each message.
            async for chunk in resp.content.iter_any():
                for data in sse.events(stream.add(chunk)):
                    if sse.is_error(data):
                        error = describe_error(200, data)
                        result.error = f"stream error: {error}"[:MAX_ERROR_CHARS]
                        continue
                    if choices := data.get("choices"):
                        now = time.perf_counter()
                        if not first:
                            first = True
                            result.ttft = now - st
                        else:
                            result.itl.append(now - last)
                        last = now
                        text_parts.append(choices[0].get("text") or "")
                    elif usage := data.get("usage"):
                        result.output_tokens = int(usage.get("completion_tokens") or 0)
                        if (pt := usage.get("prompt_tokens")) is not None:
                            result.prompt_len = int(pt)
            result.latency = last - st
            result.generated_text = "".join(text_parts)
            if result.error:
                return result
            if not first:
                result.error = "no chunk with choices received (cannot compute TTFT)"
                return result
            if result.output_tokens == 0:
                # No usage message: fall back to one token per content message.
                result.output_tokens = 1 + len(result.itl)
            result.success = True
    except asyncio.CancelledError:
        result.error = result.error or "cancelled: still running at the drain timeout"
        raise
    except asyncio.TimeoutError:
        result.error = "timeout: request exceeded request_timeout_s"
    except Exception as exc:  # every failure is a result, never a crash of the run
        result.error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    return result


def _session(config: LoadConfig) -> aiohttp.ClientSession:
    limit = config.max_concurrency or 0
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=limit,
        ttl_dns_cache=300,
        keepalive_timeout=60,
        enable_cleanup_closed=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=True,
        timeout=aiohttp.ClientTimeout(total=config.request_timeout_s),
    )


def _completions_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    if base.endswith("/v1/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/completions"
    return base + "/v1/completions"


async def run_load(
    base_url: str,
    model: str,
    requests: Sequence[RequestSpec],
    config: LoadConfig,
    *,
    progress: ProgressCallback | None = None,
    headers: Mapping[str, str] | None = None,
) -> RunResult:
    """Send ``requests`` under ``config`` and return every measured request.

    Warm-up requests (``config.num_warmups``, the first requests of the list, cycled) run
    first under the same concurrency limit and are excluded from the results.
    """
    with _frozen_heap():
        return await _run_load(base_url, model, requests, config, progress, headers)


async def _run_load(
    base_url: str,
    model: str,
    requests: Sequence[RequestSpec],
    config: LoadConfig,
    progress: ProgressCallback | None,
    headers: Mapping[str, str] | None,
) -> RunResult:
    url = _completions_url(base_url)
    todo = list(requests[: config.max_requests] if config.max_requests else requests)
    if not todo:
        raise ValueError("no requests to send")
    sem: asyncio.Semaphore | contextlib.nullcontext[None] = (
        asyncio.Semaphore(config.max_concurrency)
        if config.max_concurrency
        else contextlib.nullcontext()
    )
    async with _session(config) as session:
        warmup_failed = 0
        if config.num_warmups > 0:

            async def warm(i: int) -> RequestResult:
                req = todo[i % len(todo)]
                async with sem:
                    return await send_completion(
                        session,
                        url,
                        completion_payload(model, req, config),
                        RequestResult(index=-1 - i),
                        t0=time.perf_counter(),
                        headers=headers,
                    )

            warm_results = await asyncio.gather(*(warm(i) for i in range(config.num_warmups)))
            warmup_failed = sum(not r.success for r in warm_results)

        offsets = arrival_offsets(len(todo), config.request_rate, config.burstiness, config.seed)
        results: list[RequestResult] = []
        counts = {"done": 0, "failed": 0}
        monitor = _LoopMonitor()
        monitor.start()
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        deadline = t0 + config.time_limit_s if config.time_limit_s is not None else math.inf

        async def one(req: RequestSpec, result: RequestResult) -> None:
            # Only a wait for a taken slot is queueing; the time from due to this task's
            # first step (the loop creating the other tasks, say) is the client's lag.
            must_wait = isinstance(sem, asyncio.Semaphore) and sem.locked()
            sent = False
            try:
                async with sem:
                    if must_wait:
                        result.queue_time = time.perf_counter() - t0 - result.scheduled_time
                    if time.perf_counter() >= deadline:
                        result.error = "not sent: time limit reached while queued"
                        return
                    sent = True
                    await send_completion(
                        session,
                        url,
                        completion_payload(model, req, config),
                        result,
                        t0=t0,
                        headers=headers,
                    )
            except asyncio.CancelledError:
                if not sent:
                    result.error = "not sent: cancelled while queued"
                return
            counts["done"] += 1
            counts["failed"] += not result.success
            if progress is not None:
                progress(
                    Progress(
                        counts["done"], counts["failed"], len(todo),
                        time.perf_counter() - t0, config.label,
                    )
                )  # fmt: skip

        tasks: list[asyncio.Task[None]] = []
        not_sent = 0
        for i, req in enumerate(todo):
            due = t0 + float(offsets[i])
            if due >= deadline:
                not_sent = len(todo) - i
                break
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            result = RequestResult(
                index=req.index,
                prompt_len=req.prompt_len,
                expected_output_len=req.output_len,
                scheduled_time=float(offsets[i]),
            )
            results.append(result)
            tasks.append(asyncio.create_task(one(req, result)))
        if tasks:
            drain_end = deadline + config.drain_timeout_s
            timeout = None if math.isinf(drain_end) else max(0.0, drain_end - time.perf_counter())
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        await monitor.stop()

    queued_out = [r for r in results if r.error.startswith("not sent")]
    not_sent += len(queued_out)
    results = [r for r in results if not r.error.startswith("not sent")]
    loop_p50, loop_p99, loop_max = _percentiles(monitor.lags)
    dispatch_p50, dispatch_p99, _ = _percentiles([r.dispatch_lag for r in results])
    health = GeneratorHealth(
        loop_lag_p50_s=loop_p50,
        loop_lag_p99_s=loop_p99,
        loop_lag_max_s=loop_max,
        loop_held_share=sum(monitor.lags) / duration if duration > 0 else 0.0,
        dispatch_lag_p50_s=dispatch_p50,
        dispatch_lag_p99_s=dispatch_p99,
        client_cpu=cpu / duration if duration > 0 else 0.0,
    )
    return RunResult(
        config=config,
        base_url=base_url,
        model=model,
        results=results,
        duration_s=duration,
        started_at=started_at,
        not_sent=not_sent,
        time_limited=not_sent > 0,
        client_cpu_s=cpu,
        warmup_failed=warmup_failed,
        health=health,
    )


def run_load_sync(
    base_url: str,
    model: str,
    requests: Sequence[RequestSpec],
    config: LoadConfig,
    *,
    progress: ProgressCallback | None = None,
    headers: Mapping[str, str] | None = None,
) -> RunResult:
    """:func:`run_load` for synchronous callers (pytest tests, scripts)."""
    return asyncio.run(
        run_load(base_url, model, requests, config, progress=progress, headers=headers)
    )


def sweep_configs(
    base: LoadConfig,
    *,
    concurrencies: Sequence[int] | None = None,
    rates: Sequence[float] | None = None,
) -> list[LoadConfig]:
    """One config per concurrency or per request rate (exactly one of the two)."""
    if (concurrencies is None) == (rates is None):
        raise ValueError("give exactly one of concurrencies or rates")
    if concurrencies is not None:
        return [
            base.replace(max_concurrency=c, label=f"{base.label}c{c}".lstrip("-"))
            for c in concurrencies
        ]
    assert rates is not None
    return [base.replace(request_rate=r, label=f"{base.label}r{r:g}") for r in rates]


async def run_sweep(
    base_url: str,
    model: str,
    requests: Sequence[RequestSpec],
    configs: Sequence[LoadConfig],
    *,
    progress: ProgressCallback | None = None,
    headers: Mapping[str, str] | None = None,
    pause_s: float = 0.0,
) -> list[RunResult]:
    """Run each config in turn on the same requests (a concurrency or rate sweep)."""
    runs: list[RunResult] = []
    for i, config in enumerate(configs):
        if i and pause_s > 0:
            await asyncio.sleep(pause_s)
        runs.append(
            await run_load(base_url, model, requests, config, progress=progress, headers=headers)
        )
    return runs


def run_sweep_sync(
    base_url: str,
    model: str,
    requests: Sequence[RequestSpec],
    configs: Sequence[LoadConfig],
    *,
    progress: ProgressCallback | None = None,
    headers: Mapping[str, str] | None = None,
    pause_s: float = 0.0,
) -> list[RunResult]:
    """:func:`run_sweep` for synchronous callers."""
    return asyncio.run(
        run_sweep(
            base_url, model, requests, configs, progress=progress, headers=headers,
            pause_s=pause_s,
        )
    )  # fmt: skip


def server_token_counts(
    base_url: str,
    model: str,
    prompts: Sequence[str | list[int]],
    *,
    timeout_s: float = 30.0,
) -> list[int]:
    """How many tokens the server counts for each prompt (vLLM's ``/tokenize``).

    Token-id prompts are counted as their length (the server does not re-tokenize them).
    """
    import httpx

    counts: list[int] = []
    with httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s) as client:
        for prompt in prompts:
            if not isinstance(prompt, str):
                counts.append(len(prompt))
                continue
            resp = client.post(
                "/tokenize", json={"model": model, "prompt": prompt, "add_special_tokens": True}
            )
            resp.raise_for_status()
            counts.append(int(resp.json()["count"]))
    return counts
