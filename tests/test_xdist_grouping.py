"""With ``-n 2`` an entry's tests stay on one worker and its server starts once, two entries
run side by side, progress lines reach the terminal from both workers, and the run's records
hold its plan and what it measured.

Two real vLLM CPU servers start in parallel (one per worker), on a small test selection
(``test_serving.py``: two tests per entry). Run it holding both machine slots
(``vllm-slot vllm-slot pytest ...``) on a shared machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_conformance import plan
from vllm_conformance.report import load_records

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = ("cpu-a", "cpu-b")

pytestmark = pytest.mark.timeout(1200)


def cpu_entry(entry_id: str) -> dict[str, Any]:
    return {
        "id": entry_id,
        "source": "self-test",
        "model": {
            "family": "tiny",
            "precision": "bf16",
            "generate": "tiny-llama4",
            "served_model_name": "tiny-llama4",
            "options": {"max_position_embeddings": 65536},
        },
        "hardware": {"gpu": "cpu"},
        "serve": {"max_model_len": 2048, "max_num_seqs": 4, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One ``pytest -n 2`` run of the serving suite over two CPU entries."""
    tmp = tmp_path_factory.mktemp("xdist")
    matrix = tmp / "two.yaml"
    matrix.write_text(yaml.safe_dump({"deployments": [cpu_entry(e) for e in ENTRIES]}))
    out = subprocess.run(
        [
            sys.executable, "-m", "pytest", "src/vllm_conformance/suites/test_serving.py",
            "-n", "2", "-v", "-p", "no:cacheprovider", "--matrix", str(matrix),
            "--reports-dir", str(tmp), "--run-id", "r", "--progress-interval", "10",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=1100,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    return text, tmp / "r"


def test_each_entry_runs_on_one_worker_and_starts_once(run: tuple[str, Path]) -> None:
    text, run_dir = run
    workers: dict[str, set[str]] = defaultdict(set)
    starts: dict[str, int] = defaultdict(int)
    for path in (run_dir / "records").glob("gw*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["kind"] == "test":
                workers[record["entry"]].add(path.stem)
            elif record["kind"] == "server" and record["status"] == "started":
                starts[record["entry"]] += 1
    assert dict(starts) == {"cpu-a": 1, "cpu-b": 1}, text
    assert all(len(w) == 1 for w in workers.values()), workers
    assert workers["cpu-a"] != workers["cpu-b"], "both entries ran on one worker"
    assert "4 passed" in text


def test_two_entries_serve_side_by_side(run: tuple[str, Path]) -> None:
    """Each server was up while the other was: the workers did not take turns."""
    _, run_dir = run
    spans = {}
    for r in load_records(run_dir):
        if r["kind"] == "timing":
            began, ended = r["time"] - r["seconds"], r["time"]
            old = spans.get(r["entry"], (began, ended))
            spans[r["entry"]] = (min(old[0], began), max(old[1], ended))
    (a0, a1), (b0, b1) = spans["cpu-a"], spans["cpu-b"]
    assert a0 < b1 and b0 < a1, spans


def test_progress_lines_reach_the_terminal_from_both_workers(run: tuple[str, Path]) -> None:
    text, run_dir = run
    for entry in ENTRIES:
        started = re.search(rf"\[progress\] \[(gw\d) [\d:]+\] {entry}: server start started", text)
        assert started, text
        done = rf"\[progress\] \[{started.group(1)} [\d:]+\] {entry}: server start done in \S+"
        assert re.search(done + r", planned 2m00s", text), text
    assert "[progress] [gw0" in text and "[progress] [gw1" in text
    assert (run_dir / "progress.log").read_text().count("server start done") == 2


def test_the_run_records_its_plan_and_what_it_measured(run: tuple[str, Path]) -> None:
    text, run_dir = run
    rows = {r.entry: r for r in plan.versus(load_records(run_dir))}
    assert set(rows) == set(ENTRIES)
    for row in rows.values():
        assert row.planned_s is not None and row.planned_s > 0
        assert row.measured_s is not None and row.measured_s > 0
        assert row.measured_start_s is not None and row.measured_start_s > 0
    assert "vllm-conformance planned against measured" in text
