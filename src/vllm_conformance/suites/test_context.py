"""Context: the promised ``max_model_len`` really works, and one token more is refused cleanly.

Both sides of every limit: prompt + ``max_tokens`` == ``max_model_len`` is served
(completions as text and as token ids, chat with the template's tokens counted, streamed),
and one token more is refused with HTTP 400 and an OpenAI-style error body that names the
limit, never a 5xx, a hang or a crash, and the server serves normally afterwards; the same
for ``max_tokens`` alone. Every prompt is built to an exact token count with the served
model's own tokenizer, checked against the server's ``/tokenize`` and ``usage``.

A fitting prompt whose ``max_tokens`` overshoots is rejected or clamped depending on the
vLLM version: the entry declares the policy per version range, and the report says which
declaration applied to the served version (``/version``).

Cost. Every long prompt of the suite is a prefix of one token sequence (see
:mod:`vllm_conformance.client.prompts`), so vLLM's prefix cache serves all but the first;
only the concurrent check adds prompts of their own. ``test_prefill_budget``, the module's
last test, counts the full-length prefills from vLLM's prefix-cache counters and judges them
against ``expect.context.full_prefill_budget``. Every long request runs under a deadline
derived from the entry (:mod:`vllm_conformance.client.longctx`), not the generic timeout.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from vllm_conformance import plugin
from vllm_conformance.client import calls, prompts
from vllm_conformance.client.checks import assert_clean_rejection, assert_tokenize_agrees
from vllm_conformance.client.longctx import LongRequests, PrefillLedger
from vllm_conformance.fixtures.recorder import Recorder
from vllm_conformance.launch import logparse
from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.launch.local import ServerStartError
from vllm_conformance.matrix import Deployment, ExpectationError
from vllm_conformance.perf import estimate
from vllm_conformance.perf.server_metrics import scrape_metrics
from vllm_conformance.progress import EntryProgress

pytestmark = pytest.mark.needs_expect("context")

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
#: Seed of the one token sequence that every prompt of the suite but the concurrent ones is
#: a prefix of.
BASE = 0
#: Prompt length of the "max_tokens alone" requests: the head plus a few words.
SHORT = 32


@pytest.fixture(scope="session")
def ledger(deployment: Deployment, server: Endpoint) -> PrefillLedger:
    """The entry's long requests and what the prefix cache served of them."""
    return PrefillLedger(server.max_model_len)


@pytest.fixture
def long(
    endpoint: Endpoint, deployment: Deployment, ledger: PrefillLedger, progress: EntryProgress
) -> LongRequests:
    return LongRequests(endpoint, deployment, ledger, progress)


def request_for(
    form: str, endpoint: Endpoint, tokenizer: Any, n: int, max_tokens: int, seed: int = BASE
) -> tuple[str, dict[str, Any]]:
    """A greedy request whose prompt is exactly ``n`` tokens; ``form`` ends in ``.stream``
    for a streamed one."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": form.endswith(".stream"),
    }
    kind = form.removesuffix(".stream")
    if kind == "completions-text":
        return COMPLETIONS, {**body, "prompt": prompts.completion_text(tokenizer, n, seed)}
    if kind == "completions-ids":
        return COMPLETIONS, {**body, "prompt": prompts.token_ids(tokenizer, n, seed)}
    if kind == "chat":
        return CHAT, {**body, "messages": prompts.chat_messages(tokenizer, n, seed)}
    raise ValueError(form)


def cross_check(endpoint: Endpoint, form: str, body: dict[str, Any], local: list[int]) -> None:
    """The server's ``/tokenize`` gives the tokens the client built a text or chat prompt of."""
    if form.startswith("completions-ids"):
        return
    payload = {k: body[k] for k in ("model", "prompt", "messages") if k in body}
    with endpoint.http() as http:
        assert_tokenize_agrees(http.post("/tokenize", json=payload), local)


def built_ids(form: str, tokenizer: Any, n: int, seed: int = BASE) -> list[int]:
    """The tokens :func:`request_for` built (text decodes to the ids form's tokens)."""
    if form.startswith("chat"):
        return prompts.chat_prompt_ids(tokenizer, n, seed)
    return prompts.token_ids(tokenizer, n, seed)


def assert_healthy(endpoint: Endpoint) -> None:
    """The server still answers ``/health`` and serves a normal request."""
    with endpoint.http(timeout=30) as http:
        assert http.get("/health").status_code == 200, "server unhealthy after a rejection"
    endpoint.probe()


def output_room(deployment: Deployment) -> int:
    """Output tokens of the fits-exactly requests (the server-wide cap may be lower)."""
    return min(16, deployment.serve.max_new_tokens or 16)


@pytest.mark.parametrize("form", ("completions-text", "completions-ids", "chat"))
def test_exact_token_prompt(
    form: str, endpoint: Endpoint, tokenizer: Any, recorder: Recorder
) -> None:
    """A prompt built to N tokens is counted as N by ``/tokenize`` and by ``usage``."""
    n = min(1000, endpoint.max_model_len // 2)
    path, body = request_for(form, endpoint, tokenizer, n, max_tokens=1)
    cross_check(endpoint, form, body, built_ids(form, tokenizer, n))
    with endpoint.http() as http:
        outcome = calls.post(http, path, body)
    recorder.record(
        f"context.exact_tokens.{form}",
        "pass" if outcome.ok and outcome.prompt_tokens == n else "fail",
        request=calls.summarize_request(path, body),
        expected={"prompt_tokens": n},
        **outcome.as_record(),
    )
    assert outcome.ok, outcome.body_excerpt
    assert outcome.prompt_tokens == n


FITS = [
    ("completions-ids", 16),
    ("completions-ids", 1),
    ("completions-text", 16),
    ("completions-text", 1),
    ("chat", 16),
    ("chat", 1),
    ("completions-text.stream", 16),
    ("chat.stream", 16),
]


@pytest.mark.parametrize(("form", "outputs"), FITS)
def test_fits_exactly(
    form: str,
    outputs: int,
    endpoint: Endpoint,
    tokenizer: Any,
    deployment: Deployment,
    long: LongRequests,
    recorder: Recorder,
) -> None:
    """prompt + ``max_tokens`` == ``max_model_len``: served, every output token comes back."""
    k = min(outputs, output_room(deployment))
    n = endpoint.max_model_len - k
    path, body = request_for(form, endpoint, tokenizer, n, max_tokens=k)
    cross_check(endpoint, form, body, built_ids(form, tokenizer, n))
    outcome = long.send(f"fits.{form}.{k}", path, body, n)
    recorder.record(
        f"context.fits.{form}.max_tokens_{k}",
        "pass" if outcome.ok and outcome.completion_tokens == k else "fail",
        request=calls.summarize_request(path, body),
        expected={"prompt_tokens": n, "completion_tokens": k},
        **outcome.as_record(),
    )
    assert outcome.ok, f"HTTP {outcome.status}: {outcome.body_excerpt or outcome.stream_error}"
    assert outcome.prompt_tokens == n
    assert outcome.completion_tokens == k


def test_max_tokens_alone_fits(
    endpoint: Endpoint, tokenizer: Any, long: LongRequests, recorder: Recorder
) -> None:
    """A short prompt with ``max_tokens`` = the rest of the context is accepted.

    Streamed and closed after the first token: whether the request is admitted is the
    check, not the ``max_model_len`` decode steps it would take.
    """
    n = SHORT
    path, body = request_for("completions-ids.stream", endpoint, tokenizer, n, 1)
    body["max_tokens"] = endpoint.max_model_len - n
    outcome = long.send("max_tokens_alone.fits", path, body, n, first_token=True)
    recorder.record(
        "context.max_tokens_alone.fits",
        "pass" if outcome.ok and outcome.extra.get("closed_after_first_token") else "fail",
        request=calls.summarize_request(path, body),
        **outcome.as_record(),
    )
    assert outcome.ok, f"HTTP {outcome.status}: {outcome.body_excerpt or outcome.stream_error}"
    assert outcome.extra.get("closed_after_first_token"), "the stream ended before a token"


#: One token past a limit, whatever the overflow policy: nothing can be generated.
OVER = (
    "prompt=limit.completions-ids",
    "prompt=limit.completions-text",
    "prompt=limit.chat",
    "prompt=limit+1.completions-ids",
    "prompt=limit+1.completions-text",
    "prompt=limit+1.chat",
    "prompt=limit+1.completions-text.stream",
    "prompt=limit+1.chat.stream",
    "max_tokens=limit+1",
    "long-conversation",
)


def over_request(case: str, endpoint: Endpoint, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    limit = endpoint.max_model_len
    if case.startswith("prompt="):
        size, form = case.removeprefix("prompt=").split(".", 1)
        n = limit + 1 if size == "limit+1" else limit
        return request_for(form, endpoint, tokenizer, n, max_tokens=1)
    if case == "max_tokens=limit+1":
        path, body = request_for("completions-ids", endpoint, tokenizer, SHORT, 1)
        return path, {**body, "max_tokens": limit + 1}
    if case == "long-conversation":
        messages: list[dict[str, str]] = []
        for i in range(5):
            messages.append(prompts.chat_messages(tokenizer, limit // 4, seed=40 + i)[-1])
            messages.append({"role": "assistant", "content": "ok"})
        messages.pop()
        assert prompts.chat_token_count(tokenizer, messages) > limit
        return CHAT, {"model": endpoint.model, "max_tokens": 1, "messages": messages}
    raise ValueError(case)


@pytest.mark.parametrize("case", OVER)
def test_one_token_over_is_rejected(
    case: str, endpoint: Endpoint, tokenizer: Any, long: LongRequests, recorder: Recorder
) -> None:
    """One token past the limit (prompt, prompt + ``max_tokens``, ``max_tokens``): a clean 400."""
    path, body = over_request(case, endpoint, tokenizer)
    outcome = long.send(f"over.{case}", path, body, endpoint.max_model_len)
    recorder.record(
        f"context.overflow.{case}",
        "pass" if outcome.status == 400 and outcome.error else "fail",
        request=calls.summarize_request(path, body),
        expected={"status": 400},
        **outcome.as_record(),
    )
    assert_clean_rejection(outcome, endpoint.max_model_len)
    assert_healthy(endpoint)


def applied_policy(deployment: Deployment, endpoint: Endpoint) -> dict[str, Any] | None:
    """The overflow policy declared for the served version, as recorded (None: undeclared)."""
    assert deployment.expect.context is not None
    try:
        applied = deployment.expect.context.policy_for(endpoint.version)
    except ExpectationError as exc:
        pytest.fail(f"{deployment.id}: {exc}", pytrace=False)
    if applied is None:
        return None
    return {**applied.as_record(), "served_vllm": endpoint.version}


@pytest.mark.parametrize("case", ("prompt+max_tokens", "max_tokens-alone"))
def test_overflow_policy(
    case: str,
    endpoint: Endpoint,
    tokenizer: Any,
    deployment: Deployment,
    long: LongRequests,
    recorder: Recorder,
) -> None:
    """``max_tokens`` one past the room a prompt leaves: rejected or clamped, as declared for
    the served vLLM version.

    A change of policy after an upgrade must fail loudly instead of silently truncating
    users' outputs. ``prompt+max_tokens``: a prompt of ``max_model_len - k`` with ``k + 1``
    outputs (clamped: exactly ``k`` come back). ``max_tokens-alone``: a short prompt whose
    ``max_tokens`` is one more than the rest of the context (clamped: accepted; the stream is
    closed after the first token).
    """
    limit, k = endpoint.max_model_len, output_room(deployment)
    if case == "prompt+max_tokens":
        path, body = request_for("completions-ids", endpoint, tokenizer, limit - k, k + 1)
        outcome = long.send("policy.prompt+max_tokens", path, body, limit - k)
        clamped = outcome.ok and outcome.completion_tokens == k
    else:
        path, body = request_for("completions-ids.stream", endpoint, tokenizer, SHORT, 1)
        body["max_tokens"] = limit - SHORT + 1
        outcome = long.send("policy.max_tokens-alone", path, body, SHORT, first_token=True)
        clamped = outcome.ok and bool(outcome.extra.get("closed_after_first_token"))
    if outcome.status == 400:
        observed = "reject"
    elif clamped:
        observed = "clamp"
    else:
        observed = f"other (HTTP {outcome.status}, {outcome.completion_tokens} tokens)"
    declared = applied_policy(deployment, endpoint)
    recorder.record(
        "context.prompt_plus_max_tokens"
        if case == "prompt+max_tokens"
        else "context.max_tokens_alone_policy",
        "observed" if declared is None else "pass" if observed == declared["value"] else "fail",
        request=calls.summarize_request(path, body),
        expected=declared and {"policy": declared["value"], "applied": declared},
        measured={"policy": observed},
        **outcome.as_record(),
    )
    if observed == "reject":
        assert_clean_rejection(outcome, limit)
    assert_healthy(endpoint)
    if declared is None:
        pytest.skip(f"{deployment.id} declares no overflow_policy; observed {observed!r}")
    assert observed == declared["value"], (
        f"max_tokens past the room a prompt leaves: the server's policy is {observed!r}; "
        f"for vLLM {endpoint.version} the entry declares {declared['value']!r} "
        f"(vllm {declared['vllm']}: {declared['source']})"
    )


def test_kv_capacity(endpoint: Endpoint, deployment: Deployment, recorder: Recorder) -> None:
    """The logged KV capacity holds ``max_model_len``, the concurrency factor agrees, and the
    floor measured on this vLLM range at this ``max_model_len`` (if any) is reached."""
    if endpoint.kv_cache is None:
        assert not endpoint.launched, "vLLM printed no 'KV cache size' line at startup"
        pytest.skip("remote endpoint: no startup log to read the KV capacity from")
    ctx = deployment.expect.context
    assert ctx is not None
    kv = endpoint.kv_cache
    limit = endpoint.max_model_len
    floor = ctx.kv_floor(endpoint.version, limit)
    recorder.record(
        "context.kv_capacity",
        "observed",
        measured={
            "kv_cache_tokens": kv.tokens,
            "concurrency": kv.concurrency,
            "concurrency_tokens": kv.concurrency_tokens,
            "device": kv.device,
        },
        expected={
            "min_kv_cache_tokens": floor.tokens if floor else limit,
            "applied": floor.model_dump()
            if floor
            else f"max_model_len (no floor for vLLM {endpoint.version} at max_model_len {limit})",
            "served_vllm": endpoint.version,
        },
        source=floor.source if floor else ctx.source,
    )
    assert kv.tokens >= limit, f"KV cache holds {kv.tokens} tokens < max_model_len {limit}"
    if floor is not None:
        assert kv.tokens >= floor.tokens, (
            f"KV cache {kv.tokens} tokens < {floor.tokens}, the floor for vLLM {floor.vllm} "
            f"at max_model_len {floor.max_model_len} ({floor.source})"
        )
    assert kv.concurrency is not None, "vLLM printed no 'Maximum concurrency' figure"
    assert kv.concurrency_tokens == limit
    # vLLM's factor counts whole blocks per request, so it may sit slightly under the ratio.
    assert kv.concurrency == pytest.approx(kv.tokens / limit, rel=0.05)


def test_kv_capacity_ratio(
    endpoint: Endpoint, deployment: Deployment, recorder: Recorder, request: pytest.FixtureRequest
) -> None:
    """The logged KV capacity is the declared multiple of another entry's (fp8 KV: ~2x)."""
    ctx = deployment.expect.context
    assert ctx is not None
    want = ctx.kv_cache_ratio
    if want is None:
        pytest.skip(f"{deployment.id} declares no kv_cache_ratio")
    assert endpoint.kv_cache is not None, "vLLM printed no 'KV cache size' line at startup"
    other = plugin.state(request.config).kv_caches.get(want.to)
    if other is None:
        pytest.skip(
            f"{want.to} was not started before {deployment.id} in this pytest process: "
            "select both entries (and no -n) to compare their KV capacity"
        )
    ratio = endpoint.kv_cache.tokens / other.tokens
    ok = ratio == pytest.approx(want.ratio, rel=want.rel)
    recorder.record(
        "context.kv_capacity_ratio",
        "pass" if ok else "fail",
        measured={"kv_cache_tokens": endpoint.kv_cache.tokens, "reference_tokens": other.tokens,
                  "ratio": round(ratio, 4)},
        expected={"to": want.to, "ratio": want.ratio, "rel": want.rel},
        source=want.source,
    )  # fmt: skip
    assert ok, (
        f"KV capacity {endpoint.kv_cache.tokens} tokens is {ratio:.3f} x {want.to}'s "
        f"{other.tokens}; expected {want.ratio} +- {want.rel:.0%} ({want.source})"
    )


def test_concurrent_near_max_requests(
    endpoint: Endpoint,
    tokenizer: Any,
    deployment: Deployment,
    long: LongRequests,
    recorder: Recorder,
) -> None:
    """``floor(concurrency)`` (capped) requests of ``max_model_len - 1`` tokens all complete.

    The first is the suite's shared prompt (its KV blocks come from the prefix cache, but
    they are held all the same); the others are prompts of their own.
    """
    if endpoint.kv_cache is None or endpoint.kv_cache.concurrency is None:
        assert not endpoint.launched, "vLLM printed no 'Maximum concurrency' figure"
        pytest.skip("remote endpoint: no startup log to read the concurrency factor from")
    ctx = deployment.expect.context
    assert ctx is not None
    parallel = min(math.floor(endpoint.kv_cache.concurrency), ctx.max_concurrent_checks)
    assert parallel >= 1, "KV cache does not hold one full-length request"
    n = endpoint.max_model_len - 1
    requests = [
        request_for("completions-ids", endpoint, tokenizer, n, max_tokens=1, seed=BASE + i * 60)
        for i in range(parallel)
    ]
    before = scrape_metrics(endpoint.base_url).counters
    outcomes = long.send_together("concurrent_near_max", requests, n)
    after = scrape_metrics(endpoint.base_url).counters
    preempted = after.get("vllm:num_preemptions", 0) - before.get("vllm:num_preemptions", 0)
    ok = sum(o.ok for o in outcomes)
    recorder.record(
        "context.concurrent_near_max",
        "pass" if ok == parallel else "fail",
        measured={
            "parallel": parallel,
            "completed": ok,
            "preemptions": preempted,
            "statuses": [o.status for o in outcomes],
        },
    )
    assert ok == parallel, [o.body_excerpt for o in outcomes if not o.ok]
    assert all(o.prompt_tokens == n for o in outcomes)


def test_multi_turn_growth(
    endpoint: Endpoint, tokenizer: Any, long: LongRequests, recorder: Recorder
) -> None:
    """A conversation grows turn by turn; the turn that crosses the limit gets the 400.

    The first turn is a prefix of the suite's shared prompt; each later one computes only
    its new quarter of the context.
    """
    limit = endpoint.max_model_len
    turn = limit // 4
    history: list[dict[str, str]] = []
    statuses: list[int] = []
    last_fitting: list[dict[str, str]] | None = None
    for i in range(5):
        user = prompts.chat_messages(tokenizer, turn, seed=BASE if i == 0 else 70 + i)[-1]
        messages = [*history, user]
        body = {"model": endpoint.model, "messages": messages, "max_tokens": 4, "temperature": 0}
        count = prompts.chat_token_count(tokenizer, messages)
        outcome = long.send(f"multi_turn.{i + 1}", CHAT, body, count)
        statuses.append(outcome.status)
        if count + 4 > limit:
            assert_clean_rejection(outcome, limit)
            break
        assert outcome.ok, f"turn {i + 1} fits but failed: {outcome.body_excerpt}"
        last_fitting = messages
        history = [*messages, {"role": "assistant", "content": outcome.text or "ok"}]
    recorder.record("context.multi_turn", "observed", measured={"statuses": statuses})
    assert statuses[-1] == 400, "the conversation never crossed the limit"
    assert last_fitting is not None
    body = {"model": endpoint.model, "messages": last_fitting, "max_tokens": 4, "temperature": 0}
    again = long.send(
        "multi_turn.again", CHAT, body, prompts.chat_token_count(tokenizer, last_fitting)
    )
    assert again.ok, f"the last fitting turn no longer works: {again.body_excerpt}"


def test_kv_plausibility(endpoint: Endpoint, deployment: Deployment, recorder: Recorder) -> None:
    """The KV capacity vLLM logged is what the entry's shape predicts for the KV memory it
    logged (bytes per token of the global and the chunked local layers), the weights it
    loaded are the shape's, and weights plus KV cache fill ``gpu_memory_utilization``
    within the band of :mod:`vllm_conformance.perf.estimate`."""
    if endpoint.kv_cache is None or endpoint.log_path is None:
        assert not endpoint.launched, "vLLM printed no 'KV cache size' line at startup"
        pytest.skip("remote endpoint without --server-log: no startup log to check")
    facts = logparse.parse_startup_facts(endpoint.log_path.read_text(errors="replace").splitlines())
    try:
        check = estimate.kv_plausibility(
            deployment, facts, endpoint.kv_cache, endpoint.max_model_len
        )
    except ValueError as exc:
        pytest.fail(f"KV plausibility not measurable: {exc}", pytrace=False)
    if check is None:
        pytest.skip(
            f"{deployment.id}: the model's shape is unknown or pipeline parallelism splits "
            "it unevenly, so no KV capacity can be predicted"
        )
    gib = 2**30
    recorder.record(
        "context.kv_plausibility",
        "fail" if check.problems else "pass",
        measured={
            "kv_cache_tokens": check.logged_tokens,
            "kv_memory_gib": round(check.kv_memory_bytes / gib, 2),
            "kv_memory_source": check.kv_memory_source,
            "weights_gib": round(check.weights_bytes / gib, 2) if check.weights_bytes else None,
            "overhead_share": check.overhead_share,
        },
        expected={
            "kv_cache_tokens": round(check.predicted_tokens),
            "bytes_per_request": round(check.bytes_per_request),
            "in_flight_tokens": check.in_flight_tokens,
            "weights_gib": round(check.predicted_weights_bytes / gib, 2),
            "band": {
                "kv_tokens_rel": estimate.KV_TOKENS_REL,
                "weights_rel": estimate.WEIGHTS_REL,
                "overhead_max": estimate.OVERHEAD_MAX,
            },
        },
        source="perf.estimate.kv_plausibility: the entry's config.json and hardware.gpu",
    )
    assert not check.problems, "; ".join(check.problems)


def test_prefill_not_faster_than_physics(
    deployment: Deployment, ledger: PrefillLedger, recorder: Recorder
) -> None:
    """No long request computed its uncached prompt tokens faster than the entry's GPUs can
    at peak FLOPs: such a time is a measurement error (a cache the counters did not see, a
    clock, a proxy answering for the server), and the context timings of the run are void."""
    if ledger.unmeasured:
        pytest.fail(f"prefills not measured: {ledger.unmeasured}", pytrace=False)
    computed = [i for i in ledger.items if i.computed_tokens > 0]
    assert computed, "no long request computed any prompt token"
    rows = []
    for item in computed:
        per_request = item.computed_tokens / item.requests
        cached = max(0, item.prompt_tokens - round(per_request))
        one = estimate.prefill_floor_seconds(deployment, item.prompt_tokens, cached)
        if one is None:
            pytest.skip(f"{deployment.id}: the model's shape is unknown, so is the FLOP floor")
        rows.append({"check": item.check, "seconds": round(item.seconds, 3),
                     "floor_seconds": round(one * item.requests, 6)})  # fmt: skip
    too_fast = [r for r in rows if r["seconds"] < r["floor_seconds"]]
    recorder.record(
        "context.prefill_floor",
        "fail" if too_fast else "pass",
        measured={"requests": rows},
        expected={"seconds_at_least": "floor_seconds"},
        source="perf.estimate.prefill_floor_seconds: FLOPs of the shape at the GPUs' peak",
    )
    assert not too_fast, f"faster than the FLOP floor, a measurement error: {too_fast}"


def test_prefill_budget(
    deployment: Deployment, ledger: PrefillLedger, endpoint: Endpoint, recorder: Recorder
) -> None:
    """The suite cost this entry at most ``full_prefill_budget`` full-length prefills.

    Counted from vLLM's prefix-cache counters around each long request of the tests above
    (so run the whole module: a selection counts only what it ran). It is the last test of
    an entry that starts: the one after it is for entries that do not.
    """
    ctx = deployment.expect.context
    assert ctx is not None
    if ledger.unmeasured:
        pytest.fail(f"full prefills not counted: {ledger.unmeasured}", pytrace=False)
    assert ledger.items, "no long request was sent before this test"
    caching = deployment.serve.enable_prefix_caching is not False
    measured = ledger.as_measured()
    within = ledger.full_prefills <= ctx.full_prefill_budget
    recorder.record(
        "context.prefill_budget",
        ("pass" if within else "fail") if caching else "observed",
        measured=measured,
        expected={
            "max_full_prefills": ctx.full_prefill_budget,
            "prefix_caching": caching,
            "max_model_len": endpoint.max_model_len,
        },
        source="project: at most 3 full-length prefills per entry at any context length",
    )
    if not caching:
        pytest.skip(
            f"{deployment.id} disables prefix caching: each of the "
            f"{measured['long_requests']} long requests was a full prefill "
            f"({ledger.full_prefills} full-length)"
        )
    assert within, (
        f"{ledger.full_prefills} full-length prefills, more than the budget of "
        f"{ctx.full_prefill_budget}: {measured['full_prefill_requests']}"
    )


@pytest.mark.expects_startup_failure
def test_expected_startup_failure(
    deployment: Deployment, request: pytest.FixtureRequest, recorder: Recorder
) -> None:
    """A deployment the matrix says does not fit fails to start, for the expected reason.

    One that starts after all (a newer vLLM fits what an older one could not) is a finding
    with its capacity, so that the upgrade diff shows what changed.
    """
    st = plugin.state(request.config)
    if st.endpoint:
        pytest.skip("endpoint mode launches nothing")
    ctx = deployment.expect.context
    assert ctx is not None
    srv = st.launcher.server(deployment, st.run_dir / deployment.id / "server.log")
    try:
        srv.start()
    except ServerStartError as exc:
        kind = exc.reason.kind if exc.reason else "unknown"
        confirmed = kind in ctx.failure_reasons
        recorder.record(
            "context.expected_startup_failure",
            "expected failure confirmed" if confirmed else "fail",
            measured={
                "started": False,
                "reason": kind,
                "line": exc.reason.line if exc.reason else None,
                "estimated_max_model_len": logparse.estimated_max_model_len(
                    srv.log_path.read_text(errors="replace").splitlines()
                ),
            },
            expected={"reasons": ctx.failure_reasons},
            source=ctx.source,
        )
        assert confirmed, (
            f"startup failed as expected, but for {kind!r}, not {ctx.failure_reasons}: {exc}"
        )
        return
    ep, kv = srv.endpoint, srv.kv_cache
    srv.stop()
    finding = (
        f"expected to fail ({ctx.source}), started: KV capacity "
        f"{f'{kv.tokens:,} tokens' if kv else 'not logged'} at max_model_len "
        f"{ep.max_model_len:,} on vLLM {ep.version}"
    )
    recorder.record(
        "context.expected_startup_failure",
        "fail: expected to fail, started",
        measured={
            "started": True,
            "kv_cache_tokens": kv.tokens if kv else None,
            "concurrency": kv.concurrency if kv else None,
            "max_model_len": ep.max_model_len,
            "vllm": ep.version,
        },
        expected={"reasons": ctx.failure_reasons},
        finding=finding,
        source=ctx.source,
    )
    pytest.fail(f"{deployment.id}: {finding}", pytrace=False)
