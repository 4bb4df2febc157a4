"""Module paths of before the package was grouped into parts, and where they went.

``import vllm_conformance.launcher`` (and ``python -m vllm_conformance.tinymodel``) keep
working: the old name gives the new module, with a DeprecationWarning naming it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

MOVED: dict[str, str] = {
    f"vllm_conformance.{old}": f"vllm_conformance.{new}"
    for old, new in {
        "markers": "matrix.markers",
        "settings": "matrix.settings",
        "launcher": "launch.local",
        "serving": "launch.serving",
        "endpoint": "launch.endpoint",
        "procs": "launch.procs",
        "gpus": "launch.gpus",
        "logparse": "launch.logparse",
        "discover": "launch.discover",
        "modelgen": "models",
        "tinymodel": "models.tiny",
        "trained": "models.trained",
        "vlmgen": "models.vlm",
        "calls": "client.calls",
        "sse": "client.sse",
        "errors": "client.errors",
        "prompts": "client.prompts",
        "checks": "client.checks",
        "fuzz": "client.fuzz",
        "accuracy": "client.accuracy",
        "htmlreport": "report.html",
        "compare": "report.compare",
    }.items()
}


def _warn(old: str) -> None:
    warnings.warn(f"{old} moved to {MOVED[old]}", DeprecationWarning, stacklevel=3)


class _Redirect(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        _warn(spec.name)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        """The new module is already executed."""

    def get_source(self, fullname: str) -> str:
        # ``python -m OLD``: run the new module as __main__, saying where it went.
        return (
            f"import runpy, sys\n"
            f"print('{fullname} moved to {MOVED[fullname]}', file=sys.stderr)\n"
            f"runpy.run_module('{MOVED[fullname]}', run_name='__main__', alter_sys=True)\n"
        )


def install() -> None:
    if not any(isinstance(f, _Redirect) for f in sys.meta_path):
        sys.meta_path.append(_Redirect())
