"""The Ray launcher's decisions, without a cluster: placement plans, skip reasons from a
cluster's shape, the multi-node command lines, the matrix rules for ``hardware.nodes``, the
options; and the lifeline that ends a server whose launcher died (with real processes)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from vllm_conformance.launch import procs, serving
from vllm_conformance.launch import ray as ray_launch
from vllm_conformance.matrix import Deployment, load, settings

ROOT = Path(__file__).resolve().parent.parent


def entry(gpu: str = "h100", count: int = 1, nodes: int = 1, **serve: Any) -> Deployment:
    return Deployment.model_validate(
        {
            "id": "e",
            "source": "self-test",
            "model": {"family": "tiny", "precision": "bf16", "generate": "tiny-llama4"},
            "hardware": {"gpu": gpu, "count": count, "nodes": nodes},
            "serve": {"max_model_len": 1024, **serve},
        }
    )


def node(gpus: int, kind: str | None, cpus: int = 64) -> dict[str, float]:
    resources = {"CPU": float(cpus), "GPU": float(gpus), "memory": 1e12}
    if kind:
        resources[f"accelerator_type:{kind}"] = 1.0
    return resources


TWO_BY_FOUR = [node(4, "H100"), node(4, "H100")]


def test_one_node_entry_is_one_packed_bundle_of_its_gpus_and_kind() -> None:
    plan = ray_launch.plan(entry("h200", 8, tensor_parallel_size=8))
    assert plan == ray_launch.Placement(
        ({"CPU": 1.0, "GPU": 8.0, "accelerator_type:H200": 0.001},), "STRICT_PACK"
    )


def test_cpu_entry_takes_one_cpu() -> None:
    assert ray_launch.plan(entry("cpu")).bundles == ({"CPU": 1.0},)


def test_multi_node_entry_spreads_an_equal_share_per_node() -> None:
    plan = ray_launch.plan(
        entry("h100", 8, nodes=2, tensor_parallel_size=4, pipeline_parallel_size=2)
    )
    bundle = {"CPU": 1.0, "GPU": 4.0, "accelerator_type:H100": 0.001}
    assert plan == ray_launch.Placement((bundle, bundle), "STRICT_SPREAD")
    assert ray_launch.unfit(entry("h100", 8, nodes=2, tensor_parallel_size=8), TWO_BY_FOUR) is None


def test_entries_that_never_fit_say_why() -> None:
    assert ray_launch.unfit(entry("h100", 4, tensor_parallel_size=4), TWO_BY_FOUR) is None
    assert ray_launch.unfit(entry("h100", 8, tensor_parallel_size=8), TWO_BY_FOUR) == (
        "needs 8 x H100, 1 CPU on one node; the Ray cluster has 2 node(s) of 4 x H100, 64 CPU"
    )
    assert ray_launch.unfit(entry("h200", 1), TWO_BY_FOUR) == (
        "needs 1 x H200, 1 CPU on one node; the Ray cluster has 2 node(s) of 4 x H100, 64 CPU"
    )
    three = entry("h100", 12, nodes=3, tensor_parallel_size=4, pipeline_parallel_size=3)
    assert ray_launch.unfit(three, TWO_BY_FOUR) == (
        "needs 4 x H100, 1 CPU on 3 nodes; the Ray cluster has 2 node(s) of 4 x H100, 64 CPU"
    )
    assert ray_launch.unfit(entry("cpu"), []) == (
        "needs 1 CPU on one node; the Ray cluster has no alive node"
    )


def test_ray_executor_reserves_no_gpu_and_needs_them_in_the_cluster() -> None:
    rayexec = entry(
        "h100", 8, tensor_parallel_size=8, extra_args=["--distributed-executor-backend", "ray"]
    )
    assert ray_launch.ray_executor(rayexec)
    assert ray_launch.ray_executor(entry(extra_args=["--distributed-executor-backend=ray"]))
    assert not ray_launch.ray_executor(entry(extra_args=["--distributed-executor-backend", "mp"]))
    assert ray_launch.plan(rayexec).bundles == ({"CPU": 1.0},)
    # vLLM's own placement group may span nodes: 2 x 4 H100 hold it, 1 x 4 does not.
    assert ray_launch.unfit(rayexec, TWO_BY_FOUR) is None
    assert ray_launch.unfit(rayexec, TWO_BY_FOUR[:1]) == (
        "needs 8 x H100 in the Ray cluster for vLLM's Ray executor; the cluster has 4"
    )


def test_rank_command_lines() -> None:
    head = ray_launch.rank_args(0, 2, "10.0.0.1", 29501)
    follower = ray_launch.rank_args(1, 2, "10.0.0.1", 29501)
    common = ["--nnodes", "2", "--master-addr", "10.0.0.1", "--master-port", "29501"]
    assert [a for a in head if a not in ("--node-rank", "0")] == common
    assert follower == [*head[:3], "1", *head[4:], "--headless"]
    assert "--headless" not in head


@pytest.mark.parametrize(
    ("hardware", "serve", "message"),
    [
        ({"gpu": "h100", "count": 6, "nodes": 4}, {"tensor_parallel_size": 6}, "split evenly"),
        ({"gpu": "cpu", "nodes": 2}, {"pipeline_parallel_size": 3}, "not a multiple of"),
        ({"gpu": "h100", "count": 8, "nodes": 2}, {"tensor_parallel_size": 4}, "one rank per GPU"),
    ],
)
def test_matrix_rules_for_nodes(
    hardware: dict[str, Any], serve: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        entry(**hardware, **serve)


def test_local_launcher_refuses_a_multi_node_entry() -> None:
    launcher = serving.LocalLauncher([], startup_timeout=60)
    assert launcher.unavailable(entry("cpu", nodes=2, tensor_parallel_size=2)) == (
        "spans 2 nodes: run it with --launcher ray"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--launcher", "nope"], "--launcher: bad value 'nope': choose 'local' or 'ray'"),
        (["--launcher", "ray"], "--launcher ray needs --ray-address"),
    ],
)
def test_launcher_options_fail_clearly(args: list[str], message: str, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "pytest", "--collect-only", "-q", "--reports-dir", str(tmp_path)]
    run = subprocess.run(
        [*argv, "--pyargs", "vllm_conformance.suites.test_serving", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert message in run.stderr


# -- the lifeline -------------------------------------------------------------------------------

#: Starts a server under a lifeline as a launcher would, prints the wrapper's PID, then
#: waits to be killed; the server stands in for vLLM: a process tree in its own session.
LAUNCHER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    read_end, write_end = os.pipe()
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "vllm_conformance.launch.lifeline", str(read_end), "--",
         "bash", "-c", "sleep 300 & sleep 300; wait"],
        pass_fds=(read_end,), start_new_session=True,
    )
    os.close(read_end)
    print(wrapper.pid, flush=True)
    time.sleep(300)
    """
)


def _server_tree(tag: str) -> tuple[subprocess.Popen[str], int]:
    """The launcher process and the lifeline wrapper (its direct child), once all is up."""
    env = {**os.environ, procs.TAG_VAR: tag}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER], env=env, stdout=subprocess.PIPE, text=True
    )
    assert launcher.stdout is not None
    wrapper = int(launcher.stdout.readline())
    deadline = time.monotonic() + 30
    # the launcher, the wrapper, the watcher, bash and two sleeps
    while len(procs.tagged_pids(tag)) < 6:
        assert time.monotonic() < deadline, procs.tagged_pids(tag)
        time.sleep(0.1)
    return launcher, wrapper


def _left(tag: str, spare: int | None = None, timeout: float = 30.0) -> list[int]:
    """The tagged processes but ``spare`` once they are gone, or those left at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in procs.tagged_pids(tag) if pid != spare]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_lifeline_ends_the_server_when_its_launcher_is_killed() -> None:
    """SIGKILL of the launcher and of its direct child (what a Ray worker that dies does to
    its children): the watcher below them ends the whole server."""
    tag = uuid.uuid4().hex
    launcher, wrapper = _server_tree(tag)
    os.kill(wrapper, signal.SIGKILL)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert _left(tag) == []


def test_lifeline_waits_for_the_server_on_teardown() -> None:
    """Teardown's SIGTERM to the session: the server ends, the wrapper reports its code."""
    tag = uuid.uuid4().hex
    launcher, wrapper = _server_tree(tag)
    try:
        os.killpg(wrapper, signal.SIGTERM)
        assert _left(tag, spare=launcher.pid) == []
    finally:
        launcher.kill()
        launcher.wait()


def test_lifeline_passes_the_exit_code_and_waits_for_teardown() -> None:
    read_end, write_end = os.pipe()
    try:
        lifeline = [sys.executable, "-m", "vllm_conformance.launch.lifeline", str(read_end)]
        done = subprocess.run(
            [*lifeline, "--", "bash", "-c", "exit 7"],
            pass_fds=(read_end,),
            timeout=60,
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert done.returncode == 7


def test_kuberay_example_runs_the_ray_launcher() -> None:
    """The RayJob example is a RayJob whose entrypoint uses options that exist."""
    job = yaml.safe_load((ROOT / "ci-examples" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[argv.index("--launcher") + 1] == "ray"
    assert argv[argv.index("--ray-address") + 1] == "auto"
    ours = {a[2:] for a in argv if a.startswith("--") and a[2:] not in ("pyargs",)}
    assert ours <= set(settings.BY_NAME), ours - set(settings.BY_NAME)


def test_example_gpu_entries_plan_as_documented() -> None:
    """The GPU entries of the recipe (not run here) are valid and plan as docs/ray.md says."""
    known = load([ROOT / "ci-examples" / "ray-matrix.yaml"]).known
    scout = ray_launch.plan(known["blog-scout-2x8xh200-10m-fp8kv"])
    assert scout.strategy == "STRICT_SPREAD" and len(scout.bundles) == 2
    assert scout.bundles[0]["GPU"] == 8 and "accelerator_type:H200" in scout.bundles[0]
    assert known["blog-scout-2x8xh200-10m-fp8kv"].serve.max_model_len == 10 * 2**20
    assert ray_launch.plan(known["tiny-h100x2-ray-executor"]).bundles == ({"CPU": 1.0},)
    assert ray_launch.plan(known["tiny-2x1xh100-tp2"]).bundles[1]["GPU"] == 1
