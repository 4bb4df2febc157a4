"""Reading the hardware matrix: files, the bundled seed entries, ``extends`` and paths.

- **Bundled entries.** The package ships the seed matrix (``vllm_conformance/data/matrix``).
  Without a matrix of the user's, its entries are the run's entries; with ``--matrix
  FILE|DIR`` the user's entries are, and every bundled entry stays available by id
  (``--entry ID``, ``extends: ID``).
- **extends.** ``extends: ID`` starts an entry from another one (bundled or the user's) and
  overrides keys: mappings merge key by key; anything else, lists included, is replaced.
- **One base for paths.** A path written in a matrix file is relative to the folder of that
  file: ``model.path`` and ``model.tokenizer`` when they start with ``./``, ``../``, ``/`` or
  ``~`` (anything else is a hub id), ``expect.performance.baseline`` and
  ``expect.accuracy[].data`` (except ``fixture`` and ``$VARIABLE``: the value of a variable,
  like every command-line option, is relative to the directory pytest was started in).

Errors name file, entry and field, one line per problem, in one :class:`MatrixError`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vllm_conformance.matrix.schema import Deployment

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "matrix"

_LOCAL_PREFIXES = ("./", "../", "/", "~")


class MatrixError(Exception):
    """A matrix file is malformed; the message names file, entry and field."""


@dataclass(frozen=True)
class Matrix:
    """What a run knows: its own entries and every entry it can name by id."""

    entries: tuple[Deployment, ...]
    known: Mapping[str, Deployment]
    files: Mapping[str, Path]

    def select(self, ids: Sequence[str]) -> list[Deployment]:
        """The entries with these ids (any known entry), or the run's entries if none."""
        if unknown := sorted(set(ids) - set(self.known)):
            raise MatrixError(f"no matrix entry {unknown}; known: {sorted(self.known)}")
        return [self.known[i] for i in ids] if ids else list(self.entries)


@dataclass
class _Raw:
    """One entry as written, before ``extends`` is resolved and the schema applied."""

    data: dict[str, Any]
    path: Path
    label: str


def matrix_files(paths: Iterable[Path]) -> list[Path]:
    """Expand directories into their ``*.yaml``/``*.yml`` files, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        elif path.exists():
            found.append(path)
        else:
            raise MatrixError(f"{path}: no such matrix file or directory")
    return found


def _local(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value.startswith(_LOCAL_PREFIXES):
        return str((base / Path(value).expanduser()).resolve())
    return value


def _resolve_paths(entry: dict[str, Any], base: Path) -> None:
    """Make the entry's relative paths absolute against ``base`` (its file's folder)."""
    model = entry.get("model")
    if isinstance(model, dict):
        for key in ("path", "tokenizer"):
            if key in model:
                model[key] = _local(model[key], base)
    expect = entry.get("expect")
    if not isinstance(expect, dict):
        return
    perf = expect.get("performance")
    if isinstance(perf, dict) and isinstance(perf.get("baseline"), str):
        perf["baseline"] = str((base / Path(perf["baseline"]).expanduser()).resolve())
    for task in expect.get("accuracy") or []:
        data = task.get("data") if isinstance(task, dict) else None
        if isinstance(data, str) and data != "fixture" and not data.startswith("$"):
            task["data"] = str((base / Path(data).expanduser()).resolve())


def _read(path: Path) -> list[_Raw]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MatrixError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise MatrixError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(data, dict) or set(data) != {"deployments"}:
        raise MatrixError(f"{path}: a matrix file is a mapping with one key, 'deployments'")
    entries = data["deployments"]
    if not isinstance(entries, list) or not entries:
        raise MatrixError(f"{path}: 'deployments' is a non-empty list of entries")
    raws = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise MatrixError(f"{path}: entry #{i + 1}: an entry is a mapping")
        entry = copy.deepcopy(entry)
        _resolve_paths(entry, path.parent)
        name = entry.get("id")
        raws.append(_Raw(entry, path, f"'{name}'" if isinstance(name, str) else f"#{i + 1}"))
    return raws


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _expand(raw: _Raw, by_id: Mapping[str, _Raw], chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entry with its ``extends`` chain applied (the base's own id and text dropped)."""
    parent = raw.data.get("extends")
    if parent is None:
        return raw.data
    where = f"{raw.path}: entry {raw.label}: field 'extends'"
    if not isinstance(parent, str) or parent not in by_id:
        raise MatrixError(f"{where}: no entry {parent!r} to extend")
    if parent in chain:
        raise MatrixError(f"{where}: circular extends: {' -> '.join((*chain, parent))}")
    base = _expand(by_id[parent], by_id, (*chain, parent))
    base = {k: v for k, v in base.items() if k not in ("id", "description")}
    return _merge(base, {k: v for k, v in raw.data.items() if k != "extends"})


def _field(loc: Sequence[int | str]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "(entry)"


def _validate(raws: list[_Raw]) -> list[tuple[Deployment, Path]]:
    by_id = {r.data["id"]: r for r in raws if isinstance(r.data.get("id"), str)}
    done: list[tuple[Deployment, Path]] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for raw in raws:
        name = raw.data.get("id")
        if isinstance(name, str) and name in seen:
            problems.append(
                f"{raw.path}: entry {raw.label}: field 'id': duplicate id "
                f"(already defined in {seen[name]})"
            )
            continue
        if isinstance(name, str):
            seen[name] = raw.path
        try:
            done.append((Deployment.model_validate(_expand(raw, by_id)), raw.path))
        except ValidationError as exc:
            problems += [
                f"{raw.path}: entry {raw.label}: field '{_field(e['loc'])}': {e['msg']}"
                for e in exc.errors()
            ]
    if problems:
        raise MatrixError("\n".join(problems))
    return done


def _cross_check(entries: Iterable[Deployment], files: Mapping[str, Path]) -> None:
    """Checks that need more than one entry's schema: the ids another entry names exist,
    and each performance threshold names a metric the workload can measure."""
    problems: list[str] = []
    for entry in entries:
        where = f"{files[entry.id]}: entry '{entry.id}'"
        ctx = entry.expect.context
        if ctx and ctx.kv_cache_ratio and ctx.kv_cache_ratio.to not in files:
            problems.append(
                f"{where}: field 'expect.context.kv_cache_ratio.to': no entry "
                f"'{ctx.kv_cache_ratio.to}'"
            )
        problems += [f"{where}: {p}" for p in _threshold_problems(entry)]
    if problems:
        raise MatrixError("\n".join(problems))


def _threshold_problems(entry: Deployment) -> list[str]:
    from vllm_conformance.perf import metrics, workload

    perf = entry.expect.performance
    if perf is None:
        return []
    out = []
    for i, t in enumerate(perf.thresholds):
        field = f"field 'expect.performance.thresholds.{i}.metric'"
        if not metrics.is_metric(t.metric):
            out.append(
                f"{field}: no metric {t.metric!r} (run metrics: {', '.join(metrics.AGGREGATES)};"
                f" latencies: mean|median|std|pNN _ {'|'.join(metrics.LATENCY_METRICS)} _ms)"
            )
        elif (q := workload.percentile_of(t.metric)) is not None:
            need = workload.min_requests(q)
            if perf.workload.num_prompts < need:
                out.append(
                    f"{field}: {t.metric} needs at least {need} requests to be supported "
                    f"(MLPerf's early-stopping rule), the workload sends "
                    f"{perf.workload.num_prompts} (num_prompts)"
                )
    return out


def load(paths: Sequence[Path], bundled: bool = True) -> Matrix:
    """Load the user's matrix files (none: the bundled entries are the run's)."""
    user_files = matrix_files(paths)
    bundle_files = matrix_files([BUNDLED]) if bundled else []
    user = [r for f in user_files for r in _read(f)]
    # A bundled file named as a user file (to discover or write back) is read once.
    named = {f.resolve() for f in user_files}
    bundle = [r for f in bundle_files if f not in named for r in _read(f)]
    validated = _validate(bundle + user)
    known = {d.id: d for d, _ in validated}
    files = {d.id: f for d, f in validated}
    _cross_check(known.values(), files)
    mine = {f for f in user_files} if user_files else set(bundle_files)
    return Matrix(tuple(d for d, f in validated if f in mine), known, files)


def load_file(path: Path) -> list[Deployment]:
    """The entries of one matrix file (bundled entries can be extended)."""
    return list(load([path]).entries)


def load_matrix(paths: Sequence[Path]) -> list[Deployment]:
    """The entries of these matrix files (or, given none, the bundled ones)."""
    return list(load(paths).entries)
