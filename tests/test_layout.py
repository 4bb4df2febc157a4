"""The package's structure: every module imports on its own, and old paths say where they went."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import warnings

import pytest

import vllm_conformance

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(vllm_conformance.__path__, "vllm_conformance.")
    # Suites and fixtures are pytest's to import; the data generator needs lm-eval's tasks.
    if not m.name.startswith(("vllm_conformance.suites.", "vllm_conformance.data."))
)


def test_every_module_imports_first() -> None:
    """An import cycle shows only when a module of it is the first one imported."""
    code = "import importlib, sys; importlib.import_module(sys.argv[1])"
    failed = []
    for module in MODULES:
        out = subprocess.run(
            [sys.executable, "-c", code, module], capture_output=True, text=True, timeout=120
        )
        if out.returncode:
            failed.append(f"{module}: {out.stderr.strip().splitlines()[-1]}")
    assert not failed, "\n".join(failed)


def test_old_module_paths_still_import_and_say_where_they_went() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from vllm_conformance import tinymodel  # type: ignore[attr-defined]
    assert tinymodel.__name__ == "vllm_conformance.models.tiny"
    assert any("moved to vllm_conformance.models.tiny" in str(w.message) for w in caught)
    out = subprocess.run(
        [sys.executable, "-m", "vllm_conformance.tinymodel", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "moved to vllm_conformance.models.tiny" in out.stderr


@pytest.mark.parametrize("old", sorted(vllm_conformance._moved.MOVED))
def test_every_moved_module_exists(old: str) -> None:
    assert vllm_conformance._moved.MOVED[old] in MODULES or vllm_conformance._moved.MOVED[old] in (
        "vllm_conformance.models",
    )
