"""The harness under faults, against the real vLLM CPU server (nothing is mocked).

| fault                                   | expected                                          |
|-----------------------------------------|---------------------------------------------------|
| server fails to start                   | that entry's tests fail at once with vLLM's       |
|                                         | reason and the log tail; other entries run        |
| engine dies mid-run (engine killed)     | requests fail within seconds naming the death     |
| server stalls (SIGSTOP)                 | requests time out with a clear message; teardown  |
|                                         | still works                                       |
| port already taken                      | another port is used                              |
| SIGTERM to pytest                       | every server's process group ended; the report    |
|                                         | keeps what was measured                           |
| endpoint unreachable or wrong model     | one clear message                                 |

Two servers are started, one at a time, to keep the module within a few minutes:

1. An in-process ``VllmServer`` (``serving.launch_spec`` of a tiny entry) whose first port is
   taken on purpose (the launcher's port picker is made to return a port this module holds
   open, once; the bind failure and the retry are vLLM's and the launcher's own). The same
   server then answers the endpoint-mode checks, is stalled and resumed, has its engine
   killed, and is stopped by the last test of the section, before the second server starts.
2. ``pytest`` in a subprocess on a temporary two-entry matrix: the first entry cannot start
   (a max-model-len above the model's positions, which vLLM rejects in seconds), the second
   starts with an API key, records a measurement, hangs its own engine (SIGSTOP of the
   engine core: requests are accepted and never answered), and then the subprocess
   receives SIGTERM.

After each section no process carrying this module's marker (servers, engines, workers, the
pytest subprocess) is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_conformance import report
from vllm_conformance.launch import local, procs, serving
from vllm_conformance.launch.endpoint import EndpointError, ServerDiedError, connect
from vllm_conformance.launch.local import VllmServer, free_port
from vllm_conformance.matrix import Deployment

pytestmark = pytest.mark.timeout(900)

MAX_LEN = 2048
MODEL_NAME = "faults-tiny"
#: Every process this module starts inherits it (the launcher copies the environment).
MARK_VAR = "VLLM_CONFORMANCE_FAULTS_MARK"
MARK = uuid.uuid4().hex
KEY_VAR = "VLLM_CONFORMANCE_FAULTS_KEY"


def entry_dict(entry_id: str, **serve: Any) -> dict[str, Any]:
    """A tiny-llama4 matrix entry for fault tests (small context, 1 GiB of KV space)."""
    return {
        "id": entry_id,
        "source": "self-test: tests/test_faults.py",
        "model": {
            "family": "tiny",
            "precision": "bf16",
            "generate": "tiny-llama4",
            "served_model_name": MODEL_NAME,
        },
        "hardware": {"gpu": "cpu"},
        "serve": {
            "max_model_len": MAX_LEN,
            "max_num_seqs": 4,
            "generation_config": "vllm",
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            **serve,
        },
    }


def marked_pids(mark: str = MARK) -> list[int]:
    """Live processes carrying this module's marker (pgrep-free: read /proc by env)."""
    needle = f"{MARK_VAR}={mark}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_of(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[3]) if fields else None


def session_pids(sessions: set[int]) -> list[int]:
    """Live processes in any of ``sessions``, whatever their environment says.

    The launcher starts each server in its own session, and vLLM's engine and workers stay
    in it; unlike the tag in ``/proc/PID/environ`` (which vLLM's process titles overwrite),
    the session id cannot be lost, so it is the independent check that nothing survived.
    """
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        fields = _stat(int(proc.name))
        if fields and fields[0] != "Z" and int(fields[3]) in sessions:
            found.append(int(proc.name))
    return sorted(found)


def server_pids(server: VllmServer) -> list[int]:
    """Every live process of ``server``: tagged, or in its session."""
    assert server.proc is not None
    return sorted(set(procs.tagged_pids(server.tag)) | set(session_pids({server.proc.pid})))


def my_vllm_pids(mark: str = MARK) -> list[int]:
    """``pgrep -f vllm.entrypoints`` / ``VLLM::`` restricted to processes started here."""
    out = subprocess.run(
        ["pgrep", "-f", r"vllm\.entrypoints|VLLM::"], capture_output=True, text=True, check=False
    ).stdout.split()
    mine = set(marked_pids(mark))
    return sorted(int(pid) for pid in out if int(pid) in mine)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture(scope="module", autouse=True)
def _mark_environment() -> Iterator[None]:
    """Put the marker in this process's environment, so every child inherits it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(MARK_VAR, MARK)
        yield
    for pid in marked_pids():
        # A leftover fails the module below; do not leave it running for the next one.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# == 1. one in-process server: port taken, endpoint mode, stall, engine death, stop =======


@dataclass
class Held:
    """The port this module held open while the server picked its first port."""

    port: int


@pytest.fixture(scope="module")
def taken_port() -> Iterator[Held]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield Held(sock.getsockname()[1])
    finally:
        sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, taken_port: Held) -> Iterator[VllmServer]:
    entry = Deployment.model_validate(entry_dict("faults"))
    spec = serving.launch_spec(entry, None, startup_timeout=600.0)
    srv = VllmServer(spec, tmp_path_factory.mktemp("faults") / "server.log")
    offered = [taken_port.port]
    real_free_port = local.free_port

    def first_port_taken(host: str = "127.0.0.1") -> int:
        return offered.pop() if offered else real_free_port(host)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local, "free_port", first_port_taken)
        srv.start()
    yield srv
    srv.stop(grace=5)
    assert srv.proc is not None
    for pid in session_pids({srv.proc.pid}):
        # Leave nothing running for the next module, whatever the tests above found.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_port_already_taken_uses_another_port(server: VllmServer, taken_port: Held) -> None:
    """The first port was in use: vLLM failed to bind it, the launcher retried elsewhere."""
    log = server.log_path.read_text(errors="replace")
    assert f"--port {taken_port.port} " in log, "the first attempt did not use the taken port"
    assert "Address already in use" in log or "Errno 98" in log
    assert server.port is not None and server.port != taken_port.port
    server.endpoint.probe()


def test_unreachable_endpoint_is_one_clear_message() -> None:
    port = free_port()
    with pytest.raises(EndpointError) as info:
        connect(f"http://127.0.0.1:{port}")
    message = str(info.value)
    assert message.startswith(f"http://127.0.0.1:{port}: endpoint unreachable")
    assert "\n" not in message


def test_wrong_model_is_one_clear_message(server: VllmServer) -> None:
    with pytest.raises(EndpointError) as info:
        connect(server.endpoint.base_url, expected_model="not-served")
    message = str(info.value)
    assert f"lists ['{MODEL_NAME}'], not the entry's model 'not-served'" in message
    assert "\n" not in message


def _endpoint_run(tmp_path: Path, url: str, served: str) -> subprocess.CompletedProcess[str]:
    """pytest (subprocess) in endpoint mode on a one-test suite; nothing is launched."""
    entry = entry_dict("remote")
    entry["model"]["served_model_name"] = served
    (tmp_path / "matrix.yaml").write_text(yaml.safe_dump({"deployments": [entry]}))
    write_inner_suite(tmp_path, "def test_uses_endpoint(endpoint):\n    endpoint.probe()\n")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(tmp_path / "test_inner.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "--matrix",
            str(tmp_path / "matrix.yaml"),
            "--reports-dir",
            str(tmp_path / "reports"),
            "--run-id",
            "r",
            "--endpoint",
            url,
            "--entry",
            "remote",
        ],
        cwd=tmp_path,
        env=inner_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("fault", ["unreachable", "wrong_model"])
def test_endpoint_mode_fault_is_one_clear_message(
    server: VllmServer, tmp_path: Path, fault: str
) -> None:
    """Through pytest: the test fails with the one-line reason, no traceback."""
    if fault == "unreachable":
        url, served = f"http://127.0.0.1:{free_port()}", MODEL_NAME
        expected = "endpoint unreachable"
    else:
        url, served = server.endpoint.base_url, "not-served"
        expected = f"lists ['{MODEL_NAME}'], not the entry's model 'not-served'"
    run = _endpoint_run(tmp_path, url, served)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-3000:]
    assert expected in out, out[-3000:]
    assert "Traceback" not in out and "httpx." not in out, out[-3000:]


def test_stalled_server_times_out_clearly_then_resumes(server: VllmServer) -> None:
    """SIGSTOP the whole group: a request fails after its timeout, naming a stall; after
    SIGCONT the same server serves again."""
    import openai

    assert server.proc is not None
    pgid = server.proc.pid
    os.killpg(pgid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(EndpointError, match=r"did not finish within 3 s \(server stalled\?\)"):
            server.endpoint.probe(timeout=3)
        assert time.monotonic() - began < 10
        began = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            server.endpoint.client(timeout=3).completions.create(
                model=MODEL_NAME, prompt="hi", max_tokens=1
            )
        assert time.monotonic() - began < 10
    finally:
        os.killpg(pgid, signal.SIGCONT)
    server.endpoint.probe(timeout=120)


def _engine_pids(server: VllmServer) -> list[int]:
    return [p for p in server_pids(server) if cmdline(p).startswith("VLLM::EngineCore")]


def test_tag_sweep_sees_every_server_process(server: VllmServer) -> None:
    """The launcher's leftover sweep finds a server's processes by the tag in their
    environment; it must see all of them (engine core and workers included), or a
    surviving engine goes unreported."""
    assert server.proc is not None
    in_session = session_pids({server.proc.pid})
    tagged = procs.tagged_pids(server.tag)
    unseen = {p: cmdline(p)[:60] for p in in_session if p not in tagged}
    assert len(in_session) >= 3, in_session
    assert not unseen, (
        f"processes of the server that procs.tagged_pids cannot see: {unseen} (their "
        "/proc/PID/environ was overwritten when vLLM set the process title; launching "
        "with SPT_NOENV=1 keeps it)"
    )


def test_engine_death_is_named_within_seconds(server: VllmServer) -> None:
    """SIGKILL the engine core: the next request fails within seconds, the API server exits,
    and from then on the harness names the death (exit code, log tail) without a request."""
    engines = _engine_pids(server)
    assert engines, f"no engine process among {[cmdline(p)[:40] for p in server_pids(server)]}"
    os.kill(engines[0], signal.SIGKILL)
    began = time.monotonic()
    with pytest.raises((EndpointError, ServerDiedError)) as info:
        server.endpoint.probe(timeout=20)
    failed_after = time.monotonic() - began
    first = f"{info.type.__name__}: {info.value}"
    deadline = time.monotonic() + 30
    while server.alive() and time.monotonic() < deadline:
        # The API server's exit has no event to wait on from here; poll its process.
        time.sleep(0.2)
    exited_after = time.monotonic() - began
    assert failed_after < 20, f"the first request failed only after {failed_after:.0f} s"
    # vLLM 0.32 answers 500 "EngineCore encountered an issue ..." (EngineDeadError).
    assert any(word in first for word in ("EngineCore", "EngineDead", "died")), first
    assert not server.alive(), f"API server still running {exited_after:.0f} s after its engine"
    checked = time.monotonic()
    with pytest.raises(ServerDiedError) as died:
        server.endpoint.probe()
    assert time.monotonic() - checked < 1
    message = str(died.value)
    assert "died with exit code" in message and "last lines of the server log" in message


def test_stop_after_death_and_stall_leaves_nothing(server: VllmServer) -> None:
    """Stall whatever is left of the dead server; stop() still ends every process."""
    stalled = server_pids(server)
    for pid in stalled:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    began = time.monotonic()
    server.stop(grace=5)
    assert time.monotonic() - began < 60
    assert procs.tagged_pids(server.tag) == []
    left = server_pids(server)
    assert left == [], (
        f"stop() returned but these processes of the stalled server live on: "
        f"{ {p: cmdline(p)[:40] for p in left} } (stalled before stop: {stalled})"
    )
    assert my_vllm_pids() == []


# == 2. pytest in a subprocess: start failure, other entry runs, stall, SIGTERM ==========

INNER_SUITE = textwrap.dedent(
    """
    import os
    import signal
    import time
    from pathlib import Path

    from vllm_conformance.launch.endpoint import EndpointError


    def test_a_measures(endpoint, recorder):
        out = endpoint.client().completions.create(
            model=endpoint.model, prompt="hi", max_tokens=2, temperature=0,
            extra_body={"ignore_eos": True},
        )
        recorder.record("faults.measured", "pass", measured={"tokens": out.usage.completion_tokens})


    def _engine_of(api_pid):
        for proc in Path("/proc").iterdir():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                title = (proc / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == api_pid and title.startswith(b"VLLM::EngineCore"):
                return int(proc.name)
        raise AssertionError(f"no engine core under {api_pid}")


    def test_b_stalls_and_waits(endpoint):
        # A hung engine: the API server still accepts requests, nothing answers them.
        os.kill(_engine_of(endpoint.server.proc.pid), signal.SIGSTOP)
        try:
            endpoint.probe(timeout=3)
        except EndpointError as exc:
            Path(os.environ["FAULTS_STALLED"]).write_text(str(exc))
        # Stands for a long measurement; the outer test interrupts it with SIGTERM.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(0.5)
    """
)


def write_inner_suite(root: Path, suite: str) -> None:
    (root / "test_inner.py").write_text(suite)


def inner_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, MARK_VAR: MARK, **extra}
    for name in (
        "VLLM_CONFORMANCE_ENDPOINT",
        "VLLM_CONFORMANCE_ENTRY",
        "VLLM_CONFORMANCE_MATRIX",
        "VLLM_CONFORMANCE_RUN_ID",
        "PYTEST_ADDOPTS",
        "PYTEST_XDIST_WORKER",
        "PYTEST_XDIST_WORKER_COUNT",
    ):
        env.pop(name, None)
    return env


@dataclass
class InterruptedRun:
    """What the outer test saw of the interrupted pytest run."""

    returncode: int
    output: str
    run_dir: Path
    records: list[dict[str, Any]]
    stalled_message: str
    began: float
    exit_seconds: float
    left_after: dict[int, str]
    server_pids_during: list[int]
    key: str


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory) -> InterruptedRun:
    root = tmp_path_factory.mktemp("interrupted")
    bad = entry_dict("cannot-start", max_model_len=20_000_000)
    good = entry_dict("starts", api_key_env=KEY_VAR)
    (root / "matrix.yaml").write_text(yaml.safe_dump({"deployments": [bad, good]}))
    write_inner_suite(root, INNER_SUITE)
    stalled = root / "stalled.txt"
    sessions: set[int] = set()
    key = secrets.token_urlsafe(24)
    run_dir = root / "reports" / "run"
    log = (root / "pytest.log").open("w")
    began = time.time()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            str(root / "test_inner.py"),
            "-v",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(root),
            "--matrix",
            str(root / "matrix.yaml"),
            "--reports-dir",
            str(root / "reports"),
            "--run-id",
            "run",
            "--startup-timeout",
            "600",
        ],
        cwd=root,
        env=inner_env(FAULTS_STALLED=str(stalled), **{KEY_VAR: key}),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 720
        while not stalled.exists() and proc.poll() is None and time.monotonic() < deadline:
            # The inner suite signals through a file; poll it at a short interval.
            time.sleep(0.5)
        assert stalled.exists(), f"the inner run never stalled its server (rc {proc.poll()})"
        own = os.getsid(0)
        sessions |= {sid for p in marked_pids() if (sid := session_of(p)) and sid != own}
        during = session_pids(sessions)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=180)
        exit_seconds = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        left = sorted(set(marked_pids()) | set(session_pids(sessions)))
        left_titles = {p: cmdline(p)[:60] for p in left}
        for pid in left:
            # Reported by the tests below; not left running for the rest of the session.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return InterruptedRun(
        returncode=returncode,
        output=(root / "pytest.log").read_text(errors="replace"),
        run_dir=run_dir,
        records=report.load_records(run_dir),
        stalled_message=stalled.read_text(),
        began=began,
        exit_seconds=exit_seconds,
        left_after=left_titles,
        server_pids_during=during,
        key=key,
    )


def _tests(run: InterruptedRun, entry: str) -> dict[str, dict[str, Any]]:
    """The last 'test' record of each test of ``entry``, by test name."""
    out: dict[str, dict[str, Any]] = {}
    for rec in run.records:
        if rec.get("kind") == "test" and rec.get("entry") == entry:
            out[rec["nodeid"].split("::")[-1].split("[")[0]] = rec
    return out


def test_start_failure_fails_that_entry_at_once(interrupted_run: InterruptedRun) -> None:
    """Both tests of the entry that cannot start fail in setup with vLLM's reason and the
    log tail; the server is tried once, not once per test."""
    tests = _tests(interrupted_run, "cannot-start")
    assert set(tests) == {"test_a_measures", "test_b_stalls_and_waits"}, tests
    for rec in tests.values():
        assert rec["phase"] == "setup" and rec["outcome"] == "failed", rec
    servers = [
        r
        for r in interrupted_run.records
        if r.get("kind") == "server" and r.get("entry") == "cannot-start"
    ]
    assert [s["status"] for s in servers] == ["failed"], servers
    reason = servers[0]["reason"]
    assert reason, servers
    output = interrupted_run.output
    assert "last lines of the server log" in output
    assert reason["line"] in output
    # vLLM's own explanation (its wording may change; the flag it names does not).
    assert "max_model_len (20000000)" in output, output[-3000:]
    assert servers[0]["time"] - interrupted_run.began < 120, "the failure took minutes"
    assert tests["test_b_stalls_and_waits"]["duration"] < 1.0, "the start was retried"


def test_other_entries_still_run(interrupted_run: InterruptedRun) -> None:
    tests = _tests(interrupted_run, "starts")
    assert tests["test_a_measures"]["outcome"] == "passed", tests
    started = [
        r
        for r in interrupted_run.records
        if r.get("kind") == "server" and r.get("entry") == "starts"
    ]
    assert started and started[0]["status"] == "started", started


def test_stalled_request_names_the_stall(interrupted_run: InterruptedRun) -> None:
    assert "did not finish within 3 s (server stalled?)" in interrupted_run.stalled_message


def test_sigterm_ends_every_server(interrupted_run: InterruptedRun) -> None:
    """SIGTERM during a test whose server's engine hangs (SIGSTOP): pytest tears the server
    down and exits; no process of the run survives (checked by session id, which the
    server's processes cannot lose), and teardown reported no leftover."""
    assert interrupted_run.returncode != 0
    assert len(interrupted_run.server_pids_during) >= 3, interrupted_run.server_pids_during
    assert interrupted_run.exit_seconds < 120
    assert interrupted_run.left_after == {}, (
        f"processes of the interrupted run survived it: {interrupted_run.left_after}"
    )
    assert not [
        r
        for r in interrupted_run.records
        if r.get("kind") == "server" and r.get("status") == "leftover"
    ]


def test_report_keeps_what_was_measured(interrupted_run: InterruptedRun) -> None:
    run_dir = interrupted_run.run_dir
    checks = [r for r in interrupted_run.records if r.get("kind") == "check"]
    assert [c["check"] for c in checks] == ["faults.measured"], checks
    assert checks[0]["measured"] == {"tokens": 2}
    assert (run_dir / "report.json").exists() and (run_dir / "summary.md").exists()
    assert "faults.measured" in (run_dir / "report.json").read_text()


def test_api_key_in_no_file_of_the_run(interrupted_run: InterruptedRun) -> None:
    """The keyed entry's key is in no file of the run (records, report, JUnit, server log)
    nor in pytest's output."""
    needle = interrupted_run.key.encode()
    files = [p for p in interrupted_run.run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "server.log" for p in files), files
    leaks = [str(p) for p in files if needle in p.read_bytes()]
    assert not leaks, leaks
    assert interrupted_run.key not in interrupted_run.output
    assert json.dumps(interrupted_run.key)[1:-1] not in interrupted_run.output
