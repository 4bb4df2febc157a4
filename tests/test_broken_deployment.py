"""The suites catch a broken deployment, and its findings are bookkept exactly.

One server (the trained tiny model served with the wrong chat template: ChatML instead of
the model's Llama 4 layout, as when ``--chat-template`` points at another model's file),
one run of the suites in a subprocess, as an operator would run it:

- accuracy: the chat task fails against the reference and against a reported value, while
  the plain-completions task, which never sees the template, still matches both;
- robustness: the entry's known issues are deliberately wrong. One finding of a fuzz test
  is left out (best_of accepted) while another of the same test is listed (logit_bias
  accepted): the test fails on the unlisted one instead of passing as an expected failure.
  One listed issue never shows: the test fails, saying so. A listed issue with a replay is
  an expected failure whether or not hypothesis draws it.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_conformance import report

ROOT = Path(__file__).resolve().parent.parent
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: The reference run's score of the plain task (the cpu-arith entry's reported value).
REPORTED_PLAIN, REPORTED_CHAT = 0.94, 0.92

pytestmark = pytest.mark.timeout(1500)


def _expect(api: str, against: str) -> dict[str, Any]:
    exp: dict[str, Any] = {
        "task": "gsm8k",
        "metric": "exact_match,flexible-extract",
        "against": against,
        "api": api,
        "apply_chat_template": api == "chat-completions",
        "num_fewshot": 0,
        "concurrency": 8,
        "data": "fixture",
        "source": "self-test",
    }
    if against == "reported":
        exp["value"] = REPORTED_CHAT if api == "chat-completions" else REPORTED_PLAIN
    return exp


PROMPT = {"prompt": "the", "max_tokens": 1}
KNOWN_ISSUES = [
    # listed: the test has a known finding of the same class as the unlisted best_of one
    {"test": "test_bad_input[*-completions-plain-out_of_range]", "status": 200,
     "message": "answered 200 to logit_bias=", "reason": "logit_bias 101 accepted",
     "replay": [{"api": "completions", "body": {**PROMPT, "logit_bias": {"1": 101}}}],
     "source": "self-test"},
    # stale: a valid request answered 200 is no finding, so this never shows
    {"test": "test_bad_input[*-completions-plain-missing_field]", "status": 500,
     "message": "a failure vLLM does not have", "reason": "stale issue",
     "replay": [{"api": "completions", "body": PROMPT}], "source": "self-test"},
    # listed with a replay: exercised in every run
    {"test": "test_bad_input[*-completions-plain-lone_surrogate]", "status": 500,
     "error_type": "InternalServerError", "reason": "lone surrogate in stop",
     "replay": [{"api": "completions", "body": {**PROMPT, "stop": "\ud800"}}],
     "source": "self-test"},
]  # fmt: skip
FUZZ = "completions-plain-out_of_range or completions-plain-missing_field or " + (
    "completions-plain-lone_surrogate"
)


@dataclass(frozen=True)
class Run:
    proc: subprocess.CompletedProcess[str]
    records: list[dict[str, Any]]

    @property
    def output(self) -> str:
        return (self.proc.stdout + self.proc.stderr)[-6000:]

    def outcome(self, fragment: str) -> dict[str, Any]:
        tests = [r for r in self.records if r.get("kind") == "test" and fragment in r["nodeid"]]
        (call,) = [t for t in tests if t["phase"] == "call"]
        return call


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("broken")
    entry = {
        "id": "cpu-arith-wrong-template",
        "source": "self-test: a deliberately broken deployment",
        "model": {"family": "tiny", "precision": "bf16", "generate": "trained-arith",
                  "served_model_name": "trained-arith"},
        "hardware": {"gpu": "cpu"},
        "serve": {"max_model_len": 2048, "max_num_seqs": 8,
                  "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                  "extra_args": ["--chat-template", CHATML]},
        "expect": {
            "known_issues": KNOWN_ISSUES,
            "accuracy": [_expect(api, against) for api in ("completions", "chat-completions")
                         for against in ("reference", "reported")],
        },
    }  # fmt: skip
    matrix = tmp / "broken.yaml"
    matrix.write_text(yaml.safe_dump({"deployments": [entry]}))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "src/vllm_conformance/suites/test_accuracy.py",
         "src/vllm_conformance/suites/test_robustness.py", "-k", f"accuracy or {FUZZ}",
         "-q", "-p", "no:cacheprovider", "--matrix", str(matrix), "--reports-dir", str(tmp),
         "--run-id", "broken"],
        cwd=ROOT, capture_output=True, text=True, timeout=1400,
    )  # fmt: skip
    return Run(proc, report.load_records(tmp / "broken"))


def test_wrong_chat_template_fails_the_chat_task(broken: Run) -> None:
    assert broken.proc.returncode == 1, broken.output
    assert "accuracy below expectation" in broken.proc.stdout, broken.output
    checks = [r for r in broken.records if r.get("kind") == "check" and "accuracy" in r["check"]]
    verdicts = {(c["lm_eval"]["api"], c["expected"]["against"]): c for c in checks}
    plain, chat = "local-completions", "local-chat-completions"
    assert set(verdicts) == {(a, b) for a in (plain, chat) for b in ("reference", "reported")}
    for against in ("reference", "reported"):
        assert verdicts[plain, against]["verdict"] == "pass", verdicts[plain, against]["rule"]
        bad = verdicts[chat, against]
        assert bad["verdict"] == "fail", bad["rule"]
        # Not a near miss: the model cannot read a layout it was never trained on.
        assert bad["measured"]["value"] < bad["expected"]["value"] / 2, bad["rule"]
        # every verdict says how much it could see
        assert bad["measured"]["n"] == 150 and bad["power"]["minimal_detectable_drop"] < 0.15
    assert verdicts[chat, "reference"]["expected"]["value"] > 0.5


def test_only_the_listed_findings_are_expected(broken: Run) -> None:
    unlisted = broken.outcome("completions-plain-out_of_range")
    assert unlisted["outcome"] == "failed", unlisted
    (finding,) = [r for r in broken.records if r.get("check", "").endswith(
        "completions.plain.out_of_range.AcceptedInvalid")]  # fmt: skip
    assert "best_of" in finding["problem"], finding
    stale = broken.outcome("completions-plain-missing_field")
    assert stale["outcome"] == "failed" and "no longer show" in stale["message"], stale
    listed = broken.outcome("completions-plain-lone_surrogate")
    assert listed["outcome"] == "xfailed", listed
    known = [r for r in broken.records if r.get("kind") == "check" and ".known." in r["check"]]
    assert {k["known_issue"]["reason"] for k in known} >= {
        "logit_bias 101 accepted",
        "lone surrogate in stop",
    }
