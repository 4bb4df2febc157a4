"""Pytest markers derived from matrix entries.

``pytest -m h100`` selects the H100 deployments, ``-m "scout and fp8"`` Scout in FP8, and so
on. The marker set is a function of the entry only, so selection is the same with or
without GPUs present.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

import pytest

from vllm_conformance.matrix import Deployment, Family, GpuKind, Precision

MARKER_HELP: dict[str, str] = {
    **{kind: f"deployment runs on {kind.upper()} GPUs" for kind in get_args(GpuKind)},
    **{p: f"deployment serves {p} weights" for p in get_args(Precision)},
    **{f: f"model family {f}" for f in get_args(Family)},
    "cpu": "deployment runs on the vLLM CPU backend",
    "fp8kv": "deployment stores the KV cache in fp8",
    "expected_failure": "deployment whose startup is expected to fail",
}
for _n in (1, 2, 4, 8):
    MARKER_HELP[f"gpus{_n}"] = f"deployment needs {_n} GPU(s)"
    MARKER_HELP[f"tp{_n}"] = f"deployment uses tensor parallel size {_n}"


def deployment_markers(entry: Deployment) -> list[str]:
    """The marker names of one entry's tests."""
    names = [entry.hardware.gpu, entry.model.precision, entry.model.family]
    if entry.hardware.gpu != "cpu":
        names.append(f"gpus{entry.hardware.count}")
    names.append(f"tp{entry.serve.tensor_parallel_size}")
    if (entry.serve.kv_cache_dtype or "").startswith("fp8"):
        names.append("fp8kv")
    if entry.startup_fails:
        names.append("expected_failure")
    return names


def register(config: pytest.Config, used: Iterable[str] = ()) -> None:
    """Register the known markers plus those the loaded matrix uses (e.g. ``gpus16``)."""
    for name in sorted(set(MARKER_HELP) | set(used)):
        help_text = MARKER_HELP.get(name, "derived from the hardware matrix")
        config.addinivalue_line("markers", f"{name}: {help_text}")
