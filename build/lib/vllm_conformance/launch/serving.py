"""Turn a matrix entry into a server: the launch spec, and the launchers that start it.

A *launcher* decides where an entry's server runs and whether it can run at all; every
place that starts a server for an entry (the ``server`` fixture, the expected-startup-failure
check, capacity discovery) asks one for it, so a launcher that places servers elsewhere
(on a cluster) is invisible to them::

    launcher = LocalLauncher(gpus.detect(), startup_timeout=900)
    if (why := launcher.unavailable(entry)) is None:
        with launcher.server(entry, log_path) as server:
            endpoint = server.endpoint
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from vllm_conformance import models
from vllm_conformance.launch import gpus as gpu_mod
from vllm_conformance.launch.local import LaunchSpec, VllmServer
from vllm_conformance.matrix import Deployment


def model_path(entry: Deployment) -> str:
    """The checkpoint to serve: the entry's path, or the generated model's directory."""
    if entry.model.generate is not None:
        return str(models.materialize(entry.model.generate, entry.model.options))
    assert entry.model.path is not None
    return entry.model.path


def tokenizer_path(entry: Deployment) -> str:
    """Where the served model's tokenizer is (the model itself unless the entry says)."""
    return entry.model.tokenizer or model_path(entry)


def api_key(entry: Deployment) -> str | None:
    """The entry's API key: from the variable it names, else a fresh random secret."""
    name = entry.serve.api_key_env
    if name is None:
        return None
    return os.environ.get(name) or secrets.token_urlsafe(24)


def launch_spec(
    entry: Deployment, gpus: Sequence[int] | None, startup_timeout: float
) -> LaunchSpec:
    """The :class:`LaunchSpec` that serves ``entry`` on ``gpus``."""
    tokenizer = entry.model.tokenizer
    if tokenizer and Path(tokenizer).exists():
        tokenizer = str(Path(tokenizer).resolve())
    return LaunchSpec(
        model=model_path(entry),
        served_model_name=entry.served_model_name,
        tokenizer=tokenizer,
        args=entry.serve.argv(),
        env=dict(entry.serve.env),
        gpus=gpus,
        api_key=api_key(entry),
        startup_timeout=startup_timeout,
    )


class Launcher(Protocol):
    """Where the servers of matrix entries run."""

    def unavailable(self, entry: Deployment) -> str | None:
        """Why ``entry`` cannot run with this launcher (e.g. missing GPUs), or None."""
        ...

    def server(self, entry: Deployment, log_path: Path) -> VllmServer:
        """The (not yet started) server of ``entry``, logging to ``log_path``."""
        ...


class LocalLauncher:
    """Servers as process groups on this machine, pinned to GPUs of ``gpus``."""

    def __init__(self, gpus: Sequence[gpu_mod.Gpu], startup_timeout: float) -> None:
        self.gpus = list(gpus)
        self.startup_timeout = startup_timeout

    def unavailable(self, entry: Deployment) -> str | None:
        return gpu_mod.allocate(entry, self.gpus)[1]

    def server(self, entry: Deployment, log_path: Path) -> VllmServer:
        pinned, why = gpu_mod.allocate(entry, self.gpus)
        if why is not None:
            raise RuntimeError(f"{entry.id}: {why}")
        return VllmServer(launch_spec(entry, pinned, self.startup_timeout), log_path)
