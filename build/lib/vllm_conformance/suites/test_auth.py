"""Authentication: a deployment served with ``--api-key`` guards ``/v1/*`` and leaks no key.

An entry opts in with ``serve.api_key_env``: the harness reads the key from that variable
(or makes a random one) and hands it to vLLM as ``VLLM_API_KEY`` in the server's
environment, never on its command line. In endpoint mode the key is ``--api-key``.

What vLLM does (0.32): its middleware guards the path prefixes ``/v1``, ``/v2``,
``/inference`` and ``/cohere`` and answers ``401 {"error": "Unauthorized"}``, which is *not*
the OpenAI error shape. Everything else stays open: ``/health``, ``/ping``, ``/version``,
``/metrics`` and also ``/tokenize`` and ``/detokenize``. The tests assert the guard and
``/health`` being open (load balancers probe it without a key) and record the status of
the other open paths, so a change shows in the upgrade diff.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from vllm_conformance import plugin
from vllm_conformance.fixtures.recorder import Recorder
from vllm_conformance.launch import procs
from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.matrix import Deployment

#: (method, path, body) of guarded requests; bodies are tiny.
GUARDED: tuple[tuple[str, str, dict[str, Any] | None], ...] = (
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1, "temperature": 0}),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0},
    ),
)

#: Paths vLLM leaves open; only /health is asserted, the rest are recorded.
OPEN: tuple[tuple[str, str, dict[str, Any] | None], ...] = (
    ("GET", "/health", None),
    ("GET", "/ping", None),
    ("GET", "/version", None),
    ("GET", "/metrics", None),
    ("POST", "/tokenize", {"prompt": "hi"}),
)


@pytest.fixture
def keyed(deployment: Deployment, request: pytest.FixtureRequest) -> Endpoint:
    """The endpoint of an entry served with an API key; other entries skip (no server)."""
    st = plugin.state(request.config)
    remote_key = bool(st.endpoint and st.api_key)
    if deployment.serve.api_key_env is None and not remote_key:
        pytest.skip(f"{deployment.id} is served without --api-key (no serve.api_key_env)")
    endpoint: Endpoint = request.getfixturevalue("endpoint")
    if not endpoint.api_key:
        pytest.skip(f"{deployment.id}: no API key known for {endpoint.base_url}")
    return endpoint


def _call(
    endpoint: Endpoint,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
) -> httpx.Response:
    if body is not None:
        body = {"model": endpoint.model, **body}
    with httpx.Client(base_url=endpoint.base_url, timeout=60) as http:
        return http.request(method, path, json=body, headers=headers)


def _wrong_keys(key: str) -> dict[str, dict[str, str]]:
    """Header sets that must not pass, by name."""
    return {
        "none": {},
        "wrong": {"Authorization": "Bearer not-the-key"},
        "key_plus_one": {"Authorization": f"Bearer {key}x"},
        "key_prefix": {"Authorization": f"Bearer {key[:-1]}"},
        "no_scheme": {"Authorization": key},
        "basic_scheme": {"Authorization": f"Basic {key}"},
        "empty_bearer": {"Authorization": "Bearer"},
        "x_api_key": {"X-API-Key": key},
    }


def test_missing_or_wrong_key_is_401(keyed: Endpoint, recorder: Recorder) -> None:
    """No key, a wrong key, a near miss or another scheme on /v1/*: 401, key not echoed."""
    key = keyed.api_key
    assert key
    seen: dict[str, int] = {}
    bodies: dict[str, str] = {}
    for method, path, body in GUARDED:
        for name, headers in _wrong_keys(key).items():
            response = _call(keyed, method, path, body, headers)
            seen[f"{method} {path} [{name}]"] = response.status_code
            bodies[str(response.status_code)] = response.text[:200]
            assert key not in response.text
    bad = {k: v for k, v in seen.items() if v != 401}
    recorder.record(
        "auth.wrong_key",
        "pass" if not bad else "fail",
        request={"cases": sorted(seen)},
        status=seen,
        observed={"bodies": bodies},
        expected={"status": 401},
    )
    assert not bad, f"requests without the right key were not refused with 401: {bad}"


def test_right_key_is_served(keyed: Endpoint, recorder: Recorder) -> None:
    """The right key (any case of 'Bearer') is served on every guarded path."""
    key = keyed.api_key
    seen: dict[str, int] = {}
    for method, path, body in GUARDED:
        for scheme in ("Bearer", "bearer"):
            response = _call(keyed, method, path, body, {"Authorization": f"{scheme} {key}"})
            seen[f"{method} {path} [{scheme}]"] = response.status_code
    bad = {k: v for k, v in seen.items() if v != 200}
    recorder.record(
        "auth.right_key", "pass" if not bad else "fail", status=seen, expected={"status": 200}
    )
    assert not bad, f"requests with the right key were not served: {bad}"


def test_unguarded_paths(keyed: Endpoint, recorder: Recorder) -> None:
    """``/health`` answers without a key (documented vLLM behaviour: ``--api-key`` guards
    /v1, /v2, /inference, /cohere only); the other open paths are recorded as observed."""
    seen: dict[str, int] = {}
    for method, path, body in OPEN:
        seen[f"{method} {path}"] = _call(keyed, method, path, body, {}).status_code
    recorder.record(
        "auth.unguarded_paths",
        "observed",
        status=seen,
        expected={"GET /health": 200},
        source="vllm: AuthenticationMiddleware guards /v1, /v2, /inference, /cohere",
    )
    assert seen["GET /health"] == 200, f"/health needs a key: {seen}"


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_key_in_no_harness_file(
    keyed: Endpoint, recorder: Recorder, request: pytest.FixtureRequest
) -> None:
    """The key appears in no file the harness wrote (run directory, server log), nor on the
    command line of any server process."""
    key = keyed.api_key
    assert key
    needle = key.encode()
    run_dir = plugin.state(request.config).run_dir
    scanned = _files(run_dir) if run_dir.exists() else []
    if keyed.log_path is not None and keyed.log_path not in scanned:
        scanned.append(keyed.log_path)
    leaks = [str(p) for p in scanned if p.exists() and needle in p.read_bytes()]
    cmdlines: list[str] = []
    tag = getattr(keyed.server, "tag", None)
    if tag:
        for pid in procs.tagged_pids(tag):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            cmdlines.append(str(pid))
            if needle in cmdline:
                leaks.append(f"/proc/{pid}/cmdline")
    recorder.record(
        "auth.key_not_written",
        "pass" if not leaks else "fail",
        measured={"files_scanned": len(scanned), "processes_scanned": len(cmdlines)},
        leaks=leaks,
    )
    assert scanned, f"nothing to scan under {run_dir}"
    assert not leaks, f"the API key was written to: {leaks}"
