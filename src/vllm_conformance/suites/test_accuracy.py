"""Accuracy: lm-evaluation-harness scores of the served model against what they must be.

Each of the entry's tasks (``expect.accuracy``) runs through lm-eval against the server
(``local-completions`` or ``local-chat-completions``) on local data, with the shots, chat
template and generation settings the entry pins. The score must not be worse than the
reported value, or, for generated models, than the score of the reference implementation
(transformers, greedy) on the same documents: one-sided at the project's significance level,
with the entry's ``rtol`` tolerated on top of the noise (:mod:`vllm_conformance.verdicts`).
Each verdict records the sample size, the standard error and the smallest drop it could
have detected. A run that did not measure the task as defined (lm-eval truncated a prompt,
or got no answer) fails, whatever its score.
"""

from __future__ import annotations

from typing import Any

import pytest

from vllm_conformance import verdicts
from vllm_conformance.client import accuracy
from vllm_conformance.fixtures.recorder import Recorder
from vllm_conformance.launch import serving
from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.matrix import AccuracyExpect, Deployment
from vllm_conformance.progress import EntryProgress

pytestmark = pytest.mark.needs_expect("accuracy")


def _run_key(exp: AccuracyExpect) -> tuple[Any, ...]:
    """Expectations that differ only in metric or verdict share one lm-eval run."""
    return (exp.task, exp.api, exp.num_fewshot, exp.apply_chat_template,
            exp.fewshot_as_multiturn, exp.system_instruction, exp.limit, exp.data,
            tuple(sorted(exp.gen_kwargs.items())))  # fmt: skip


def check_name(exp: AccuracyExpect) -> str:
    """Unique per expectation within an entry, and stable across runs (compare keys on it)."""
    name = f"accuracy.{exp.task}.{exp.metric}"
    if exp.api != "completions":
        name += f".{exp.api}"
    if exp.num_fewshot is not None:
        name += f".{exp.num_fewshot}-shot"
    if exp.against == "reported":
        name += ".reported"
    return name


def settings_of(exp: AccuracyExpect, served: accuracy.AccuracyResult) -> dict[str, Any]:
    """What the entry asked for and what lm-eval ran with (``lm_eval``), side by side."""
    return {
        "api": exp.api, "num_fewshot": exp.num_fewshot,
        "apply_chat_template": served.apply_chat_template,
        "fewshot_as_multiturn": exp.fewshot_as_multiturn,
        "system_instruction": exp.system_instruction, "limit": exp.limit,
        "concurrency": exp.concurrency, "gen_kwargs": dict(exp.gen_kwargs),
        "lm_eval": served.settings,
    }  # fmt: skip


def verdict_for(
    exp: AccuracyExpect, served: accuracy.AccuracyResult, deployment: Deployment
) -> tuple[verdicts.AccuracyVerdict, accuracy.AccuracyResult | None]:
    """The verdict on one expectation (and the reference run it used, if any)."""
    if exp.against == "reported":
        assert exp.value is not None
        verdict = verdicts.against_reported(
            served.score, exp.value, reported_stderr=exp.stderr, rtol=exp.rtol,
            one_sided=exp.one_sided,
        )  # fmt: skip
        return verdict, None
    reference = accuracy.reference_score(
        serving.model_path(deployment), exp, exp.data, gen_kwargs=exp.gen_kwargs or None
    ).select(exp.metric)
    verdict = verdicts.against_reference(served.per_doc, reference.per_doc, one_sided=exp.one_sided)
    return verdict, reference


def _unmeasured(served: accuracy.AccuracyResult) -> str | None:
    """Why the run does not measure the task as defined, or None."""
    kinds = {k: v for k, v in served.warnings.items() if v}
    if not kinds:
        return None
    parts = [f"{len(v)} x {k} (e.g. {v[0][:200]!r})" for k, v in sorted(kinds.items())]
    return "lm-eval warned: " + "; ".join(parts)


def test_accuracy(
    endpoint: Endpoint,
    deployment: Deployment,
    recorder: Recorder,
    progress: EntryProgress,
) -> None:
    """Every accuracy expectation of the entry holds; each verdict is in the report."""
    lm_eval_runs: dict[tuple[Any, ...], accuracy.AccuracyResult | Exception] = {}
    failures = []
    for exp in deployment.expect.accuracy:
        key = _run_key(exp)
        if key not in lm_eval_runs:
            try:
                # Named like the plan's step, so its ETA is the planned time.
                with progress.phase(f"lm-eval {exp.task}"):
                    lm_eval_runs[key] = accuracy.run_lm_eval(
                        endpoint.base_url, endpoint.model, exp, exp.data,
                        api_key=endpoint.api_key, gen_kwargs=exp.gen_kwargs or None,
                    )  # fmt: skip
            except accuracy.AccuracyDataError as exc:
                lm_eval_runs[key] = exc
        run = lm_eval_runs[key]
        if isinstance(run, accuracy.AccuracyDataError):
            pytest.fail(str(run), pytrace=False)
        served = run.select(exp.metric)
        name = check_name(exp)
        unmeasured = _unmeasured(served)
        try:
            verdict, reference = verdict_for(exp, served, deployment)
        except ValueError as exc:  # served and reference scored different documents
            verdict, reference, unmeasured = None, None, unmeasured or str(exc)
        passed = verdict is not None and verdict.passed and unmeasured is None
        recorder.record(
            name,
            "pass" if passed else "fail",
            measured={"value": served.value, "stderr": served.stderr, "n": served.n},
            expected={"against": exp.against,
                      "value": verdict.expected if verdict else exp.value,
                      "stderr": exp.stderr, "rtol": exp.rtol, "one_sided": exp.one_sided},
            **(_verdict_fields(verdict) if verdict else {}),
            unmeasured=unmeasured,
            settings=settings_of(exp, served),
            warnings=served.warnings,
            per_doc=served.per_doc,
            lm_eval={"version": served.lm_eval_version, "task_versions": served.task_versions,
                     "n_shot": served.n_shot, "api": served.api,
                     "apply_chat_template": served.apply_chat_template},
            reference=reference.to_dict() if reference else None,
            source=exp.source,
        )  # fmt: skip
        if unmeasured is not None:
            failures.append(f"{name}: could not measure: {unmeasured}")
        elif verdict is not None and not verdict.passed:
            failures.append(
                f"{name}: served {served.value:.4f} ± {served.stderr:.4f} (n={served.n}), "
                f"expected {verdict.expected:.4f} ({exp.against}; {exp.source}); rule "
                f"{verdict.rule}; margin {verdict.margin:+.4f}; settings "
                f"{settings_of(exp, served)['lm_eval']}"
            )
    assert not failures, "accuracy below expectation:\n" + "\n".join(failures)


def _verdict_fields(verdict: verdicts.AccuracyVerdict) -> dict[str, Any]:
    diff = verdict.difference
    return {
        "tolerance": verdict.tolerance, "margin": verdict.margin, "rule": verdict.rule,
        "test": {"method": diff.method, "difference": diff.estimate, "stderr": diff.stderr,
                 "z": diff.z, "p_value": diff.p_value, "alpha": verdict.alpha},
        "power": {"power": verdicts.POWER,
                  "minimal_detectable_drop": verdict.minimal_detectable_drop},
    }  # fmt: skip
