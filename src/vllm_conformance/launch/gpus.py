"""The GPUs of this node, their datasheets, and leases that hand them out by entry size.

Every process on the node (each pytest-xdist worker, a second run, capacity discovery) takes
GPUs through one lease table (:class:`Leases`), so an entry gets exactly as many GPUs as its
``hardware.count`` whichever worker runs it: an 8-GPU entry gets the whole node when it comes,
and 1-GPU entries run side by side while they fit. An entry whose GPUs are busy waits for
them (first come, first served per GPU kind, so a large entry is not starved by small ones
that come after it); only an entry that the node can never fit is unavailable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_conformance.launch import procs
from vllm_conformance.matrix import Deployment

_KINDS = {"H100": "h100", "H200": "h200", "B200": "b200", "A100": "a100"}


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU (SXM form, dense math: no sparsity)."""

    memory_gib: float
    #: HBM bandwidth, bytes per second
    bandwidth: float
    #: peak dense tensor FLOP/s by operand precision (absent: not supported)
    peak_flops: dict[str, float]
    source: str

    def peak(self, precision: str) -> float:
        """The fastest peak usable for ``precision`` (fp8 weights may not run fp4 math)."""
        order = ("fp4", "fp8", "bf16")
        wanted = {"fp4": 0, "int4": 0, "fp8": 1}.get(precision, 2)
        usable = [self.peak_flops[p] for p in order[wanted:] if p in self.peak_flops]
        return max(usable)


#: Per GPU kind of the matrix. Memory as the driver reports it (``nvidia-smi``). ``cpu`` is
#: the vLLM CPU backend on the 2-core machines CI runs on: nominal upper bounds, no datasheet.
SPECS: dict[str, GpuSpec] = {
    "cpu": GpuSpec(
        24, 4e10, {"bf16": 8e12}, "nominal: 2 x86 cores, AMX 2,048 bf16 FLOP/cycle at 2 GHz"
    ),
    "a100": GpuSpec(80, 2.039e12, {"bf16": 312e12}, "NVIDIA A100 datasheet (80GB SXM)"),
    "h100": GpuSpec(79.6, 3.35e12, {"bf16": 989e12, "fp8": 1979e12}, "NVIDIA H100 datasheet (SXM)"),
    "h200": GpuSpec(139.8, 4.8e12, {"bf16": 989e12, "fp8": 1979e12}, "NVIDIA H200 datasheet (SXM)"),
    "b200": GpuSpec(
        178.4,
        8e12,
        {"bf16": 2250e12, "fp8": 4500e12, "fp4": 9000e12},
        "NVIDIA DGX B200 datasheet, per GPU",
    ),
}


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int

    @property
    def kind(self) -> str | None:
        """The matrix's GPU kind for this device (``h100`` ...), or None if unknown."""
        upper = self.name.upper()
        return next((kind for key, kind in _KINDS.items() if key in upper), None)


def detect() -> list[Gpu]:
    """The NVIDIA GPUs visible to this process (honours ``CUDA_VISIBLE_DEVICES``)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, name, memory = (part.strip() for part in line.split(","))
        gpus.append(Gpu(int(index), name, int(float(memory))))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [int(v) for v in visible.split(",") if v.strip().isdigit()]
        gpus = [g for g in gpus if g.index in wanted]
    return gpus


def unavailable(entry: Deployment, gpus: Sequence[Gpu]) -> str | None:
    """Why this node can never run ``entry`` (too few GPUs of its kind), or None."""
    hw = entry.hardware
    if hw.gpu == "cpu":
        return None
    matching = [g for g in gpus if g.kind == hw.gpu]
    if len(matching) >= hw.count:
        return None
    have = ", ".join(sorted({g.name for g in gpus})) or "no GPU"
    return f"needs {hw.count} x {hw.gpu}; this node has {len(matching)} (visible: {have})"


def pick(entry: Deployment, gpus: Sequence[Gpu], busy: set[int]) -> list[int] | None:
    """The lowest free indices of the entry's kind, as many as it needs, or None."""
    free = [g.index for g in gpus if g.kind == entry.hardware.gpu and g.index not in busy]
    return free[: entry.hardware.count] if len(free) >= entry.hardware.count else None


#: The node-wide lease table unless ``--gpu-leases`` names another.
DEFAULT_LEASES = Path(tempfile.gettempdir()) / "vllm-conformance" / "gpu-leases.json"


class GpusBusy(TimeoutError):
    """An entry waited its bound for GPUs that stayed busy; the message names the holders."""


@dataclass
class Lease:
    """The GPUs one entry's server holds until :meth:`release` (none for a CPU entry)."""

    entry: str
    indices: list[int]
    leases: Leases | None = None
    released: bool = field(default=False, init=False)

    def release(self) -> None:
        if not self.released and self.leases is not None:
            self.leases.release(self)
        self.released = True


class Leases:
    """A lease table of the node's GPUs, shared by every process through one JSON file.

    The table is read and written only under an exclusive ``flock`` of ``<path>.lock``; it
    holds the leases (GPU index -> entry, owner, pid) and the queue of entries waiting, in
    the order they came. A lease or queue place whose process is gone is dropped at the next
    look, so a killed worker never keeps GPUs.
    """

    def __init__(self, path: Path = DEFAULT_LEASES, poll_s: float = 2.0) -> None:
        self.path = path
        self.poll_s = poll_s

    @contextlib.contextmanager
    def _table(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                table = self._read()
                yield table
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(table, indent=1))
                os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            table = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            table = {}
        leases = {k: v for k, v in table.get("leases", {}).items() if procs.is_running(v["pid"])}
        queue = [q for q in table.get("queue", []) if procs.is_running(q["pid"])]
        return {"leases": leases, "queue": queue}

    def held(self) -> dict[int, dict[str, Any]]:
        """GPU index -> who holds it (entry, owner, pid, since)."""
        with self._table() as table:
            return {int(k): v for k, v in table["leases"].items()}

    def try_acquire(
        self, entry: Deployment, gpus: Sequence[Gpu], owner: str, queue: bool = False
    ) -> Lease | str:
        """A lease now, or why not (the holders, the entries queued first). With ``queue``,
        a refused entry keeps (or takes) its place in the queue of its GPU kind."""
        me = {"entry": entry.id, "owner": owner, "pid": os.getpid()}
        kind = entry.hardware.gpu
        with self._table() as table:
            mine = [q for q in table["queue"] if _same(q, me)]
            ahead = [q for q in table["queue"] if q["kind"] == kind and not _same(q, me)]
            if mine:
                ahead = ahead[: table["queue"].index(mine[0])]
            busy = {int(k) for k in table["leases"]}
            indices = None if ahead else pick(entry, gpus, busy)
            if indices is not None:
                table["queue"] = [q for q in table["queue"] if not _same(q, me)]
                for index in indices:
                    table["leases"][str(index)] = {**me, "since": time.time()}
                return Lease(entry.id, indices, self)
            if queue and not mine:
                table["queue"].append(
                    {**me, "kind": kind, "count": entry.hardware.count, "since": time.time()}
                )
            return _why_busy(entry, gpus, table, ahead)

    def acquire(
        self,
        entry: Deployment,
        gpus: Sequence[Gpu],
        owner: str,
        timeout: float,
        on_wait: Callable[[str], None] | None = None,
    ) -> Lease:
        """A lease, waiting in the queue up to ``timeout`` seconds (then :class:`GpusBusy`).
        ``on_wait`` gets the reason after each refused look."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.try_acquire(entry, gpus, owner, queue=True)
            if isinstance(got, Lease):
                return got
            if on_wait is not None:
                on_wait(got)
            if time.monotonic() >= deadline:
                self._leave_queue(entry, owner)
                raise GpusBusy(f"{entry.id}: GPUs still busy after {timeout:.0f} s: {got}")
            # Another process frees GPUs at a time nothing here can wait on: look again.
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))

    def release(self, lease: Lease) -> None:
        with self._table() as table:
            for index in lease.indices:
                held = table["leases"].get(str(index))
                if held and held["pid"] == os.getpid() and held["entry"] == lease.entry:
                    del table["leases"][str(index)]

    def _leave_queue(self, entry: Deployment, owner: str) -> None:
        me = {"entry": entry.id, "owner": owner, "pid": os.getpid()}
        with self._table() as table:
            table["queue"] = [q for q in table["queue"] if not _same(q, me)]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in ("entry", "owner", "pid"))


def _why_busy(
    entry: Deployment, gpus: Sequence[Gpu], table: dict[str, Any], ahead: list[dict[str, Any]]
) -> str:
    kind, count = entry.hardware.gpu, entry.hardware.count
    mine = [g.index for g in gpus if g.kind == kind]
    holders: dict[str, list[int]] = {}
    for index in mine:
        if (held := table["leases"].get(str(index))) is not None:
            label = f"{held['entry']} ({held['owner']}, {time.time() - held['since']:.0f} s)"
            holders.setdefault(label, []).append(index)
    free = len(mine) - sum(len(v) for v in holders.values())
    why = f"{free} of {len(mine)} {kind} free, {count} needed"
    if holders:
        why += "; held: " + ", ".join(f"{k} on {v}" for k, v in holders.items())
    if ahead:
        why += "; queued first: " + ", ".join(f"{q['entry']} ({q['count']})" for q in ahead)
    return why
