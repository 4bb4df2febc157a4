"""Numbers in the diff: accuracy values with standard errors (the project's one rule,
:mod:`vllm_conformance.verdicts`, the same as the accuracy suite's), per-request
performance samples (:mod:`vllm_conformance.perf.stats`), and other measured values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_conformance import verdicts
from vllm_conformance.report.compare.model import (
    HIGHER_IS_BETTER_SAMPLES,
    Diff,
    Kind,
    clean,
    num,
    pct,
    rel,
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
        se = num(measured.get(cand))
        if se is not None:
            return se
    table = record.get("stderr")
    if isinstance(table, dict):
        return num(table.get(key))
    return None


def _is_stderr_key(key: str) -> bool:
    return key == "stderr" or key.endswith("_stderr") or "_stderr," in key


def _sample_count(measured: dict[str, Any], record: dict[str, Any]) -> float | None:
    for source in (measured, record):
        for name in ("n", "n_samples", "samples_n", "limit"):
            n = num(source.get(name))
            if n is not None:
                return n
    return None


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
            se = verdicts.binomial_stderr(value, int(n))
    return se


def _per_doc(measured: dict[str, Any], record: dict[str, Any]) -> dict[str, float] | None:
    table = measured.get("per_doc", record.get("per_doc"))
    if not isinstance(table, dict):
        return None
    return {str(k): float(v) for k, v in table.items() if num(v) is not None}


def _paired(
    om: dict[str, Any], old: dict[str, Any], nm: dict[str, Any], new: dict[str, Any], key: str
) -> verdicts.Difference | None:
    """The paired difference over the documents both runs scored (``per_doc``), or None.

    Pairing removes the variance between documents, which both runs share, so a real
    change shows with far fewer documents than the independent test needs. Used only when
    the per-document scores belong to ``key`` (``value``, or the record's only number).
    """
    primary = [k for k, v in nm.items() if num(v) is not None and not _is_stderr_key(k)]
    primary = [k for k in primary if k not in ("n", "n_samples", "limit")]
    if key != "value" and primary != [key]:
        return None
    a, b = _per_doc(om, old), _per_doc(nm, new)
    if not a or not b or len(set(a) & set(b)) < 2:
        return None
    return verdicts.paired_difference(b, a, common_only=True)


def _accuracy(
    diff: Diff, entry: str, name: str, old: dict[str, Any], new: dict[str, Any], key: str
) -> bool:
    """Compare ``measured[key]`` with its standard errors; False if it has none.

    The suite's rule: a regression when the one-sided bound of the change is below the
    tolerated drop (the new record's ``expected.rtol``, else none)."""
    om, nm = old.get("measured") or {}, new.get("measured") or {}
    a, b = num(om.get(key)), num(nm.get(key))
    if a is None or b is None:
        return False
    se_a, se_b = _standard_error(om, key, old, a), _standard_error(nm, key, new, b)
    if se_a is None or se_b is None:
        return False
    change = _paired(om, old, nm, new, key)
    if change is None:
        n = int(_sample_count(nm, new) or 0)
        change = verdicts.independent_difference(
            verdicts.Score(b, se_b, n), verdicts.Score(a, se_a, n)
        )
    low, high = change.bounds(diff.options.alpha)
    better = _higher_is_better(name, new, key)
    rtol = num((new.get("expected") or {}).get("rtol")) or 0.0
    kind: Kind | None = None
    if better is None:
        kind = "change" if low > 0 or high < 0 else None
    else:
        judged = verdicts.judge(low, high, baseline=a, min_effect=rtol, higher_is_better=better)
        kind = None if judged == "no change" else judged
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
            "z": change.z,
            "p_value": change.p_value,
            "bounds": [low, high],
            "tolerated": rtol,
            "method": change.method,
            "verdict": kind or "no significant change",
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
            f"{b - a:+.4f} ({low:+.4f} to {high:+.4f} at one-sided {diff.options.alpha:g}), "
            f"z={change.z:+.2f}, p={change.p_value:.3g} (se {se_a:.4f} / {se_b:.4f}; "
            f"{change.method})",
        )
    if old.get("request") != new.get("request") or old.get("settings") != new.get("settings"):
        diff.add(
            "note",
            "accuracy",
            entry,
            name,
            "settings",
            old.get("settings", old.get("request")),
            new.get("settings", new.get("request")),
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
        if counts.get(k) is None and num(measured.get(k)) is not None:
            counts[k] = measured[k]
    if not isinstance(samples, dict):
        return {}, counts
    clean = {
        str(k): [float(x) for x in v if num(x) is not None]
        for k, v in samples.items()
        if isinstance(v, list)
    }
    return clean, counts


def performance(
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
    counts = [num(c.get(k)) for c in (o_counts, n_counts) for k in ("completed", "failed")]
    if all(c is not None for c in counts):
        oc, of, nc, nf = (int(c or 0) for c in counts)
        results.append(
            stats.compare_failure_rate(of, oc + of, nf, nc + nf, alpha=diff.options.alpha)
        )
    for c in results:
        row = {"entry": entry, "check": name, **c.to_dict(), "describe": c.describe()}
        diff.performance.append(clean(row))
        if c.verdict in ("regression", "improvement"):
            diff.add(
                c.verdict, "performance", entry, name, c.metric, c.baseline, c.current, c.describe()
            )


def measured(diff: Diff, entry: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    om, nm = old.get("measured") or {}, new.get("measured") or {}
    if not isinstance(om, dict) or not isinstance(nm, dict):
        if om != nm:
            diff.add("change", "check", entry, name, "measured", om, nm)
        return
    for key in sorted(set(om) | set(nm)):
        if key in ("policy", "per_doc") or _is_stderr_key(key):
            continue
        a, b = om.get(key), nm.get(key)
        fa, fb = num(a), num(b)
        if fa is not None and fb is not None:
            if _accuracy(diff, entry, name, old, new, key):
                continue
            if fa == fb:
                continue
            is_int = all(isinstance(v, int) for v in (a, b))
            if is_int:
                diff.add("change", "check", entry, name, f"measured.{key}", a, b, pct(a, b))
            elif abs(rel(fa, fb)) > diff.options.numeric_rtol:
                diff.add(
                    "note",
                    "check",
                    entry,
                    name,
                    f"measured.{key}",
                    a,
                    b,
                    f"{pct(a, b)} (no uncertainty recorded: not tested)",
                )
        elif a != b:
            diff.add("change", "check", entry, name, f"measured.{key}", a, b)
