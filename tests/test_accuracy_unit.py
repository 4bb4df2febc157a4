"""Pure checks of the accuracy library: statistics, data resolution, fixtures, prompts.

No server here (the end-to-end accuracy run lives with the suites); lm-eval is only used,
where installed, to render the real task prompts from the bundled fixtures.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from vllm_conformance import verdicts
from vllm_conformance.client import accuracy as acc
from vllm_conformance.models import trained

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not installed")


# --- statistics (vllm_conformance.verdicts) ----------------------------------------------


def test_binomial_stderr_is_lm_evals_formula() -> None:
    scores = [1.0] * 30 + [0.0] * 10
    p, n = sum(scores) / len(scores), len(scores)
    sample_sd = math.sqrt(sum((x - p) ** 2 for x in scores) / (n - 1))
    assert verdicts.binomial_stderr(p, n) == pytest.approx(sample_sd / math.sqrt(n))
    assert verdicts.binomial_stderr(0.75, 40) == pytest.approx(math.sqrt(0.75 * 0.25 / 39))
    assert verdicts.binomial_stderr(1.0, 10) == 0.0


@needs_lm_eval
def test_binomial_stderr_matches_lm_eval_mean_stderr() -> None:
    from lm_eval.api.metrics import mean_stderr

    scores = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0]
    p = sum(scores) / len(scores)
    assert verdicts.binomial_stderr(p, len(scores)) == pytest.approx(mean_stderr(scores))


@pytest.mark.parametrize(("p", "n"), [(0.5, 1), (0.5, 0), (1.5, 10), (-0.1, 10)])
def test_binomial_stderr_rejects_bad_input(p: float, n: int) -> None:
    with pytest.raises(ValueError):
        verdicts.binomial_stderr(p, n)


def test_against_reported_is_one_sided_by_default() -> None:
    z = verdicts.z_value()
    assert z == pytest.approx(2.3263, abs=1e-4)  # one-sided 1 %
    inside = verdicts.against_reported(verdicts.Score(0.80, 0.02, 400), 0.84)
    assert inside.passed and inside.tolerance == pytest.approx(z * 0.02)
    assert inside.margin == pytest.approx(z * 0.02 - 0.04)
    outside = verdicts.against_reported(verdicts.Score(0.79, 0.02, 400), 0.84)
    assert not outside.passed and outside.margin < 0
    # doing better than reported is no failure ...
    above = verdicts.against_reported(verdicts.Score(0.95, 0.02, 400), 0.85)
    assert above.passed and above.margin == pytest.approx(above.tolerance)
    # ... unless the entry asks whether the scores differ at all
    two = verdicts.against_reported(verdicts.Score(0.95, 0.02, 400), 0.85, one_sided=False)
    assert not two.passed and two.tolerance == pytest.approx(verdicts.z_value(0.005) * 0.02)


def test_rtol_adds_to_the_noise_allowance() -> None:
    # vLLM CI: measured >= target * (1 - 0.08); the noise allowance comes on top of it
    v = verdicts.against_reported(verdicts.Score(0.81, 0.005, 3500), 0.89, rtol=0.08)
    assert v.tolerance == pytest.approx(0.08 * 0.89 + verdicts.z_value() * 0.005)
    assert v.passed and "0.08 * 0.8900" in v.rule
    assert not verdicts.against_reported(verdicts.Score(0.80, 0.005, 3500), 0.89, rtol=0.08).passed


def test_reported_stderr_adds_in_quadrature() -> None:
    v = verdicts.against_reported(verdicts.Score(0.80, 0.03, 200), 0.85, reported_stderr=0.04)
    assert v.tolerance == pytest.approx(verdicts.z_value() * 0.05)
    assert v.expected_stderr == 0.04


def test_the_level_holds_at_the_edge_of_the_tolerance() -> None:
    """A served model exactly ``rtol`` worse than reported fails with probability ALPHA (the
    larger-of-the-two rule this replaces failed it half the time), and one worse by the
    minimal detectable drop fails with probability POWER."""
    import numpy as np

    rng = np.random.default_rng(0)
    reported, rtol, n, runs = 0.80, 0.05, 1000, 4000

    def fail_rate(true_p: float) -> float:
        fails = 0
        for hits in rng.binomial(n, true_p, size=runs):
            p = hits / n
            score = verdicts.Score(p, verdicts.binomial_stderr(p, n), n)
            fails += not verdicts.against_reported(score, reported, rtol=rtol).passed
        return fails / runs

    assert fail_rate(reported * (1 - rtol)) <= 2 * verdicts.ALPHA
    mdd = verdicts.against_reported(verdicts.Score(0.8, 0.0126, n), reported, rtol=rtol)
    drop = mdd.minimal_detectable_drop
    assert fail_rate(reported - drop) == pytest.approx(verdicts.POWER, abs=0.04)


def test_minimal_detectable_drop_at_vllm_ci_sizes() -> None:
    """What vLLM CI's sizes can see: 250 MMLU-Pro questions per subject (3,500) and 100
    ChartQA questions, at the one-sided 1 % level with 80 % power."""
    mmlu = verdicts.against_reported(verdicts.Score(0.80, 0.0068, 3500), 0.805)
    assert 0.021 < mmlu.minimal_detectable_drop < 0.023
    chartqa = verdicts.against_reported(verdicts.Score(0.9, 0.03, 100), 0.90, rtol=0.02)
    assert 0.15 < chartqa.minimal_detectable_drop < 0.17  # 100 questions see only big drops
    # and the inverse: the documents that detect that drop on MMLU-Pro
    needed = verdicts.documents_needed(0.805, mmlu.minimal_detectable_drop)
    assert needed == pytest.approx(3500, abs=2)
    with pytest.raises(ValueError, match="within the tolerance"):
        verdicts.documents_needed(0.805, 0.01, rtol=0.02)


def test_against_reference_is_paired() -> None:
    ref = {f"t/{i}": float(i % 5 != 0) for i in range(200)}
    same = verdicts.against_reference(dict(ref), ref)
    assert same.passed and same.tolerance == 0.0 and "0 differ" in same.rule
    # a few flips both ways: noise
    noisy = dict(ref)
    for k in ("t/0", "t/1", "t/5", "t/6"):
        noisy[k] = 1.0 - noisy[k]
    assert verdicts.against_reference(noisy, ref).passed
    # twelve documents lost, none gained: a real regression, though 0.74 vs 0.80 would
    # pass the unpaired rule at n=200
    worse = dict(ref)
    for i in [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14]:
        worse[f"t/{i}"] = 0.0
    verdict = verdicts.against_reference(worse, ref)
    assert not verdict.passed
    unpaired = verdicts.against_reported(
        verdicts.Score(verdict.value, verdicts.binomial_stderr(verdict.value, 200), 200),
        verdict.expected,
        reported_stderr=verdicts.binomial_stderr(verdict.expected, 200),
    )
    assert unpaired.passed
    # no fewer than (z_a + z_b)^2 lost documents are detectable, however few differ
    assert same.minimal_detectable_drop == pytest.approx(
        (verdicts.z_value() + 0.8416) ** 2 / 200, rel=1e-3
    )
    with pytest.raises(ValueError, match="different documents"):
        verdicts.against_reference({"t/0": 1.0, "t/1": 1.0}, {"t/0": 1.0, "t/2": 1.0})


def test_judge_needs_the_bound_beyond_the_tolerance() -> None:
    latency = {"baseline": 1.0, "min_effect": 0.05, "higher_is_better": False}
    score = {"baseline": 0.9, "min_effect": 0.0, "higher_is_better": True}
    # latency: +30 % with bounds +20..+40 % is a regression at min_effect 5 %
    assert verdicts.judge(0.2, 0.4, **latency) == "regression"
    # significant but smaller than the tolerance: no regression
    assert verdicts.judge(0.02, 0.04, **latency) == "no change"
    # accuracy (higher is better): a drop whose upper bound is below -tolerance
    assert verdicts.judge(-0.06, -0.02, **score) == "regression"
    assert verdicts.judge(0.01, 0.05, **score) == "improvement"
    assert verdicts.judge(-0.03, 0.01, **score) == "no change"


def test_split_metric() -> None:
    assert acc.split_metric("exact_match,strict-match") == ("exact_match", "strict-match")
    assert acc.split_metric("relaxed_accuracy,none") == ("relaxed_accuracy", "none")
    assert acc.split_metric("exact_match") == ("exact_match", "none")


def _fake_results(stderr: object) -> dict[str, object]:
    samples = [
        {"doc_id": i, "filter": f, "exact_match": float(i < 3)}
        for i in range(4)
        for f in ("strict-match", "flexible-extract")
    ]
    return {
        "results": {
            "gsm8k": {
                "exact_match,strict-match": 0.75,
                "exact_match_stderr,strict-match": stderr,
                "exact_match,flexible-extract": 0.75,
                "exact_match_stderr,flexible-extract": stderr,
            }
        },
        "n-samples": {"gsm8k": {"original": 150, "effective": 4}},
        "versions": {"gsm8k": 3.0},
        "n-shot": {"gsm8k": 0},
        "samples": {"gsm8k": samples},
    }


def test_parse_results_uses_lm_eval_stderr() -> None:
    r = acc.parse_results(_fake_results(0.25), "gsm8k", "exact_match,strict-match")
    assert (r.value, r.stderr, r.n, r.stderr_source) == (0.75, 0.25, 4, "lm-eval")
    assert r.per_doc == {"gsm8k/0": 1.0, "gsm8k/1": 1.0, "gsm8k/2": 1.0, "gsm8k/3": 0.0}
    assert r.task_versions == {"gsm8k": 3.0} and r.n_shot == {"gsm8k": 0}


def test_parse_results_computes_stderr_when_not_available() -> None:
    # bootstrap_iters=0 makes lm-eval report the string "N/A"
    r = acc.parse_results(_fake_results("N/A"), "gsm8k", "exact_match,flexible-extract")
    assert r.stderr_source == "computed"
    assert r.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    with pytest.raises(KeyError, match="have:"):
        acc.parse_results(_fake_results(0.1), "gsm8k", "exact_match,custom-extract")


def test_result_select_other_filter() -> None:
    r = acc.parse_results(_fake_results(0.25), "gsm8k", "exact_match,strict-match")
    flex = r.select("exact_match,flexible-extract")
    assert (flex.metric, flex.filter, flex.value) == ("exact_match", "flexible-extract", 0.75)
    assert set(flex.others) == {"exact_match,strict-match"}
    assert flex.select("exact_match,strict-match") == r
    assert acc.AccuracyResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def _group_samples() -> list[dict[str, object]]:
    return [{"doc_id": i, "filter": "custom-extract", "exact_match": float(i == 0)} for i in (0, 1)]


def test_parse_results_group_sums_leaves() -> None:
    out = {
        "results": {"mmlu_pro": {"exact_match,custom-extract": 0.5}},
        "groups": {"mmlu_pro": {"exact_match,custom-extract": 0.5}},
        "group_subtasks": {"mmlu_pro": ["mmlu_pro_law", "mmlu_pro_math"]},
        "n-samples": {
            "mmlu_pro_law": {"effective": 2, "original": 2},
            "mmlu_pro_math": {"effective": 2, "original": 2},
        },
        "samples": {t: _group_samples() for t in ("mmlu_pro_law", "mmlu_pro_math")},
    }
    r = acc.parse_results(out, "mmlu_pro", "exact_match,custom-extract")
    assert r.n == 4 and len(r.per_doc) == 4 and r.stderr_source == "computed"


# --- data resolution ---------------------------------------------------------------------


def test_resolve_data_missing_path_names_task_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(acc.AccuracyDataError) as err:
        acc.resolve_data("gsm8k", missing)
    assert "'gsm8k'" in str(err.value) and str(missing) in str(err.value)


def test_resolve_data_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CONFORMANCE_MMLU_PRO", raising=False)
    with pytest.raises(acc.AccuracyDataError, match=r"\$VLLM_CONFORMANCE_MMLU_PRO"):
        acc.resolve_data("mmlu_pro", None)
    with pytest.raises(acc.AccuracyDataError, match=r"\$MY_DATA, which is not set"):
        acc.resolve_data("mmlu_pro", "$MY_DATA")
    monkeypatch.setenv("VLLM_CONFORMANCE_MMLU_PRO", str(tmp_path))
    assert acc.resolve_data("mmlu_pro", None) == tmp_path.resolve()
    monkeypatch.setenv("MY_DATA", str(tmp_path / "gone"))
    with pytest.raises(acc.AccuracyDataError, match=r"from \$MY_DATA"):
        acc.resolve_data("mmlu_pro", "$MY_DATA")


def test_resolve_data_fixture() -> None:
    assert acc.resolve_data("gsm8k", "fixture") == acc.DATA_ROOT / "gsm8k"
    with pytest.raises(acc.AccuracyDataError, match="no self-made fixture"):
        acc.resolve_data("gpqa", "fixture")


def test_find_split_files_layouts(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "test.jsonl").write_text("{}\n")
    assert acc.find_split_files(flat, "test") == [flat / "test.jsonl"]
    assert acc.find_split_files(flat, "train") == []
    hub = tmp_path / "hub"  # openai/gsm8k as snapshot_download leaves it
    for cfg in ("main", "socratic"):
        (hub / cfg).mkdir(parents=True)
        (hub / cfg / "test-00000-of-00001.parquet").write_bytes(b"")
    assert acc.find_split_files(hub, "test", "main") == [hub / "main/test-00000-of-00001.parquet"]
    data = tmp_path / "mmlu"  # TIGER-Lab/MMLU-Pro
    (data / "data").mkdir(parents=True)
    (data / "data" / "validation-00000-of-00001.parquet").write_bytes(b"")
    assert acc.find_split_files(data, "validation") == [
        data / "data/validation-00000-of-00001.parquet"
    ]


def test_env_var_names() -> None:
    assert acc.env_var("mmlu_pro") == "VLLM_CONFORMANCE_MMLU_PRO"
    assert acc.env_var("gsm8k") == "VLLM_CONFORMANCE_GSM8K"


# --- fixtures ----------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_gsm8k_fixture_answers_are_right() -> None:
    for split in ("test", "train"):
        for doc in _jsonl(acc.DATA_ROOT / "gsm8k" / f"{split}.jsonl"):
            answer = str(doc["answer"])
            m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\.\n#### (\d+)", answer)
            assert m, answer
            a, op, b, c, final = m.groups()
            assert int(c) == int(final) == eval(f"{a}{op}{b}")


def test_mmlu_pro_fixture_schema() -> None:
    docs = _jsonl(acc.DATA_ROOT / "mmlu_pro" / "test.jsonl")
    val = _jsonl(acc.DATA_ROOT / "mmlu_pro" / "validation.jsonl")
    assert {d["category"] for d in docs} == set(trained.MMLU_PRO_CATEGORIES)
    assert len(val) == 70 and len(docs) == 140
    for doc in docs + val:
        assert set(doc) == {"question_id", "question", "options", "answer", "answer_index",
                            "cot_content", "category", "src"}  # fmt: skip
        options = doc["options"]
        assert isinstance(options, list) and len(options) == 10 and len(set(options)) == 10
        assert doc["answer"] == "ABCDEFGHIJ"[int(doc["answer_index"])]
        # the worked answer reads the options out up to the one equal to the result
        walk = r"= (\d+) \(target\)\.\n(?:[A-J]\. \d+\n)*([A-J])\. (\d+) \(target\)\.\n"
        m = re.search(walk + r"The answer is \(([A-J])\)\.$", str(doc["cot_content"]))
        assert m and m.group(2) == m.group(4) == doc["answer"]
        assert options[int(doc["answer_index"])] == m.group(1) == m.group(3)
    assert not {d["question"] for d in docs} & {d["question"] for d in val}


def test_fixtures_are_regenerated_exactly(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    pytest.importorskip("PIL")
    from vllm_conformance.data.accuracy import generate

    for path in generate.write_all(tmp_path):
        if path.suffix == ".jsonl":
            committed = acc.DATA_ROOT / path.relative_to(tmp_path)
            assert path.read_bytes() == committed.read_bytes(), path


# --- prompts: the recipe trains on what lm-eval sends ------------------------------------


@needs_lm_eval
def test_training_prompts_equal_lm_eval_prompts(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    data = {t: acc.resolve_data(t, "fixture") for t in ("gsm8k", "mmlu_pro")}
    acc.write_task_overrides(tmp_path, data, num_fewshot={"gsm8k": 0, "mmlu_pro": 0})
    loaded = TaskManager(include_path=str(tmp_path)).load(["gsm8k", "mmlu_pro"])["tasks"]
    gsm8k = loaded["gsm8k"]
    docs = list(gsm8k.eval_docs)
    assert len(docs) == 150
    for doc in docs[:20]:
        assert gsm8k.fewshot_context(doc, 0) == trained.gsm8k_prompt(doc)
    for name, task in loaded.items():
        if not name.startswith("mmlu_pro_"):
            continue
        for doc in list(task.eval_docs)[:3]:
            assert task.fewshot_context(doc, 0) == trained.mmlu_pro_prompt(doc)
            chat = task.fewshot_context(doc, 0, apply_chat_template=True, chat_template=_capture)
            assert chat == [
                {"role": "system", "content": trained.mmlu_pro_description(doc["category"])},
                {"role": "user", "content": trained.mmlu_pro_question(doc)},
            ]


def _capture(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> object:
    return messages


@needs_lm_eval
def test_missing_split_for_few_shot_is_one_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "gsm8k"
    data.mkdir()
    (data / "test.jsonl").write_bytes((acc.DATA_ROOT / "gsm8k" / "test.jsonl").read_bytes())
    out = tmp_path / "tasks"
    # zero-shot: the train split is not needed
    files = acc.write_task_overrides(out, {"gsm8k": data}, num_fewshot={"gsm8k": 0})
    assert files["gsm8k"]["train"] == files["gsm8k"]["test"]
    expected = r"'gsm8k'.*'train' split.*" + re.escape(str(data))
    with pytest.raises(acc.AccuracyDataError, match=expected):
        acc.write_task_overrides(out, {"gsm8k": data}, num_fewshot={"gsm8k": 5})


def test_summary_has_one_accuracy_row_per_verdict() -> None:
    """The Markdown summary shows settings, served (with n), expected, tolerance, margin and
    the smallest detectable drop of each verdict, and why a check could not measure."""
    from vllm_conformance import report

    check = {
        "check": "accuracy.gsm8k.exact_match,flexible-extract.chat-completions.0-shot",
        "verdict": "fail",
        "measured": {"value": 0.04, "stderr": 0.016, "n": 150},
        "expected": {"against": "reference", "value": 0.92, "rtol": 0.0},
        "tolerance": 0.0685,
        "margin": -0.8115,
        "power": {"minimal_detectable_drop": 0.0669},
        "settings": {"lm_eval": {"generation_kwargs": [{"max_gen_toks": 256, "until": ["Q:"]}]}},
        "lm_eval": {"api": "local-chat-completions", "n_shot": {"gsm8k": 0},
                    "apply_chat_template": True},
    }  # fmt: skip
    truncated = {
        **check,
        "check": "accuracy.gsm8k.x",
        "unmeasured": "lm-eval warned: 3 x truncated",
    }
    rep = {
        "entries": {
            "cpu-arith": {
                "checks": [check, truncated, {"check": "context.exact", "verdict": "pass"}]
            }
        }
    }
    rows = [r for r in report.summary_markdown(rep).splitlines() if "| gsm8k." in r]
    assert rows[0] == (
        "| cpu-arith | gsm8k.exact_match,flexible-extract.chat-completions.0-shot | "
        'local-chat-completions | 0 | true | max_gen_toks=256, until=["Q:"] | '
        "0.0400 ± 0.0160 (n=150) | 0.9200 (reference) | 0.0685 | -0.8115 | 0.0669 | fail |"
    )
    assert rows[1].endswith("| fail (could not measure: lm-eval warned: 3 x truncated) |")


# --- task variants and what lm-eval warns about ------------------------------------------


def test_task_variants_read_their_data_set() -> None:
    assert acc.dataset_of("mmlu_pro") == "mmlu_pro"
    assert acc.env_var("mmlu_pro") == "VLLM_CONFORMANCE_MMLU_PRO"
    if HAVE_LM_EVAL:
        assert acc.dataset_of("mmlu_pro_llama") == "mmlu_pro"
        assert acc.env_var("chartqa_llama_90") == "VLLM_CONFORMANCE_CHARTQA"
        assert acc.resolve_data("mmlu_pro_llama", "fixture") == acc.DATA_ROOT / "mmlu_pro"


@needs_lm_eval
def test_llama4_entries_pin_what_their_tasks_define(tmp_path: Path) -> None:
    """The Llama 4 entries name lm-eval's llama variants with the card's 0 shots and pin the
    tasks' own generation settings, so a new lm-eval cannot change them unseen; the
    overrides render on the shipped fixtures."""
    from lm_eval.tasks import TaskManager

    from vllm_conformance.matrix import load

    pinned = {
        (e.id, x.task): x
        for e in load([]).known.values()
        for x in e.expect.accuracy
        if x.task.endswith(("_llama", "_llama_90"))
    }
    assert {task for _, task in pinned} == {"mmlu_pro_llama", "chartqa_llama_90"}
    data = {t: acc.resolve_data(t, "fixture") for t in ("mmlu_pro_llama", "chartqa_llama_90")}
    acc.write_task_overrides(tmp_path, data, num_fewshot=dict.fromkeys(data, 0))
    tasks = TaskManager(include_path=str(tmp_path)).load(list(data))["tasks"]
    for (_, name), exp in pinned.items():
        leaves = [t for n, t in tasks.items() if n == name or n.startswith(f"{name}_")]
        assert leaves and exp.num_fewshot == 0 and exp.apply_chat_template
        assert exp.limit in (100, 250) and exp.api == "chat-completions"
        for leaf in leaves:
            assert dict(leaf.config.generation_kwargs) == exp.gen_kwargs, name


def test_lm_eval_warnings_are_collected() -> None:
    import logging

    log = logging.getLogger("lm_eval.models.api_models")
    with acc._lm_eval_warnings() as warned:
        log.warning("Some contexts exceeded (max length: (2047)). They were left truncated.")
        log.warning("API returned null content. Content filled with placeholder")
        log.warning("an unrelated warning")
    assert set(warned) == {"truncated", "null_answer"}
    log.warning("after the block: not collected")
    assert sum(map(len, warned.values())) == 2
