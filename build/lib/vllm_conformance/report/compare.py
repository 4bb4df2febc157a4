"""Compare two runs (before and after an upgrade): what changed, and is it a regression?

Reports are matched entry by entry; checks by ``(entry, check)`` (the n-th record of a
check name with the n-th), tests by ``(entry, nodeid)``. Every difference becomes a
:class:`Finding` of one kind:

- ``regression``: worse in a way clients or operators feel: a check or test that newly
  fails, a server that no longer starts, less KV capacity or concurrency or a shorter
  ``max_model_len``, a changed error contract (status code, error ``type``/``param``/
  ``code``, reject vs clamp), a new 5xx, or a statistically significant drop in accuracy or
  performance;
- ``improvement``: the same, the good way;
- ``change``: different, neither clearly worse nor better: an error *message* reworded
  (vLLM rewords them between versions; clients must not match on text), an observed value
  that moved, a much slower start (compile caches make it noisy, so it is not gated);
- ``note``: context: versions, serve arguments, numbers without an uncertainty that moved
  a little, checks present on one side only.

Accuracy values with standard errors are compared by a z-test of the difference
(``z = (new - old) / sqrt(se_old^2 + se_new^2)``); per-request performance samples by
:mod:`vllm_conformance.perf.stats` (Mann-Whitney U plus a bootstrap CI of the ratio, and a
Fisher test of the failure rate). What the check records must contain for that is in
docs/upgrades.md.

Either side may be a run that was killed half-way: its records are read as far as they go.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vllm_conformance import report as report_mod

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

    alpha: float = 0.05
    min_effect: float = 0.05
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
        return _clean(
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


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
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
            rep = report_mod.load_report(p, complete=None)
        elif p.is_file():
            raw = json.loads(p.read_text())
            if not isinstance(raw, dict) or "entries" not in raw:
                raise CompareError(f"{p}: not a vllm-conformance report.json")
            rep = report_mod.build_report(_records_of(raw), build=raw.get("build"))
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


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _rel(old: float, new: float) -> float:
    if old == 0:
        return 0.0 if new == 0 else math.inf
    return (new - old) / abs(old)


def _pct(old: Any, new: Any) -> str:
    a, b = _num(old), _num(new)
    if a is None or b is None:
        return ""
    r = _rel(a, b)
    return "" if not math.isfinite(r) else f"{r:+.1%}"


def _get(record: Mapping[str, Any], dotted: str) -> Any:
    if dotted == "policy":
        measured = record.get("measured")
        return measured.get("policy") if isinstance(measured, dict) else None
    head, _, tail = dotted.partition(".")
    value = record.get(head)
    if tail:
        return value.get(tail) if isinstance(value, dict) else None
    return value


def _status_kind(old: Any, new: Any) -> Kind:
    o, n = _num(old), _num(new)
    if o is None or n is None:
        return "change"  # recorded on one side only: a suite change, not a server change
    if n is not None and n >= 500 and (o is None or o < 500):
        return "regression"
    if o is not None and o >= 500 and (n is None or n < 500):
        return "improvement"
    return "regression"


def _keyed(items: Iterable[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Items by ``item[key]``; repeats get ``#2``, ``#3`` ... in order."""
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for item in items:
        name = str(item.get(key))
        seen[name] = seen.get(name, 0) + 1
        out[name if seen[name] == 1 else f"{name}#{seen[name]}"] = item
    return out


# -- sections -----------------------------------------------------------------------


def _environment(diff: Diff) -> None:
    old_env, new_env = diff.old.environment, diff.new.environment
    old_rows = dict(report_mod.environment_rows(old_env))
    new_rows = dict(report_mod.environment_rows(new_env))
    for label in old_rows:
        changed = old_rows[label] != new_rows.get(label)
        diff.environment.append(
            {"label": label, "old": old_rows[label], "new": new_rows.get(label), "changed": changed}
        )
        if changed and label != "platform":
            diff.add(
                "note", "environment", None, label, "version", old_rows[label], new_rows.get(label)
            )
    old_vars, new_vars = old_env.get("env") or {}, new_env.get("env") or {}
    for name in sorted(set(old_vars) | set(new_vars)):
        if old_vars.get(name) != new_vars.get(name):
            diff.add(
                "note",
                "environment",
                None,
                name,
                "environment variable",
                old_vars.get(name),
                new_vars.get(name),
            )


def _capacity_row(
    diff: Diff, entry: str, name: str, old: Any, new: Any, kind: Kind | None, detail: str = ""
) -> None:
    diff.capacity.append(
        {
            "entry": entry,
            "field": name,
            "old": old,
            "new": new,
            "delta": _pct(old, new),
            "kind": kind,
        }
    )
    if kind is not None:
        diff.add(kind, "capacity", entry, name, name, old, new, detail)


def _capacity(diff: Diff, entry: str, old_srv: dict[str, Any], new_srv: dict[str, Any]) -> None:
    opts = diff.options
    o_status, n_status = old_srv.get("status"), new_srv.get("status")
    status_kind: Kind | None = None
    if o_status != n_status:
        if n_status == "failed":
            status_kind = "regression"
        elif o_status == "failed" and n_status == "started":
            status_kind = "improvement"
        else:
            status_kind = "change"
    reason = ""
    if n_status == "failed":
        why = new_srv.get("reason") or {}
        reason = f"{why.get('kind')}: {why.get('line')}" if isinstance(why, dict) else str(why)
    _capacity_row(diff, entry, "server", o_status, n_status, status_kind, reason[:500])

    o_kv, n_kv = old_srv.get("kv_cache") or {}, new_srv.get("kv_cache") or {}
    for name, old, new in (
        ("kv_cache_tokens", o_kv.get("tokens"), n_kv.get("tokens")),
        ("concurrency", o_kv.get("concurrency"), n_kv.get("concurrency")),
    ):
        kind: Kind | None = None
        a, b = _num(old), _num(new)
        if a is not None and b is not None and a != b:
            r = _rel(a, b)
            kind = "note"
            if r < -opts.capacity_rtol:
                kind = "regression"
            elif r > opts.capacity_rtol:
                kind = "improvement"
        elif (a is None) != (b is None) and n_status == o_status == "started":
            kind = "change"
        _capacity_row(diff, entry, name, old, new, kind)

    old_len, new_len = _num(old_srv.get("max_model_len")), _num(new_srv.get("max_model_len"))
    len_kind: Kind | None = None
    if old_len is not None and new_len is not None and old_len != new_len:
        len_kind = "regression" if new_len < old_len else "improvement"
    _capacity_row(
        diff,
        entry,
        "max_model_len",
        old_srv.get("max_model_len"),
        new_srv.get("max_model_len"),
        len_kind,
    )

    o_s, n_s = _num(old_srv.get("startup_seconds")), _num(new_srv.get("startup_seconds"))
    start_kind: Kind | None = None
    detail = ""
    if o_s is not None and n_s is not None and o_s > 0:
        if n_s > o_s * opts.startup_factor and n_s - o_s > opts.startup_abs_s:
            start_kind = "change"
            detail = "slower start; compile caches and machine load make it noisy, not gated"
        elif n_s * opts.startup_factor < o_s and o_s - n_s > opts.startup_abs_s:
            start_kind = "note"
            detail = "faster start"
    _capacity_row(diff, entry, "startup_seconds", o_s, n_s, start_kind, detail)

    if o_kv.get("device") != n_kv.get("device") and o_kv and n_kv:
        _capacity_row(
            diff,
            entry,
            "kv_cache_device",
            o_kv.get("device"),
            n_kv.get("device"),
            "note",
            "the device prefix of vLLM's 'KV cache size' log line",
        )
    if old_srv.get("teardown") != new_srv.get("teardown"):
        kind = "regression" if new_srv.get("teardown") == "leftover" else "improvement"
        _capacity_row(
            diff,
            entry,
            "teardown",
            old_srv.get("teardown") or "clean",
            new_srv.get("teardown") or "clean",
            kind,
            str(new_srv.get("teardown_message") or ""),
        )

    o_args, n_args = old_srv.get("serve_args") or {}, new_srv.get("serve_args") or {}
    for name in sorted(set(o_args) | set(n_args)):
        if o_args.get(name) != n_args.get(name):
            diff.add(
                "note",
                "serve",
                entry,
                name,
                "serve argument",
                o_args.get(name),
                n_args.get(name),
                "the runs did not serve with the same arguments",
            )


def _stderr_of(measured: dict[str, Any], key: str, record: dict[str, Any]) -> float | None:
    """The standard error recorded for ``measured[key]`` under any of the accepted names."""
    candidates = [f"{key}_stderr"]
    if "," in key:  # lm-eval: "exact_match,flexible-extract" -> "exact_match_stderr,flex..."
        metric, _, filt = key.partition(",")
        candidates.append(f"{metric}_stderr,{filt}")
    if key == "value":
        candidates.append("stderr")
    for cand in candidates:
        se = _num(measured.get(cand))
        if se is not None:
            return se
    table = record.get("stderr")
    if isinstance(table, dict):
        return _num(table.get(key))
    return None


def _is_stderr_key(key: str) -> bool:
    return key == "stderr" or key.endswith("_stderr") or "_stderr," in key


def _sample_count(measured: dict[str, Any], record: dict[str, Any]) -> float | None:
    for source in (measured, record):
        for name in ("n", "n_samples", "samples_n", "limit"):
            n = _num(source.get(name))
            if n is not None:
                return n
    return None


def _z_test(old: float, se_old: float, new: float, se_new: float) -> tuple[float, float]:
    """z of the difference and its two-sided p-value (normal approximation)."""
    spread = math.sqrt(se_old**2 + se_new**2)
    if spread == 0:
        return (0.0, 1.0) if old == new else (math.copysign(math.inf, new - old), 0.0)
    z = (new - old) / spread
    return z, math.erfc(abs(z) / math.sqrt(2))


def _higher_is_better(check: str, record: dict[str, Any], key: str) -> bool | None:
    flag = record.get("higher_is_better")
    if isinstance(flag, dict):
        flag = flag.get(key)
    if isinstance(flag, bool):
        return flag
    if check.startswith(("accuracy", "acc.")):
        return True
    return None


def _standard_error(
    measured: dict[str, Any], key: str, record: dict[str, Any], value: float
) -> float | None:
    """The recorded standard error, else a proportion's binomial one when ``n`` is known."""
    se = _stderr_of(measured, key, record)
    if se is None and str(record.get("check", "")).startswith("accuracy"):
        n = _sample_count(measured, record)
        if n and n > 1 and 0 <= value <= 1:
            # lm-eval's stderr of a mean of 0/1 scores: sqrt(p(1-p)/(n-1)).
            se = math.sqrt(value * (1 - value) / (n - 1))
    return se


def _per_doc(measured: dict[str, Any], record: dict[str, Any]) -> dict[str, float] | None:
    table = measured.get("per_doc", record.get("per_doc"))
    if not isinstance(table, dict):
        return None
    return {str(k): float(v) for k, v in table.items() if _num(v) is not None}


def _paired(
    om: dict[str, Any], old: dict[str, Any], nm: dict[str, Any], new: dict[str, Any], key: str
) -> tuple[float, float, int] | None:
    """z, p and n of a paired test over the documents both runs scored (``per_doc``).

    Pairing removes the variance between documents, which both runs share, so a real
    change shows with far fewer documents than the independent test needs. Used only when
    the per-document scores belong to ``key`` (``value``, or the record's only number).
    """
    primary = [k for k, v in nm.items() if _num(v) is not None and not _is_stderr_key(k)]
    primary = [k for k in primary if k not in ("n", "n_samples", "limit")]
    if key != "value" and primary != [key]:
        return None
    a, b = _per_doc(om, old), _per_doc(nm, new)
    if not a or not b:
        return None
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    d = [b[k] - a[k] for k in common]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    if var == 0:
        return (0.0, 1.0, len(d)) if mean == 0 else (math.copysign(math.inf, mean), 0.0, len(d))
    z = mean / math.sqrt(var / len(d))
    return z, math.erfc(abs(z) / math.sqrt(2)), len(d)


def _accuracy(
    diff: Diff, entry: str, name: str, old: dict[str, Any], new: dict[str, Any], key: str
) -> bool:
    """Compare ``measured[key]`` with its standard errors; False if it has none."""
    om, nm = old.get("measured") or {}, new.get("measured") or {}
    a, b = _num(om.get(key)), _num(nm.get(key))
    if a is None or b is None:
        return False
    se_a, se_b = _standard_error(om, key, old, a), _standard_error(nm, key, new, b)
    if se_a is None or se_b is None:
        return False
    z, p = _z_test(a, se_a, b, se_b)
    method = "z-test of independent means"
    if (paired := _paired(om, old, nm, new, key)) is not None:
        z, p, n_common = paired
        method = f"paired z-test over {n_common} common documents"
    better = _higher_is_better(name, new, key)
    kind: Kind | None = None
    if p < diff.options.alpha:
        worse = None if better is None else (b < a) == better
        kind = "change" if worse is None else "regression" if worse else "improvement"
    verdict = kind or "no significant change"
    diff.accuracy.append(
        {
            "entry": entry,
            "check": name,
            "metric": key,
            "old": a,
            "old_stderr": se_a,
            "new": b,
            "new_stderr": se_b,
            "delta": b - a,
            "z": z,
            "p_value": p,
            "method": method,
            "verdict": verdict,
        }
    )
    if kind is not None:
        diff.add(
            kind,
            "accuracy",
            entry,
            name,
            key,
            a,
            b,
            f"{b - a:+.4f}, z={z:+.2f}, p={p:.3g} (se {se_a:.4f} / {se_b:.4f}; {method})",
        )
    if old.get("request") != new.get("request"):
        diff.add(
            "note",
            "accuracy",
            entry,
            name,
            "request",
            old.get("request"),
            new.get("request"),
            "evaluated differently: not like-for-like",
        )
    return True


def _samples(
    record: dict[str, Any], run_path: str
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per-request samples (ms) and completed/failed counts of a performance check."""
    samples = record.get("samples")
    counts: dict[str, Any] = {}
    baseline = record.get("baseline")
    path = record.get("baseline_path") or record.get("samples_path")
    if baseline is None and path:
        p = Path(path)
        if not p.is_absolute():
            base = Path(run_path)
            p = (base if base.is_dir() else base.parent) / p
        try:
            baseline = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            baseline = None
    if isinstance(baseline, dict):
        samples = samples or baseline.get("samples")
        counts = {k: baseline.get(k) for k in ("completed", "failed")}
    measured = record.get("measured") or {}
    for k in ("completed", "failed"):
        if counts.get(k) is None and _num(measured.get(k)) is not None:
            counts[k] = measured[k]
    if not isinstance(samples, dict):
        return {}, counts
    clean = {
        str(k): [float(x) for x in v if _num(x) is not None]
        for k, v in samples.items()
        if isinstance(v, list)
    }
    return clean, counts


def _performance(
    diff: Diff, entry: str, name: str, old: dict[str, Any], new: dict[str, Any]
) -> None:
    o_samples, o_counts = _samples(old, diff.old.path)
    n_samples, n_counts = _samples(new, diff.new.path)
    if not o_samples or not n_samples:
        return
    from vllm_conformance.perf import stats

    results = []
    for metric in sorted(set(o_samples) & set(n_samples)):
        results.append(
            stats.compare_samples(
                o_samples[metric],
                n_samples[metric],
                metric=metric,
                higher_is_better=metric in HIGHER_IS_BETTER_SAMPLES,
                alpha=diff.options.alpha,
                min_effect=diff.options.min_effect,
            )
        )
    counts = [_num(c.get(k)) for c in (o_counts, n_counts) for k in ("completed", "failed")]
    if all(c is not None for c in counts):
        oc, of, nc, nf = (int(c or 0) for c in counts)
        results.append(
            stats.compare_failure_rate(of, oc + of, nf, nc + nf, alpha=diff.options.alpha)
        )
    for c in results:
        row = {"entry": entry, "check": name, **c.to_dict(), "describe": c.describe()}
        diff.performance.append(_clean(row))
        if c.verdict in ("regression", "improvement"):
            diff.add(
                c.verdict, "performance", entry, name, c.metric, c.baseline, c.current, c.describe()
            )


def _measured(diff: Diff, entry: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    om, nm = old.get("measured") or {}, new.get("measured") or {}
    if not isinstance(om, dict) or not isinstance(nm, dict):
        if om != nm:
            diff.add("change", "check", entry, name, "measured", om, nm)
        return
    for key in sorted(set(om) | set(nm)):
        if key in ("policy", "per_doc") or _is_stderr_key(key):
            continue
        a, b = om.get(key), nm.get(key)
        fa, fb = _num(a), _num(b)
        if fa is not None and fb is not None:
            if _accuracy(diff, entry, name, old, new, key):
                continue
            if fa == fb:
                continue
            is_int = all(isinstance(v, int) for v in (a, b))
            if is_int:
                diff.add("change", "check", entry, name, f"measured.{key}", a, b, _pct(a, b))
            elif abs(_rel(fa, fb)) > diff.options.numeric_rtol:
                diff.add(
                    "note",
                    "check",
                    entry,
                    name,
                    f"measured.{key}",
                    a,
                    b,
                    f"{_pct(a, b)} (no uncertainty recorded: not tested)",
                )
        elif a != b:
            diff.add("change", "check", entry, name, f"measured.{key}", a, b)


def _check_row(
    entry: str, key: str, old: dict[str, Any] | None, new: dict[str, Any] | None, kind: Kind | None
) -> dict[str, Any]:
    def side(rec: dict[str, Any] | None) -> dict[str, Any] | None:
        if rec is None:
            return None
        out = {"verdict": rec.get("verdict")}
        out.update({f: _get(rec, f) for f in (*CONTRACT_FIELDS, *MESSAGE_FIELDS)})
        return out

    return {"entry": entry, "check": key, "old": side(old), "new": side(new), "kind": kind}


_RANK: dict[Kind | None, int] = {"regression": 0, "change": 1, "improvement": 2, "note": 3, None: 4}


def _modules(entry: dict[str, Any]) -> set[str]:
    """Test files that ran for an entry (from test records and check records)."""
    nodeids = [*(entry.get("outcomes") or {}), *(c.get("nodeid") or "" for c in entry["checks"])]
    return {n.split("::")[0] for n in nodeids if n}


def _absent(
    diff: Diff, module: str, new_modules: set[str], new_e: dict[str, Any]
) -> tuple[Kind, str]:
    """How to classify something the OLD run has and the NEW run lacks."""
    if (new_e.get("server") or {}).get("status") == "failed":
        # The failed start is the regression; what it prevented is not news.
        return "note", "not run: the NEW server did not start"
    if module and module not in new_modules:
        return "note", f"{module} was not run in NEW (a different selection)"
    if not diff.new.complete:
        return "note", "not reached: the NEW run is incomplete"
    return "change", "no longer recorded"


def _checks(diff: Diff, entry: str, old_e: dict[str, Any], new_e: dict[str, Any]) -> None:
    olds, news = _keyed(old_e["checks"], "check"), _keyed(new_e["checks"], "check")
    new_modules = _modules(new_e)
    for key in [*olds, *(k for k in news if k not in olds)]:
        old, new = olds.get(key), news.get(key)
        before = len(diff.findings)
        if old is None:
            assert new is not None
            diff.add("note", "check", entry, key, "presence", None, new.get("verdict"), "new check")
        elif new is None:
            module = str(old.get("nodeid") or "").split("::")[0]
            kind, detail = _absent(diff, module, new_modules, new_e)
            diff.add(kind, "check", entry, key, "presence", old.get("verdict"), None, detail)
        else:
            _compare_check(diff, entry, key, old, new)
        kinds = [f.kind for f in diff.findings[before:]]
        worst = min(kinds, key=lambda k: _RANK[k]) if kinds else None
        diff.checks.append(_check_row(entry, key, old, new, worst))


def _compare_check(
    diff: Diff, entry: str, key: str, old: dict[str, Any], new: dict[str, Any]
) -> None:
    ov, nv = (
        report_mod.verdict_class(old.get("verdict")),
        report_mod.verdict_class(new.get("verdict")),
    )
    if old.get("verdict") != new.get("verdict"):
        if ov == "pass" and nv == "fail":
            kind: Kind = "regression"
        elif ov == "fail" and nv == "pass":
            kind = "improvement"
        else:
            kind = "change"
        diff.add(kind, "check", entry, key, "verdict", old.get("verdict"), new.get("verdict"))
    status_changed = old.get("status") != new.get("status")
    for name in CONTRACT_FIELDS:
        a, b = _get(old, name), _get(new, name)
        if a == b:
            continue
        if status_changed and name.startswith("error.") and (a is None or b is None):
            continue  # an error body that comes or goes with the status: one finding
        kind = _status_kind(a, b) if name == "status" else "regression"
        if name == "policy":
            detail = "reject vs clamp of an over-long request"
        elif name == "status":
            detail = "status code"
        else:
            detail = "error contract (clients match on type/param/code)"
        diff.add(kind, "error", entry, key, name, a, b, detail)
    for name in MESSAGE_FIELDS:
        a, b = _get(old, name), _get(new, name)
        if a != b and a is not None and b is not None:
            diff.add(
                "change",
                "error",
                entry,
                key,
                name,
                a,
                b,
                "message reworded (not a regression: match on type/param, not text)",
            )
    finish = (old.get("finish_reason"), new.get("finish_reason"))
    if finish[0] != finish[1] and not (status_changed and None in finish):
        diff.add(
            "change",
            "check",
            entry,
            key,
            "finish_reason",
            old.get("finish_reason"),
            new.get("finish_reason"),
        )
    _measured(diff, entry, key, old, new)
    _performance(diff, entry, key, old, new)
    if old.get("expected") != new.get("expected"):
        diff.add(
            "note",
            "check",
            entry,
            key,
            "expected",
            old.get("expected"),
            new.get("expected"),
            "the matrix expectation differs between the runs",
        )


def _first_line(message: Any, limit: int = 240) -> str:
    """The gist of a failure message (the server log tail it may carry is in the report)."""
    text = str(message or "").strip().split("\n")[0].split(" --- ")[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tests(diff: Diff, entry: str, old_e: dict[str, Any], new_e: dict[str, Any]) -> None:
    o_out, n_out = old_e.get("outcomes") or {}, new_e.get("outcomes") or {}
    messages = {
        t["nodeid"]: t.get("message", "")
        for t in new_e.get("tests", [])
        if t.get("outcome") == "failed"
    }
    bad = {"failed", "error"}
    new_modules = _modules(new_e)
    for nodeid in [*o_out, *(n for n in n_out if n not in o_out)]:
        a, b = o_out.get(nodeid), n_out.get(nodeid)
        if a == b:
            continue
        if a is None:
            kind: Kind = "note"
            detail = "new test"
        elif b is None:
            kind, detail = _absent(diff, nodeid.split("::")[0], new_modules, new_e)
        elif a == "passed" and b in bad:
            kind, detail = "regression", _first_line(messages.get(nodeid))
        elif a in bad and b == "passed":
            kind, detail = "improvement", ""
        else:
            kind, detail = "change", _first_line(messages.get(nodeid))
        diff.add(kind, "test", entry, nodeid, "outcome", a, b, detail)
        diff.tests.append({"entry": entry, "nodeid": nodeid, "old": a, "new": b, "kind": kind})


def compare(old: Side, new: Side, options: Options | None = None) -> Diff:
    """Diff two loaded runs."""
    diff = Diff(old, new, options or Options())
    if not new.complete:
        diff.add(
            "note",
            "run",
            None,
            "NEW",
            "complete",
            True,
            False,
            f"the NEW run did not finish ({new.torn_lines} torn line(s) skipped)",
        )
    if not old.complete:
        diff.add(
            "note",
            "run",
            None,
            "OLD",
            "complete",
            True,
            False,
            f"the OLD run did not finish ({old.torn_lines} torn line(s) skipped)",
        )
    _environment(diff)
    old_entries, new_entries = old.report.get("entries", {}), new.report.get("entries", {})
    for entry in [*old_entries, *(e for e in new_entries if e not in old_entries)]:
        o, n = old_entries.get(entry), new_entries.get(entry)
        if o is None or n is None:
            diff.add(
                "note",
                "run",
                entry,
                entry,
                "entry",
                o is not None,
                n is not None,
                "entry ran in one of the runs only",
            )
            continue
        if o.get("server") or n.get("server"):
            _capacity(diff, entry, o.get("server") or {}, n.get("server") or {})
        _checks(diff, entry, o, n)
        _tests(diff, entry, o, n)
    diff.findings.sort(key=lambda f: _RANK[f.kind])
    return diff


def compare_paths(old: str | Path, new: str | Path, options: Options | None = None) -> Diff:
    """Load both runs and diff them."""
    return compare(load_side(old), load_side(new), options)


# -- rendering ----------------------------------------------------------------------


def _cell(value: Any, limit: int = 120) -> str:
    text = report_mod.format_value(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def headline(diff: Diff, fail_on: FailOn = "regressions") -> str:
    """One line: counts and the exit verdict."""
    c = diff.counts()
    verdict = "FAIL" if diff.failing(fail_on) else "OK"
    return (
        f"{verdict} (--fail-on {fail_on}): {c['regression']} regression(s), {c['change']} "
        f"change(s), {c['improvement']} improvement(s), {c['note']} note(s)"
    )


def _side_line(label: str, side: Side) -> str:
    state = "complete" if side.complete else "**incomplete (killed half-way?)**"
    torn = f", {side.torn_lines} torn line(s) skipped" if side.torn_lines else ""
    return (
        f"- {label}: `{side.path}` (run `{side.run_id}`, vLLM {side.vllm}, {state}, "
        f"{side.records if side.records is not None else '?'} records{torn})"
    )


def to_markdown(diff: Diff, fail_on: FailOn = "regressions") -> str:
    """The diff as a Markdown page."""
    out = [
        f"# vLLM upgrade diff: {diff.old.vllm} → {diff.new.vllm}",
        "",
        _side_line("OLD", diff.old),
        _side_line("NEW", diff.new),
        "",
        f"**{headline(diff, fail_on)}**",
        "",
        "## Environment",
        "",
        "| | OLD | NEW |",
        "|---|---|---|",
    ]
    for row in diff.environment:
        mark = " **≠**" if row["changed"] else ""
        out.append(f"| {row['label']}{mark} | {_cell(row['old'])} | {_cell(row['new'])} |")
    titles = {
        "regression": "Regressions",
        "change": "Changes",
        "improvement": "Improvements",
        "note": "Notes",
    }
    for kind in KINDS:
        found = [f for f in diff.findings if f.kind == kind]
        if not found:
            continue
        out += [
            "",
            f"## {titles[kind]} ({len(found)})",
            "",
            "| area | entry | subject | field | OLD | NEW | detail |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in found:
            out.append(
                f"| {f.area} | {_cell(f.entry)} | {_cell(f.subject, 90)} | {_cell(f.field)} | "
                f"{_cell(f.old)} | {_cell(f.new)} | {_cell(f.detail, 200)} |"
            )
    if diff.capacity:
        out += [
            "",
            "## Capacity",
            "",
            "| entry | figure | OLD | NEW | Δ | finding |",
            "|---|---|---:|---:|---:|---|",
        ]
        for row in diff.capacity:
            out.append(
                f"| {row['entry']} | {row['field']} | {_cell(row['old'])} | "
                f"{_cell(row['new'])} | {row['delta']} | {row['kind'] or ''} |"
            )
    errors = [
        r for r in diff.checks if (r["old"] or {}).get("status") or (r["new"] or {}).get("status")
    ]
    if errors:
        out += [
            "",
            "## Checks: status and error contract",
            "",
            "| entry | check | OLD verdict | NEW verdict | OLD status/type/param | "
            "NEW status/type/param | finding |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in errors:
            o, n = row["old"] or {}, row["new"] or {}

            def contract(s: dict[str, Any]) -> str:
                if not s:
                    return "-"
                parts = [
                    s.get("status"),
                    s.get("error.type") or s.get("stream_error.type"),
                    s.get("error.param") or s.get("stream_error.param"),
                ]
                if s.get("policy"):
                    parts.append(s["policy"])
                return " / ".join(_cell(p) for p in parts)

            out.append(
                f"| {row['entry']} | {_cell(row['check'], 80)} | {_cell(o.get('verdict'))} | "
                f"{_cell(n.get('verdict'))} | {contract(o)} | {contract(n)} | "
                f"{row['kind'] or ''} |"
            )
    if diff.accuracy:
        out += [
            "",
            "## Accuracy",
            "",
            "| entry | check | metric | OLD ± se | NEW ± se | Δ | z | p | verdict |",
            "|---|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in diff.accuracy:
            out.append(
                f"| {r['entry']} | {r['check']} | {r['metric']} | {r['old']:.4f} ± "
                f"{r['old_stderr']:.4f} | {r['new']:.4f} ± {r['new_stderr']:.4f} | "
                f"{r['delta']:+.4f} | {r['z']:+.2f} | {r['p_value']:.3g} | {r['verdict']} |"
            )
    if diff.performance:
        out += [
            "",
            "## Performance",
            "",
            "| entry | check | metric | OLD | NEW | ratio | CI of ratio | p | verdict |",
            "|---|---|---|---:|---:|---:|---|---:|---|",
        ]
        for r in diff.performance:
            out.append(
                f"| {r['entry']} | {r['check']} | {r['metric']} ({r['statistic']}) | "
                f"{_cell(r['baseline'])} | {_cell(r['current'])} | {_cell(r['ratio'])} | "
                f"[{_cell(r['ci_low'])}, {_cell(r['ci_high'])}] | {_cell(r['p_value'])} | "
                f"{r['verdict']} |"
            )
    totals = {}
    for label, side in (("OLD", diff.old), ("NEW", diff.new)):
        t = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for e in side.report.get("entries", {}).values():
            for outcome in (e.get("outcomes") or {}).values():
                t[outcome] = t.get(outcome, 0) + 1
        totals[label] = t
    out += [
        "",
        "## Tests",
        "",
        "| | passed | failed | error | skipped |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, t in totals.items():
        out.append(f"| {label} | {t['passed']} | {t['failed']} | {t['error']} | {t['skipped']} |")
    if diff.tests:
        out += ["", "| entry | test | OLD | NEW | finding |", "|---|---|---|---|---|"]
        out += [
            f"| {r['entry']} | `{r['nodeid']}` | {_cell(r['old'])} | {_cell(r['new'])} | "
            f"{r['kind']} |"
            for r in diff.tests
        ]
    return "\n".join(out) + "\n"


def to_json(diff: Diff, fail_on: FailOn = "regressions") -> str:
    """The diff as JSON (strict: no NaN)."""
    data = diff.to_dict()
    data["fail_on"] = fail_on
    data["failing"] = diff.failing(fail_on)
    return json.dumps(data, indent=2, default=str, allow_nan=False) + "\n"


def render(diff: Diff, fmt: str, fail_on: FailOn = "regressions") -> str:
    """The diff in ``md``, ``html`` or ``json``."""
    if fmt == "md":
        return to_markdown(diff, fail_on)
    if fmt == "json":
        return to_json(diff, fail_on)
    if fmt == "html":
        from vllm_conformance.report import html as htmlreport

        return htmlreport.render_compare(diff.to_dict(), headline(diff, fail_on))
    raise ValueError(f"unknown format {fmt!r}")
