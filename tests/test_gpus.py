"""GPU leases: entries get GPUs by their size across processes, wait while they are busy, and
are unavailable only when the node can never fit them. Pure logic on a made-up 8-GPU node:
the holders are real separate processes (as xdist workers are), no GPU is needed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_conformance.launch import gpus
from vllm_conformance.launch.serving import LocalLauncher
from vllm_conformance.matrix import Deployment
from vllm_conformance.perf import estimate

ROOT = Path(__file__).resolve().parent.parent
NODE = [gpus.Gpu(i, "NVIDIA H100 80GB HBM3", 81559) for i in range(8)]


def entry(entry_id: str, count: int, gpu: str = "h100") -> Deployment:
    return Deployment.model_validate(
        {
            "id": entry_id,
            "source": "self-test",
            "model": {"family": "tiny", "precision": "bf16", "generate": "tiny-llama4"},
            "hardware": {"gpu": gpu, "count": count},
            "serve": {"max_model_len": 4096},
        }
    )


# A separate process that leases GPUs for an entry, prints them, and holds them until its
# stdin closes: what an xdist worker does with a running server.
HOLDER = """
import json, sys
from pathlib import Path
from vllm_conformance.launch import gpus
from vllm_conformance.matrix import Deployment
table, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
node = [gpus.Gpu(i, "NVIDIA H100 80GB HBM3", 81559) for i in range(8)]
lease = gpus.Leases(table, poll_s=0.05).acquire(
    Deployment.model_validate(spec), node, sys.argv[3], timeout=120
)
print(json.dumps(lease.indices), flush=True)
sys.stdin.read()
lease.release()
"""


class Holder:
    def __init__(self, table: Path, spec: Deployment, owner: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(table), spec.model_dump_json(), owner],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        assert self.proc.stdout is not None
        self.indices: list[int] = json.loads(self.proc.stdout.readline())

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


@pytest.fixture
def table(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "gpu-leases.json"


@pytest.fixture
def leases(table: Path) -> gpus.Leases:
    return gpus.Leases(table, poll_s=0.05)


def test_one_gpu_entries_run_side_by_side(table: Path, leases: gpus.Leases) -> None:
    a = Holder(table, entry("small-a", 1), "gw0")
    b = Holder(table, entry("small-b", 1), "gw1")
    try:
        assert len(a.indices) == len(b.indices) == 1
        assert a.indices != b.indices
        held = leases.held()
        assert {held[i]["entry"] for i in a.indices + b.indices} == {"small-a", "small-b"}
        # Six GPUs are left: a 4-GPU entry fits beside them, an 8-GPU entry does not.
        four = leases.try_acquire(entry("four", 4), NODE, "gw2")
        assert isinstance(four, gpus.Lease)
        assert set(four.indices).isdisjoint(a.indices + b.indices)
        four.release()
        refused = leases.try_acquire(entry("whole", 8), NODE, "gw2")
        assert isinstance(refused, str)
        assert "6 of 8 h100 free, 8 needed" in refused and "small-a (gw0" in refused
    finally:
        a.release()
        b.release()


def test_a_whole_node_entry_waits_for_busy_gpus_then_gets_the_node(
    table: Path, leases: gpus.Leases
) -> None:
    small = Holder(table, entry("small", 1), "gw1")
    waited = threading.Event()
    reasons: list[str] = []
    got: list[gpus.Lease] = []

    def on_wait(reason: str) -> None:
        reasons.append(reason)
        waited.set()

    waiter = threading.Thread(
        target=lambda: got.append(leases.acquire(entry("whole", 8), NODE, "gw0", 120, on_wait))
    )
    waiter.start()
    assert waited.wait(60), "the 8-GPU entry never waited"
    assert not got, "the 8-GPU entry got GPUs while one was held"
    small.release()
    waiter.join(60)
    assert got and sorted(got[0].indices) == list(range(8))
    assert "held: small (gw1" in reasons[0]
    got[0].release()
    assert leases.held() == {}


def test_first_come_first_served_per_kind(table: Path, leases: gpus.Leases) -> None:
    """A 1-GPU entry that comes after a waiting 8-GPU entry does not take a free GPU from
    under it, so small entries cannot starve a large one."""
    small = Holder(table, entry("small", 1), "gw1")
    queued = threading.Event()
    got: list[gpus.Lease] = []
    waiter = threading.Thread(
        target=lambda: got.append(
            leases.acquire(entry("whole", 8), NODE, "gw0", 120, lambda _: queued.set())
        )
    )
    waiter.start()
    assert queued.wait(60)
    later = leases.try_acquire(entry("later", 1), NODE, "gw2")
    assert isinstance(later, str)
    assert "7 of 8 h100 free" in later and "queued first: whole (8)" in later
    # Another kind's queue is not in the way.
    h200 = [gpus.Gpu(8, "NVIDIA H200", 143771)]
    other = leases.try_acquire(entry("other-kind", 1, "h200"), h200, "gw3")
    assert isinstance(other, gpus.Lease) and other.indices == [8]
    other.release()
    small.release()
    waiter.join(60)
    assert got and len(got[0].indices) == 8
    got[0].release()


def test_a_dead_holder_frees_its_gpus(table: Path, leases: gpus.Leases) -> None:
    holder = Holder(table, entry("crashed", 8), "gw0")
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(timeout=60)
    got = leases.try_acquire(entry("next", 8), NODE, "gw1")
    assert isinstance(got, gpus.Lease), got
    got.release()


def test_the_wait_is_bounded_and_names_the_holder(table: Path, leases: gpus.Leases) -> None:
    holder = Holder(table, entry("long", 8), "gw0")
    try:
        with pytest.raises(gpus.GpusBusy, match=r"small: GPUs still busy after 0 s: .*long"):
            leases.acquire(entry("small", 1), NODE, "gw1", timeout=0.2)
        # The entry that gave up left the queue: nothing queues before a newcomer.
        refused = leases.try_acquire(entry("newcomer", 1), NODE, "gw2")
        assert isinstance(refused, str) and "queued first" not in refused
    finally:
        holder.release()


def test_only_an_entry_the_node_can_never_fit_is_unavailable() -> None:
    four = NODE[:4]
    assert gpus.unavailable(entry("whole", 8), NODE) is None
    assert gpus.unavailable(entry("whole", 8), four) == (
        "needs 8 x h100; this node has 4 (visible: NVIDIA H100 80GB HBM3)"
    )
    assert "needs 1 x h200; this node has 0" in str(gpus.unavailable(entry("x", 1, "h200"), NODE))
    assert gpus.unavailable(entry("c", 1, "cpu"), []) is None
    assert gpus.pick(entry("two", 2), NODE, busy={0, 2}) == [1, 3]
    assert gpus.pick(entry("two", 2), NODE, busy=set(range(7))) is None


def test_startup_timeout_follows_the_model_size() -> None:
    tiny = entry("tiny", 1)
    maverick = Deployment.model_validate(
        {
            "id": "maverick",
            "source": "self-test",
            "model": {"family": "maverick", "precision": "bf16", "path": "/nonexistent"},
            "hardware": {"gpu": "h100", "count": 8},
            "serve": {"tensor_parallel_size": 8, "max_model_len": 300000},
        }
    )
    launcher = LocalLauncher(NODE)
    # The tiny model keeps the floor; 800 GB of Maverick BF16 weights get three planned reads.
    assert launcher.startup_timeout_for(tiny) == estimate.STARTUP_TIMEOUT_MIN_SECONDS
    big = launcher.startup_timeout_for(maverick)
    assert big == pytest.approx(3 * estimate.startup_seconds(maverick))
    assert big > 1500
    assert LocalLauncher(NODE, startup_timeout=60).startup_timeout_for(maverick) == 60
