"""Capacity discovery end to end on a CPU entry, with the KV space set by VLLM_CPU_KVCACHE_SPACE.

The entry's model has only global attention layers, so "KV cache size" counts real token
slots (with chunked layers vLLM's hybrid manager reports a figure that moves with
--max-model-len), and wide KV heads (4 layers x 8 x 128, 16 KiB per token), so 1 GiB of CPU
KV space holds about 65K tokens and the confirming full-length request stays short.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vllm_conformance.launch.discover import derived_length, write_back
from vllm_conformance.matrix import load_file

ROOT = Path(__file__).resolve().parent.parent

ENTRY = {
    "id": "cpu-discover",
    "source": "self-test",
    "model": {
        "family": "tiny",
        "precision": "bf16",
        "generate": "tiny-llama4",
        "served_model_name": "tiny-llama4",
        "options": {
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "no_rope_layer_interval": 1,
            "max_position_embeddings": 131072,
        },
    },
    "hardware": {"gpu": "cpu"},
    "serve": {"max_model_len": 4096, "max_num_seqs": 2, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
    "expect": {"context": {"source": "self-test"}},
}


@pytest.mark.timeout(1200)
def test_discovery_verifies_and_writes_back(tmp_path: Path) -> None:
    matrix = tmp_path / "m.yaml"
    matrix.write_text(
        "# comment kept\n" + yaml.safe_dump({"deployments": [ENTRY]}, sort_keys=False)
    )
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
            "--write-back",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "cap" / "capacity.json").exists(), out.stdout + out.stderr
    row = json.loads((tmp_path / "cap" / "capacity.json").read_text())[0]
    assert row["kv_cache_tokens"] > ENTRY["serve"]["max_model_len"]
    assert row["verified_max_model_len"] == derived_length(row["kv_cache_tokens"], 0.93, 1000)
    assert f"{row['verified_max_model_len']:,}" in (tmp_path / "cap" / "capacity.md").read_text()
    written = load_file(matrix)[0]
    assert written.serve.max_model_len == row["verified_max_model_len"]
    assert matrix.read_text().startswith("# comment kept\n")


def test_derived_length_rounds_down() -> None:
    assert derived_length(538_512, 0.93, 10_000) == 500_000
    assert derived_length(65_536, 0.93, 1000) == 60_000


def test_write_back_names_a_missing_entry(tmp_path: Path) -> None:
    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump({"deployments": [ENTRY]}, sort_keys=False))
    from vllm_conformance.launch.discover import DiscoveryError

    with pytest.raises(DiscoveryError, match="no entry 'other'"):
        write_back(matrix, "other", 1000)
