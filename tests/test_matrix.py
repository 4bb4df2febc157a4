"""The hardware matrix: every seed deployment loads; every malformed file gets one clear error."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_conformance.matrix import (
    BUNDLED,
    Deployment,
    MatrixError,
    load_file,
    load_matrix,
    parse_token_count,
)

MATRIX = BUNDLED
ROOT = Path(__file__).resolve().parent.parent

# Every deployment of the seed documents, by (model family, GPU, count, precision, context).
SEED_ROWS = {
    # Fixstars' table (H100, max_new_tokens 2048); None = expected startup failure (OOM)
    ("scout", "h100", 4, "bf16", None),
    ("scout", "h100", 4, "fp8", 500_000),
    ("scout", "h100", 8, "bf16", 1_200_000),
    ("scout", "h100", 8, "fp8", 1_500_000),
    ("maverick", "h100", 4, "bf16", None),
    ("maverick", "h100", 4, "fp8", None),
    ("maverick", "h100", 8, "bf16", None),
    ("maverick", "h100", 8, "fp8", 300_000),
    # vLLM blog, 8 GPUs
    ("scout", "h100", 8, "bf16", 1_000_000),
    ("maverick", "h100", 8, "fp8", 430_000),
    ("scout", "h200", 8, "bf16", 3_600_000),
    ("maverick", "h200", 8, "fp8", 1_000_000),
    # NVIDIA recipe
    ("scout", "h200", 1, "fp8", 10_240),
    ("scout", "b200", 1, "fp4", 10_240),
}


def row(d: Deployment) -> tuple[str, str, int, str, int | None]:
    ctx = None if d.startup_fails else d.serve.max_model_len
    return (d.model.family, d.hardware.gpu, d.hardware.count, d.model.precision, ctx)


@pytest.fixture(scope="module")
def deployments() -> list[Deployment]:
    return load_matrix([MATRIX])


def test_every_seed_row_is_in_the_matrix(deployments: list[Deployment]) -> None:
    assert {row(d) for d in deployments} >= SEED_ROWS


def test_fixstars_rows_cap_output_at_2048(deployments: list[Deployment]) -> None:
    fixstars = [d for d in deployments if d.id.startswith("fixstars-")]
    assert len(fixstars) == 8
    assert all(d.serve.max_new_tokens == 2048 for d in fixstars)
    assert sum(d.startup_fails for d in fixstars) == 4


def test_nvidia_recipe_values(deployments: list[Deployment]) -> None:
    by_id = {d.id: d for d in deployments}
    b200 = by_id["nvidia-scout-b200-fp4"]
    argv = b200.serve.argv()
    for flag in (
        "--kv-cache-dtype",
        "--async-scheduling",
        "--no-enable-prefix-caching",
        "--max-num-batched-tokens",
        "--compilation-config",
    ):
        assert flag in argv
    assert {a.value for a in b200.expect.accuracy} == {0.8946, 0.8779}
    perf = b200.expect.performance
    assert perf is not None
    assert (perf.workload.input_len, perf.workload.output_len) == (1024, 1024)
    assert (perf.workload.max_concurrency, perf.workload.num_prompts) == (512, 2560)


def test_every_expectation_has_a_source(deployments: list[Deployment]) -> None:
    for d in deployments:
        assert d.source
        if d.expect.context:
            assert d.expect.context.source
        for acc in d.expect.accuracy:
            assert acc.source
        if d.expect.performance:
            assert all(t.source for t in d.expect.performance.thresholds)


def test_cpu_default_entry(deployments: list[Deployment]) -> None:
    cpu = next(d for d in deployments if d.id == "cpu")
    assert cpu.hardware.gpu == "cpu"
    assert cpu.model.generate == "tiny-llama4"
    assert cpu.serve.max_model_len >= 32768


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("1k", 1000),
        ("1K", 1024),
        ("32768", 32768),
        ("1_000_000", 10**6),
        ("3.6m", 3_600_000),
        ("2M", 2**21),
    ],
)
def test_token_count_suffixes_follow_vllm(text: str, tokens: int) -> None:
    assert parse_token_count(text) == tokens


# --- malformed files -----------------------------------------------------------------------

VALID: dict[str, Any] = {
    "deployments": [
        {
            "id": "good",
            "source": "test",
            "model": {"family": "tiny", "precision": "bf16", "generate": "tiny-llama4"},
            "hardware": {"gpu": "cpu"},
            "serve": {"max_model_len": 4096},
        },
        {
            "id": "second",
            "source": "test",
            "model": {"family": "scout", "precision": "fp8", "path": "org/model"},
            "hardware": {"gpu": "h100", "count": 8},
            "serve": {"max_model_len": 1000, "tensor_parallel_size": 8},
            "expect": {"context": {"source": "test"}},
        },
    ]
}


def write(tmp_path: Path, data: Any, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def mutated(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    change(data["deployments"][1])
    return data


CASES = {
    "unknown key": (lambda e: e["serve"].update(max_model_length=5), "serve.max_model_length"),
    "wrong type": (lambda e: e["serve"].update(max_num_seqs="many"), "serve.max_num_seqs"),
    "missing field": (lambda e: e["serve"].pop("max_model_len"), "serve.max_model_len"),
    "bad gpu kind": (lambda e: e["hardware"].update(gpu="h300"), "hardware.gpu"),
    "output above context": (
        lambda e: e["serve"].update(override_generation_config={"max_new_tokens": 2048}),
        "(entry)",
    ),
    "tp above gpus": (lambda e: e["serve"].update(tensor_parallel_size=16), "(entry)"),
    "no source": (lambda e: e["expect"]["context"].pop("source"), "expect.context.source"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_entry_names_file_entry_and_field(tmp_path: Path, case: str) -> None:
    change, field = CASES[case]
    path = write(tmp_path, mutated(change))
    with pytest.raises(MatrixError) as info:
        load_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "entry 'second'" in message
    assert f"field '{field}'" in message


def test_duplicate_id_across_files(tmp_path: Path) -> None:
    write(tmp_path, VALID, "a.yaml")
    write(tmp_path, VALID, "b.yaml")
    with pytest.raises(MatrixError, match=r"b\.yaml: entry 'good': field 'id': duplicate id"):
        load_matrix([tmp_path])


def test_kv_cache_ratio_names_an_existing_entry(tmp_path: Path) -> None:
    ratio = {"to": "good", "ratio": 2.0, "source": "test"}
    write(tmp_path, mutated(lambda e: e["expect"]["context"].update(kv_cache_ratio=ratio)))
    assert load_matrix([tmp_path])[1].expect.context.kv_cache_ratio.to == "good"  # type: ignore[union-attr]
    ratio["to"] = "gone"
    path = write(tmp_path, mutated(lambda e: e["expect"]["context"].update(kv_cache_ratio=ratio)))
    with pytest.raises(
        MatrixError,
        match=rf"{path}: entry 'second': field 'expect.context.kv_cache_ratio.to': no entry 'gone'",
    ):
        load_matrix([tmp_path])


def _with_threshold(metric: str, num_prompts: int) -> dict[str, Any]:
    perf = {
        "source": "test",
        "workload": {"input_len": 16, "output_len": 8, "num_prompts": num_prompts},
        "thresholds": [{"metric": metric, "max": 100, "source": "test"}],
    }
    return mutated(lambda e: e["expect"].update(performance=perf))


def test_a_threshold_on_no_such_metric_fails_at_load(tmp_path: Path) -> None:
    """A misspelt metric is one clear error at collection, not a failure after the run."""
    assert load_matrix([write(tmp_path, _with_threshold("p95_ttft_ms", 200))])
    path = write(tmp_path, _with_threshold("p99_time_to_first_token_ms", 1000))
    with pytest.raises(MatrixError) as info:
        load_matrix([tmp_path])
    message = str(info.value)
    assert message.startswith(
        f"{path}: entry 'second': field 'expect.performance.thresholds.0.metric': "
        "no metric 'p99_time_to_first_token_ms'"
    )
    assert "output_throughput" in message


def test_a_percentile_gate_needs_enough_requests(tmp_path: Path) -> None:
    assert load_matrix([write(tmp_path, _with_threshold("p99_e2el_ms", 662))])
    write(tmp_path, _with_threshold("p99_e2el_ms", 640))
    with pytest.raises(MatrixError, match=r"p99_e2el_ms needs at least 662 requests.* sends 640"):
        load_matrix([tmp_path])


@pytest.mark.parametrize(
    "text", ["deployments: [", "- just a list", "deployments: []", ""], ids=repr
)
def test_broken_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(MatrixError, match=str(path)):
        load_file(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(MatrixError, match="no such matrix file"):
        load_matrix([tmp_path / "nope.yaml"])


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**7),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    section=st.sampled_from(["model", "hardware", "serve"]),
    key=st.sampled_from(
        [
            "family",
            "precision",
            "gpu",
            "count",
            "max_model_len",
            "tensor_parallel_size",
            "gpu_memory_utilization",
            "env",
            "bogus",
        ]
    ),
    value=_scalars,
)
def test_generated_corruption_is_valid_or_one_clear_error(
    tmp_path_factory: pytest.TempPathFactory, section: str, key: str, value: Any
) -> None:
    """Any single corrupted field either still validates or names file, entry and field."""
    data = mutated(lambda e: e[section].update({key: value}))
    path = write(tmp_path_factory.mktemp("h"), data)
    try:
        load_file(path)
    except MatrixError as exc:
        for line in str(exc).splitlines():
            assert line.startswith(f"{path}: entry 'second': field '")
    else:
        assert key != "bogus"


def test_known_issue_patterns_take_brackets_literally() -> None:
    from vllm_conformance.matrix import KnownIssue

    issue = KnownIssue(test="test_bad_input[*-stream-invalid_utf8]", reason="r", source="s")
    assert issue.matches("test_bad_input[cpu-chat-stream-invalid_utf8]")
    assert not issue.matches("test_bad_input[cpu-chat-plain-invalid_utf8]")
    assert not issue.matches("test_bad_input_x")


def test_known_issues_become_strict_xfails(deployments: list[Deployment]) -> None:
    """The cpu entry's fuzz findings mark exactly the tests they name (at collection)."""
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "src/vllm_conformance/suites/test_robustness.py",
            "--collect-only",
            "-q",
            "--entry",
            "cpu",
            "-m",
            "cpu",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    cpu = next(d for d in deployments if d.id == "cpu")
    names = [line.split("::", 1)[1] for line in out.stdout.splitlines() if "::" in line]
    marked = [n for n in names if any(i.matches(n) for i in cpu.expect.known_issues)]
    assert 0 < len(marked) < len(names)


def test_known_issue_signatures_match_only_their_finding() -> None:
    from vllm_conformance.matrix import KnownIssue

    issue = KnownIssue(test="test_bad_input[*]", status=500, error_type="InternalServerError",
                       message=r"^\s*$|NoneType", reason="r", source="s")  # fmt: skip
    assert issue.has_signature
    assert issue.matches_finding(500, "InternalServerError", "'NoneType' object")
    assert not issue.matches_finding(500, "InternalServerError", "a new server error")
    assert not issue.matches_finding(400, "InternalServerError", "NoneType")
    assert not KnownIssue(test="t", reason="r", source="s").matches_finding(500, None, "")
    with pytest.raises(ValueError, match="not a regular expression"):
        KnownIssue(test="t", message="(", reason="r", source="s")
    with pytest.raises(ValueError, match="matched by the signature"):
        KnownIssue(test="t", replay=[{"api": "chat", "raw": "null"}], reason="r", source="s")
    with pytest.raises(ValueError, match="exactly one of"):
        KnownIssue(test="t", status=500, replay=[{"api": "chat"}], reason="r", source="s")
