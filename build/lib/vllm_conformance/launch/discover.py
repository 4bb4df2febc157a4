"""Capacity discovery: the largest ``--max-model-len`` an entry starts and serves with.

Automates what Fixstars did by hand: start once and read "KV cache size: N tokens" from
the log; start again at ``N x margin`` (they used about 93 %), rounded down; confirm with a
request of exactly that many tokens (``max_model_len - 1`` prompt tokens plus one output
token). The result is a table like theirs, as Markdown and JSON, and optionally the
verified value written back into the matrix entry.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_conformance.client import calls, prompts
from vllm_conformance.launch import gpus, serving
from vllm_conformance.launch.local import ServerStartError, VllmServer
from vllm_conformance.matrix import (
    Deployment,
    MatrixError,
    load_file,
    load_matrix,
    matrix_files,
)


class DiscoveryError(RuntimeError):
    """Capacity discovery could not finish; the message says at which step and why."""


@dataclass(frozen=True)
class Capacity:
    """One row of the capacity table."""

    entry: str
    model: str
    gpus: str
    precision: str
    kv_cache_dtype: str
    kv_cache_tokens: int
    margin: float
    verified_max_model_len: int
    probe_max_model_len: int
    vllm: str | None


def derived_length(kv_tokens: int, margin: float, round_to: int) -> int:
    """``kv_tokens x margin``, rounded down to a multiple of ``round_to``."""
    value = int(kv_tokens * margin) // round_to * round_to
    if value <= 0:
        raise DiscoveryError(f"{kv_tokens} KV tokens x {margin} rounds down to nothing")
    return value


def _with_max_model_len(entry: Deployment, value: int) -> Deployment:
    return entry.model_copy(
        update={"serve": entry.serve.model_copy(update={"max_model_len": value})}
    )


def _start(entry: Deployment, log_path: Path, startup_timeout: float) -> VllmServer:
    launcher = serving.LocalLauncher(gpus.detect(), startup_timeout)
    if why := launcher.unavailable(entry):
        raise DiscoveryError(f"{entry.id}: {why}")
    server = launcher.server(entry, log_path)
    try:
        server.start()
    except ServerStartError as exc:
        raise DiscoveryError(
            f"{entry.id}: no start at max_model_len {entry.serve.max_model_len}: {exc}"
        ) from None
    return server


def discover(
    entry: Deployment,
    out_dir: Path,
    margin: float = 0.93,
    round_to: int = 1000,
    startup_timeout: float = 900.0,
) -> Capacity:
    """Run the two starts and the confirming request; return the verified capacity."""
    from transformers import AutoTokenizer

    server = _start(entry, out_dir / entry.id / "probe.log", startup_timeout)
    try:
        kv = server.kv_cache
    finally:
        server.stop()
    if kv is None:
        raise DiscoveryError(f"{entry.id}: vLLM printed no 'KV cache size' line at startup")
    target = derived_length(kv.tokens, margin, round_to)
    verify = _with_max_model_len(entry, target)
    server = _start(verify, out_dir / entry.id / "verify.log", startup_timeout)
    try:
        ep = server.endpoint
        tokenizer = AutoTokenizer.from_pretrained(serving.tokenizer_path(entry))
        ids = prompts.token_ids(tokenizer, ep.max_model_len - 1, seed=0)
        body = {"model": ep.model, "prompt": ids, "max_tokens": 1, "temperature": 0}
        with ep.http() as http:
            outcome = calls.post(http, "/v1/completions", body)
    finally:
        server.stop()
    if not outcome.ok or outcome.prompt_tokens != target - 1:
        raise DiscoveryError(
            f"{entry.id}: started at max_model_len {target} but a {target - 1}-token request "
            f"failed: HTTP {outcome.status} {outcome.body_excerpt}"
        )
    hw = entry.hardware
    return Capacity(
        entry=entry.id,
        model=entry.model.path or entry.model.generate or entry.id,
        gpus="cpu" if hw.gpu == "cpu" else f"{hw.count} x {hw.gpu}",
        precision=entry.model.precision,
        kv_cache_dtype=entry.serve.kv_cache_dtype or "auto",
        kv_cache_tokens=kv.tokens,
        margin=margin,
        verified_max_model_len=target,
        probe_max_model_len=entry.serve.max_model_len,
        vllm=ep.version,
    )


def markdown_table(rows: list[Capacity]) -> str:
    """Fixstars' table: model, GPUs, precision, KV dtype, KV tokens, verified context."""
    out = [
        "| entry | model | GPUs | precision | KV cache dtype | KV cache tokens | "
        "verified max_model_len | vLLM |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    out += [
        f"| {r.entry} | {r.model} | {r.gpus} | {r.precision} | {r.kv_cache_dtype} | "
        f"{r.kv_cache_tokens:,} | {r.verified_max_model_len:,} | {r.vllm} |"
        for r in rows
    ]
    return "\n".join(out) + "\n"


def write_tables(rows: list[Capacity], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "capacity.md", out_dir / "capacity.json"
    md.write_text(markdown_table(rows))
    js.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return md, js


def write_back(matrix_file: Path, entry_id: str, max_model_len: int) -> None:
    """Set ``serve.max_model_len`` of one entry in place, keeping comments and layout."""
    lines = matrix_file.read_text().splitlines(keepends=True)
    start = next(
        (
            i
            for i, line in enumerate(lines)
            if re.match(rf"\s*- id: {re.escape(entry_id)}\s*$", line)
        ),
        None,
    )
    if start is None:
        raise DiscoveryError(f"{matrix_file}: no entry '{entry_id}'")
    for i in range(start + 1, len(lines)):
        if re.match(r"\s*- id: ", lines[i]):
            break
        if m := re.match(r"(\s*max_model_len:\s*)\S+(.*)$", lines[i], re.S):
            lines[i] = f"{m.group(1)}{max_model_len}{m.group(2)}"
            matrix_file.write_text("".join(lines))
            return
    raise DiscoveryError(f"{matrix_file}: entry '{entry_id}' has no max_model_len line")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vllm-conformance discover``."""
    parser.add_argument("entries", nargs="+", metavar="ENTRY", help="matrix entry ids")
    parser.add_argument("--matrix", type=Path, action="append", help="matrix file or dir")
    parser.add_argument(
        "--margin",
        type=float,
        default=0.93,
        help="fraction of the KV capacity to verify (Fixstars: ~0.93)",
    )
    parser.add_argument(
        "--round-to",
        type=int,
        default=1000,
        help="round the derived max_model_len down to a multiple of this",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("reports/capacity"),
        help="directory for capacity.md, capacity.json and server logs",
    )
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument(
        "--write-back",
        action="store_true",
        help="write the verified max_model_len into the matrix entry",
    )


def run(args: argparse.Namespace) -> int:
    """Discover every named entry; print the table; exit 1 if any entry failed."""
    try:
        files = matrix_files(args.matrix or [Path("matrix")])
        where = {e.id: f for f in files for e in load_file(f)}
        entries = {e.id: e for e in load_matrix(files)}
    except MatrixError as exc:
        print(f"discover: invalid hardware matrix:\n{exc}", file=sys.stderr)
        return 2
    rows, failed = [], []
    for entry_id in args.entries:
        if entry_id not in entries:
            print(f"discover: no matrix entry {entry_id!r}", file=sys.stderr)
            return 2
        try:
            row = discover(
                entries[entry_id], args.out, args.margin, args.round_to, args.startup_timeout
            )
        except DiscoveryError as exc:
            print(f"discover: {exc}", file=sys.stderr)
            failed.append(entry_id)
            continue
        rows.append(row)
        if args.write_back:
            write_back(where[entry_id], entry_id, row.verified_max_model_len)
    md, js = write_tables(rows, args.out)
    print(markdown_table(rows), end="")
    print(f"written: {md} {js}")
    return 1 if failed else 0
