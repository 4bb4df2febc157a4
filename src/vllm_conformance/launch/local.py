"""Own one vLLM server's life: start, wait until it really serves, watch, stop.

``VllmServer`` is a context manager usable outside pytest (capacity discovery and the
compare command reuse it)::

    with VllmServer(spec, log_path=Path("server.log")) as server:
        endpoint = server.endpoint
        ...

Readiness is a real one-token completion under a deadline, not ``/health`` alone (which
has answered 200 while the engine was dead). A server that exits during start-up raises
:class:`ServerStartError` at once with vLLM's reason and the log tail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from vllm_conformance.launch import logparse, procs
from vllm_conformance.launch.endpoint import Endpoint, EndpointError, ServerDiedError, connect

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LIFELINE_MODULE = "vllm_conformance.launch.lifeline"
_PORT_IN_USE = ("Address already in use", "address already in use", "Errno 98")


class ServerStartError(RuntimeError):
    """The server did not come up; the message holds vLLM's reason and the log tail."""

    def __init__(self, message: str, reason: logparse.FailureReason | None, log_tail: str):
        super().__init__(f"{message}\n--- last lines of the server log ---\n{log_tail}")
        self.message = message
        self.reason = reason
        self.log_tail = log_tail


class LeftoverProcessError(RuntimeError):
    """Processes of a stopped server survived SIGTERM, SIGKILL and the sweep."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one server, independent of the matrix."""

    model: str
    served_model_name: str
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    gpus: Sequence[int] | None = None
    api_key: str | None = None
    tokenizer: str | None = None
    host: str = "127.0.0.1"
    startup_timeout: float = 900.0
    python: str = sys.executable
    #: the module that serves (``vllm_serve`` for what only ``vllm serve`` has: multi-node)
    module: str = API_SERVER_MODULE


def command(spec: LaunchSpec, port: int | None) -> list[str]:
    """The argv that starts ``spec``'s server (the API key travels in the environment).

    ``port`` None: a process that serves no HTTP (a headless multi-node follower).
    """
    cmd = [spec.python, "-m", spec.module, "--model", spec.model]
    cmd += ["--served-model-name", spec.served_model_name]
    if spec.tokenizer:
        cmd += ["--tokenizer", spec.tokenizer]
    if port is not None:
        cmd += ["--host", spec.host, "--port", str(port)]
    return cmd + list(spec.args)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now (the OS picks it, so parallel workers do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file (empty if it does not exist)."""
    try:
        with path.open(errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError:
        return ""


class VllmServer:
    """One vLLM OpenAI-compatible server process group."""

    def __init__(
        self, spec: LaunchSpec, log_path: Path, port_attempts: int = 3, lifeline: bool = False
    ) -> None:
        """``lifeline``: the server ends itself when this process dies (see
        :mod:`~vllm_conformance.launch.lifeline`); for launchers that can die without
        running teardown, such as a Ray actor on a node that fails."""
        self.spec = spec
        self.log_path = log_path
        self.port_attempts = port_attempts
        self.lifeline = lifeline
        self._lifeline_fd: int | None = None
        self.tag = uuid.uuid4().hex
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self.kv_cache: logparse.KvCacheInfo | None = None
        self._endpoint: Endpoint | None = None
        self._exit_watch: threading.Thread | None = None
        self.exit_code: int | None = None

    # -- life cycle -------------------------------------------------------------------

    @property
    def placement(self) -> dict[str, Any]:
        """The GPU indices the server is pinned to (None: not pinned here)."""
        return {"gpus": None if self.spec.gpus is None else list(self.spec.gpus)}

    def command(self, port: int | None) -> list[str]:
        return command(self.spec, port)

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, **self.spec.env, procs.TAG_VAR: self.tag}
        # vLLM's setproctitle would overwrite /proc/PID/environ of its engine and workers,
        # erasing the tag that teardown sweeps for.
        env.setdefault("SPT_NOENV", "1")
        env.pop("VLLM_API_KEY", None)
        if self.spec.api_key:
            env["VLLM_API_KEY"] = self.spec.api_key
        if self.spec.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.spec.gpus)
        return env

    def start(self) -> Endpoint:
        """Start the server and wait until it serves a real completion."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        for attempt in range(1, self.port_attempts + 1):
            self.port = free_port(self.spec.host)
            self._spawn(self.port)
            try:
                self._wait_ready(began)
                break
            except ServerStartError as exc:
                self.stop()
                if attempt < self.port_attempts and any(s in exc.log_tail for s in _PORT_IN_USE):
                    continue
                raise
            except BaseException:  # Ctrl-C or SIGTERM mid-start: no fixture will stop it
                self.stop()
                raise
        self.startup_seconds = time.monotonic() - began
        return self.endpoint

    def spawn(self) -> None:
        """Start a process that serves no HTTP (a headless follower), without waiting."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._spawn(None)

    def _spawn(self, port: int | None) -> None:
        argv = self.command(port)
        wrapper: list[str] = []
        read_end = None
        if self.lifeline:
            self._cut_lifeline()
            read_end, self._lifeline_fd = os.pipe()
            wrapper = [sys.executable, "-m", LIFELINE_MODULE, str(read_end), "--"]
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(
                    wrapper + argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self._environment(),
                    start_new_session=True,
                    pass_fds=() if read_end is None else (read_end,),
                )
            finally:
                if read_end is not None:
                    os.close(read_end)
        self.exit_code = None
        self._exit_watch = threading.Thread(target=self._watch_exit, daemon=True)
        self._exit_watch.start()

    def _watch_exit(self) -> None:
        assert self.proc is not None
        self.exit_code = self.proc.wait()

    def _fail(self, message: str) -> ServerStartError:
        lines = tail(self.log_path, 400).splitlines()
        return ServerStartError(message, logparse.failure_reason(lines), "\n".join(lines[-40:]))

    def _wait_ready(self, began: float) -> None:
        assert self.proc is not None and self.port is not None
        base_url = f"http://{self.spec.host}:{self.port}"
        deadline = began + self.spec.startup_timeout
        with httpx.Client(timeout=5.0) as http:
            while True:
                try:
                    code = self.proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
                else:
                    reason = logparse.failure_reason(tail(self.log_path, 400).splitlines())
                    why = f": {reason.line}" if reason else ""
                    raise self._fail(f"vLLM server exited with code {code} during start-up{why}")
                if time.monotonic() > deadline:
                    raise self._fail(
                        f"vLLM server not ready after {self.spec.startup_timeout:.0f} s"
                    )
                try:
                    if http.get(f"{base_url}/health").status_code != 200:
                        continue
                except httpx.HTTPError:
                    continue
                break
        try:
            self._endpoint = connect(
                base_url,
                api_key=self.spec.api_key,
                expected_model=self.spec.served_model_name,
                server=self,
            )
            self._endpoint.probe(timeout=max(60.0, deadline - time.monotonic()))
        except (EndpointError, ServerDiedError) as exc:
            raise self._fail(f"vLLM server answered /health but does not serve: {exc}") from None
        self.kv_cache = logparse.parse_kv_cache(tail(self.log_path, 100_000).splitlines())
        self._endpoint.kv_cache = self.kv_cache

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise RuntimeError("server not started")
        return self._endpoint

    def alive(self) -> bool:
        """Whether the API server process is still running."""
        return self.proc is not None and self.exit_code is None and self.proc.poll() is None

    def death_message(self) -> str:
        """Why the server is gone, with the log tail."""
        code = self.proc.poll() if self.proc else None
        return (
            f"vLLM server (port {self.port}) died with exit code {code}\n"
            f"--- last lines of the server log ({self.log_path}) ---\n{tail(self.log_path)}"
        )

    def stop(self, grace: float = 20.0) -> None:
        """End the whole process group; raise if any tagged process survives."""
        if self.proc is None:
            return
        left = procs.end_process_group(self.proc.pid, self.tag, grace)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            left.append(self.proc.pid)
        self._cut_lifeline()
        if left:
            raise LeftoverProcessError(f"processes of the vLLM server survived teardown: {left}")

    def _cut_lifeline(self) -> None:
        if self._lifeline_fd is not None:
            os.close(self._lifeline_fd)
            self._lifeline_fd = None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
