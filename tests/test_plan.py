"""The cost plan: what the collected tests do per entry, their planned time, the node time
packed as the GPU leases pack entries; printed by ``--collect-only`` and ``vllm-conformance
plan`` for the seed matrix without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_conformance import plan
from vllm_conformance.matrix import AccuracyExpect, load_matrix
from vllm_conformance.perf import estimate

ROOT = Path(__file__).resolve().parent.parent
SEED = {d.id: d for d in load_matrix([])}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_conformance.cli", "plan", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_packing_gives_a_large_entry_the_node_and_runs_small_ones_side_by_side() -> None:
    jobs = [(8, 100.0), (4, 50.0), (4, 50.0), (1, 10.0), (1, 10.0), (1, 10.0)]
    assert plan.packed_seconds(jobs, 8, workers=1) == 230
    # The 8-GPU job alone, the two 4-GPU jobs together, the 1-GPU jobs together.
    assert plan.packed_seconds(jobs, 8, workers=8) == 160
    # First come, first served: a 1-GPU job behind a waiting 8-GPU job waits for it.
    assert plan.packed_seconds([(1, 10.0), (8, 100.0), (1, 10.0)], 8, workers=8) == 120


def test_accuracy_documents_follow_limit_and_data() -> None:
    def exp(task: str, **kw: object) -> AccuracyExpect:
        return AccuracyExpect.model_validate(
            {"task": task, "metric": "m", "value": 0.5, "source": "s", **kw}
        )

    assert plan.accuracy_documents(exp("gsm8k")) == 1319
    assert plan.accuracy_documents(exp("gsm8k", limit=250)) == 250
    # lm-eval limits each of mmlu_pro's 14 subjects.
    assert plan.accuracy_documents(exp("mmlu_pro", limit=250)) == 3500
    assert plan.accuracy_documents(exp("mmlu_pro", data="fixture")) == 140
    assert plan.accuracy_documents(exp("mmlu_pro", data="fixture", limit=5)) == 70
    assert plan.accuracy_documents(exp("unknown_task")) is None


def test_an_entry_plan_counts_what_its_selected_suites_do() -> None:
    blog = SEED["blog-scout-8xh100-bf16"]
    everything = plan.Selected({"context": 17, "accuracy": 1, "performance": 4, "serving": 2})
    e = plan.plan_entry(blog, everything)
    assert e.count(plan.SERVER_START) == 1
    assert blog.expect.context is not None
    assert e.count(plan.FULL_PREFILLS) == blog.expect.context.full_prefill_budget == 3
    # mmlu_pro_llama and chartqa_llama_90 at vLLM CI's limits: 250 per subject, 100
    assert e.count("lm-eval") == 250 * 14 + 100
    assert e.count(plan.LOAD_RUN) == 640 + 2
    assert e.count(plan.OTHER_TESTS) == 19
    prefill = estimate.prefill_seconds(blog, 1_000_000)
    assert prefill is not None
    assert e.step_seconds()[plan.FULL_PREFILLS] == pytest.approx(3 * prefill)
    # Only the serving suite: one start, nothing long.
    small = plan.plan_entry(blog, plan.Selected({"serving": 2}))
    assert [s.name for s in small.steps] == [plan.SERVER_START, plan.OTHER_TESTS]
    # An entry expected not to start: one (failing) start per such test, no prefills.
    oom = plan.plan_entry(SEED["fixstars-scout-4xh100-bf16"], plan.Selected({"context": 1}, 1))
    assert [(s.name, s.count) for s in oom.steps] == [(plan.SERVER_START, 1)]


def test_plan_records_rebuild_the_plan() -> None:
    selected = [
        (SEED["blog-scout-8xh100-bf16"], plan.Selected({"context": 17, "serving": 2})),
        (SEED["h100-tiny-bf16"], plan.Selected({"serving": 2})),
    ]
    built = plan.build(selected, workers=8)
    again = plan.Plan.from_records([{"kind": "plan", **r} for r in built.records()])
    assert again == built


def test_collect_only_prints_the_plan_without_gpus() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "h100"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vllm-conformance cost plan" in out.stdout
    assert "| blog-scout-8xh100-bf16 | 8 x h100 | 1 (" in out.stdout
    h100 = sum(d.hardware.gpu == "h100" for d in SEED.values())
    assert f"- h100 node (8 GPUs): {h100} entries" in out.stdout


def test_plan_command_for_the_seed_matrix() -> None:
    out = cli("-m", "h100", "--format", "json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    entries = {e["entry"]: e for e in data["entries"]}
    # Planned although this machine has no GPU (their tests are skipped here).
    assert set(entries) == {d.id for d in SEED.values() if d.hardware.gpu == "h100"}
    tiny = {s["name"] for s in entries["h100-tiny-bf16"]["steps"]}
    assert tiny >= {plan.SERVER_START, plan.FULL_PREFILLS, plan.OTHER_TESTS}
    # Largest first: every 8-GPU entry is planned (and runs) before the 4- and 1-GPU ones.
    counts = [e["gpus"] for e in sorted(data["entries"], key=lambda e: e["order"])]
    assert counts == sorted(counts, reverse=True)
    (node,) = data["nodes"]
    assert node["gpu"] == "h100" and node["workers"] == 8
    assert node["packed_s"] < node["serial_s"]
    assert data["gpu_node_seconds"] == node["packed_s"]
    text = cli("-m", "h100").stdout
    assert text.startswith("| entry | GPUs | server starts | full prefills |")
    assert "planned GPU-node time:" in text


def test_plan_command_reports_bad_usage_in_one_line() -> None:
    out = cli("--entry", "no-such-entry")
    assert out.returncode == 2
    assert "--entry: no matrix entry ['no-such-entry']" in out.stderr
    assert out.stdout == ""


def test_versus_without_plan_records_is_empty() -> None:
    assert plan.versus([{"kind": "test", "entry": "x"}]) == []


def test_versus_reads_the_prefills_the_context_suite_counted() -> None:
    blog = SEED["blog-scout-8xh100-bf16"]
    built = plan.build([(blog, plan.Selected({"context": 17}))])
    records = [{"kind": "plan", **r} for r in built.records()] + [
        {"kind": "timing", "entry": blog.id, "seconds": 300.0},
        {"kind": "check", "entry": blog.id, "check": plan.PREFILL_CHECK,
         "measured": {"full_prefills": 2}},
    ]  # fmt: skip
    (row,) = plan.versus(records)
    assert (row.planned_prefills, row.measured_prefills) == (3, 2)
    assert row.measured_s == 300.0
