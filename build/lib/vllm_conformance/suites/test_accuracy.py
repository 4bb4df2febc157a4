"""Accuracy: lm-evaluation-harness scores of the served model against what they must be.

Each of the entry's tasks (``expect.accuracy``) runs through lm-eval against the server
(``local-completions`` or ``local-chat-completions``) on local data. The score must match
either the reported value (``|served - reported| <= z * stderr``, optionally widened by a
relative tolerance as in vLLM's own CI) or, for generated models, the score of the reference
implementation (transformers, greedy) on the same documents.
"""

from __future__ import annotations

from typing import Any

import pytest

from vllm_conformance.client import accuracy
from vllm_conformance.fixtures.recorder import Recorder
from vllm_conformance.launch import serving
from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.matrix import AccuracyExpect, Deployment

pytestmark = pytest.mark.needs_expect("accuracy")


def _run_key(exp: AccuracyExpect) -> tuple[Any, ...]:
    """Expectations that differ only in metric share one lm-eval run."""
    return (exp.task, exp.api, exp.num_fewshot, exp.apply_chat_template, exp.limit, exp.data,
            tuple(sorted(exp.gen_kwargs.items())))  # fmt: skip


def check_name(exp: AccuracyExpect) -> str:
    """Unique per expectation within an entry, and stable across runs (compare keys on it)."""
    name = f"accuracy.{exp.task}.{exp.metric}"
    if exp.api != "completions":
        name += f".{exp.api}"
    if exp.num_fewshot is not None:
        name += f".{exp.num_fewshot}-shot"
    return name


def verdict_for(
    exp: AccuracyExpect, served: accuracy.AccuracyResult, deployment: Deployment
) -> tuple[accuracy.Verdict, accuracy.AccuracyResult | None]:
    if exp.against == "reported":
        assert exp.value is not None
        return accuracy.check_reported(served.score, None, exp.value, z=exp.z, rtol=exp.rtol), None
    reference = accuracy.reference_score(
        serving.model_path(deployment), exp, exp.data, gen_kwargs=exp.gen_kwargs or None
    ).select(exp.metric)
    try:
        verdict = accuracy.compare_paired(served, reference, z=exp.z)
    except ValueError:
        verdict = accuracy.compare_scores(served, reference, z=exp.z, rtol=exp.rtol)
    return verdict, reference


def test_accuracy(
    endpoint: Endpoint,
    deployment: Deployment,
    recorder: Recorder,
) -> None:
    """Every accuracy expectation of the entry holds; each verdict is in the report."""
    lm_eval_runs: dict[tuple[Any, ...], accuracy.AccuracyResult | Exception] = {}
    failures = []
    for exp in deployment.expect.accuracy:
        key = _run_key(exp)
        if key not in lm_eval_runs:
            try:
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
        verdict, reference = verdict_for(exp, served, deployment)
        recorder.record(
            check_name(exp),
            "pass" if verdict.passed else "fail",
            measured={"value": served.value, "stderr": served.stderr, "n": served.n},
            expected={"against": exp.against, "value": verdict.expected,
                      "stderr": verdict.expected_stderr},
            tolerance=verdict.tolerance,
            margin=verdict.margin,
            rule=verdict.rule,
            per_doc=served.per_doc,
            lm_eval={"version": served.lm_eval_version, "task_versions": served.task_versions,
                     "n_shot": served.n_shot, "api": served.api,
                     "apply_chat_template": served.apply_chat_template},
            reference=reference.to_dict() if reference else None,
            source=exp.source,
        )  # fmt: skip
        if not verdict.passed:
            failures.append(
                f"{exp.task} {exp.metric}: served {served.value:.4f} ± {served.stderr:.4f}, "
                f"expected {verdict.expected:.4f} ({exp.against}; {exp.source}); "
                f"rule {verdict.rule}; margin {verdict.margin:+.4f}"
            )
    assert not failures, "accuracy below expectation:\n" + "\n".join(failures)
