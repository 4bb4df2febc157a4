"""The pytest plugin: options, the matrix, markers, parametrization, the run report.

Suites take a ``deployment`` fixture; this plugin parametrizes it, session-scoped and
indirect, with the selected matrix entries, so pytest groups tests by deployment across
modules (server A starts, all its tests run, A stops, then B).

Suite-level markers:

- ``needs_expect("context")``: only entries with that expectation section run the test;
  the others are skipped at collection time, so no server starts for nothing.
- ``expects_startup_failure``: the test is for entries whose start is expected to fail
  (and only those); every other test never sees such entries.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from vllm_conformance import report
from vllm_conformance.launch import gpus as gpu_mod
from vllm_conformance.launch import serving
from vllm_conformance.launch.logparse import KvCacheInfo
from vllm_conformance.matrix import Deployment, MatrixError, load, markers, settings

#: The fixtures every suite can take (one module per concept).
pytest_plugins = [
    "vllm_conformance.fixtures.server",
    "vllm_conformance.fixtures.tokenizer",
    "vllm_conformance.fixtures.recorder",
]


@dataclass
class State:
    """Everything the plugin resolved in ``pytest_configure``."""

    deployments: list[Deployment]
    selected: list[Deployment]
    run_dir: Path
    writer: report.RecordWriter
    worker: str | None
    launcher: serving.Launcher
    endpoint: str | None = None
    api_key: str | None = None
    request_timeout: float = 600.0
    #: KV capacity logged by each entry's server started in this process, by entry id.
    kv_caches: dict[str, KvCacheInfo] = field(default_factory=dict)

    def unavailable(self, entry: Deployment) -> str | None:
        """Why ``entry`` cannot run here (missing GPUs), or None."""
        if self.endpoint:
            return None
        return self.launcher.unavailable(entry)


STATE = pytest.StashKey[State]()
_RUN_DIR_KEY = "vllm_conformance_run_dir"


def state(config: pytest.Config) -> State:
    return config.stash[STATE]


def pytest_addoption(parser: pytest.Parser) -> None:
    settings.add_options(parser)


def _run_dir(config: pytest.Config) -> Path:
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput and _RUN_DIR_KEY in workerinput:
        return Path(workerinput[_RUN_DIR_KEY])
    base = Path(settings.resolve(config, "reports-dir"))
    if not base.is_absolute():
        base = config.invocation_params.dir / base
    run_id = settings.resolve(config, "run-id") or time.strftime("%Y%m%d-%H%M%S")
    return base / run_id


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    # pytest tears down session fixtures on KeyboardInterrupt; SIGTERM (CI cancelling a job)
    # must end every server's process group the same way.
    raise KeyboardInterrupt(f"received signal {signum}")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_expect(key): run only for entries with this expectation section"
    )
    config.addinivalue_line(
        "markers", "expects_startup_failure: run only for entries expected not to start"
    )
    paths = [Path(p) for p in settings.resolve(config, "matrix")]
    paths = [p if p.is_absolute() else config.invocation_params.dir / p for p in paths]
    try:
        matrix = load(paths)
    except MatrixError as exc:
        raise pytest.UsageError(f"invalid hardware matrix:\n{exc}") from None
    try:
        selected = matrix.select(settings.resolve(config, "entry"))
    except MatrixError as exc:
        raise pytest.UsageError(f"--entry: {exc}") from None
    deployments = list(matrix.known.values())
    markers.register(config, {m for d in deployments for m in markers.deployment_markers(d)})

    endpoint = settings.resolve(config, "endpoint")
    if endpoint and len([d for d in selected if not d.startup_fails]) != 1:
        raise pytest.UsageError(
            "--endpoint runs the suites against one deployment: select its matrix entry "
            "with --entry ID"
        )
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    run_dir = _run_dir(config)
    if worker is None and not config.option.collectonly and not config.option.xmlpath:
        # Runs before the junitxml plugin reads the option: JUnit lands beside the report.
        config.option.xmlpath = str(run_dir / "junit.xml")
    writer = report.RecordWriter(run_dir / "records" / f"{worker or 'main'}.jsonl")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    detected = gpu_mod.detect()
    config.stash[STATE] = State(
        deployments=deployments,
        selected=selected,
        run_dir=run_dir,
        writer=writer,
        worker=worker,
        launcher=serving.LocalLauncher(
            gpu_mod.worker_share(detected, worker, workers),
            settings.resolve(config, "startup-timeout"),
        ),
        endpoint=endpoint,
        api_key=settings.resolve(config, "api-key"),
        request_timeout=settings.resolve(config, "request-timeout"),
    )
    if worker is None and not config.option.collectonly:
        writer.write("run", environment=report.environment(detected), endpoint=endpoint)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(run_dir), "vllm-conformance-xdist")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


class _XdistHooks:
    """Hands the controller's run directory to every worker."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[_RUN_DIR_KEY] = str(self.run_dir)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "deployment" not in metafunc.fixturenames:
        return
    st = state(metafunc.config)
    for_failures = metafunc.definition.get_closest_marker("expects_startup_failure") is not None
    needs = [m.args[0] for m in metafunc.definition.iter_markers("needs_expect")]
    params = []
    for entry in st.selected:
        if entry.startup_fails != for_failures:
            continue
        marks: list[pytest.MarkDecorator] = [
            getattr(pytest.mark, name) for name in markers.deployment_markers(entry)
        ]
        missing = [key for key in needs if not getattr(entry.expect, key)]
        if missing:
            marks.append(
                pytest.mark.skip(reason=f"{entry.id} declares no {'/'.join(missing)} expectations")
            )
        elif (why := st.unavailable(entry)) is not None:
            marks.append(pytest.mark.skip(reason=f"{entry.id}: {why}"))
        params.append(pytest.param(entry, id=entry.id, marks=marks))
    metafunc.parametrize("deployment", params, indirect=True, scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that an entry's ``known_issues`` name as strict expected failures."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        entry = callspec.params.get("deployment") if callspec else None
        if not isinstance(entry, Deployment):
            continue
        for issue in entry.expect.known_issues:
            if issue.vllm is None and issue.matches(item.name):
                item.add_marker(
                    pytest.mark.xfail(strict=True, reason=f"{issue.reason} ({issue.source})")
                )
                break


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    if rep.when == "call" or rep.outcome != "passed":
        callspec = getattr(item, "callspec", None)
        entry = callspec.params.get("deployment") if callspec else None
        crash = getattr(rep.longrepr, "reprcrash", None)
        if rep.skipped and isinstance(rep.longrepr, tuple):
            message = str(rep.longrepr[2])
        elif crash is not None:
            message = str(crash.message)[:2000]
        else:
            message = rep.longreprtext.strip()[-2000:]
        state(item.config).writer.write(
            "test",
            entry=entry.id if isinstance(entry, Deployment) else None,
            nodeid=item.nodeid,
            phase=rep.when,
            outcome="xfailed" if hasattr(rep, "wasxfail") and rep.skipped else rep.outcome,
            duration=rep.duration,
            message=message,
            properties=dict(rep.user_properties),
        )
    return rep


def pytest_sessionfinish(session: pytest.Session) -> None:
    st = session.config.stash.get(STATE, None)
    if st is not None and st.worker is None and (st.run_dir / "records").exists():
        report.finalize(st.run_dir, complete=session.exitstatus != pytest.ExitCode.INTERRUPTED)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    st = config.stash.get(STATE, None)
    if st is not None and st.worker is None and (st.run_dir / "summary.md").exists():
        terminalreporter.write_line(f"vllm-conformance report: {st.run_dir}")
