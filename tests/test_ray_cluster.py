"""The Ray launcher on a real two-node Ray cluster of this machine, with real vLLM CPU servers.

The cluster is ``scripts/ray-local-cluster``'s: node 127.0.0.2 (head, 2 fake H100) and node
127.0.0.3 (2 fake H200), one CPU each, so that each holds one vLLM CPU server at a time. The
entries are in ``tests/data/ray-matrix.yaml``. Tests run in this order (the last one kills a
node):

| test                                                            | vLLM servers started     |
|-----------------------------------------------------------------|--------------------------|
| placement by GPU kind and count; skip reasons from the cluster  | none                     |
| ``pytest -n 3 -m cpu --launcher ray``: the serving and context  | 3, two at a time         |
| suites on three CPU entries, one xdist worker each: two         |                          |
| placed on different nodes, the third queued until a node is     |                          |
| free; an entry over three nodes skipped with the reason         |                          |
| vLLM CPU refuses its Ray executor: the start fails, with why    | 1, fails in about 30 s   |
| one deployment over both nodes (``vllm serve --nnodes 2``,      | 1 (two processes)        |
| TP 2); then 127.0.0.3's raylet is killed: the deployment is     |                          |
| reported dead in one message, and nothing is left on any node   |                          |

Nothing any test starts may be left behind: after each, no process carries a Ray launcher's
run tag; after the module, none carries the cluster's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from vllm_conformance import report
from vllm_conformance.launch import procs
from vllm_conformance.launch import ray as ray_launch
from vllm_conformance.launch.endpoint import ServerDiedError
from vllm_conformance.launch.local import ServerStartError
from vllm_conformance.matrix import Deployment, load

pytestmark = pytest.mark.timeout(1500)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ray-local-cluster"
MATRIX = ROOT / "tests" / "data" / "ray-matrix.yaml"
CLUSTER_VAR = "VLLM_CONFORMANCE_RAY_CLUSTER"
KEY_VAR = "VLLM_CONFORMANCE_RAY_TEST_KEY"
HEAD, OTHER = "127.0.0.2", "127.0.0.3"


@dataclass(frozen=True)
class Cluster:
    dir: Path
    address: str

    def raylet(self, node_dir: str) -> int:
        """The PID of a node's raylet (``n1``: the head, ``n2``: 127.0.0.3)."""
        for pid in procs.tagged_pids(str(self.dir), var=CLUSTER_VAR):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"/raylet") and any(
                f"{self.dir}/{node_dir}/".encode() in a for a in argv
            ):
                return pid
        raise AssertionError(f"no raylet of {self.dir}/{node_dir}")


def run_pids() -> list[int]:
    """Live processes started for any Ray launcher's server (they carry its run tag)."""
    needle = f"{ray_launch.RUN_TAG_VAR}=".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not procs.is_running(int(proc.name)):
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(var.startswith(needle) for var in environ):
            found.append(int(proc.name))
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Short: Ray's socket paths under it must stay within the 107 bytes of a Unix socket.
    root = Path(tempfile.mkdtemp(prefix="vcr-", dir="/tmp"))
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        started = subprocess.run(
            [SCRIPT, "start", root], env=env, capture_output=True, text=True, timeout=240
        )
        assert started.returncode == 0, started.stderr + started.stdout
        yield Cluster(root, started.stdout.split()[-1])
    finally:
        stopped = subprocess.run(
            [SCRIPT, "stop", root], env=env, capture_output=True, text=True, timeout=120
        )
        assert stopped.returncode == 0, stopped.stderr
        assert procs.tagged_pids(str(root), var=CLUSTER_VAR) == []
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def entries() -> dict[str, Deployment]:
    return load([MATRIX]).known


@pytest.fixture(scope="module")
def launcher(cluster: Cluster) -> Iterator[ray_launch.RayLauncher]:
    """A launcher in this process (a Ray driver), for the tests below the suites."""
    launch = ray_launch.RayLauncher(cluster.address, startup_timeout=600, queue_timeout=300)
    yield launch
    launch.close()


def node_ids() -> dict[str, str]:
    return {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_placement_by_gpu_kind_and_count(
    launcher: ray_launch.RayLauncher, entries: dict[str, Deployment]
) -> None:
    """Entries that can never fit are named with the cluster's shape; the rest are placed by
    GPU kind (2 x H200 only fit 127.0.0.3)."""
    assert launcher.unavailable(entries["ray-h100x4"]) == (
        "needs 4 x H100, 1 CPU on one node; the Ray cluster has 1 node(s) of 2 x H100, 1 CPU; "
        "1 node(s) of 2 x H200, 1 CPU"
    )
    assert launcher.unavailable(entries["ray-cpu-3nodes"]) == (
        "needs 1 CPU on 3 nodes; the Ray cluster has 1 node(s) of 2 x H100, 1 CPU; "
        "1 node(s) of 2 x H200, 1 CPU"
    )
    h200 = ray_launch.plan(entries["ray-h200x2"])
    group = placement_group(list(h200.bundles), h200.strategy)
    try:
        assert group.wait(60), "2 x H200 were never placed"
        placed = placement_group_table(group)["bundles_to_node_id"][0]
        assert placed == node_ids()[OTHER]
    finally:
        remove_placement_group(group)


ENTRIES = ("ray-cpu-a", "ray-cpu-b", "ray-cpu-c", "ray-cpu-3nodes")


def test_cpu_suites_over_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    """``pytest -n 3 -m cpu --launcher ray`` of the serving and context suites on three CPU
    entries (one xdist worker each): two get a node each, the third waits for one; every
    test passes; an entry that needs three nodes is skipped, saying so."""
    key = "ray-test-" + os.urandom(8).hex()
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "3"]
    argv += ["--pyargs", "vllm_conformance.suites.test_serving"]
    argv += ["vllm_conformance.suites.test_context", "-m", "cpu"]
    argv += ["--launcher", "ray", "--ray-address", cluster.address, "--ray-queue-timeout", "900"]
    argv += ["--matrix", str(MATRIX), *(f"--entry={e}" for e in ENTRIES)]
    argv += ["--reports-dir", str(tmp_path), "--run-id", "run"]
    try:
        run = subprocess.run(
            argv,
            cwd=ROOT,
            env={**os.environ, KEY_VAR: key},
            capture_output=True,
            text=True,
            timeout=1400,
        )
    finally:
        # The run ended (or timed out: subprocess.run killed it); what it started must not stay.
        assert run_pids() == []
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]

    started: dict[str, dict[str, Any]] = {}
    tests: dict[str, list[dict[str, Any]]] = {}
    for record in report.load_records(tmp_path / "run"):
        if record["kind"] == "server" and record["status"] == "started":
            started[record["entry"]] = record
        if record["kind"] == "test" and (
            record["phase"] == "call" or record["outcome"] == "skipped"
        ):
            tests.setdefault(record["entry"], []).append(record)
    assert sorted(started) == ["ray-cpu-a", "ray-cpu-b", "ray-cpu-c"]
    host = {e: r["base_url"].split("//")[1].split(":")[0] for e, r in started.items()}
    # The two placed at once hold one node each; the third got a node only once one of them
    # had started, run its tests and stopped.
    queued = max(started, key=lambda e: started[e]["placed_at"])
    first = sorted(set(started) - {queued})
    assert {host[e] for e in first} == {HEAD, OTHER}, host
    assert started[queued]["placed_at"] > min(started[e]["time"] for e in first), started
    assert started[queued]["queued_seconds"] > 10 * max(started[e]["queued_seconds"] for e in first)
    for entry in started:
        outcomes = [r["outcome"] for r in tests[entry]]
        assert "failed" not in outcomes and outcomes.count("passed") >= 10, tests[entry]
    (skip,) = {r["message"] for r in tests["ray-cpu-3nodes"]}
    assert "needs 1 CPU on 3 nodes; the Ray cluster has" in skip
    # The key reached the server (ray-cpu-a's requests were authorized) and no file.
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert leaks == []


def test_ray_executor_refused_by_vllm_cpu(
    cluster: Cluster,
    launcher: ray_launch.RayLauncher,
    entries: dict[str, Deployment],
    tmp_path: Path,
) -> None:
    """``--distributed-executor-backend ray`` reaches vLLM, which joins the cluster (the
    launcher hands it the address) and then refuses its Ray executor on CPU: the start fails
    at once, with vLLM's reason in the log copied from the node."""
    srv = launcher.server(entries["ray-cpu-ray-executor"], tmp_path / "server.log")
    with pytest.raises(ServerStartError, match=r"exited with code 1 during start-up"):
        srv.start()
    log = srv.log_path.read_text()
    assert "Connected to Ray cluster" in log and cluster.address in log
    assert "ValueError: current platform cpu does not support ray." in log
    assert run_pids() == []


def test_deployment_over_two_nodes_and_a_node_killed(
    cluster: Cluster,
    launcher: ray_launch.RayLauncher,
    entries: dict[str, Deployment],
    tmp_path: Path,
) -> None:
    """vLLM's multi-node mode over both nodes serves; killing 127.0.0.3's raylet (whichever
    rank it holds) fails the deployment with one message naming the node, requests fail,
    and no process of it is left on either node."""
    srv = launcher.server(entries["ray-cpu-2nodes"], tmp_path / "server.log")
    endpoint = srv.start()
    try:
        assert sorted(srv.placement["nodes"]) == [HEAD, OTHER]
        follower_log = (tmp_path / "server.rank1.log").read_text()
        assert "--nnodes 2 --node-rank 1" in follower_log and "--headless" in follower_log
        assert "headless multiproc executor" in follower_log
        assert "world_size=2" in srv.log_path.read_text()
        out = endpoint.client().completions.create(
            model=endpoint.model, prompt="hello", max_tokens=3, temperature=0
        )
        assert out.usage is not None and out.usage.completion_tokens == 3
        endpoint.check_alive()

        os.kill(cluster.raylet("n2"), signal.SIGKILL)
        deadline = time.monotonic() + ray_launch.UNREACHABLE_S + 60
        while srv.alive():
            # Ray declares a node dead after missed health checks; ask again until it has.
            assert time.monotonic() < deadline, "the deployment still counts as alive"
            time.sleep(1.0)
        with pytest.raises(ServerDiedError) as died:
            endpoint.check_alive()
        message = str(died.value)
        assert message.startswith("ray-cpu-2nodes on Ray: the Ray actor of node rank ")
        assert f"(Ray node {OTHER}) died" in message and "node has died" in message
    finally:
        srv.stop()
    assert run_pids() == []
