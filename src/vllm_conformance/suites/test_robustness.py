"""Robustness: bad input, dropped clients and overload never break the server.

Bad input (hypothesis, :mod:`vllm_conformance.client.fuzz`): for ``/v1/completions`` and
``/v1/chat/completions``, every answer is a 4xx with an OpenAI-style
error body (``{"error": {"message", "type", "param", "code"}}``) or a 200 with a well-formed
answer; never a 5xx, never an error inside a 200 stream, never a hang (client timeout),
never a 200 to a request the OpenAI API rejects (``temperature: -1``); and the server still
serves a real completion afterwards. Distinct failure kinds (5xx, hang, non-OpenAI error
body, error in a 200 stream, malformed 200, invalid request accepted) are minimized
separately by hypothesis, printed, and recorded with the exact request so they can be
replayed (``fuzz.FuzzCase.from_record``).

Known issues of the entry (``expect.known_issues`` with a signature: status, error type,
message pattern) are matched per finding: a matching answer is recorded as that issue and
not raised, so hypothesis keeps looking for others. Any other finding fails the test, and
so does a known issue that no longer shows; when every finding was a known one the test is
an expected failure (:class:`vllm_conformance.plugin.KnownFindings`).

Each (endpoint, streamed or not, class) is one test: validation that runs after a stream
has started reports its errors inside the 200 stream, and one class's finding would
otherwise hide another's (hypothesis stops exploring soon after the first failure).
Examples per test: ``VLLM_CONFORMANCE_FUZZ_EXAMPLES`` (default 30: 600 requests per
endpoint, 1,200 per entry, about a minute on the tiny CPU model). Runs are derandomized
(the same examples every run, no example database: CI is a fresh clone);
``VLLM_CONFORMANCE_FUZZ_SEED=N`` explores other examples.

Dropped clients: streams (and plain requests) abandoned mid-generation are aborted by the
server: ``vllm:num_requests_running`` returns to zero within a deadline and later requests
are unaffected. Overload: three times ``max_num_seqs`` concurrent streams each complete or
are refused cleanly (429/503 with an error body); no other 5xx, and the server recovers.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import seed as hypothesis_seed

from vllm_conformance.client import fuzz, sse
from vllm_conformance.fixtures.recorder import Recorder
from vllm_conformance.launch import serving
from vllm_conformance.launch.endpoint import Endpoint, ServerDiedError
from vllm_conformance.matrix import Deployment, KnownIssue
from vllm_conformance.perf.server_metrics import MetricsSnapshot, parse_metrics
from vllm_conformance.plugin import KnownFindings

EXAMPLES_ENV = "VLLM_CONFORMANCE_FUZZ_EXAMPLES"
SEED_ENV = "VLLM_CONFORMANCE_FUZZ_SEED"
DEFAULT_EXAMPLES = 30
#: A bad request gets its answer within this; a valid one is at most a few tokens.
FUZZ_TIMEOUT_S = 60.0
#: How long an aborted or finished request may take to leave the running set.
DRAIN_DEADLINE_S = 60.0
#: How long the dropped-client test waits to see its requests generate before dropping them.
#: A busy CPU server's /metrics lags: up to 17 s measured on 2 cores, with thousands of
#: tokens generated meanwhile, still far from the 30,000 each request asks for.
STARTED_S = 120.0
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
GENERATED = "vllm:generation_tokens"
#: Counter of finished requests, labelled with finished_reason ('length', 'stop', ...).
FINISHED = "vllm:request_success"


def _examples() -> int:
    raw = os.environ.get(EXAMPLES_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_EXAMPLES
    except ValueError:
        raise pytest.UsageError(f"{EXAMPLES_ENV}={raw!r} is not a whole number") from None


def _vocab_size(endpoint: Endpoint, deployment: Deployment) -> int | None:
    """The served model's vocabulary size, from its config when it was launched here."""
    if not endpoint.launched:
        return None
    try:
        config = json.loads((Path(serving.model_path(deployment)) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        if isinstance(section.get("vocab_size"), int):
            return int(section["vocab_size"])
    return None


# -- one request, judged ------------------------------------------------------------------


class ServerError(AssertionError):
    """The server answered a 5xx (or a stream carried a 5xx error)."""


class Hang(AssertionError):
    """No complete answer before the client timeout."""


class NotOpenAIError(AssertionError):
    """A 4xx whose body is not an OpenAI-style error object."""


class ErrorInStream(AssertionError):
    """A 200 stream that carries an error instead of a 4xx answer."""


class MalformedAnswer(AssertionError):
    """A 200 answer that is not a well-formed completion."""


class AcceptedInvalid(AssertionError):
    """A 200 answer to a request the OpenAI API rejects."""


def send(http: httpx.Client, case: fuzz.FuzzCase, timeout: float) -> tuple[int | None, str, str]:
    """Send one case; (status, body text, content type). Status None: no answer in time."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        with http.stream(
            "POST", case.path, content=case.render(), headers=case.headers(), timeout=timeout
        ) as response:
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    return None, b"".join(chunks).decode(errors="replace"), ""
            ctype = response.headers.get("content-type", "")
            return response.status_code, b"".join(chunks).decode(errors="replace"), ctype
    except httpx.TimeoutException:
        return None, b"".join(chunks).decode(errors="replace"), ""


def _raise_for(verdict: fuzz.Verdict, case: fuzz.FuzzCase) -> None:
    """Each failure kind is raised from its own line, so hypothesis shrinks each apart."""
    what = f"{case.kind} ({case.note or 'no note'}) to {case.path}: {verdict.problem}"
    if verdict.outcome == "5xx":
        raise ServerError(what)
    if verdict.outcome == "timeout":
        raise Hang(what)
    if verdict.outcome == "accepted":
        raise AcceptedInvalid(what)
    if verdict.status == 200 and "error inside a 200 stream" in verdict.problem:
        if "InternalServerError" in verdict.problem or '"code": 5' in verdict.problem:
            raise ServerError(what)
        raise ErrorInStream(what)
    if verdict.status is not None and 400 <= verdict.status < 500:
        raise NotOpenAIError(what)
    raise MalformedAnswer(what)


def _judge(case: fuzz.FuzzCase, status: int | None, text: str, ctype: str) -> fuzz.Verdict:
    # A raw body may still ask for a stream: trust the answer's content type.
    streamed = sse.MEDIA_TYPE in ctype
    return fuzz.judge(case, status, text if status is not None else None, streamed=streamed)


def _replays(
    issues: list[KnownIssue], api: fuzz.Api, stream: bool, kind: str, model: str
) -> list[fuzz.FuzzCase]:
    """The known issues' replay requests for this endpoint, streamed as the test is."""
    cases = []
    for issue in issues:
        for r in issue.replay:
            if r.api != api:
                continue
            body = None if r.body is None else {**r.body, "model": model, "stream": stream}
            raw = r.raw.encode() if r.raw is not None else None
            if r.raw_b64 is not None:
                raw = base64.b64decode(r.raw_b64)
            invalid = bool(fuzz.rejected_fields(body))
            case = fuzz.FuzzCase(api, kind, body, raw, content_type=r.content_type,
                                 note="known issue replay", invalid=invalid)  # fmt: skip
            cases.append(case)
    return cases


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", fuzz.KINDS)
@pytest.mark.parametrize("mode", ["plain", "stream"])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_bad_input(
    endpoint: Endpoint,
    deployment: Deployment,
    recorder: Recorder,
    known_issues: list[KnownIssue],
    api: fuzz.Api,
    mode: str,
    kind: str,
) -> None:
    """Hypothesis-drawn bad requests of one class, streamed or not: 4xx with an error body
    or a well-formed 200 (a 4xx if the OpenAI API rejects the request); never a 5xx, an error
    inside a 200 stream or a hang; the server is healthy afterwards. Findings that match the
    entry's known issues are expected; any other fails."""
    target = fuzz.Target(endpoint.model, endpoint.max_model_len, _vocab_size(endpoint, deployment))
    strategy = fuzz.STRATEGIES[kind](api, target, mode == "stream")
    examples = _examples()
    seed_text = os.environ.get(SEED_ENV)
    tally: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    errors: dict[str, dict[str, Any]] = {}
    failures: dict[type[BaseException], dict[str, Any]] = {}
    first_failure: dict[type[BaseException], dict[str, Any]] = {}
    sent = 0
    dead: list[str] = []
    #: known issue index -> (times seen, first matching failure)
    seen: dict[int, tuple[int, dict[str, Any]]] = {}

    http = endpoint.http(FUZZ_TIMEOUT_S)

    def prop(case: fuzz.FuzzCase) -> None:
        nonlocal sent
        if dead:
            raise ServerDiedError(dead[0])
        # Printed with the minimized example: the exact request, ready to replay.
        note(f"request: {json.dumps(case.to_record())[:4000]}")
        began = time.monotonic()
        status, text, ctype = send(http, case, FUZZ_TIMEOUT_S)
        seconds = time.monotonic() - began
        sent += 1
        verdict = _judge(case, status, text, ctype)
        tally[re.sub(r"\d+", "N", case.note)[:60] or case.kind][str(status)] += 1
        if verdict.error and status is not None:
            errors.setdefault(
                f"{status} {verdict.error.get('type')} param={verdict.error.get('param')}",
                {"status": status, "error": verdict.error, "request": case.summary()},
            )
        if verdict.ok:
            return
        try:
            endpoint.check_alive()
        except ServerDiedError as exc:
            dead.append(str(exc))
        failure = {
            "request": case.to_record(),
            "status": status,
            "error": verdict.error,
            "measured": {"seconds": round(seconds, 3)},
            "problem": verdict.problem,
            "response_head": text[:2000],
        }
        error = verdict.error or {}
        signature = (status, error.get("type"), f"{error.get('message') or ''} {verdict.problem}")
        for i, issue in enumerate(known_issues):
            if issue.matches_finding(*signature):
                count, first = seen.get(i, (0, failure))
                seen[i] = (count + 1, first)
                return
        try:
            _raise_for(verdict, case)
        except AssertionError as exc:
            # The last failing call of a kind is hypothesis's final, minimized replay.
            failures[type(exc)] = failure
            first_failure.setdefault(type(exc), failure)
            raise

    run = given(strategy)(prop)
    for case in _replays(known_issues, api, mode == "stream", kind, endpoint.model):
        run = example(case)(run)
    run = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=seed_text is None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )(run)
    if seed_text is not None:
        run = hypothesis_seed(int(seed_text))(run)

    check = f"robustness.bad_input.{api}.{mode}.{kind}"
    began = time.monotonic()
    fuzz_error: Exception | None = None
    try:
        run()
    except Exception as exc:  # hypothesis raises the failure (or an ExceptionGroup of them)
        fuzz_error = exc
    finally:
        http.close()
    elapsed = time.monotonic() - began
    for exc_type, failure in failures.items():
        recorder.record(f"{check}.{exc_type.__name__}", "fail",
                        **failure, first_request=first_failure[exc_type]["request"])  # fmt: skip
    for i, (count, failure) in sorted(seen.items()):
        issue = {"reason": known_issues[i].reason, "source": known_issues[i].source}
        recorder.record(f"{check}.known.{i}", "fail",
                        **{**failure, "measured": {"times": count}}, known_issue=issue)  # fmt: skip
    unseen = [issue for i, issue in enumerate(known_issues) if i not in seen]
    healthy, health_error = True, ""
    try:
        endpoint.probe(timeout=60)
    except Exception as exc:
        healthy, health_error = False, str(exc)
    recorder.record(
        check,
        "pass" if fuzz_error is None and healthy and not seen and not unseen else "fail",
        measured={"requests": sent, "seconds": round(elapsed, 1), "examples": examples},
        observed={
            "status_by_case": {k: dict(v) for k, v in sorted(tally.items())},
            "errors": errors,
        },
        expected={"status": "4xx with error body, or 200 well-formed", "healthy_after": True},
        healthy_after=healthy,
        health_error=health_error,
        seed=seed_text or "derandomized",
        known={known_issues[i].reason: count for i, (count, _) in sorted(seen.items())},
        known_not_seen=[issue.reason for issue in unseen],
    )
    if fuzz_error is not None:
        raise fuzz_error
    assert healthy, f"server unhealthy after the {kind} requests: {health_error}"
    assert not unseen, "known issue(s) of the entry no longer show (fixed? update the entry): " + (
        "; ".join(f"{i.reason} ({i.source})" for i in unseen)
    )
    if seen:
        found = [f"{n} x {known_issues[i].reason}" for i, (n, _) in sorted(seen.items())]
        raise KnownFindings("; ".join(found))


# -- dropped clients ----------------------------------------------------------------------


def _snapshot(endpoint: Endpoint, **labels: str) -> MetricsSnapshot:
    """The server's metrics of this model, filtered by ``labels`` as well."""
    with endpoint.http(10) as http:
        response = http.get("/metrics")
    response.raise_for_status()
    return parse_metrics(response.text, labels={"model_name": endpoint.model, **labels})


def _wait_for(
    endpoint: Endpoint, condition: Callable[[MetricsSnapshot], bool], deadline_s: float
) -> tuple[bool, MetricsSnapshot, float]:
    """Poll ``/metrics`` until ``condition`` holds; (held, last snapshot, seconds waited)."""
    began = time.monotonic()
    while True:
        endpoint.check_alive()
        snap = _snapshot(endpoint)
        if condition(snap):
            return True, snap, time.monotonic() - began
        if time.monotonic() - began > deadline_s:
            return False, snap, time.monotonic() - began
        # Metrics have no push channel: poll at a short interval until the deadline.
        time.sleep(0.2)


def _idle(snap: MetricsSnapshot) -> bool:
    return snap.gauges.get(RUNNING, 0.0) == 0 and snap.gauges.get(WAITING, 0.0) == 0


@pytest.fixture
def metrics_endpoint(endpoint: Endpoint) -> Endpoint:
    """The endpoint, if it exposes vLLM's request gauges (not with --disable-log-stats)."""
    if RUNNING not in _snapshot(endpoint).gauges:
        pytest.skip(f"{endpoint.base_url}/metrics has no {RUNNING} (--disable-log-stats?)")
    ok, snap, _ = _wait_for(endpoint, _idle, DRAIN_DEADLINE_S)
    if not ok:
        pytest.fail(f"server not idle before the test: {snap.gauges}", pytrace=False)
    return endpoint


def _long_request(endpoint: Endpoint, stream: bool, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": endpoint.model,
        "prompt": "The server keeps writing",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if stream:
        body["stream"] = True
    return body


def _finished(endpoint: Endpoint, reason: str) -> float:
    """Requests that ended with ``reason`` ('length', 'stop', ...) so far."""
    return _snapshot(endpoint, finished_reason=reason).counters.get(FINISHED, 0.0)


def _open_raw(endpoint: Endpoint, body: dict[str, Any]) -> socket.socket:
    """Send a completion request on a plain socket and leave the answer unread.

    A socket, not an HTTP client, so the test decides exactly when the client goes away.
    """
    url = urlsplit(endpoint.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    payload = json.dumps(body).encode()
    head = [
        "POST /v1/completions HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{k}: {v}" for k, v in endpoint.headers().items()),
        "Connection: close",
    ]
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    return sock


def _read_until(
    sock: socket.socket, arrived: Callable[[bytes], bool], limit: int = 1 << 20
) -> bytes:
    data = b""
    while not arrived(data) and len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _answered(sock: socket.socket, head: bytes, stream: bool) -> bool:
    """Whether the request on ``sock`` already got its whole answer (what arrived so far is
    ``head``): a plain request answers only at its end, a stream ends with ``[DONE]``."""
    data = head
    sock.setblocking(False)
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return sse.has_done(data) if stream else data.startswith(b"HTTP/")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_dropped_clients_are_freed(
    metrics_endpoint: Endpoint, deployment: Deployment, recorder: Recorder, stream: bool
) -> None:
    """Requests whose client disconnects mid-generation are aborted, not run to the end,
    and the server serves the next request normally.

    The proof is per request: a request counts as dropped only if its answer had not
    arrived when its socket closed (on a loaded host one can finish before the server's
    figures show it started), and the server's count of requests finished by length must
    not exceed those answered before the drop. A run where every request finished first
    measured nothing and fails.
    """
    ep = metrics_endpoint
    count = min(4, deployment.serve.max_num_seqs or 4)
    # As long as the context allows, so a request still runs when its client goes.
    max_tokens = max(64, min(30_000, ep.max_model_len - 64))
    body = _long_request(ep, stream, max_tokens)
    before = _snapshot(ep).counters.get(GENERATED, 0.0)
    # vLLM counts no finish for a client's abort, but a request that ran to the end
    # counts as finished by length.
    length_before = _finished(ep, "length")
    sockets: list[socket.socket] = []
    heads: list[bytes] = []
    answered = 0
    began = time.monotonic()
    try:
        for _ in range(count):
            sockets.append(_open_raw(ep, body))
        if stream:
            # Each stream's first event proves that its request is generating.
            heads = [_read_until(sock, sse.has_data) for sock in sockets]
            bad = [h[:300] for h in heads if not h.startswith(b"HTTP/1.1 200")]
            assert not bad, bad
            started = True
        else:
            # A plain request shows nothing until it ends; the server's figures are the proof.
            heads = [b""] * count
            started, _, _ = _wait_for(
                ep,
                lambda s: s.gauges.get(RUNNING, 0.0) >= 1 or s.counters.get(GENERATED, 0) > before,
                STARTED_S,
            )
        seconds_to_start = time.monotonic() - began
    finally:
        # Dropped at once; what had already been answered is not a drop.
        for sock, head in zip(sockets, heads, strict=False):
            answered += _answered(sock, head, stream)
            sock.close()
    dropped = len(sockets) - answered
    freed, snap, waited = _wait_for(ep, _idle, DRAIN_DEADLINE_S)
    generated = snap.counters.get(GENERATED, 0.0) - before
    ran_to_end = _finished(ep, "length") - length_before
    not_aborted = max(0.0, ran_to_end - answered)
    after = ep.client().completions.create(
        model=ep.model,
        prompt="After the drop",
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    ep.probe()
    ok = (
        started
        and dropped > 0
        and freed
        and not_aborted == 0
        and generated < count * max_tokens
        and after.usage is not None
        and after.usage.completion_tokens == 4
    )
    recorder.record(
        f"robustness.disconnect.{'stream' if stream else 'plain'}",
        "pass" if ok else "fail",
        request={"count": count, "max_tokens": max_tokens, "stream": stream},
        measured={
            "seconds_to_start": round(seconds_to_start, 2),
            "seconds_to_idle": round(waited, 2),
            "dropped": dropped,
            "answered_before_drop": answered,
            "ran_to_end": ran_to_end,
            "generated_tokens": generated,
            "gauges_after": snap.gauges,
        },
        expected={"ran_to_end": answered, "dropped_at_least": 1, "running_after": 0},
    )
    assert started, (
        f"none of the {count} requests of {max_tokens} tokens was seen generating within "
        f"{STARTED_S:.0f} s: {snap.gauges}"
    )
    assert dropped > 0, (
        f"could not measure: all {count} requests of {max_tokens} tokens were answered before "
        f"their clients went ({seconds_to_start:.0f} s to see them start)"
    )
    assert freed, (
        f"{RUNNING}/{WAITING} still {snap.gauges} {DRAIN_DEADLINE_S:.0f} s after the clients "
        "disconnected: the server keeps generating for nobody"
    )
    assert not_aborted == 0 and generated < count * max_tokens, (
        f"of {dropped} requests of {max_tokens} tokens dropped unanswered, {not_aborted:.0f} "
        f"ran to the end ({generated:.0f} tokens generated, {answered} answered before the "
        "drop): they were not aborted"
    )
    assert after.usage is not None and after.usage.completion_tokens == 4


# -- overload -----------------------------------------------------------------------------

#: Streams are ``OVERLOAD_FACTOR`` x max_num_seqs, at most ``OVERLOAD_CAP`` (loopback only).
OVERLOAD_FACTOR = 3
OVERLOAD_CAP = 96
OVERLOAD_TOKENS = 16
OVERLOAD_TIMEOUT_S = 300.0
#: Answers that refuse load cleanly (vLLM queues by default; 503 with --max-num-queued-reqs).
REFUSALS = (429, 503)


async def _one_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    began = time.monotonic()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            text = (await response.aread()).decode(errors="replace")
            status = response.status_code
    except httpx.TimeoutException:
        return {"outcome": "timeout", "status": None, "seconds": time.monotonic() - began}
    except httpx.HTTPError as exc:
        return {"outcome": "transport", "status": None, "problem": str(exc)}
    seconds = time.monotonic() - began
    if status == 200:
        problem = fuzz.check_stream(text)
        if not problem:
            # check_stream found every event a JSON object, so they all decode here.
            usage = None
            for event in sse.events(text.splitlines()):
                usage = (event.get("usage") or {}).get("completion_tokens", usage)
            if usage != OVERLOAD_TOKENS:
                problem = f"stream finished with {usage} tokens, not {OVERLOAD_TOKENS}"
        outcome = "completed" if not problem else "bad"
        return {"outcome": outcome, "status": 200, "seconds": seconds, "problem": problem}
    problem, info = fuzz.check_error_body(status, text)
    if status in REFUSALS and not problem:
        return {"outcome": "refused", "status": status, "seconds": seconds, "error": info}
    return {"outcome": "bad", "status": status, "seconds": seconds, "problem": text[:300]}


async def _overload(endpoint: Endpoint, count: int) -> list[dict[str, Any]]:
    body = {
        "model": endpoint.model,
        "prompt": "Many clients at once",
        "max_tokens": OVERLOAD_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=endpoint.base_url,
        headers=endpoint.headers(),
        timeout=OVERLOAD_TIMEOUT_S,
        limits=limits,
    ) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(_one_stream(client, body) for _ in range(count))),
            OVERLOAD_TIMEOUT_S + 30,
        )


@pytest.mark.timeout(900)
def test_overload_completes_or_refuses_cleanly(
    metrics_endpoint: Endpoint, deployment: Deployment, recorder: Recorder
) -> None:
    """Several times max_num_seqs concurrent streams: each completes or is refused with
    429/503 and an error body; no other 5xx, no hang; the server is idle and healthy after."""
    ep = metrics_endpoint
    seqs = deployment.serve.max_num_seqs
    count = min(OVERLOAD_FACTOR * seqs, OVERLOAD_CAP) if seqs else OVERLOAD_CAP
    began = time.monotonic()
    results = asyncio.run(_overload(ep, count))
    elapsed = time.monotonic() - began
    idle, snap, waited = _wait_for(ep, _idle, DRAIN_DEADLINE_S)
    ep.probe()
    outcomes = collections.Counter(r["outcome"] for r in results)
    statuses = collections.Counter(str(r["status"]) for r in results)
    bad = [r for r in results if r["outcome"] not in ("completed", "refused")]
    seconds = sorted(r["seconds"] for r in results if "seconds" in r)
    recorder.record(
        "robustness.overload",
        "pass" if not bad and idle else "fail",
        request={"streams": count, "max_num_seqs": seqs, "max_tokens": OVERLOAD_TOKENS},
        measured={
            "outcomes": dict(outcomes),
            "statuses": dict(statuses),
            "seconds": round(elapsed, 2),
            "slowest_s": round(seconds[-1], 2) if seconds else None,
            "seconds_to_idle": round(waited, 2),
        },
        expected={"outcomes": ["completed", "refused (429/503)"], "idle_after": True},
        problems=[r.get("problem") for r in bad[:5]],
    )
    assert not bad, f"{len(bad)} of {count} streams neither completed nor were refused: {bad[:3]}"
    assert idle, f"server not idle {DRAIN_DEADLINE_S:.0f} s after the overload: {snap.gauges}"
