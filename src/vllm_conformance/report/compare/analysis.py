"""The diff's analysis: each section of two reports compared, every difference a finding
(environment, capacity, checks and their error contract, tests; numbers in
:mod:`.measures`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_conformance.report.compare.measures import measured, performance
from vllm_conformance.report.compare.model import (
    CONTRACT_FIELDS,
    MESSAGE_FIELDS,
    Diff,
    Kind,
    Options,
    Side,
    get,
    keyed,
    load_side,
    num,
    pct,
    rel,
    status_kind,
)
from vllm_conformance.report.model import verdict_class
from vllm_conformance.report.tables import environment_rows

# -- sections -----------------------------------------------------------------------


def _environment(diff: Diff) -> None:
    old_env, new_env = diff.old.environment, diff.new.environment
    old_rows = dict(environment_rows(old_env))
    new_rows = dict(environment_rows(new_env))
    for label in old_rows:
        changed = old_rows[label] != new_rows.get(label)
        diff.environment.append(
            {"label": label, "old": old_rows[label], "new": new_rows.get(label), "changed": changed}
        )
        if changed and label != "platform":
            diff.add(
                "note", "environment", None, label, "version", old_rows[label], new_rows.get(label)
            )
    _notes(diff, "environment", None, "environment variable", old_env.get("env"),
           new_env.get("env"))  # fmt: skip


def _notes(
    diff: Diff, area: str, entry: str | None, field: str, old: Any, new: Any, detail: str = ""
) -> None:
    """One note per key whose value differs between two mappings."""
    old, new = old or {}, new or {}
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            diff.add("note", area, entry, name, field, old.get(name), new.get(name), detail)


def _capacity_row(
    diff: Diff, entry: str, name: str, old: Any, new: Any, kind: Kind | None, detail: str = ""
) -> None:
    diff.capacity.append(
        {
            "entry": entry,
            "field": name,
            "old": old,
            "new": new,
            "delta": pct(old, new),
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
        a, b = num(old), num(new)
        if a is not None and b is not None and a != b:
            r = rel(a, b)
            kind = "note"
            if r < -opts.capacity_rtol:
                kind = "regression"
            elif r > opts.capacity_rtol:
                kind = "improvement"
        elif (a is None) != (b is None) and n_status == o_status == "started":
            kind = "change"
        _capacity_row(diff, entry, name, old, new, kind)

    old_len, new_len = num(old_srv.get("max_model_len")), num(new_srv.get("max_model_len"))
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

    o_s, n_s = num(old_srv.get("startup_seconds")), num(new_srv.get("startup_seconds"))
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

    _notes(diff, "serve", entry, "serve argument", old_srv.get("serve_args"),
           new_srv.get("serve_args"), "the runs did not serve with the same arguments")  # fmt: skip


def _check_row(
    entry: str, key: str, old: dict[str, Any] | None, new: dict[str, Any] | None, kind: Kind | None
) -> dict[str, Any]:
    def side(rec: dict[str, Any] | None) -> dict[str, Any] | None:
        if rec is None:
            return None
        out = {"verdict": rec.get("verdict")}
        out.update({f: get(rec, f) for f in (*CONTRACT_FIELDS, *MESSAGE_FIELDS)})
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
    olds, news = keyed(old_e["checks"], "check"), keyed(new_e["checks"], "check")
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
        verdict_class(old.get("verdict")),
        verdict_class(new.get("verdict")),
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
        a, b = get(old, name), get(new, name)
        if a == b:
            continue
        if status_changed and name.startswith("error.") and (a is None or b is None):
            continue  # an error body that comes or goes with the status: one finding
        kind = status_kind(a, b) if name == "status" else "regression"
        if name == "policy":
            detail = "reject vs clamp of an over-long request"
        elif name == "status":
            detail = "status code"
        else:
            detail = "error contract (clients match on type/param/code)"
        diff.add(kind, "error", entry, key, name, a, b, detail)
    for name in MESSAGE_FIELDS:
        a, b = get(old, name), get(new, name)
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
    measured(diff, entry, key, old, new)
    performance(diff, entry, key, old, new)
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
