"""Markers derived from the matrix select exactly the matching entries, with no GPU present."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_conformance.matrix import Deployment, load_matrix
from vllm_conformance.matrix.markers import deployment_markers

ROOT = Path(__file__).resolve().parent.parent


def collected_entries(*args: str) -> set[str]:
    """Entry ids of the suite tests that ``pytest --collect-only`` selects."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "src/vllm_conformance/suites/test_serving.py",
            "-W",
            "error::pytest.PytestUnknownMarkWarning",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode in (0, 5), out.stdout + out.stderr
    return set(re.findall(r"\[([^\]]+)\]$", out.stdout, re.M))


@pytest.fixture(scope="module")
def deployments() -> list[Deployment]:
    return load_matrix([])


@pytest.mark.parametrize(
    "expr",
    [
        "h100",
        "h200",
        "b200",
        "cpu",
        "fp8",
        "bf16",
        "fp4",
        "scout",
        "maverick",
        "tiny",
        "gpus8",
        "h100 and fp8",
        "scout and not h100",
        "expected_failure",
    ],
)
def test_selection_matches_derived_markers(expr: str, deployments: list[Deployment]) -> None:
    names = {m for d in deployments for m in deployment_markers(d)}
    expected = {
        d.id
        for d in deployments
        if not d.startup_fails and eval(expr, {}, {n: n in deployment_markers(d) for n in names})
    }
    assert collected_entries("-m", expr) == expected


def test_h100_collection_lists_h100_entries(deployments: list[Deployment]) -> None:
    h100 = {d.id for d in deployments if d.hardware.gpu == "h100" and not d.startup_fails}
    assert h100 and collected_entries("-m", "h100") == h100


def test_markers_are_registered() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--markers"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    for marker in (
        "h100:",
        "h200:",
        "b200:",
        "a100:",
        "cpu:",
        "gpus8:",
        "fp8:",
        "scout:",
        "maverick:",
        "tiny:",
        "needs_expect(key):",
    ):
        assert f"@pytest.mark.{marker}" in out.stdout


def test_missing_gpus_skip_with_reason() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "src/vllm_conformance/suites/test_serving.py",
            "-m",
            "h200 and gpus8",
            "-rs",
            "-q",
            "--run-id",
            "markers-selftest",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "needs 8 x h200; this node has 0" in out.stdout
    assert " passed" not in out.stdout
