"""Tables shared by the Markdown and HTML views of a report (rows of formatted cells)."""

from __future__ import annotations

import json
from typing import Any


def fmt(value: Any, digits: int = 0) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if digits else f"{value:,.2f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def md(text: Any) -> str:
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
        ("torch", fmt(env.get("torch"))),
        ("transformers", fmt(env.get("transformers"))),
        ("lm-eval", fmt(env.get("lm_eval"))),
        ("Python", fmt(env.get("python"))),
        ("GPUs", gpu_text),
        ("CPU", f"{env.get('cpu_model') or env.get('cpu')} ({env.get('cpu_count')} cores)"),
        ("platform", fmt(env.get("platform"))),
    ]


def measured_text(measured: Any, limit: int = 160) -> str:
    """A short ``key=value`` rendering of a check's ``measured`` dict."""
    if not isinstance(measured, dict):
        return "" if measured is None else str(measured)[:limit]
    parts = []
    for key, value in measured.items():
        if isinstance(value, (list, dict)) and len(json.dumps(value)) > 60:
            value = f"[{len(value)} items]"
        parts.append(f"{key}={fmt(value) if not isinstance(value, str) else value}")
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


ACCURACY_HEADERS = ("entry", "task.metric", "API", "shots", "chat template",
                    "generation", "served ± stderr (n)", "expected", "tolerance", "margin",
                    "smallest detectable drop", "verdict")  # fmt: skip


def accuracy_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per accuracy verdict (:data:`ACCURACY_HEADERS`): what was served with which
    settings, what it had to match, how close it came and the smallest drop the check could
    see; a check that could not measure says why in its verdict."""
    rows = []
    for name, entry in sorted(report.get("entries", {}).items()):
        for check in entry.get("checks") or []:
            if not str(check.get("check", "")).startswith("accuracy."):
                continue
            got, want = check.get("measured") or {}, check.get("expected") or {}
            lm = check.get("lm_eval") or {}
            ran = (check.get("settings") or {}).get("lm_eval") or {}
            shots = ", ".join(sorted({str(v) for v in (lm.get("n_shot") or {}).values()}))
            generation = "; ".join(_generation(g) for g in ran.get("generation_kwargs") or [])
            verdict = str(check.get("verdict"))
            if check.get("unmeasured"):
                verdict += f" (could not measure: {check['unmeasured']})"
            expected = f"{fmt(want.get('value'), 4)} ({fmt(want.get('against'))}"
            if want.get("rtol"):
                expected += f", rtol {fmt(want.get('rtol'))}"
            rows.append([
                name, check["check"].removeprefix("accuracy."), fmt(lm.get("api")), fmt(shots),
                fmt(lm.get("apply_chat_template")), generation or "-",
                f"{fmt(got.get('value'), 4)} ± {fmt(got.get('stderr'), 4)} "
                f"(n={fmt(got.get('n'))})",
                expected + ")",
                fmt(check.get("tolerance"), 4), fmt(check.get("margin"), 4),
                fmt((check.get("power") or {}).get("minimal_detectable_drop"), 4), verdict,
            ])  # fmt: skip
    return rows


def _generation(kwargs: Any) -> str:
    if not isinstance(kwargs, dict):
        return str(kwargs)
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(kwargs.items()))


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
