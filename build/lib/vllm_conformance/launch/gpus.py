"""Which GPUs this machine (and this pytest-xdist worker) may use.

Each xdist worker gets a disjoint, contiguous share of the visible GPUs, so parallel
workers never start two servers on the same device.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

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


def worker_share(gpus: Sequence[Gpu], worker: str | None, workers: int) -> list[Gpu]:
    """The contiguous slice of ``gpus`` that xdist worker ``gwN`` of ``workers`` owns."""
    if worker is None or workers <= 1:
        return list(gpus)
    n = int(worker.removeprefix("gw"))
    per = len(gpus) // workers
    return list(gpus[n * per : (n + 1) * per])


def allocate(entry: Deployment, share: Sequence[Gpu]) -> tuple[list[int] | None, str | None]:
    """GPU indices for ``entry`` from ``share``, or ``(None, reason)`` when it cannot run.

    CPU entries need no GPU and get ``([], None)``-like ``(None, None)``: nothing to pin.
    """
    hw = entry.hardware
    if hw.gpu == "cpu":
        return None, None
    matching = [g for g in share if g.kind == hw.gpu]
    if len(matching) < hw.count:
        have = ", ".join(sorted({g.name for g in share})) or "no GPU"
        return None, (
            f"needs {hw.count} x {hw.gpu}; this worker has {len(matching)} (visible: {have})"
        )
    return [g.index for g in matching[: hw.count]], None
