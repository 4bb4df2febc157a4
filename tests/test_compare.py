"""The upgrade diff between two real vLLM CPU releases, end to end.

``scripts/upgrade-diff 0.30.0 0.32.0 <suites>`` builds (or reuses) one virtual environment
per release with scripts/bootstrap, runs the same suites on the ``cpu`` entry in each and
compares the two runs. Nothing about what differs between the releases is written here:
every expectation is derived from the two reports (a check whose recorded status differs
must be in the diff, as a regression unless it is a reworded message, ...), so the test
keeps working, and keeps showing the real differences, whatever vLLM changes.

Cost: building the 0.30.0 environment the first time (about 5 minutes) and two runs of the
serving and context suites (about 4 to 6 minutes each on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_report import child_env, killed_run

from vllm_conformance import report, verdicts
from vllm_conformance.report import compare
from vllm_conformance.report.compare.model import CONTRACT_FIELDS, MESSAGE_FIELDS, get, keyed

REPO = Path(__file__).resolve().parents[1]
#: Not 0.28.0, whose CPU fused-MoE kernel segfaults on the first request of the tiny Llama 4
#: on CPUs with AMX (measured 2026-12-01; docs/upgrades.md); 0.30.0 serves it.
OLD_VERSION, NEW_VERSION = "0.30.0", "0.32.0"
#: A subset of the suites keeps the run short: serving, and the context checks whose error
#: behaviour an upgrade can change (the full-length prefills add minutes and no new kind of
#: finding).
SUITES = [
    "src/vllm_conformance/suites/test_serving.py",
    "src/vllm_conformance/suites/test_context.py",
    "-k",
    "not fits_exactly and not max_tokens_alone_fits and not concurrent_near_max and not multi_turn",
]
PREFIX = "selftest"


@dataclass(frozen=True)
class Upgrade:
    old_dir: Path
    new_dir: Path
    diff_base: Path
    proc: subprocess.CompletedProcess[str]

    @property
    def diff(self) -> dict[str, Any]:
        return json.loads(self.diff_base.with_suffix(".json").read_text())

    def report(self, which: str) -> dict[str, Any]:
        return report.load_report(self.old_dir if which == "old" else self.new_dir)


def _started(run_dir: Path) -> bool:
    servers = [e["server"] for e in report.load_report(run_dir)["entries"].values() if e["server"]]
    return bool(servers) and all(s.get("status") == "started" for s in servers)


@pytest.fixture(scope="module")
def upgrade(tmp_path_factory: pytest.TempPathFactory) -> Upgrade:
    reports = tmp_path_factory.mktemp("upgrade")
    # One more try when a server could not start at all (on a shared machine that is
    # memory taken by other processes, not a finding about vLLM).
    for attempt in (1, 2):
        prefix = f"{PREFIX}{attempt}"
        env = child_env(RUN_PREFIX=prefix, REPORTS_DIR=str(reports), FAIL_ON="never")
        proc = subprocess.run(
            [str(REPO / "scripts" / "upgrade-diff"), OLD_VERSION, NEW_VERSION, *SUITES],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=3000,
        )  # fmt: skip
        assert proc.returncode == 0, f"upgrade-diff failed:\n{proc.stderr[-6000:]}"
        result = Upgrade(
            reports / f"{prefix}-vllm-{OLD_VERSION}",
            reports / f"{prefix}-vllm-{NEW_VERSION}",
            reports / f"{prefix}-diff.md",
            proc,
        )
        if _started(result.old_dir) and _started(result.new_dir):
            break
    # The script's own lines: which environments were built or reused, and the timings.
    sys.stderr.write("".join(x for x in proc.stderr.splitlines(True) if x.startswith("upgrade-")))
    return result


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_conformance.cli", *map(str, args)],
        capture_output=True, text=True, timeout=300, env=child_env(),
    )  # fmt: skip


def _findings(diff: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [f for f in diff["findings"] if all(f.get(k) == v for k, v in match.items())]


def test_each_run_used_its_own_installed_release(upgrade: Upgrade) -> None:
    for which, version in (("old", OLD_VERSION), ("new", NEW_VERSION)):
        rep = upgrade.report(which)
        assert rep["environment"]["vllm"] == version
        assert rep["build"]["complete"] is True
        # What the server itself says (/version), not only the package metadata.
        assert rep["entries"]["cpu"]["server"]["version"] == version
        assert ((upgrade.old_dir if which == "old" else upgrade.new_dir) / "junit.xml").exists()
    diff = upgrade.diff
    assert (diff["old"]["vllm"], diff["new"]["vllm"]) == (OLD_VERSION, NEW_VERSION)
    md = upgrade.diff_base.read_text()
    assert md.startswith(f"# vLLM upgrade diff: {OLD_VERSION} → {NEW_VERSION}")
    assert upgrade.proc.stdout == md


def test_both_runs_ran_the_same_tests(upgrade: Upgrade) -> None:
    old, new = upgrade.report("old"), upgrade.report("new")
    # Besides "cpu": "(none)", the tests that no entry was selected for.
    assert set(old["entries"]) == set(new["entries"]) and "cpu" in old["entries"]
    assert set(old["entries"]["cpu"]["outcomes"]) == set(new["entries"]["cpu"]["outcomes"])
    assert old["entries"]["cpu"]["checks"], "the suites recorded no checks"


def _contract(check: dict[str, Any]) -> dict[str, Any]:
    return {f: get(check, f) for f in CONTRACT_FIELDS}


def test_every_behaviour_difference_is_in_the_diff(upgrade: Upgrade) -> None:
    """Each check whose verdict, status or error contract differs is listed, and how."""
    old = keyed(upgrade.report("old")["entries"]["cpu"]["checks"], "check")
    new = keyed(upgrade.report("new")["entries"]["cpu"]["checks"], "check")
    diff = upgrade.diff
    md = upgrade.diff_base.read_text()
    differing = 0
    for name in set(old) & set(new):
        a, b = old[name], new[name]
        if a.get("verdict") != b.get("verdict"):
            differing += 1
            (f,) = _findings(diff, entry="cpu", subject=name, field="verdict")
            assert (f["old"], f["new"]) == (a["verdict"], b["verdict"])
            classes = (report.verdict_class(a["verdict"]), report.verdict_class(b["verdict"]))
            if classes == ("pass", "fail"):
                assert f["kind"] == "regression"
            if classes == ("fail", "pass"):
                assert f["kind"] == "improvement"
            assert name in md
        status_changed = a.get("status") != b.get("status")
        for field, va in _contract(a).items():
            vb = _contract(b)[field]
            if va == vb:
                continue
            if status_changed and field.startswith("error.") and None in (va, vb):
                continue  # the error body came or went with the status: listed as that
            differing += 1
            (f,) = _findings(diff, entry="cpu", subject=name, field=field)
            assert (f["old"], f["new"]) == (va, vb)
            assert f["kind"] in ("regression", "improvement", "change")
            if field != "status" and None not in (va, vb):
                assert f["kind"] == "regression", "a changed error contract is a regression"
            assert name in md
        for field in MESSAGE_FIELDS:
            va, vb = get(a, field), get(b, field)
            if va is not None and vb is not None and va != vb:
                (f,) = _findings(diff, entry="cpu", subject=name, field=field)
                assert f["kind"] == "change", "a reworded message is not a regression"
    # Nothing is listed that is not a real difference.
    for f in _findings(diff, area="error"):
        assert get(old[f["subject"]], f["field"]) != get(new[f["subject"]], f["field"])
    print(f"{differing} contract/verdict differences between {OLD_VERSION} and {NEW_VERSION}")


def test_capacity_figures_are_compared(upgrade: Upgrade) -> None:
    old = upgrade.report("old")["entries"]["cpu"]["server"]
    new = upgrade.report("new")["entries"]["cpu"]["server"]
    rows = {r["field"]: r for r in upgrade.diff["capacity"] if r["entry"] == "cpu"}
    assert (rows["kv_cache_tokens"]["old"], rows["kv_cache_tokens"]["new"]) == (
        old["kv_cache"]["tokens"], new["kv_cache"]["tokens"],
    )  # fmt: skip
    assert (rows["concurrency"]["old"], rows["concurrency"]["new"]) == (
        old["kv_cache"]["concurrency"], new["kv_cache"]["concurrency"],
    )  # fmt: skip
    assert (rows["max_model_len"]["old"], rows["max_model_len"]["new"]) == (
        old["max_model_len"], new["max_model_len"],
    )  # fmt: skip
    assert rows["startup_seconds"]["old"] == pytest.approx(old["startup_seconds"])
    assert rows["startup_seconds"]["new"] == pytest.approx(new["startup_seconds"])
    if new["kv_cache"]["tokens"] < old["kv_cache"]["tokens"] * 0.99:
        assert rows["kv_cache_tokens"]["kind"] == "regression"
    if old["kv_cache"]["device"] != new["kv_cache"]["device"]:
        assert rows["kv_cache_device"]["kind"] == "note"


def test_newly_failing_and_passing_tests_are_listed(upgrade: Upgrade) -> None:
    old = upgrade.report("old")["entries"]["cpu"]["outcomes"]
    new = upgrade.report("new")["entries"]["cpu"]["outcomes"]
    listed = {r["nodeid"]: r for r in upgrade.diff["tests"]}
    for nodeid in set(old) | set(new):
        if old.get(nodeid) == new.get(nodeid):
            assert nodeid not in listed
            continue
        row = listed[nodeid]
        assert (row["old"], row["new"]) == (old.get(nodeid), new.get(nodeid))
        if old.get(nodeid) == "passed" and new.get(nodeid) in ("failed", "error"):
            assert row["kind"] == "regression"
        if old.get(nodeid) in ("failed", "error") and new.get(nodeid) == "passed":
            assert row["kind"] == "improvement"


def test_exit_status_follows_fail_on(upgrade: Upgrade) -> None:
    counts = upgrade.diff["counts"]
    expect = {
        "regressions": 1 if counts["regression"] else 0,
        "any": 1 if counts["regression"] + counts["change"] + counts["improvement"] else 0,
        "never": 0,
    }
    for fail_on, code in expect.items():
        proc = _cli("compare", upgrade.old_dir, upgrade.new_dir, "--fail-on", fail_on)
        assert proc.returncode == code, (fail_on, proc.stderr)
    # A run compared with itself has nothing to fail on, even with --fail-on any.
    same = _cli("compare", upgrade.new_dir, upgrade.new_dir, "--fail-on", "any")
    assert same.returncode == 0, same.stdout[-3000:]
    # report.json files are accepted as well as run directories.
    by_file = _cli("compare", upgrade.old_dir / "report.json", upgrade.new_dir / "report.json",
                   "--format", "json", "--fail-on", "never")  # fmt: skip
    assert by_file.returncode == 0
    assert json.loads(by_file.stdout)["counts"] == counts
    missing = _cli("compare", upgrade.old_dir / "nothing-here", upgrade.new_dir)
    assert missing.returncode == 2 and "nothing-here" in missing.stderr


def test_html_diff_is_written(upgrade: Upgrade) -> None:
    page = upgrade.diff_base.with_suffix(".html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert f"{OLD_VERSION} → {NEW_VERSION}" in page
    for f in _findings(upgrade.diff, kind="regression"):
        assert f["subject"].replace("&", "&amp;") in page


def test_a_killed_run_loads_and_compares(
    upgrade: Upgrade, tmp_path_factory: pytest.TempPathFactory
) -> None:
    killed = killed_run(tmp_path_factory)
    # test_report.py may have rebuilt its report already: it stays incomplete either way.
    assert report.load_report(killed)["build"]["complete"] is False
    side = compare.load_side(killed)
    assert side.complete is False and side.torn_lines == 1
    diff = compare.compare(compare.load_side(upgrade.old_dir), side)
    # What the killed run never reached is a note, never a regression or a change.
    for f in diff.findings:
        if f.field in ("presence", "outcome") and f.new is None:
            assert f.kind == "note", f
    assert _findings(diff.to_dict(), area="run", subject="NEW", field="complete")
    proc = _cli("compare", upgrade.old_dir, killed, "--fail-on", "never")
    assert proc.returncode == 0, proc.stderr
    assert "incomplete" in proc.stdout


# -- accuracy and performance records (no suite records them on the CPU entry yet) ----------
#
# These runs are written with the plugin's own RecordWriter, as a suite would write them;
# the numbers are chosen so the verdicts are known.


def _write_run(run_dir: Path, vllm: str, checks: list[dict[str, Any]]) -> Path:
    writer = report.RecordWriter(run_dir / "records" / "main.jsonl")
    writer.write("run", environment={"vllm": vllm, "gpus": []})
    for check in checks:
        writer.write(
            "check",
            entry="gpu",
            nodeid=f"src/vllm_conformance/suites/test_x.py::{check['check']}",
            **check,
        )
    (run_dir / "junit.xml").write_text("<testsuites/>")
    return run_dir


def _accuracy_check(value: float, stderr: float) -> dict[str, Any]:
    key = "exact_match,flexible-extract"
    return {
        "check": "accuracy.gsm8k",
        "verdict": "pass",
        "measured": {key: value, "exact_match_stderr,flexible-extract": stderr, "n": 1319},
    }


@pytest.mark.parametrize(
    ("old", "new", "kind"),
    [
        ((0.90, 0.0083), (0.86, 0.0085), "regression"),  # z = -3.4
        ((0.90, 0.0083), (0.89, 0.0083), None),  # z = -0.85: within the noise
        ((0.86, 0.0085), (0.90, 0.0083), "improvement"),
    ],
)
def test_accuracy_difference_is_z_tested(
    tmp_path: Path, old: tuple[float, float], new: tuple[float, float], kind: str | None
) -> None:
    a = _write_run(tmp_path / "a", "1", [_accuracy_check(*old)])
    b = _write_run(tmp_path / "b", "2", [_accuracy_check(*new)])
    diff = compare.compare_paths(a, b)
    (row,) = diff.accuracy
    z = (new[0] - old[0]) / (old[1] ** 2 + new[1] ** 2) ** 0.5
    assert row["z"] == pytest.approx(z)
    found = [f for f in diff.findings if f.area == "accuracy"]
    assert [f.kind for f in found] == ([kind] if kind else [])


def test_paired_documents_make_a_small_drop_visible(tmp_path: Path) -> None:
    """Per-document scores: the paired test sees a drop the independent one cannot."""
    docs = {str(i): float(i % 10 < 7) for i in range(400)}  # 0.70
    worse = {k: (0.0 if int(k) % 20 == 0 and v else v) for k, v in docs.items()}  # 0.65
    checks = [
        {"check": "accuracy.docs", "verdict": "pass",
         "measured": {"value": sum(d.values()) / 400, "stderr": 0.023, "n": 400, "per_doc": d}}
        for d in (docs, worse)
    ]  # fmt: skip
    a = _write_run(tmp_path / "a", "1", [checks[0]])
    b = _write_run(tmp_path / "b", "2", [checks[1]])
    (row,) = compare.compare_paths(a, b).accuracy
    assert row["method"].startswith("paired") and row["verdict"] == "regression"
    independent = verdicts.independent_difference(
        verdicts.Score(row["new"], row["new_stderr"], 400),
        verdicts.Score(row["old"], row["old_stderr"], 400),
    )
    assert independent.p_value > 0.05 > row["p_value"]


def test_performance_samples_go_through_perf_stats(tmp_path: Path) -> None:
    import numpy as np

    from vllm_conformance.perf import stats

    rng = np.random.default_rng(0)
    base = rng.lognormal(3.9, 0.2, 300).tolist()
    slow = (rng.lognormal(3.9, 0.2, 300) * 1.3).tolist()
    same = rng.lognormal(3.9, 0.2, 300).tolist()

    def check(ttft: list[float], failed: int) -> dict[str, Any]:
        return {"check": "performance.seed", "verdict": "observed", "samples": {"ttft": ttft},
                "measured": {"completed": 300 - failed, "failed": failed}}  # fmt: skip

    a = _write_run(tmp_path / "a", "1", [check(base, 0)])
    b = _write_run(tmp_path / "b", "2", [check(slow, 30)])
    c = _write_run(tmp_path / "c", "2", [check(same, 0)])
    rows = {r["metric"]: r for r in compare.compare_paths(a, b).performance}
    expected = stats.compare_samples(base, slow, metric="ttft")
    assert rows["ttft"]["verdict"] == expected.verdict == "regression"
    assert rows["ttft"]["p_value"] == pytest.approx(expected.p_value)
    assert rows["failure_rate"]["verdict"] == "regression"
    quiet = compare.compare_paths(a, c)
    assert [r["verdict"] for r in quiet.performance] == ["no change", "no change"]
    assert not quiet.failing("regressions")
