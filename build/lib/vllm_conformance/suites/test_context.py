"""Context: the promised ``max_model_len`` really works, and one token more is refused cleanly.

Every prompt is built to an exact token count with the served model's own tokenizer (the
chat template's tokens included) and the server's ``usage.prompt_tokens`` must agree.
Rejections must be HTTP 400 with an OpenAI-style error body, never a 5xx, a hang or a
crash, and the server must serve normally afterwards.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from vllm_conformance import plugin
from vllm_conformance.client import calls, prompts
from vllm_conformance.client.checks import assert_clean_rejection
from vllm_conformance.fixtures.recorder import Recorder
from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.launch.local import ServerStartError
from vllm_conformance.matrix import Deployment
from vllm_conformance.perf.server_metrics import scrape_metrics

pytestmark = pytest.mark.needs_expect("context")

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
FORMS = ("completions-text", "completions-ids", "chat")


def request_for(
    form: str, endpoint: Endpoint, tokenizer: Any, n: int, max_tokens: int, seed: int
) -> tuple[str, dict[str, Any]]:
    """A greedy request whose prompt is exactly ``n`` tokens, in one of :data:`FORMS`."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if form == "completions-text":
        return COMPLETIONS, {**body, "prompt": prompts.completion_text(tokenizer, n, seed)}
    if form == "completions-ids":
        return COMPLETIONS, {**body, "prompt": prompts.token_ids(tokenizer, n, seed)}
    if form == "chat":
        return CHAT, {**body, "messages": prompts.chat_messages(tokenizer, n, seed)}
    raise ValueError(form)


def send(endpoint: Endpoint, path: str, body: dict[str, Any]) -> calls.Outcome:
    with endpoint.http() as http:
        return calls.post(http, path, body)


def assert_healthy(endpoint: Endpoint) -> None:
    """The server still answers ``/health`` and serves a normal request."""
    with endpoint.http(timeout=30) as http:
        assert http.get("/health").status_code == 200, "server unhealthy after a rejection"
    endpoint.probe()


@pytest.mark.parametrize("form", FORMS)
def test_exact_token_prompt(
    form: str, endpoint: Endpoint, tokenizer: Any, recorder: Recorder
) -> None:
    """A prompt built to N tokens is counted as N by the server."""
    n = min(1000, endpoint.max_model_len // 2)
    path, body = request_for(form, endpoint, tokenizer, n, max_tokens=1, seed=1)
    outcome = send(endpoint, path, body)
    recorder.record(
        f"context.exact_tokens.{form}",
        "pass" if outcome.ok and outcome.prompt_tokens == n else "fail",
        request=calls.summarize_request(path, body),
        expected={"prompt_tokens": n},
        **outcome.as_record(),
    )
    assert outcome.ok, outcome.body_excerpt
    assert outcome.prompt_tokens == n


@pytest.mark.parametrize("form", ("completions-text", "chat"))
def test_tokenize_endpoint_agrees(form: str, endpoint: Endpoint, tokenizer: Any) -> None:
    """The server's ``/tokenize`` counts the client-built prompt exactly as the client does."""
    n = min(1000, endpoint.max_model_len // 2)
    _, body = request_for(form, endpoint, tokenizer, n, max_tokens=1, seed=2)
    payload = {k: body[k] for k in ("model", "prompt", "messages") if k in body}
    with endpoint.http() as http:
        response = http.post("/tokenize", json=payload)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["count"] == n


@pytest.mark.parametrize(
    ("form", "stream"),
    [
        ("completions-text", False),
        ("completions-ids", False),
        ("chat", False),
        ("completions-text", True),
        ("chat", True),
    ],
)
def test_largest_prompt_succeeds(
    form: str, stream: bool, endpoint: Endpoint, tokenizer: Any, recorder: Recorder
) -> None:
    """A prompt of ``max_model_len - 1`` tokens with ``max_tokens=1`` is served."""
    n = endpoint.max_model_len - 1
    path, body = request_for(form, endpoint, tokenizer, n, max_tokens=1, seed=10 + stream)
    outcome = send(endpoint, path, {**body, "stream": stream})
    recorder.record(
        f"context.largest_prompt.{form}{'.stream' if stream else ''}",
        "pass" if outcome.ok else "fail",
        request=calls.summarize_request(path, body),
        **outcome.as_record(),
    )
    assert outcome.ok, f"HTTP {outcome.status}: {outcome.body_excerpt or outcome.stream_error}"
    assert outcome.prompt_tokens == n
    assert outcome.completion_tokens == 1


@pytest.mark.parametrize("form", ("completions-text", "chat"))
def test_prompt_plus_k_outputs_fill_context(
    form: str, endpoint: Endpoint, tokenizer: Any, deployment: Deployment, recorder: Recorder
) -> None:
    """``max_model_len - k`` prompt tokens plus ``k`` output tokens: all ``k`` come back."""
    k = min(16, deployment.serve.max_new_tokens or 16)
    n = endpoint.max_model_len - k
    path, body = request_for(form, endpoint, tokenizer, n, max_tokens=k, seed=20)
    outcome = send(endpoint, path, body)
    recorder.record(
        f"context.fill.{form}",
        "pass" if outcome.ok and outcome.completion_tokens == k else "fail",
        request=calls.summarize_request(path, body),
        **outcome.as_record(),
    )
    assert outcome.ok, outcome.body_excerpt
    assert outcome.prompt_tokens == n
    assert outcome.completion_tokens == k


OVERFLOWS = (
    "prompt+1.completions-text",
    "prompt+1.completions-ids",
    "prompt+1.chat",
    "prompt+1.completions-text.stream",
    "max_tokens-above-limit",
    "long-conversation",
)


def overflow_request(case: str, endpoint: Endpoint, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    limit = endpoint.max_model_len
    if case.startswith("prompt+1."):
        form = case.split(".")[1]
        path, body = request_for(form, endpoint, tokenizer, limit + 1, max_tokens=1, seed=30)
        return path, {**body, "stream": case.endswith(".stream")}
    if case == "max_tokens-above-limit":
        path, body = request_for("completions-text", endpoint, tokenizer, 8, 1, seed=31)
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


@pytest.mark.parametrize("case", OVERFLOWS)
def test_overflow_rejected_cleanly(
    case: str, endpoint: Endpoint, tokenizer: Any, recorder: Recorder
) -> None:
    """One token past the limit (or an output budget past it) gets a clean 400."""
    path, body = overflow_request(case, endpoint, tokenizer)
    outcome = send(endpoint, path, body)
    recorder.record(
        f"context.overflow.{case}",
        "pass" if outcome.status == 400 and outcome.error else "fail",
        request=calls.summarize_request(path, body),
        expected={"status": 400},
        **outcome.as_record(),
    )
    assert_clean_rejection(outcome, endpoint.max_model_len)
    assert_healthy(endpoint)


def test_prompt_plus_max_tokens_policy(
    endpoint: Endpoint, tokenizer: Any, deployment: Deployment, recorder: Recorder
) -> None:
    """A fitting prompt whose ``max_tokens`` overshoots: rejected or clamped, as declared.

    vLLM versions differ here; a change of policy after an upgrade must fail loudly
    instead of silently truncating users' outputs.
    """
    assert deployment.expect.context is not None
    declared = deployment.expect.context.overflow_policy
    room = 8
    n = endpoint.max_model_len - room
    path, body = request_for("completions-text", endpoint, tokenizer, n, 2 * room, seed=50)
    outcome = send(endpoint, path, body)
    if outcome.status == 400:
        observed = "reject"
    elif outcome.ok and (outcome.completion_tokens or 0) <= room:
        observed = "clamp"
    else:
        observed = f"other (HTTP {outcome.status}, {outcome.completion_tokens} tokens)"
    recorder.record(
        "context.prompt_plus_max_tokens",
        "pass" if observed == declared else "fail",
        request=calls.summarize_request(path, body),
        expected={"policy": declared},
        measured={"policy": observed},
        source=deployment.expect.context.source,
        **outcome.as_record(),
    )
    assert observed == declared, (
        f"prompt + max_tokens over max_model_len: the server's policy is {observed!r}, the "
        f"entry declares {declared!r} (expect.context.overflow_policy)"
    )
    if observed == "reject":
        assert_clean_rejection(outcome, endpoint.max_model_len)
    assert_healthy(endpoint)


def test_kv_capacity(endpoint: Endpoint, deployment: Deployment, recorder: Recorder) -> None:
    """The logged KV capacity holds ``max_model_len``, and the concurrency factor agrees."""
    if endpoint.kv_cache is None:
        assert not endpoint.launched, "vLLM printed no 'KV cache size' line at startup"
        pytest.skip("remote endpoint: no startup log to read the KV capacity from")
    ctx = deployment.expect.context
    assert ctx is not None
    kv = endpoint.kv_cache
    limit = endpoint.max_model_len
    ratio = kv.tokens / limit
    recorder.record(
        "context.kv_capacity",
        "observed",
        measured={
            "kv_cache_tokens": kv.tokens,
            "concurrency": kv.concurrency,
            "concurrency_tokens": kv.concurrency_tokens,
            "device": kv.device,
        },
        expected={"min_kv_cache_tokens": ctx.min_kv_cache_tokens or limit},
        source=ctx.source,
    )
    assert kv.tokens >= limit, f"KV cache holds {kv.tokens} tokens < max_model_len {limit}"
    if ctx.min_kv_cache_tokens is not None:
        assert kv.tokens >= ctx.min_kv_cache_tokens, (
            f"KV cache {kv.tokens} tokens < {ctx.min_kv_cache_tokens} ({ctx.source})"
        )
    assert kv.concurrency is not None, "vLLM printed no 'Maximum concurrency' figure"
    assert kv.concurrency_tokens == limit
    # vLLM's factor counts whole blocks per request, so it may sit slightly under the ratio.
    assert kv.concurrency == pytest.approx(ratio, rel=0.05)


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
    endpoint: Endpoint, tokenizer: Any, deployment: Deployment, recorder: Recorder
) -> None:
    """``floor(concurrency)`` (capped) requests of ``max_model_len - 1`` tokens all complete."""
    if endpoint.kv_cache is None or endpoint.kv_cache.concurrency is None:
        assert not endpoint.launched, "vLLM printed no 'Maximum concurrency' figure"
        pytest.skip("remote endpoint: no startup log to read the concurrency factor from")
    ctx = deployment.expect.context
    assert ctx is not None
    parallel = min(math.floor(endpoint.kv_cache.concurrency), ctx.max_concurrent_checks)
    assert parallel >= 1, "KV cache does not hold one full-length request"
    n = endpoint.max_model_len - 1
    requests = [
        request_for("completions-ids", endpoint, tokenizer, n, max_tokens=1, seed=60 + i)
        for i in range(parallel)
    ]
    before = scrape_metrics(endpoint.base_url).counters
    with ThreadPoolExecutor(parallel) as pool:
        outcomes = list(pool.map(lambda r: send(endpoint, *r), requests))
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


def test_multi_turn_growth(endpoint: Endpoint, tokenizer: Any, recorder: Recorder) -> None:
    """A conversation grows turn by turn; the turn that crosses the limit gets the 400."""
    limit = endpoint.max_model_len
    turn = limit // 3
    history: list[dict[str, str]] = []
    statuses: list[int] = []
    last_fitting: list[dict[str, str]] | None = None
    for i in range(4):
        user = prompts.chat_messages(tokenizer, turn, seed=70 + i)[-1]
        messages = [*history, user]
        body = {"model": endpoint.model, "messages": messages, "max_tokens": 4, "temperature": 0}
        fits = prompts.chat_token_count(tokenizer, messages) + 4 <= limit
        outcome = send(endpoint, CHAT, body)
        statuses.append(outcome.status)
        if not fits:
            assert_clean_rejection(outcome, limit)
            break
        assert outcome.ok, f"turn {i + 1} fits but failed: {outcome.body_excerpt}"
        last_fitting = messages
        history = [*messages, {"role": "assistant", "content": outcome.text or "ok"}]
    recorder.record("context.multi_turn", "observed", measured={"statuses": statuses})
    assert statuses[-1] == 400, "the conversation never crossed the limit"
    assert last_fitting is not None
    again = send(
        endpoint,
        CHAT,
        {"model": endpoint.model, "messages": last_fitting, "max_tokens": 4, "temperature": 0},
    )
    assert again.ok, f"the last fitting turn no longer works: {again.body_excerpt}"


@pytest.mark.expects_startup_failure
def test_expected_startup_failure(
    deployment: Deployment, request: pytest.FixtureRequest, recorder: Recorder
) -> None:
    """A deployment the matrix says does not fit fails to start, for the expected reason."""
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
            measured={"reason": kind, "line": exc.reason.line if exc.reason else None},
            expected={"reasons": ctx.failure_reasons},
            source=ctx.source,
        )
        assert confirmed, (
            f"startup failed as expected, but for {kind!r}, not {ctx.failure_reasons}: {exc}"
        )
        return
    srv.stop()
    recorder.record(
        "context.expected_startup_failure",
        "fail",
        measured={"started": True},
        kv_cache=srv.kv_cache,
        source=ctx.source,
    )
    pytest.fail(
        f"{deployment.id} started, but the matrix expects it to fail ({ctx.source}); "
        f"KV cache: {srv.kv_cache}"
    )
