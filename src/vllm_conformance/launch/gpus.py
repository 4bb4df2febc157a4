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
