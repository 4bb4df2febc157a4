"""The diff's model: the two runs (:class:`Side`), its findings and tables (:class:`Diff`),
and how a run is loaded (a run directory, also of a killed run, or a report.json)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vllm_conformance import verdicts
from vllm_conformance.report.model import build_report, load_report

Kind = Literal["regression", "improvement", "change", "note"]
FailOn = Literal["regressions", "any", "never"]
KINDS: tuple[Kind, ...] = ("regression", "change", "improvement", "note")

#: Check fields that make up the error contract, in the order they are shown.
CONTRACT_FIELDS: tuple[str, ...] = (
    "status",
    "error.type",
    "error.param",
    "error.code",
    "stream_error.type",
    "stream_error.param",
    "stream_error.code",
    "policy",
)
MESSAGE_FIELDS: tuple[str, ...] = ("error.message", "stream_error.message")
#: Per-request sample sets where a higher value is better (none of vLLM's latencies are).
HIGHER_IS_BETTER_SAMPLES: frozenset[str] = frozenset({"throughput", "output_throughput"})


class CompareError(RuntimeError):
    """A run could not be loaded or compared; the message says which and why."""


@dataclass(frozen=True)
class Options:
    """Thresholds of the comparison (defaults suit the CPU self-test and GPU runs alike)."""

    alpha: float = verdicts.ALPHA
    min_effect: float = verdicts.MIN_EFFECT
    capacity_rtol: float = 0.01
    startup_factor: float = 1.5
    startup_abs_s: float = 30.0
    numeric_rtol: float = 0.05


@dataclass(frozen=True)
class Finding:
    """One difference between the two runs."""

    kind: Kind
    area: str
    entry: str | None
    subject: str
    field: str
    old: Any
    new: Any
    detail: str = ""


@dataclass
class Side:
    """One of the two runs."""

    path: str
    run_id: str
    complete: bool
    records: int | None
    torn_lines: int
    environment: dict[str, Any]
    report: dict[str, Any] = field(repr=False)

    @property
    def vllm(self) -> str | None:
        return self.environment.get("vllm")

    def describe(self) -> dict[str, Any]:
        """JSON form without the report itself."""
        return {
            "path": self.path,
            "run_id": self.run_id,
            "complete": self.complete,
            "records": self.records,
            "torn_lines": self.torn_lines,
            "vllm": self.vllm,
        }


@dataclass
class Diff:
    """Everything the comparison found, with the tables it rests on."""

    old: Side
    new: Side
    options: Options
    findings: list[Finding] = field(default_factory=list)
    environment: list[dict[str, Any]] = field(default_factory=list)
    capacity: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    performance: list[dict[str, Any]] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        kind: Kind,
        area: str,
        entry: str | None,
        subject: str,
        field_: str,
        old: Any,
        new: Any,
        detail: str = "",
    ) -> None:
        self.findings.append(Finding(kind, area, entry, subject, field_, old, new, detail))

    def count(self, kind: Kind) -> int:
        return sum(f.kind == kind for f in self.findings)

    def counts(self) -> dict[str, int]:
        return {k: self.count(k) for k in KINDS}

    def failing(self, fail_on: FailOn) -> bool:
        """Whether ``--fail-on fail_on`` turns this diff into a non-zero exit."""
        if fail_on == "never":
            return False
        if fail_on == "any":
            return any(f.kind != "note" for f in self.findings)
        return self.count("regression") > 0

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON form (NaN and infinities become None)."""
        return clean(
            {
                "old": self.old.describe(),
                "new": self.new.describe(),
                "options": asdict(self.options),
                "counts": self.counts(),
                "findings": [asdict(f) for f in self.findings],
                "environment": self.environment,
                "capacity": self.capacity,
                "checks": self.checks,
                "accuracy": self.accuracy,
                "performance": self.performance,
                "tests": self.tests,
            }
        )


def clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


# -- loading ------------------------------------------------------------------------


def _records_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A report turned back into records, so derived fields are rebuilt the same way."""
    records: list[dict[str, Any]] = [
        {
            "kind": "run",
            "time": report.get("started", 0),
            "environment": report.get("environment", {}),
            "endpoint": report.get("endpoint"),
        }
    ]
    for name, entry in report.get("entries", {}).items():
        server = entry.get("server")
        if server:
            fields = {k: v for k, v in server.items() if k not in ("teardown", "teardown_message")}
            records.append({"kind": "server", "entry": name, **fields})
            if server.get("teardown") == "leftover":
                records.append(
                    {
                        "kind": "server",
                        "entry": name,
                        "status": "leftover",
                        "message": server.get("teardown_message"),
                    }
                )
        for kind in ("checks", "tests"):
            records += [{"kind": kind[:-1], "entry": name, **r} for r in entry.get(kind, [])]
    return records


def load_side(path: str | Path) -> Side:
    """A run directory (its records, or its report.json) or a report.json file."""
    p = Path(path)
    try:
        if p.is_dir():
            rep = load_report(p, complete=None)
        elif p.is_file():
            raw = json.loads(p.read_text())
            if not isinstance(raw, dict) or "entries" not in raw:
                raise CompareError(f"{p}: not a vllm-conformance report.json")
            rep = build_report(_records_of(raw), build=raw.get("build"))
        else:
            raise CompareError(f"{p}: no such run directory or report file")
    except (OSError, json.JSONDecodeError, FileNotFoundError) as exc:
        raise CompareError(f"{p}: cannot read the run: {exc}") from None
    build = rep.get("build") or {}
    run_id = build.get("run_id") or (p.name if p.is_dir() else p.parent.name)
    return Side(
        path=str(p),
        run_id=run_id,
        complete=bool(build.get("complete", True)),
        records=build.get("records"),
        torn_lines=int(build.get("torn_lines", 0)),
        environment=rep.get("environment", {}),
        report=rep,
    )


# -- helpers ------------------------------------------------------------------------


def num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def rel(old: float, new: float) -> float:
    if old == 0:
        return 0.0 if new == 0 else math.inf
    return (new - old) / abs(old)


def pct(old: Any, new: Any) -> str:
    a, b = num(old), num(new)
    if a is None or b is None:
        return ""
    r = rel(a, b)
    return "" if not math.isfinite(r) else f"{r:+.1%}"


def get(record: Mapping[str, Any], dotted: str) -> Any:
    if dotted == "policy":
        measured = record.get("measured")
        return measured.get("policy") if isinstance(measured, dict) else None
    head, _, tail = dotted.partition(".")
    value = record.get(head)
    if tail:
        return value.get(tail) if isinstance(value, dict) else None
    return value


def status_kind(old: Any, new: Any) -> Kind:
    o, n = num(old), num(new)
    if o is None or n is None:
        return "change"  # recorded on one side only: a suite change, not a server change
    if n is not None and n >= 500 and (o is None or o < 500):
        return "regression"
    if o is not None and o >= 500 and (n is None or n < 500):
        return "improvement"
    return "regression"


def keyed(items: Iterable[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Items by ``item[key]``; repeats get ``#2``, ``#3`` ... in order."""
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for item in items:
        name = str(item.get(key))
        seen[name] = seen.get(name, 0) + 1
        out[name if seen[name] == 1 else f"{name}#{seen[name]}"] = item
    return out
