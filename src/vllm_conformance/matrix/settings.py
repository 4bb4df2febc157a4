"""Every option of the plugin, its help, and one resolution order.

A value comes from, in this order: the command line, the environment, the ini file
(``[tool.pytest.ini_options]``), the default. Errors name where a bad value came from.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Option:
    name: str  # command-line flag without dashes, e.g. "matrix"
    env: str
    help: str
    default: Any = None
    convert: Callable[[str], Any] = str
    multiple: bool = False

    @property
    def dest(self) -> str:
        return "vc_" + self.name.replace("-", "_")

    @property
    def ini(self) -> str:
        return "vllm_conformance_" + self.name.replace("-", "_")


def launcher_kind(value: str) -> str:
    if value not in ("local", "ray"):
        raise ValueError("choose 'local' or 'ray'")
    return value


OPTIONS: tuple[Option, ...] = (
    Option(
        "matrix",
        "VLLM_CONFORMANCE_MATRIX",
        "matrix file or directory (repeatable); default: the bundled seed matrix, whose "
        "entries stay available by id",
        default=[],
        multiple=True,
    ),
    Option(
        "entry",
        "VLLM_CONFORMANCE_ENTRY",
        "run only these matrix entry ids (repeatable)",
        default=[],
        multiple=True,
    ),
    Option(
        "endpoint",
        "VLLM_CONFORMANCE_ENDPOINT",
        "base URL of an already-running deployment; nothing is launched",
    ),
    Option("api-key", "VLLM_CONFORMANCE_API_KEY", "API key for --endpoint"),
    Option(
        "server-log",
        "VLLM_CONFORMANCE_SERVER_LOG",
        "startup log of the --endpoint server: its KV capacity is then checked too",
    ),
    Option(
        "launcher",
        "VLLM_CONFORMANCE_LAUNCHER",
        "where servers run: 'local' (this machine) or 'ray' (a Ray cluster, --ray-address)",
        default="local",
        convert=launcher_kind,
    ),
    Option(
        "ray-address",
        "VLLM_CONFORMANCE_RAY_ADDRESS",
        "the Ray cluster of --launcher ray: HOST:PORT of its head, 'auto' on one of its "
        "nodes, or ray://HOST:10001 (Ray Client)",
    ),
    Option(
        "ray-queue-timeout",
        "VLLM_CONFORMANCE_RAY_QUEUE_TIMEOUT",
        "seconds an entry waits for its place on the Ray cluster before it fails",
        default=3600.0,
        convert=float,
    ),
    Option("reports-dir", "VLLM_CONFORMANCE_REPORTS", "where run reports go", default="reports"),
    Option("run-id", "VLLM_CONFORMANCE_RUN_ID", "name of this run's report directory"),
    Option(
        "save-baseline",
        "VLLM_CONFORMANCE_SAVE_BASELINE",
        "directory to save each entry's performance samples in, as <entry>.json baselines",
    ),
    Option(
        "startup-timeout",
        "VLLM_CONFORMANCE_STARTUP_TIMEOUT",
        "seconds a server may take to start; default: per entry, 3 x its planned start "
        "(from the model's size), at least 900",
        convert=float,
    ),
    Option(
        "gpu-wait",
        "VLLM_CONFORMANCE_GPU_WAIT",
        "seconds an entry waits for busy GPUs before it fails; default: 14400 (4 h)",
        convert=float,
    ),
    Option(
        "gpu-leases",
        "VLLM_CONFORMANCE_GPU_LEASES",
        "the node's GPU lease table (JSON), shared by every run and xdist worker; "
        "default: <tmp>/vllm-conformance/gpu-leases.json",
    ),
    Option(
        "progress-interval",
        "VLLM_CONFORMANCE_PROGRESS_INTERVAL",
        "seconds between two progress lines of a long phase",
        default=60.0,
        convert=float,
    ),
    Option(
        "request-timeout",
        "VLLM_CONFORMANCE_REQUEST_TIMEOUT",
        "seconds one request may take",
        default=600.0,
        convert=float,
    ),
)
BY_NAME = {o.name: o for o in OPTIONS}


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("vllm-conformance")
    for opt in OPTIONS:
        group.addoption(
            f"--{opt.name}",
            dest=opt.dest,
            action="append" if opt.multiple else "store",
            default=None,
            help=f"{opt.help} [env {opt.env}]",
        )
        parser.addini(opt.ini, opt.help, type="linelist" if opt.multiple else "string")


def resolve(config: pytest.Config, name: str) -> Any:
    """The value of option ``name`` after CLI > env > ini > default."""
    opt = BY_NAME[name]
    value: Any = config.getoption(opt.dest)
    origin = f"--{opt.name}"
    if value is None and (env := os.environ.get(opt.env)):
        value = env.split(",") if opt.multiple else env
        origin = f"environment variable {opt.env}"
    if value is None and (ini := config.getini(opt.ini)):
        value, origin = ini, f"ini option {opt.ini}"
    if value is None:
        return opt.default
    try:
        return [opt.convert(v) for v in value] if opt.multiple else opt.convert(value)
    except ValueError as exc:
        raise pytest.UsageError(f"{origin}: bad value {value!r}: {exc}") from None
