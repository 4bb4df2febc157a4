"""Capacity discovery: the largest ``--max-model-len`` an entry starts and serves with.

Automates what Fixstars did by hand, with vLLM's own arithmetic instead of the logged
"KV cache size": for hybrid layouts (Llama 4's chunked local plus global layers) that figure
moves with ``--max-model-len`` and understates what one request can use. Instead:

1. **Probe** at the model's position limit (``max_position_embeddings``; the entry's own
   value when the model's config is not at hand). Where the KV memory cannot hold it, vLLM
   refuses to start and says "the estimated maximum model length is N", found by binary
   search over its own per-request KV accounting. Where it can, the position limit is the
   capacity. A probe that fails for another reason (weights do not fit) is retried at the
   entry's own value; when that fails too the row is tabulated as Fixstars did, "(OOM)".
2. **Verify** at ``N x margin`` (they used about 93 %), rounded down: start there and send
   a request of exactly that many tokens (``max_model_len - 1`` prompt tokens plus one
   output token, under the deadline derived from the entry).
3. **Search** when the verifying start or request fails: the next length is vLLM's new
   estimate (rounded down), else halfway to the longest length known to work, at most
   ``max_starts`` starts in all.

The result is a table like theirs, as Markdown and JSON, and optionally the verified value
written back into the matrix entry (:func:`write_back`, any YAML style).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

from vllm_conformance.client import calls, prompts
from vllm_conformance.launch import gpus, logparse, serving
from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.launch.local import ServerStartError
from vllm_conformance.matrix import (
    Deployment,
    MatrixError,
    load,
    matrix_files,
)
from vllm_conformance.perf import estimate


class DiscoveryError(RuntimeError):
    """Capacity discovery could not finish; the message says at which step and why."""


@dataclass(frozen=True)
class Attempt:
    """One server start at one ``max_model_len`` and what it showed."""

    max_model_len: int
    #: ``verified``, ``request failed``, or the start's failure kind (``kv_cache``, ``oom`` ...)
    outcome: str
    kv_cache_tokens: int | None = None
    estimated_max_model_len: int | None = None
    vllm: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Capacity:
    """One row of the capacity table."""

    entry: str
    model: str
    gpus: str
    precision: str
    kv_cache_dtype: str
    #: ``verified``, or why nothing was: ``oom``, ``kv_cache``, ``other`` ...
    status: str
    margin: float
    basis: str
    verified_max_model_len: int | None
    #: "KV cache size" logged by the verified start
    kv_cache_tokens: int | None
    #: vLLM's "estimated maximum model length" from the probe
    estimated_max_model_len: int | None
    probe_max_model_len: int
    vllm: str | None
    attempts: list[Attempt] = field(default_factory=list)


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


class _Starts:
    """Starts servers of one entry at chosen lengths, counting and recording each."""

    def __init__(self, entry: Deployment, out_dir: Path, startup_timeout: float | None) -> None:
        self.entry = entry
        self.out_dir = out_dir / entry.id
        self.launcher = serving.LocalLauncher(gpus.detect(), startup_timeout)
        if why := self.launcher.unavailable(entry):
            raise DiscoveryError(f"{entry.id}: {why}")
        self.attempts: list[Attempt] = []

    def at(self, length: int) -> Attempt:
        """Start at ``length``; when it starts, confirm with a request of that length."""
        entry = _with_max_model_len(self.entry, length)
        log = self.out_dir / f"start-{len(self.attempts) + 1}-{length}.log"
        server = self.launcher.server(entry, log)
        try:
            server.start()
        except ServerStartError as exc:
            lines = log.read_text(errors="replace").splitlines()
            reason = exc.reason
            attempt = Attempt(
                length,
                reason.kind if reason else "other",
                estimated_max_model_len=logparse.estimated_max_model_len(lines),
                detail=(reason.line if reason else str(exc).splitlines()[0])[:500],
            )
        else:
            try:
                attempt = self._confirm(entry, server.endpoint, server.kv_cache)
            finally:
                server.stop()
        self.attempts.append(attempt)
        return attempt

    def _confirm(self, entry: Deployment, ep: Endpoint, kv: logparse.KvCacheInfo | None) -> Attempt:
        from transformers import AutoTokenizer

        length = ep.max_model_len
        tokenizer = AutoTokenizer.from_pretrained(serving.tokenizer_path(entry))
        body = {
            "model": ep.model,
            "prompt": prompts.token_ids(tokenizer, length - 1),
            "max_tokens": 1,
            "temperature": 0,
        }
        bound = estimate.request_deadline_seconds(entry, length - 1, 1) or ep.request_timeout
        tokens = kv.tokens if kv else None
        try:
            with ep.http(timeout=bound) as http:
                outcome = calls.post(http, "/v1/completions", body)
        except httpx.TimeoutException:
            return Attempt(
                length,
                "request failed",
                tokens,
                vllm=ep.version,
                detail=f"no answer in {bound:.0f} s",
            )
        if not outcome.ok or outcome.prompt_tokens != length - 1:
            detail = f"HTTP {outcome.status} {outcome.body_excerpt}"[:500]
            return Attempt(length, "request failed", tokens, vllm=ep.version, detail=detail)
        return Attempt(length, "verified", tokens, vllm=ep.version)


def _next_length(failed: Attempt, round_to: int) -> int | None:
    """After a failure at ``failed.max_model_len``: vLLM's new estimate, else halfway down
    (nothing shorter is known to work), rounded down; None when nothing is left to try."""
    high = failed.max_model_len
    guess = (failed.estimated_max_model_len or 0) // round_to * round_to
    if 0 < guess < high:
        return guess
    half = high // 2 // round_to * round_to
    return half if 0 < half < high else None


def discover(
    entry: Deployment,
    out_dir: Path,
    margin: float = 0.93,
    round_to: int = 1000,
    startup_timeout: float | None = None,
    max_starts: int = 6,
) -> Capacity:
    """Probe, verify, search; return the row (verified or not)."""
    starts = _Starts(entry, out_dir, startup_timeout)
    own = entry.serve.max_model_len
    probe = estimate.position_limit(entry) or own
    first = starts.at(probe)
    estimated = first.estimated_max_model_len
    target: int | None
    if first.outcome == "verified":
        target, basis = None, f"started at {probe:,}, the model's position limit"
    elif first.outcome == "kv_cache" and estimated:
        target = derived_length(estimated, margin, round_to)
        basis = f"vLLM's estimate after a start at {probe:,} failed"
    else:
        second = first if probe == own else starts.at(own)
        if second.outcome != "verified" or second.kv_cache_tokens is None:
            return _row(entry, second.outcome, margin, "no start", None, probe, starts.attempts)
        # A started server only logs "KV cache size", which understates hybrid layouts.
        target = derived_length(second.kv_cache_tokens, margin, round_to)
        basis = f"'KV cache size' logged at {own:,} (a lower bound for hybrid layouts)"
    while target is not None and len(starts.attempts) < max_starts:
        attempt = starts.at(target)
        if attempt.outcome == "verified":
            break
        target = _next_length(attempt, round_to)
    verified = next((a for a in reversed(starts.attempts) if a.outcome == "verified"), None)
    status = "verified" if verified else starts.attempts[-1].outcome
    return _row(entry, status, margin, basis, verified, probe, starts.attempts)


def _row(
    entry: Deployment,
    status: str,
    margin: float,
    basis: str,
    verified: Attempt | None,
    probe: int,
    attempts: list[Attempt],
) -> Capacity:
    hw = entry.hardware
    return Capacity(
        entry=entry.id,
        model=entry.model.path or entry.model.generate or entry.id,
        gpus="cpu" if hw.gpu == "cpu" else f"{hw.count} x {hw.gpu}",
        precision=entry.model.precision,
        kv_cache_dtype=entry.serve.kv_cache_dtype or "auto",
        status=status,
        margin=margin,
        basis=basis,
        verified_max_model_len=verified.max_model_len if verified else None,
        kv_cache_tokens=verified.kv_cache_tokens if verified else None,
        estimated_max_model_len=next(
            (a.estimated_max_model_len for a in attempts if a.estimated_max_model_len), None
        ),
        probe_max_model_len=probe,
        vllm=next((a.vllm for a in attempts if a.vllm), None),
        attempts=attempts,
    )


def _num(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def markdown_table(rows: list[Capacity]) -> str:
    """Fixstars' table (model, GPUs, precision, KV dtype, KV tokens, verified context), with
    vLLM's estimate and the starts it took; rows that never started show the reason."""
    out = [
        "| entry | model | GPUs | precision | KV cache dtype | KV cache tokens | "
        "vLLM estimate | verified max_model_len | starts | vLLM |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        verified = _num(r.verified_max_model_len) or f"({r.status.upper()})"
        out.append(
            f"| {r.entry} | {r.model} | {r.gpus} | {r.precision} | {r.kv_cache_dtype} | "
            f"{_num(r.kv_cache_tokens)} | {_num(r.estimated_max_model_len)} | {verified} | "
            f"{len(r.attempts)} | {r.vllm or ''} |"
        )
    return "\n".join(out) + "\n"


def write_tables(rows: list[Capacity], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "capacity.md", out_dir / "capacity.json"
    md.write_text(markdown_table(rows))
    js.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return md, js


# -- write-back -------------------------------------------------------------------------


def _value(mapping: yaml.Node, key: str) -> yaml.Node | None:
    if not isinstance(mapping, yaml.MappingNode):
        return None
    return next((v for k, v in mapping.value if getattr(k, "value", None) == key), None)


def _nodes(node: yaml.Node) -> Iterator[yaml.Node]:
    yield node
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield from _nodes(k)
            yield from _nodes(v)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _nodes(item)


def _insert(text: str, mapping: yaml.MappingNode, line: str) -> str:
    """``text`` with ``line`` (``key: value``) added as the last key of ``mapping``."""
    if mapping.flow_style:
        close = text.rindex("}", 0, mapping.end_mark.index)
        before = text[mapping.start_mark.index + 1 : close].strip()
        return f"{text[:close]}{', ' if before else ''}{line}{text[close:]}"
    column = mapping.value[0][0].start_mark.column
    end = mapping.value[-1][1].end_mark
    at = end.index if end.column == 0 else text.find("\n", end.index) + 1 or len(text)
    prefix = "" if at == 0 or text[at - 1] == "\n" else "\n"
    return f"{text[:at]}{prefix}{' ' * column}{line}\n{text[at:]}"


def write_back(matrix_file: Path, entry_id: str, max_model_len: int) -> None:
    """Set ``serve.max_model_len`` of one entry in place, any YAML style, nothing else changed.

    The value is found by its position in the parsed document (block or flow style, quoted
    or not); an entry without one of its own (from ``extends``) gets the key added to its
    ``serve``. A value shared with other entries through a YAML anchor is not edited.
    """
    text = matrix_file.read_text()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise DiscoveryError(f"{matrix_file}: not valid YAML: {exc}") from None
    entries = _value(root, "deployments") if root is not None else None
    items = entries.value if isinstance(entries, yaml.SequenceNode) else []
    entry = next((e for e in items if getattr(_value(e, "id"), "value", None) == entry_id), None)
    if entry is None:
        raise DiscoveryError(f"{matrix_file}: no entry '{entry_id}'")
    serve = _value(entry, "serve")
    node = _value(serve, "max_model_len") if serve is not None else None
    target = node or serve
    others = [n for e in items if e is not entry for n in _nodes(e)]
    if target is not None and any(n is target for n in others):
        raise DiscoveryError(
            f"{matrix_file}: entry '{entry_id}' shares its serve.max_model_len with other "
            "entries through a YAML anchor; edit it by hand"
        )
    if serve is None:
        assert isinstance(entry, yaml.MappingNode)
        text = _insert(text, entry, f"serve: {{max_model_len: {max_model_len}}}")
    elif node is None:
        if not isinstance(serve, yaml.MappingNode):
            raise DiscoveryError(f"{matrix_file}: entry '{entry_id}': 'serve' is not a mapping")
        text = _insert(text, serve, f"max_model_len: {max_model_len}")
    else:
        text = f"{text[: node.start_mark.index]}{max_model_len}{text[node.end_mark.index :]}"
    matrix_file.write_text(text)


# -- command line -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vllm-conformance discover``."""
    parser.add_argument("entries", nargs="+", metavar="ENTRY", help="matrix entry ids")
    parser.add_argument("--matrix", type=Path, action="append", help="matrix file or dir")
    parser.add_argument(
        "--margin",
        type=float,
        default=0.93,
        help="fraction of vLLM's estimated capacity to verify (Fixstars: ~0.93)",
    )
    parser.add_argument(
        "--round-to",
        type=int,
        default=1000,
        help="round the derived max_model_len down to a multiple of this",
    )
    parser.add_argument(
        "--max-starts", type=int, default=6, help="server starts per entry, probe included"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("reports/capacity"),
        help="directory for capacity.md, capacity.json and server logs",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        help="seconds (default: 3 x the entry's planned start from its model size, >= 900)",
    )
    parser.add_argument(
        "--write-back",
        action="store_true",
        help="write the verified max_model_len into the matrix entry",
    )


def run(args: argparse.Namespace) -> int:
    """Discover every named entry; print the table; exit 1 if an entry that should start
    found no verified length."""
    try:
        matrix = load(args.matrix or [])
        chosen = matrix.select(args.entries)
    except MatrixError as exc:
        print(f"discover: {exc}", file=sys.stderr)
        return 2
    user_files = set(matrix_files(args.matrix or []))
    if args.write_back and (
        bundled := [e.id for e in chosen if matrix.files[e.id] not in user_files]
    ):
        print(
            f"discover: --write-back changes only your matrix files; {bundled} are bundled: "
            "extend them in a file of yours (extends: ID) and discover that entry",
            file=sys.stderr,
        )
        return 2
    rows, failed = [], []
    for entry in chosen:
        entry_id = entry.id
        try:
            row = discover(
                entry, args.out, args.margin, args.round_to, args.startup_timeout, args.max_starts
            )
        except DiscoveryError as exc:
            print(f"discover: {exc}", file=sys.stderr)
            failed.append(entry_id)
            continue
        rows.append(row)
        if row.verified_max_model_len is None:
            tried = ", ".join(f"{a.max_model_len:,}: {a.outcome}" for a in row.attempts)
            print(f"discover: {entry_id}: no length verified ({tried})", file=sys.stderr)
            if not entry.startup_fails:
                failed.append(entry_id)
        elif args.write_back:
            write_back(matrix.files[entry_id], entry_id, row.verified_max_model_len)
    md, js = write_tables(rows, args.out)
    print(markdown_table(rows), end="")
    print(f"written: {md} {js}")
    return 1 if failed else 0
