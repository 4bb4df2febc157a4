"""Run records on disk: each process appends JSON lines to its own ``records/<worker>.jsonl``
and syncs every line, so a run killed half-way keeps everything measured until then.

Record kinds: ``run`` (environment), ``server`` (one per start, plus one at a bad teardown),
``check`` (see docs/CONVENTIONS.md) and ``test`` (one per pytest phase report).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        return {k: jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class RecordWriter:
    """Appends records for one process; every line is flushed and synced."""

    path: Path

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"kind": kind, "time": time.time(), **jsonable(fields)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record


@dataclass(frozen=True)
class RecordSet:
    """The records of one run directory and what could not be read of them."""

    records: list[dict[str, Any]]
    files: int
    torn_lines: int


def read_records(run_dir: Path) -> RecordSet:
    """Every record of a run, oldest first, counting lines that are not JSON.

    A process killed while writing leaves a torn last line; it is skipped, not fatal.
    """
    records: list[dict[str, Any]] = []
    torn = 0
    paths = sorted((Path(run_dir) / "records").glob("*.jsonl"))
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(record, dict) and "kind" in record:
                records.append(record)
            else:
                torn += 1
    records.sort(key=lambda r: r.get("time", 0))
    return RecordSet(records, len(paths), torn)


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run, oldest first; a torn last line (a killed run) is ignored."""
    return read_records(run_dir).records
