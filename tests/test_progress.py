"""Progress phases: the lines they write (elapsed, ETA from counted steps or from the plan),
their heartbeat, their ``phase`` record, and the tail that copies the lines to a terminal.
(That the lines reach the terminal from xdist workers is checked in test_xdist_grouping.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from vllm_conformance.progress import Progress, TerminalTail, duration
from vllm_conformance.report import RecordWriter, load_records


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_durations_read_at_a_glance() -> None:
    assert [duration(s) for s in (4.4, 65, 3599, 7440)] == ["4s", "1m05s", "59m59s", "2h04m"]


def test_a_counted_phase_reports_progress_eta_and_its_record(tmp_path: Path) -> None:
    log = tmp_path / "progress.log"
    writer = RecordWriter(tmp_path / "records" / "gw1.jsonl")
    progress = Progress(log, "gw1", interval_s=3600, writer=writer)
    with progress.phase("e1", "lm-eval gsm8k", total=4, unit="docs", planned_s=600) as step:
        step.update(1)
        step.update(2)
        step.update(4)
    text = lines(log)
    assert re.fullmatch(r"\[gw1 [\d:]{8}\] e1: lm-eval gsm8k started \(planned 10m00s\)", text[0])
    # Rate-limited: of the three updates only the last (all done) writes a line.
    assert len(text) == 3, text
    assert re.search(r"e1: lm-eval gsm8k: 4/4 docs, \d+s elapsed, ETA 0s$", text[1])
    assert re.search(r"e1: lm-eval gsm8k done in \d+s, planned 10m00s, 4 docs$", text[2])
    (record,) = [r for r in load_records(tmp_path) if r["kind"] == "phase"]
    assert record["entry"] == "e1" and record["phase"] == "lm-eval gsm8k"
    assert record["done"] == 4 and record["total"] == 4 and record["outcome"] == "ok"
    assert record["planned_s"] == 600 and record["seconds"] >= 0


def test_eta_from_the_rate_or_from_the_plan(tmp_path: Path) -> None:
    progress = Progress(tmp_path / "p.log", interval_s=3600)
    counted = progress.phase("e", "x", total=10)
    counted._began -= 30  # thirty seconds ago
    counted.done = 3
    assert counted.eta_s() == pytest.approx(70, abs=1)
    progress.planned = {("e", "load run"): 100.0}
    planned = progress.phase("e", "load run")
    planned._began -= 40
    assert planned.planned_s == 100
    assert planned.eta_s() == pytest.approx(60, abs=1)
    planned._began -= 100
    assert "over plan" in planned.status()
    assert progress.phase("e", "unplanned").eta_s() is None


def test_a_silent_phase_keeps_writing_heartbeats_and_a_failure_says_so(tmp_path: Path) -> None:
    log = tmp_path / "progress.log"
    progress = Progress(log, interval_s=0.2)
    with (
        pytest.raises(RuntimeError),
        progress.phase("e", "server start", planned_s=120, detail=lambda: "log: loading weights"),
    ):
        deadline = time.monotonic() + 30
        while sum("elapsed" in line for line in lines(log)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for the heartbeat thread's lines to appear
        raise RuntimeError("boom")
    text = lines(log)
    beats = [line for line in text if "elapsed" in line]
    assert len(beats) >= 2, text
    assert re.search(r"server start, \d+s elapsed, ETA [12]m\d\ds, log: loading weights$", beats[0])
    assert re.search(r"server start FAILED after \d+s, planned 2m00s: RuntimeError$", text[-1])


def test_without_a_path_nothing_is_written(tmp_path: Path) -> None:
    with Progress(None).phase("e", "x", total=1) as step:
        step.advance()
    assert list(tmp_path.iterdir()) == []


def test_the_tail_copies_every_line_to_the_terminal(tmp_path: Path) -> None:
    log = tmp_path / "progress.log"
    first, second = Progress(log, "gw0"), Progress(log, "gw1")
    read, write = os.pipe()
    tail = TerminalTail(log, SimpleNamespace(), poll_s=3600)
    tail.start(write)
    os.close(write)
    first.line("a", "one")
    second.line("b", "two")
    tail.stop()
    out = os.read(read, 65536).decode().splitlines()
    os.close(read)
    assert [re.sub(r" [\d:]{8}\]", "]", line) for line in out] == [
        "[progress] [gw0] a: one",
        "[progress] [gw1] b: two",
    ]


INNER = """
def test_a_long_step(deployment, progress):
    with progress.phase("server start", total=2, unit="steps") as step:
        step.advance()
        step.advance()
"""


def test_a_suite_reports_through_the_progress_fixture(tmp_path: Path) -> None:
    """In one pytest process (no xdist) the lines reach the terminal past the capture, and a
    phase named like a plan step starts from the planned time."""
    (tmp_path / "test_inner.py").write_text(INNER)
    matrix = {"deployments": [{
        "id": "cpu-x", "source": "self-test", "hardware": {"gpu": "cpu"},
        "model": {"family": "tiny", "precision": "bf16", "generate": "tiny-llama4"},
        "serve": {"max_model_len": 2048},
    }]}  # fmt: skip
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "test_inner.py"), "-p",
         "no:cacheprovider", "--rootdir", str(tmp_path), "--matrix", str(tmp_path / "m.yaml"),
         "--reports-dir", str(tmp_path / "reports"), "--run-id", "r"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(
        r"\[progress\] \[main [\d:]{8}\] cpu-x: server start started \(planned 2m", out.stdout
    )
    assert re.search(r"cpu-x: server start: 2/2 steps, \d+s elapsed, ETA 0s", out.stdout)
    assert "cpu-x: server start done in" in out.stdout
