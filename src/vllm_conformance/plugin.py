"""The pytest plugin: options, the matrix, markers, parametrization, the run report.

Suites take a ``deployment`` fixture; this plugin parametrizes it, session-scoped and
indirect, with the selected matrix entries, so pytest groups tests by deployment across
modules (server A starts, all its tests run, A stops, then B).

Suite-level markers:

- ``needs_expect("context")``: only entries with that expectation section run the test;
  the others are skipped at collection time, so no server starts for nothing.
- ``expects_startup_failure``: the test is for entries whose start is expected to fail
  (and only those); every other test never sees such entries.

With pytest-xdist (``-n K``) every test of an entry carries ``xdist_group(<entry>)`` and the
distribution is ``loadgroup``, so an entry's tests stay on one worker and its server starts
once; entries come largest first, and each takes its GPUs from the node's lease table
(:mod:`~vllm_conformance.launch.gpus`). The cost plan (:mod:`~vllm_conformance.plan`) is
built from the collected tests, printed by ``--collect-only`` and recorded at a run's start;
long phases report progress lines outside capture (:mod:`~vllm_conformance.progress`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from vllm_conformance import plan as plan_mod
from vllm_conformance import report
from vllm_conformance.launch import gpus as gpu_mod
from vllm_conformance.launch import serving
from vllm_conformance.launch.logparse import KvCacheInfo
from vllm_conformance.matrix import Deployment, KnownIssue, MatrixError, load, markers, settings
from vllm_conformance.progress import Progress, TerminalTail, duration

#: The fixtures every suite can take (one module per concept).
pytest_plugins = [
    "vllm_conformance.fixtures.server",
    "vllm_conformance.fixtures.tokenizer",
    "vllm_conformance.fixtures.recorder",
    "vllm_conformance.fixtures.progress",
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
    server_log: Path | None = None
    request_timeout: float = 600.0
    #: KV capacity logged by each entry's server started in this process, by entry id.
    kv_caches: dict[str, KvCacheInfo] = field(default_factory=dict)
    progress: Progress = field(default_factory=lambda: Progress(None))
    #: GPUs per kind on this machine (the plan's node size where there are any)
    node_gpus: dict[str, int] = field(default_factory=dict)
    #: entry id -> why its tests are skipped here although they run on a node that has
    #: its GPUs (the plan still counts them)
    runs_elsewhere: dict[str, str] = field(default_factory=dict)
    plan: plan_mod.Plan | None = None
    tail: TerminalTail | None = None

    def unavailable(self, entry: Deployment) -> str | None:
        """Why ``entry`` cannot run here (missing GPUs), or None."""
        if self.endpoint:
            return None
        return self.launcher.unavailable(entry)


STATE = pytest.StashKey[State]()
_RUN_DIR_KEY = "vllm_conformance_run_dir"
#: nodeid -> xdist group, written by the first worker for the controller's scheduler
_GROUPS_FILE = "xdist-groups.json"


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


def _option_path(config: pytest.Config, name: str) -> Path | None:
    """A path option, relative to the directory pytest was started in."""
    value = settings.resolve(config, name)
    return config.invocation_params.dir / value if value else None


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
    for name in ("api-key", "server-log"):
        if settings.resolve(config, name) and not endpoint:
            raise pytest.UsageError(
                f"--{name} is for a server this run does not launch (--endpoint URL); a "
                "launched entry takes its key from serve.api_key_env and its log from the run"
            )
    if endpoint and len([d for d in selected if not d.startup_fails]) != 1:
        raise pytest.UsageError(
            "--endpoint runs the suites against one deployment: select its matrix entry "
            "with --entry ID"
        )
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    _group_by_entry(config)
    run_dir = _run_dir(config)
    if worker is None and not config.option.collectonly and not config.option.xmlpath:
        # Runs before the junitxml plugin reads the option: JUnit lands beside the report.
        config.option.xmlpath = str(run_dir / "junit.xml")
    writer = report.RecordWriter(run_dir / "records" / f"{worker or 'main'}.jsonl")
    detected = gpu_mod.detect()
    progress = Progress(
        None if config.option.collectonly else run_dir / "progress.log",
        worker,
        settings.resolve(config, "progress-interval"),
        writer,
    )
    leases = settings.resolve(config, "gpu-leases")
    gpu_wait = settings.resolve(config, "gpu-wait")
    launcher = _ray_launcher(config, progress)
    config.stash[STATE] = State(
        deployments=deployments,
        selected=selected,
        run_dir=run_dir,
        writer=writer,
        worker=worker,
        launcher=launcher
        or serving.LocalLauncher(
            detected,
            settings.resolve(config, "startup-timeout"),
            leases=gpu_mod.Leases(Path(leases)) if leases else None,
            progress=progress,
            owner=worker or "main",
            **({"gpu_wait": gpu_wait} if gpu_wait is not None else {}),
        ),
        endpoint=endpoint,
        api_key=settings.resolve(config, "api-key"),
        server_log=_option_path(config, "server-log"),
        request_timeout=settings.resolve(config, "request-timeout"),
        progress=progress,
        node_gpus=dict(Counter(g.kind for g in detected if g.kind)),
    )
    if worker is None and not config.option.collectonly:
        writer.write("run", environment=report.environment(detected), endpoint=endpoint)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(run_dir), "vllm-conformance-xdist")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _ray_launcher(config: pytest.Config, progress: Progress) -> serving.Launcher | None:
    """The Ray launcher, when ``--launcher ray`` asks for it (else None: the local one)."""
    if settings.resolve(config, "launcher") != "ray":
        return None
    address = settings.resolve(config, "ray-address")
    if not address:
        raise pytest.UsageError(
            "--launcher ray needs --ray-address: HOST:PORT of the cluster's head, 'auto' on "
            "one of its nodes, or ray://HOST:10001"
        )
    try:
        from vllm_conformance.launch import ray as ray_launch
    except ImportError as exc:
        raise pytest.UsageError(f"--launcher ray: {exc}") from None
    return ray_launch.RayLauncher(
        address,
        settings.resolve(config, "startup-timeout"),
        settings.resolve(config, "ray-queue-timeout"),
        progress,
    )


#: xdist distributions that would split an entry's tests over workers (each its own server).
_SPLITTING = ("load", "loadscope", "loadfile", "worksteal")


def _group_by_entry(config: pytest.Config) -> None:
    """``-n K``: distribute by entry (``loadgroup``), in collection order (largest first)."""
    if getattr(config.option, "dist", "no") in _SPLITTING:
        config.option.dist = "loadgroup"
        config.option.loadscopereorder = False


def _entry_of(item: pytest.Item) -> Deployment | None:
    callspec = getattr(item, "callspec", None)
    entry = callspec.params.get("deployment") if callspec else None
    return entry if isinstance(entry, Deployment) else None


class _XdistHooks:
    """Hands the controller's run directory to every worker; schedules ``loadgroup``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[_RUN_DIR_KEY] = str(self.run_dir)

    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """``loadgroup`` by the groups the first worker wrote at collection.

        xdist 3.8 carries a test's ``xdist_group`` to the controller as a node-id suffix,
        which pytest 9.2's structured node ids no longer take (pytest-xdist #1386: the
        groups are silently lost); this reads them from the run directory instead.
        """
        if config.getoption("dist") != "loadgroup":
            return None
        from xdist.scheduler import LoadGroupScheduling

        groups_file = self.run_dir / _GROUPS_FILE

        class EntryScheduling(LoadGroupScheduling):
            groups: dict[str, str] | None = None

            def _split_scope(self, nodeid: str) -> str:
                if self.groups is None:
                    self.groups = json.loads(groups_file.read_text())
                return self.groups.get(nodeid) or super()._split_scope(nodeid)

        return EntryScheduling(config, log)


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
            st.runs_elsewhere[entry.id] = f"{entry.id}: {why}"
            marks.append(pytest.mark.skip(reason=f"{entry.id}: {why}"))
        params.append(pytest.param(entry, id=entry.id, marks=marks))
    metafunc.parametrize("deployment", params, indirect=True, scope="session")


def _gpus(item: pytest.Item) -> int:
    entry = _entry_of(item)
    return entry.hardware.count if entry is not None and entry.hardware.gpu != "cpu" else 0


def _group(entry: Deployment) -> str:
    """An entry's xdist group: its own, or that of the entry its KV capacity is compared
    with (both must start in one process)."""
    ratio = entry.expect.context.kv_cache_ratio if entry.expect.context else None
    return ratio.to if ratio is not None else entry.id


class KnownFindings(Exception):
    """Raised by a test whose every finding matched a known issue of its entry: the
    strict xfail the plugin set expects exactly this, so any other failure still fails."""


def _known_issues(item: pytest.Item) -> list[KnownIssue]:
    entry = _entry_of(item)
    if entry is None:
        return []
    # Issues of a vLLM range wait for the served version (the endpoint fixture marks them).
    return [i for i in entry.expect.known_issues if i.vllm is None and i.matches(item.name)]


def _mark_known_issues(item: pytest.Item) -> None:
    """Strict expected failure: of any failure, or, when every issue naming the test has a
    signature, only of :class:`KnownFindings` (the test matched its findings to them)."""
    issues = _known_issues(item)
    if not issues:
        return
    reason = "; ".join(f"{i.reason} ({i.source})" for i in issues)
    if all(i.has_signature for i in issues):
        item.add_marker(pytest.mark.xfail(strict=True, raises=KnownFindings, reason=reason))
    else:
        item.add_marker(pytest.mark.xfail(strict=True, reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Generator[None]:
    """One xdist group per entry; the tests that an entry's ``known_issues`` name marked as
    expected failures; then (once pytest has grouped the tests by entry) the largest
    entries first, so that they get the node before small ones fill it."""
    grouped = config.pluginmanager.hasplugin("xdist")
    for item in items:
        entry = _entry_of(item)
        if entry is None:
            continue
        if grouped:
            item.add_marker(pytest.mark.xdist_group(_group(entry)))
        _mark_known_issues(item)
    # Marked before this yield: xdist's worker reads the marks in its own hook.
    yield
    items.sort(key=lambda item: -_gpus(item))


@pytest.fixture
def known_issues(request: pytest.FixtureRequest) -> list[KnownIssue]:
    """The known issues with a signature that name this test, for it to match its
    findings against (then raise :class:`KnownFindings` if all matched)."""
    return [i for i in _known_issues(request.node) if i.has_signature]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    if rep.when == "call" or rep.outcome != "passed":
        entry = _entry_of(item)
        crash = getattr(rep.longrepr, "reprcrash", None)
        if rep.skipped and isinstance(rep.longrepr, tuple):
            message = str(rep.longrepr[2])
        elif crash is not None:
            message = str(crash.message)[:2000]
        else:
            message = rep.longreprtext.strip()[-2000:]
        state(item.config).writer.write(
            "test",
            entry=entry.id if entry is not None else None,
            nodeid=item.nodeid,
            phase=rep.when,
            outcome="xfailed" if hasattr(rep, "wasxfail") and rep.skipped else rep.outcome,
            duration=rep.duration,
            message=message,
            properties=dict(rep.user_properties),
        )
    return rep


# tryfirst: the groups are on disk before xdist's worker reports its collection.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Plan the collected tests; the planning process (no xdist, or its first worker: all
    workers collect the same) records the plan at the run's start."""
    config = session.config
    st = state(config)
    if st.worker == "gw0":
        groups = {
            item.nodeid: str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for item in session.items
            if (mark := item.get_closest_marker("xdist_group")) is not None
        }
        st.run_dir.mkdir(parents=True, exist_ok=True)
        (st.run_dir / _GROUPS_FILE).write_text(json.dumps(groups))
    if st.endpoint:
        return
    selected = plan_mod.from_items(session.items, st.runs_elsewhere)
    st.plan = plan_mod.build(selected, _workers(config, selected), st.node_gpus)
    st.progress.planned = st.plan.phase_seconds()
    if not st.plan.entries or config.option.collectonly or st.worker not in (None, "gw0"):
        return
    for record in st.plan.records():
        st.writer.write("plan", **record)
    nodes = ", ".join(
        f"{n.gpu} {'?' if n.packed_s is None else duration(n.packed_s)}" for n in st.plan.nodes
    )
    st.progress.line(None, f"plan: {len(st.plan.entries)} entries planned ({nodes})")


def _workers(config: pytest.Config, selected: list[tuple[Deployment, Any]]) -> int:
    """The xdist workers of this run; for a plan without ``-n``, as many as one node
    has GPUs (what packing needs)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    workers = workers or getattr(config.option, "numprocesses", None) or 0
    if not workers and config.option.collectonly:
        kinds = {entry.hardware.gpu for entry, _ in selected} - {"cpu"}
        sizes = state(config).node_gpus
        workers = max((sizes.get(k, plan_mod.NODE_GPUS) for k in kinds), default=1)
    return max(1, int(workers))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    """Each test's wall time (setup, call, teardown: server start and stop included),
    unless it was skipped at collection (then it ran on no server)."""
    began = time.monotonic()
    try:
        return (yield)
    finally:
        entry = _entry_of(item)
        if entry is not None and item.get_closest_marker("skip") is None:
            state(item.config).writer.write(
                "timing", entry=entry.id, nodeid=item.nodeid, seconds=time.monotonic() - began
            )


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """The process that owns the terminal copies every process's progress lines to it."""
    config = session.config
    st = config.stash.get(STATE, None)
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if st is None or st.worker is not None or st.progress.path is None or terminal is None:
        return
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):
            return  # no terminal file descriptor (an IDE's stream): progress.log only
        st.tail = TerminalTail(st.progress.path, terminal)
        st.tail.start(fd)


def pytest_sessionfinish(session: pytest.Session) -> None:
    st = session.config.stash.get(STATE, None)
    if st is not None and st.tail is not None:
        st.tail.stop()
    if st is not None and st.worker is None and (st.run_dir / "records").exists():
        report.finalize(st.run_dir, complete=session.exitstatus != pytest.ExitCode.INTERRUPTED)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    st = config.stash.get(STATE, None)
    if st is None or st.worker is not None:
        return
    if config.option.collectonly and st.plan is not None and st.plan.entries:
        terminalreporter.write_sep("-", "vllm-conformance cost plan")
        terminalreporter.write(plan_mod.render(st.plan))
    if (st.run_dir / "records").exists() and (
        rows := plan_mod.versus(report.load_records(st.run_dir))
    ):
        terminalreporter.write_sep("-", "vllm-conformance planned against measured")
        terminalreporter.write(plan_mod.render_versus(rows))
    if (st.run_dir / "summary.md").exists():
        terminalreporter.write_line(f"vllm-conformance report: {st.run_dir}")
