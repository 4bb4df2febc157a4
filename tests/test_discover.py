"""Capacity discovery end to end on the real Llama 4 hybrid KV layout, and write-back.

The entry serves the tiny Llama 4 as it is (chunked local layers of 8,192 tokens plus a
global NoPE layer) with 30 MiB of KV memory: vLLM's one-request capacity is then about
30K tokens, far above what its "KV cache size" line says at the entry's own 4,096 (that
figure divides the blocks by what a 4,096-token request needs in every layer). The margin
of 1.05 puts the verifying start above vLLM's estimate on purpose, so the search after a
failed start runs too: probe (fails, logs the estimate), verify (fails), verify at the
estimate (starts, and a request of that length is served). Three starts, two of them
refused within seconds of loading the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_conformance.launch import logparse
from vllm_conformance.launch.discover import (
    Attempt,
    DiscoveryError,
    _next_length,
    derived_length,
    write_back,
)
from vllm_conformance.matrix import BUNDLED, load, load_file

ROOT = Path(__file__).resolve().parent.parent
KV_BYTES = 30 * 2**20

HYBRID = f"""\
# comment kept
deployments:
  - id: cpu-discover
    source: self-test
    model: {{family: tiny, precision: bf16, generate: tiny-llama4, served_model_name: tiny-llama4,
            options: {{max_position_embeddings: 65536}}}}
    hardware: {{gpu: cpu}}
    # No torch.compile: a start that vLLM refuses for KV memory ends right after loading.
    serve: {{max_model_len: 4096, max_num_seqs: 2, compilation_config: {{mode: 0}},
            extra_args: ["--kv-cache-memory-bytes", "{KV_BYTES}"]}}   # flow style, kept
    expect:
      context: {{source: self-test}}
"""


@pytest.mark.timeout(1500)
def test_discovery_uses_vllms_estimate_and_searches(tmp_path: Path) -> None:
    matrix = tmp_path / "m.yaml"
    matrix.write_text(HYBRID)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_conformance.cli",
            "discover",
            "cpu-discover",
            "--matrix",
            str(matrix),
            "--out",
            str(tmp_path / "cap"),
            "--margin",
            "1.05",
            "--write-back",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    row = json.loads((tmp_path / "cap" / "capacity.json").read_text())[0]
    probe, over, verified = row["attempts"]
    log = (tmp_path / "cap" / "cpu-discover" / "start-1-65536.log").read_text().splitlines()
    estimated = logparse.estimated_max_model_len(log)
    assert estimated is not None, "the probe at the position limit logged no estimate"
    # Hybrid regime: longer than one chunk plus one batch, so local layers hold less.
    assert 8192 + 2048 < estimated < 60_000
    assert (probe["max_model_len"], probe["outcome"]) == (65536, "kv_cache")
    assert row["estimated_max_model_len"] == estimated
    assert over["max_model_len"] == derived_length(estimated, 1.05, 1000)
    assert over["outcome"] == "kv_cache"
    assert verified["outcome"] == "verified"
    assert row["verified_max_model_len"] == verified["max_model_len"] == estimated // 1000 * 1000
    assert f"{row['verified_max_model_len']:,}" in (tmp_path / "cap" / "capacity.md").read_text()
    written = matrix.read_text()
    assert written == HYBRID.replace(
        "max_model_len: 4096", f"max_model_len: {estimated // 1000 * 1000}"
    )
    assert load_file(matrix)[0].serve.max_model_len == row["verified_max_model_len"]


def test_derived_length_rounds_down() -> None:
    assert derived_length(538_512, 0.93, 10_000) == 500_000
    assert derived_length(65_536, 0.93, 1000) == 60_000


@pytest.mark.parametrize(
    ("failed", "expected"),
    [
        (Attempt(32_000, "kv_cache", estimated_max_model_len=30_592), 30_000),
        (Attempt(32_000, "oom"), 16_000),
        (Attempt(32_000, "kv_cache", estimated_max_model_len=40_000), 16_000),
        (Attempt(1_000, "oom"), None),
    ],
)
def test_next_length_after_a_failed_start(failed: Attempt, expected: int | None) -> None:
    assert _next_length(failed, 1000) == expected


def deployments(text: str) -> dict[str, Any]:
    return {e["id"]: e for e in yaml.safe_load(text)["deployments"]}


ENTRY = "model: {family: tiny, precision: bf16, generate: tiny-llama4}\n    hardware: {gpu: cpu}"
STYLES = {
    "block": f"""deployments:
  - id: a
    {ENTRY}
    serve:
      max_model_len: 4096   # comment kept
      max_num_seqs: 2
    source: x
""",
    "flow-serve": f"""deployments:
  - id: a
    {ENTRY}
    serve: {{max_num_seqs: 2, max_model_len: "4K"}}
    source: x
""",
    "flow-entry": """deployments:
  - {id: z, source: y, serve: {max_model_len: 1}}
  - {id: a, source: x, serve: {max_model_len: 4096, max_num_seqs: 2}}
""",
    "id-not-first": f"""deployments:
  - source: x
    {ENTRY}
    serve:
      max_num_seqs: 2
      max_model_len: 4096
    id: a
""",
    "inherited-block": """deployments:
  - id: a
    extends: cpu
    serve:
      max_num_seqs: 2
    source: x
""",
    "inherited-flow": """deployments:
  - id: a
    extends: cpu
    serve: {max_num_seqs: 2}
    source: x
""",
    "no-serve": """deployments:
  - id: a
    extends: cpu
    source: x
  - id: b
    extends: cpu
""",
}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_write_back_any_style(style: str, tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(STYLES[style])
    before = deployments(STYLES[style])
    write_back(path, "a", 123_000)
    after = deployments(path.read_text())
    assert after["a"]["serve"]["max_model_len"] == 123_000
    after["a"]["serve"].pop("max_model_len")
    before["a"].setdefault("serve", {}).pop("max_model_len", None)
    assert after == before, "write-back changed more than max_model_len"
    if "comment kept" in STYLES[style]:
        assert "# comment kept" in path.read_text()


def test_write_back_on_the_bundled_matrix(tmp_path: Path) -> None:
    """Flow-style (h100-tiny-bf16) and block-style (cpu) entries of the seed file."""
    path = tmp_path / "tiny.yaml"
    original = (BUNDLED / "tiny.yaml").read_text()
    path.write_text(original)
    write_back(path, "h100-tiny-bf16", 3_000_000)
    write_back(path, "cpu", 30_000)
    new = {e.id: e for e in load([path], bundled=False).entries}
    old = {e.id: e for e in load([BUNDLED / "tiny.yaml"], bundled=False).entries}
    assert new["h100-tiny-bf16"].serve.max_model_len == 3_000_000
    assert new["cpu"].serve.max_model_len == 30_000
    # Paths in the file (a performance baseline) resolve against its folder: not compared.
    paths = {"expect": {"performance": {"baseline"}}}
    changed = {
        i for i in old if old[i].model_dump(exclude=paths) != new[i].model_dump(exclude=paths)
    }
    assert changed == {"h100-tiny-bf16", "cpu"}
    assert len(path.read_text().splitlines()) == len(original.splitlines())


def test_write_back_refuses_a_shared_anchor(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "deployments:\n"
        "  - {id: a, source: x, serve: &s {max_model_len: 4096}}\n"
        "  - {id: b, source: x, serve: *s}\n"
    )
    with pytest.raises(DiscoveryError, match="through a YAML anchor"):
        write_back(path, "a", 1000)


def test_write_back_names_a_missing_entry(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(STYLES["block"])
    with pytest.raises(DiscoveryError, match="no entry 'other'"):
        write_back(path, "other", 1000)
