"""Turn a matrix entry into a server: the launch spec, and the launchers that start it.

A *launcher* decides where an entry's server runs and whether it can run at all; every
place that starts a server for an entry (the ``server`` fixture, the expected-startup-failure
check, capacity discovery) asks one for it, so a launcher that places servers elsewhere
(on a cluster) is invisible to them::

    launcher = LocalLauncher(gpus.detect())
    if (why := launcher.unavailable(entry)) is None:
        with launcher.server(entry, log_path) as server:   # waits for the entry's GPUs
            endpoint = server.endpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from vllm_conformance import models
from vllm_conformance.launch import gpus as gpu_mod
from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.launch.local import (
    LaunchSpec,
    LeftoverProcessError,
    ServerStartError,
    VllmServer,
    tail,
)
from vllm_conformance.launch.logparse import KvCacheInfo
from vllm_conformance.matrix import Deployment
from vllm_conformance.perf import estimate
from vllm_conformance.progress import Progress

#: How long an entry waits for busy GPUs before it fails (a night of other entries).
DEFAULT_GPU_WAIT_S = 4 * 3600.0


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
    entry: Deployment,
    gpus: Sequence[int] | None,
    startup_timeout: float,
    key: str | None = None,
) -> LaunchSpec:
    """The :class:`LaunchSpec` that serves ``entry`` on ``gpus`` (with API key ``key``, if
    the entry has one: default :func:`api_key`)."""
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
        api_key=key if key is not None else api_key(entry),
        startup_timeout=startup_timeout,
    )


class Server(Protocol):
    """What the ``server`` fixture needs of a launched server, wherever it runs
    (:class:`VllmServer` here; :class:`~vllm_conformance.launch.ray.RayServer` on a cluster).
    """

    log_path: Path
    port: int | None
    startup_seconds: float | None
    kv_cache: KvCacheInfo | None

    @property
    def endpoint(self) -> Endpoint: ...

    @property
    def placement(self) -> dict[str, Any]:
        """Where it runs (GPUs, nodes, the wait for them), for the run's records."""
        ...

    def command(self, port: int | None) -> list[str]: ...

    def start(self) -> Endpoint: ...

    def stop(self, grace: float = 20.0) -> None: ...

    def alive(self) -> bool: ...

    def death_message(self) -> str: ...


class Launcher(Protocol):
    """Where the servers of matrix entries run."""

    def unavailable(self, entry: Deployment) -> str | None:
        """Why ``entry`` cannot run with this launcher (e.g. missing GPUs), or None."""
        ...

    def server(self, entry: Deployment, log_path: Path) -> Server:
        """The (not yet started) server of ``entry``, logging to ``log_path``."""
        ...

    def close(self) -> None:
        """End whatever the launcher still holds (at the end of the session)."""
        ...


class LocalLauncher:
    """Servers as process groups on this node, on GPUs leased from ``leases``.

    ``startup_timeout`` None gives each entry its own deadline, derived from its model's
    size (:func:`~vllm_conformance.perf.estimate.startup_timeout_seconds`); a number applies
    to every entry. ``server()`` waits up to ``gpu_wait`` seconds for the entry's GPUs and
    reports the wait and the start through ``progress``.
    """

    def __init__(
        self,
        gpus: Sequence[gpu_mod.Gpu],
        startup_timeout: float | None = None,
        *,
        leases: gpu_mod.Leases | None = None,
        gpu_wait: float = DEFAULT_GPU_WAIT_S,
        progress: Progress | None = None,
        owner: str = "main",
    ) -> None:
        self.gpus = list(gpus)
        self.startup_timeout = startup_timeout
        self.leases = leases or gpu_mod.Leases()
        self.gpu_wait = gpu_wait
        self.progress = progress or Progress(None)
        self.owner = owner

    def unavailable(self, entry: Deployment) -> str | None:
        if entry.hardware.nodes > 1:
            return f"spans {entry.hardware.nodes} nodes: run it with --launcher ray"
        return gpu_mod.unavailable(entry, self.gpus)

    def startup_timeout_for(self, entry: Deployment) -> float:
        if self.startup_timeout is not None:
            return self.startup_timeout
        return estimate.startup_timeout_seconds(entry)

    def server(self, entry: Deployment, log_path: Path) -> VllmServer:
        if (why := self.unavailable(entry)) is not None:
            raise RuntimeError(f"{entry.id}: {why}")
        # Built (a generated model materialized) before any GPU is held.
        spec = launch_spec(entry, None, self.startup_timeout_for(entry))
        lease = self._lease(entry)
        if lease.indices:
            spec = dataclasses.replace(spec, gpus=lease.indices)
        return LeasedServer(spec, log_path, lease, self.progress, estimate.startup_seconds(entry))

    def _lease(self, entry: Deployment) -> gpu_mod.Lease:
        if entry.hardware.gpu == "cpu":
            return gpu_mod.Lease(entry.id, [])
        got = self.leases.try_acquire(entry, self.gpus, self.owner, queue=True)
        if isinstance(got, gpu_mod.Lease):
            return got
        with self.progress.phase(entry.id, "waiting for GPUs") as wait:
            wait.note(got)
            return self.leases.acquire(entry, self.gpus, self.owner, self.gpu_wait, wait.note)

    def close(self) -> None:
        """Nothing to do: every server is stopped by its fixture."""


class LeasedServer(VllmServer):
    """A server that gives its GPUs back once its processes are gone, and reports its start
    as a progress phase (with the last line of its log)."""

    def __init__(
        self,
        spec: LaunchSpec,
        log_path: Path,
        lease: gpu_mod.Lease,
        progress: Progress,
        planned_s: float,
    ) -> None:
        super().__init__(spec, log_path)
        self.lease = lease
        self.progress = progress
        self.planned_s = planned_s
        self._starting = False

    def start(self) -> Endpoint:
        self._starting = True
        try:
            with self.progress.phase(
                self.lease.entry, "server start", planned_s=self.planned_s, detail=self._last_log
            ):
                return super().start()
        except ServerStartError:
            # start() has ended the process group already.
            self.lease.release()
            raise
        except BaseException:
            # Interrupted (Ctrl-C, CI's SIGTERM) while waiting: end the group here.
            self._starting = False
            with contextlib.suppress(LeftoverProcessError):
                self.stop()
            raise
        finally:
            self._starting = False

    def stop(self, grace: float = 20.0) -> None:
        super().stop(grace)
        # Not while start() retries a port, and not if processes survived (they hold memory).
        if not self._starting:
            self.lease.release()

    def _last_log(self) -> str:
        lines = [line.strip() for line in tail(self.log_path, 5).splitlines() if line.strip()]
        return f"log: {lines[-1][:120]}" if lines else ""
