"""The launcher against the real vLLM CPU server: start, serve, stop, nothing left behind.

One server is started for the whole module and killed by the last test, so the module
costs two server starts (this one and the start that must fail).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_conformance import models
from vllm_conformance.launch import procs
from vllm_conformance.launch.endpoint import EndpointError, ServerDiedError
from vllm_conformance.launch.local import LaunchSpec, ServerStartError, VllmServer

pytestmark = pytest.mark.timeout(900)


def tiny_spec(**overrides: object) -> LaunchSpec:
    args = {
        "model": str(models.materialize("tiny-llama4", {"max_position_embeddings": 4194304})),
        "served_model_name": "tiny-llama4",
        "args": ["--max-model-len", "2048", "--max-num-seqs", "4"],
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "startup_timeout": 600.0,
    }
    return LaunchSpec(**{**args, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    srv = VllmServer(tiny_spec(), tmp_path_factory.mktemp("lifecycle") / "server.log")
    srv.start()
    yield srv
    srv.stop()
    assert procs.tagged_pids(srv.tag) == []


def test_start_reads_what_the_server_reports(server: VllmServer) -> None:
    ep = server.endpoint
    assert ep.model == "tiny-llama4"
    assert ep.max_model_len == 2048
    assert ep.version and ep.version[0].isdigit()
    assert server.kv_cache is not None and server.kv_cache.device == "CPU"
    assert server.kv_cache.concurrency_tokens == 2048
    assert server.startup_seconds and server.startup_seconds > 0


def assert_serves_three_tokens(server: VllmServer) -> None:
    out = server.endpoint.client().completions.create(
        model="tiny-llama4",
        prompt="hello",
        max_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage is not None and out.usage.completion_tokens == 3


def test_serves_a_request(server: VllmServer) -> None:
    assert_serves_three_tokens(server)


def test_server_processes_carry_the_tag(server: VllmServer) -> None:
    tagged = procs.tagged_pids(server.tag)
    assert server.proc is not None and server.proc.pid in tagged
    assert len(tagged) >= 2, "the engine core runs in its own process"


def test_killed_server_is_reported_dead_at_once(server: VllmServer) -> None:
    """SIGKILL the API server: the next check names the death, without waiting."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    began = time.monotonic()
    with pytest.raises(ServerDiedError, match="died with exit code -9"):
        server.endpoint.probe()
    assert time.monotonic() - began < 5
    # Its engine process is orphaned but still tagged: stop() must sweep it.
    server.stop()
    assert procs.tagged_pids(server.tag) == []


def test_start_that_must_fail_reports_vllms_reason(tmp_path: Path) -> None:
    """A max-model-len far beyond the KV space: ServerStartError with vLLM's own words."""
    spec = tiny_spec(args=["--max-model-len", "3000000"])
    srv = VllmServer(spec, tmp_path / "server.log")
    with pytest.raises(ServerStartError) as info:
        srv.start()
    assert info.value.reason is not None
    assert info.value.reason.kind == "kv_cache"
    assert info.value.reason.line in str(info.value)
    assert "last lines of the server log" in str(info.value)
    assert procs.tagged_pids(srv.tag) == []


def test_unreachable_endpoint_is_one_clear_message() -> None:
    from vllm_conformance.launch.endpoint import connect
    from vllm_conformance.launch.local import free_port

    with pytest.raises(EndpointError, match="endpoint unreachable"):
        connect(f"http://127.0.0.1:{free_port()}")


def test_sweep_finds_a_session_member_without_the_tag() -> None:
    """A process that lost the tag (vLLM rewrites titles; a dying process has no environment
    left to read) is still found through the session its server leads."""
    env = {k: v for k, v in os.environ.items() if k != procs.TAG_VAR}
    child = subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)
    try:
        assert child.pid not in procs.tagged_pids("no-such-tag")
        assert child.pid in procs.tagged_pids("no-such-tag", session=child.pid)
        assert procs.end_process_group(child.pid, "no-such-tag", grace=5) == []
    finally:
        child.kill()
        child.wait()


def test_tensor_parallel_workers_start_serve_and_stop(tmp_path: Path) -> None:
    """TP 2 on the CPU backend: the multi-process launch the 4- and 8-GPU entries use
    (API server, engine core, one worker per rank), and a stop that ends every one of them."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"TP 2 binds one CPU per rank; this machine allows {cpus}")
    spec = tiny_spec(
        args=["--max-model-len", "2048", "--max-num-seqs", "4", "--tensor-parallel-size", "2"],
        # One NUMA node cannot be split by vLLM's automatic binding: one CPU per rank.
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"},
    )
    srv = VllmServer(spec, tmp_path / "server.log")
    srv.start()
    try:
        assert_serves_three_tokens(srv)
        # vLLM prefixes each process's log lines with its role and PID.
        log = (tmp_path / "server.log").read_text()
        ranks = {int(pid) for pid in re.findall(r"^\(Worker_TP[01] pid=(\d+)\)", log, re.M)}
        assert len(ranks) == 2, f"one worker per rank expected in the log, found {ranks}"
        assert ranks <= set(procs.tagged_pids(srv.tag))
    finally:
        srv.stop()
    assert procs.tagged_pids(srv.tag, session=srv.proc.pid if srv.proc else None) == []
    assert not [pid for pid in ranks if procs.is_running(pid)]
