"""What a user installs: the wheel, into a fresh venv beside vLLM CPU, run from an empty folder.

Nothing of this repository is on the path there: the plugin loads through its ``pytest11``
entry point, the suites, fixtures and seed matrix come from the installed package, and the
only file in the folder is the user's own matrix, whose entry extends a bundled one.
One fresh venv (scripts/bootstrap with PROJECT=<wheel>, about 3 minutes from the local pip
cache) and one vLLM CPU server start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USER_MATRIX = textwrap.dedent(
    """
    deployments:
      - id: my-cpu
        extends: cpu
        description: the bundled cpu entry, as a user's own deployment
        source: "a user's matrix: the bundled cpu entry with 1 GiB of KV space"
        serve:
          env: {VLLM_CPU_KVCACHE_SPACE: "1"}
    """
)


def _clean_env() -> dict[str, str]:
    skip = ("VLLM_CONFORMANCE_", "PYTEST_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with vLLM CPU and the wheel built from this checkout."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(ROOT)],
        check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("vllm_conformance-*.whl")
    venv = tmp_path_factory.mktemp("venv") / "fresh"
    subprocess.run(
        [str(ROOT / "scripts" / "bootstrap")],
        env={**_clean_env(), "VENV": str(venv), "PROJECT": str(wheel)},
        check=True,
        timeout=1500,
    )
    return venv


def test_wheel_runs_the_suites_from_an_empty_folder(installed: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "my-matrix.yaml").write_text(USER_MATRIX)
    out = subprocess.run(
        [str(installed / "bin" / "vllm-conformance"), "run", "--suite", "serving",
         "--matrix", "my-matrix.yaml", "-m", "cpu", "--run-id", "user-run", "-q"],
        cwd=work, env=_clean_env(), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    report = json.loads((work / "reports" / "user-run" / "report.json").read_text())
    # Only the user's entry ran: bundled entries are available by id, not selected.
    assert set(report["entries"]) == {"my-cpu"}, report["entries"].keys()
    counts = report["entries"]["my-cpu"]["counts"]["tests"]
    assert counts["passed"] >= 2 and counts["failed"] == counts["error"] == 0, counts
    # The code that ran is the installed package, not this checkout.
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import vllm_conformance, sys; print(vllm_conformance.__file__)"],
        cwd=work, env=_clean_env(), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(installed) in where and str(ROOT) not in where
