"""The accuracy suite catches a broken deployment of the trained tiny model.

The deployment serves the right weights with the wrong chat template (ChatML instead of the
model's Llama 4 layout, as when ``--chat-template`` points at another model's file). The
suite runs in a subprocess, as an operator would run it, and must fail the chat task while
the plain-completions task, which never sees the template, still matches the reference.
"""

from __future__ import annotations

import subprocess
import sys
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

pytestmark = pytest.mark.timeout(1500)


def _expect(api: str) -> dict[str, Any]:
    return {
        "task": "gsm8k",
        "metric": "exact_match,flexible-extract",
        "against": "reference",
        "api": api,
        "apply_chat_template": api == "chat-completions",
        "num_fewshot": 0,
        "data": "fixture",
        "source": "self-test",
    }


def test_wrong_chat_template_fails_the_chat_task(tmp_path: Path) -> None:
    entry = {
        "id": "cpu-arith-wrong-template",
        "source": "self-test: a deliberately broken deployment",
        "model": {"family": "tiny", "precision": "bf16", "generate": "trained-arith",
                  "served_model_name": "trained-arith"},
        "hardware": {"gpu": "cpu"},
        "serve": {"max_model_len": 2048, "max_num_seqs": 8,
                  "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                  "extra_args": ["--chat-template", CHATML]},
        "expect": {"accuracy": [_expect("completions"), _expect("chat-completions")]},
    }  # fmt: skip
    matrix = tmp_path / "broken.yaml"
    matrix.write_text(yaml.safe_dump({"deployments": [entry]}))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "src/vllm_conformance/suites/test_accuracy.py", "-q", "-p",
         "no:cacheprovider", "--matrix", str(matrix), "--reports-dir", str(tmp_path),
         "--run-id", "broken"],
        cwd=ROOT, capture_output=True, text=True, timeout=1400,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "accuracy below expectation" in out, out[-4000:]
    checks = [r for r in report.load_records(tmp_path / "broken") if r.get("kind") == "check"]
    verdicts = {c["lm_eval"]["api"]: c for c in checks}
    assert set(verdicts) == {"local-completions", "local-chat-completions"}, verdicts
    plain, chat = verdicts["local-completions"], verdicts["local-chat-completions"]
    assert plain["verdict"] == "pass", plain["rule"]
    assert chat["verdict"] == "fail", chat["rule"]
    # Not a near miss: the model cannot read a layout it was never trained on.
    assert chat["expected"]["value"] > 0.5
    assert chat["measured"]["value"] < chat["expected"]["value"] / 2, chat["rule"]
