"""Accuracy through lm-evaluation-harness: run a task against a server, judge the score.

Three parts, usable without pytest:

* **data**: lm-eval's built-in tasks download their data sets; here a task reads local files
  instead. :func:`write_task_overrides` renders, per built-in task (every member of a group),
  a YAML that ``include``\\ s lm-eval's own YAML and only swaps ``dataset_path`` /
  ``dataset_kwargs.data_files``, so prompts, filters, metrics and task versions stay lm-eval's.
  The data is a local directory: the real data set (``{split}.jsonl``, ``{split}.parquet``,
  or a Hugging Face snapshot such as ``main/test-00000-of-00001.parquet``), given as a path,
  as ``$ENV_VAR``, through ``VLLM_CONFORMANCE_<TASK>``, or ``"fixture"`` for the small
  self-made sets shipped in ``vllm_conformance/data/accuracy``.
* **runs**: :func:`run_lm_eval` (a served model, through ``local-completions`` or
  ``local-chat-completions``) and :func:`reference_score` (the same documents through
  transformers, lm-eval's ``hf`` backend, greedy), both returning an :class:`AccuracyResult`.
* **verdicts**: :func:`check_reported` (a score against a published value),
  :func:`compare_scores` (served against reference, both with standard errors) and
  :func:`compare_paired` (the same, using that both ran on the same documents).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import string
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

Api = Literal["completions", "chat-completions"]

#: the self-made fixture sets, one directory per task, and the override template
DATA_ROOT = Path(__file__).parent.parent / "data" / "accuracy"
OVERRIDE_TEMPLATE = DATA_ROOT / "tasks" / "override.yaml.in"
#: ``VLLM_CONFORMANCE_<TASK>`` names a task's data directory when nothing else does
ENV_PREFIX = "VLLM_CONFORMANCE_"
FIXTURE = "fixture"
#: two-sided 99 %
DEFAULT_Z = 2.576


class AccuracyDataError(FileNotFoundError):
    """A task's data set is missing or incomplete; the message names the task and the path."""


class TaskParams(Protocol):
    """What a run needs to know about a task (``matrix.AccuracyExpect`` has these fields)."""

    task: str
    metric: str
    api: Api
    num_fewshot: int | None
    apply_chat_template: bool
    limit: int | None
    concurrency: int


@dataclass(frozen=True)
class AccuracyTask:
    """One lm-eval task run: the fields of ``matrix.AccuracyExpect`` plus run details.

    ``metric`` is lm-eval's result key, ``"<metric>,<filter>"`` (``exact_match,strict-match``).
    ``gen_kwargs`` override the task's generation settings (e.g. ``{"max_gen_toks": 256}``
    where the task's default would not fit ``max_model_len``).
    """

    task: str
    metric: str
    api: Api = "completions"
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    limit: int | None = None
    concurrency: int = 8
    #: a path, ``"$ENV_VAR"`` or ``"fixture"`` (see :func:`resolve_data`)
    data: str | None = None
    gen_kwargs: Mapping[str, Any] = field(default_factory=dict)
    system_instruction: str | None = None
    seed: int = 1234


@dataclass(frozen=True)
class Score:
    """A proportion with its standard error and sample size."""

    value: float
    stderr: float
    n: int


@dataclass(frozen=True)
class AccuracyResult:
    """One task's score from one lm-eval run, with what is needed to reproduce it."""

    task: str
    metric: str
    filter: str
    value: float
    stderr: float
    n: int
    lm_eval_version: str
    task_versions: dict[str, Any]
    n_shot: dict[str, Any]
    model: str
    api: str
    apply_chat_template: bool
    gen_kwargs: dict[str, Any]
    data: dict[str, dict[str, list[str]]]
    #: ``"<leaf task>/<doc_id>" -> score``: lets two runs be compared document by document
    per_doc: dict[str, float]
    stderr_source: Literal["lm-eval", "computed"]
    elapsed_s: float
    #: the run's other ``metric,filter`` keys: ``{key: {value, stderr, n, stderr_source,
    #: per_doc}}`` (gsm8k's strict-match and flexible-extract come from one run)
    others: dict[str, dict[str, Any]] = field(default_factory=dict)

    def select(self, metric_key: str) -> AccuracyResult:
        """The same run, scored by another ``metric,filter`` key."""
        metric, filt = split_metric(metric_key)
        key = f"{metric},{filt}"
        if key == f"{self.metric},{self.filter}":
            return self
        if key not in self.others:
            raise KeyError(f"run of {self.task!r} has no {key!r} (have: {sorted(self.others)})")
        mine = {
            "value": self.value,
            "stderr": self.stderr,
            "n": self.n,
            "stderr_source": self.stderr_source,
            "per_doc": self.per_doc,
        }
        others = {k: v for k, v in self.others.items() if k != key}
        others[f"{self.metric},{self.filter}"] = mine
        return replace(self, metric=metric, filter=filt, others=others, **self.others[key])

    @property
    def score(self) -> Score:
        """The value, standard error and n, for the verdict functions."""
        return Score(self.value, self.stderr, self.n)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the form the reference cache stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyResult:
        """Inverse of :meth:`to_dict`."""
        return cls(**dict(data))


@dataclass(frozen=True)
class Verdict:
    """The outcome of one accuracy check, with every number that decided it."""

    passed: bool
    value: float
    stderr: float
    expected: float
    expected_stderr: float | None
    #: the largest difference allowed
    tolerance: float
    #: ``tolerance - |difference|`` (for one-sided checks: ``tolerance - shortfall``);
    #: negative when the check fails
    margin: float
    z: float
    rtol: float | None
    rule: str


# --- statistics -------------------------------------------------------------------------


def binomial_stderr(p: float, n: int) -> float:
    """lm-eval's standard error of a mean of 0/1 scores: ``sqrt(p (1 - p) / (n - 1))``."""
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 samples, got n={n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a proportion, got {p}")
    return math.sqrt(p * (1.0 - p) / (n - 1))


def wilson_interval(p: float, n: int, z: float = DEFAULT_Z) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound near 0 and 1, unlike ``p ± z·se``)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def check_reported(
    measured: Score | float,
    stderr: float | None,
    reported: float,
    *,
    z: float = DEFAULT_Z,
    rtol: float | None = None,
    reported_stderr: float | None = None,
    one_sided: bool = False,
) -> Verdict:
    """Is a measured score consistent with a reported (published) one?

    Passes when ``|measured - reported| <= z * se``, where ``se`` is the measured standard
    error, combined in quadrature with ``reported_stderr`` when the report gives one. With
    ``rtol``, the allowance is the larger of that and ``rtol * reported`` (vLLM CI's rule
    ``measured >= reported * (1 - rtol)``): a relative tolerance covers differences of setup
    that no sample size removes, while the statistical one keeps small samples from failing
    on noise. ``one_sided`` only fails a shortfall (doing better than reported passes).
    """
    value, se = _value_and_stderr(measured, stderr)
    combined = math.sqrt(se**2 + (reported_stderr or 0.0) ** 2)
    tolerance = z * combined
    rule = f"|measured - reported| <= {z:g} * {combined:.4f}"
    if rtol is not None:
        tolerance = max(tolerance, rtol * reported)
        rule = f"|measured - reported| <= max({z:g} * {combined:.4f}, {rtol:g} * {reported:g})"
    diff = reported - value if one_sided else abs(value - reported)
    if one_sided:
        rule = rule.replace("|measured - reported|", "reported - measured")
    margin = tolerance - max(diff, 0.0) if one_sided else tolerance - diff
    return Verdict(
        passed=margin >= 0,
        value=value,
        stderr=se,
        expected=reported,
        expected_stderr=reported_stderr,
        tolerance=tolerance,
        margin=margin,
        z=z,
        rtol=rtol,
        rule=rule,
    )


def compare_scores(
    served: Score | AccuracyResult,
    reference: Score | AccuracyResult,
    *,
    z: float = DEFAULT_Z,
    rtol: float | None = None,
) -> Verdict:
    """Do two independent measurements agree? ``|a - b| <= z * sqrt(se_a² + se_b²)``.

    The rule treats the runs as independent samples, which is conservative for two runs on
    the same documents (their scores are positively correlated); :func:`compare_paired`
    uses the pairing and is much tighter.
    """
    a = served.score if isinstance(served, AccuracyResult) else served
    b = reference.score if isinstance(reference, AccuracyResult) else reference
    return check_reported(a, a.stderr, b.value, z=z, rtol=rtol, reported_stderr=b.stderr)


def compare_paired(
    served: Mapping[str, float] | AccuracyResult,
    reference: Mapping[str, float] | AccuracyResult,
    *,
    z: float = DEFAULT_Z,
) -> Verdict:
    """Served against reference on the same documents, document by document.

    The mean of the per-document differences must be within ``z`` of its standard error
    (a paired z-test; with 0/1 scores, McNemar's test in its normal form). Documents only
    one side scored are an error: the runs did not see the same data.
    """
    a = served.per_doc if isinstance(served, AccuracyResult) else served
    b = reference.per_doc if isinstance(reference, AccuracyResult) else reference
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:5]
        raise ValueError(f"the runs scored different documents (e.g. {only})")
    n = len(a)
    if n < 2:
        raise ValueError(f"a paired comparison needs at least 2 documents, got {n}")
    diffs = [a[k] - b[k] for k in sorted(a)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    se = math.sqrt(var / n)
    tolerance = z * se
    value = sum(a.values()) / n
    expected = sum(b.values()) / n
    return Verdict(
        passed=abs(mean) <= tolerance,
        value=value,
        stderr=se,
        expected=expected,
        expected_stderr=None,
        tolerance=tolerance,
        margin=tolerance - abs(mean),
        z=z,
        rtol=None,
        rule=f"|mean(served_i - reference_i)| <= {z:g} * {se:.4f} over {n} documents "
        f"({sum(1 for d in diffs if d)} differ)",
    )


def _value_and_stderr(measured: Score | float, stderr: float | None) -> tuple[float, float]:
    if isinstance(measured, Score):
        return measured.value, measured.stderr if stderr is None else stderr
    if stderr is None:
        raise ValueError("a bare measured value needs its stderr")
    return float(measured), float(stderr)


def split_metric(key: str) -> tuple[str, str]:
    """``"exact_match,strict-match"`` -> ``("exact_match", "strict-match")``."""
    metric, _, filt = key.partition(",")
    return metric, filt or "none"


# --- data -------------------------------------------------------------------------------


def env_var(task: str) -> str:
    """The environment variable that names ``task``'s data: ``VLLM_CONFORMANCE_MMLU_PRO``."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", task).upper()


def resolve_data(task: str, data: str | Path | None) -> Path:
    """The data directory of ``task``.

    ``data`` is a path, ``"$NAME"`` (an environment variable holding the path), ``"fixture"``
    (the bundled self-made set) or ``None`` (then ``VLLM_CONFORMANCE_<TASK>``). Anything
    missing raises :class:`AccuracyDataError` naming the task and the path.
    """
    where = "argument"
    if data is None:
        name = env_var(task)
        value = os.environ.get(name)
        if not value:
            raise AccuracyDataError(
                f"accuracy task {task!r}: no data set given; set ${name} to a local copy "
                f"(or pass data='fixture' for the self-made set)"
            )
        data, where = value, f"${name}"
    elif isinstance(data, str) and data.startswith("$"):
        name = data[1:]
        value = os.environ.get(name)
        if not value:
            raise AccuracyDataError(
                f"accuracy task {task!r}: data set path comes from ${name}, which is not set"
            )
        data, where = value, data
    if isinstance(data, str) and data == FIXTURE:
        path = DATA_ROOT / task
        if not path.is_dir():
            raise AccuracyDataError(
                f"accuracy task {task!r}: no self-made fixture for this task (looked in {path})"
            )
        return path
    path = Path(data).expanduser()
    if not path.exists():
        raise AccuracyDataError(
            f"accuracy task {task!r}: data set path {path} (from {where}) does not exist"
        )
    return path.resolve()


_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def find_split_files(root: Path, split: str, dataset_name: str | None = None) -> list[Path]:
    """The files of one split under ``root``: ``{split}.jsonl|json|parquet``, or the
    Hugging Face layout ``[<config>/|data/]{split}-00000-of-00001*.parquet``."""
    if root.is_file():
        return [root] if root.stem == split else []
    for ext in _FORMATS:
        if (root / f"{split}{ext}").is_file():
            return [root / f"{split}{ext}"]
    subdirs = [d for d in (dataset_name, "data", ".") if d]
    for sub in subdirs:
        for ext in _FORMATS:
            found = sorted((root / sub).glob(f"{split}-*{ext}"))
            if found:
                return found
            found = sorted((root / sub / split).glob(f"*{ext}")) if sub != "." else []
            if found:
                return found
    return []


@functools.lru_cache(maxsize=1)
def _builtin_index() -> dict[str, tuple[str, Path | None, dict[str, Any]]]:
    """name -> (kind, yaml path, raw config) of lm-eval's built-in tasks and groups."""
    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index
    return {
        name: (entry.kind.name, entry.yaml_path, dict(entry.cfg or {}))
        for name, entry in index.items()
    }


def _leaf_tasks(name: str) -> list[tuple[str, Path, dict[str, Any]]]:
    """The built-in tasks that make up ``name`` (itself, or a group's members, recursively)."""
    index = _builtin_index()
    if name not in index:
        raise KeyError(f"lm-eval {_lm_eval_version()} has no task or group named {name!r}")
    kind, path, cfg = index[name]
    if kind in ("TASK", "PY_TASK"):
        assert path is not None
        return [(name, path, cfg)]
    members = cfg.get("task", []) if kind == "GROUP" else []
    leaves: list[tuple[str, Path, dict[str, Any]]] = []
    for member in members:
        member_name = member if isinstance(member, str) else member.get("task", member.get("group"))
        leaves.extend(_leaf_tasks(member_name))
    if not leaves:
        raise KeyError(f"lm-eval task {name!r} ({kind}) has no YAML-defined tasks to override")
    return leaves


def _data_files(
    task: str, leaf_cfg: Mapping[str, Any], root: Path, fewshot: int
) -> tuple[str, dict[str, list[str]]]:
    """(builder, {split: files}) for one leaf task; the test split must exist."""
    test = leaf_cfg.get("test_split") or leaf_cfg.get("validation_split")
    others = {
        leaf_cfg.get(k)
        for k in ("training_split", "validation_split", "fewshot_split")
        if leaf_cfg.get(k)
    } - {test}
    name = leaf_cfg.get("dataset_name")
    files: dict[str, list[Path]] = {}
    test_files = find_split_files(root, test, name)
    if not test_files:
        raise AccuracyDataError(
            f"accuracy task {task!r}: no {test!r} split under data set path {root} "
            f"(expected {test}.jsonl, {test}.parquet or [data/]{test}-*.parquet)"
        )
    files[test] = test_files
    for split in sorted(others):
        found = find_split_files(root, split, name)
        if found:
            files[split] = found
        elif fewshot > 0:
            raise AccuracyDataError(
                f"accuracy task {task!r}: {fewshot}-shot needs the {split!r} split, "
                f"absent under data set path {root}"
            )
        else:
            # lm-eval opens every configured split; zero-shot never reads this one.
            files[split] = test_files
    builders = {_FORMATS[p.suffix] for fs in files.values() for p in fs}
    if len(builders) != 1:
        raise AccuracyDataError(
            f"accuracy task {task!r}: data set path {root} mixes formats ({sorted(builders)})"
        )
    return builders.pop(), {s: [str(p) for p in fs] for s, fs in files.items()}


def write_task_overrides(
    out_dir: Path, data: Mapping[str, Path], num_fewshot: Mapping[str, int | None] | None = None
) -> dict[str, dict[str, list[str]]]:
    """Render offline overrides of the built-in tasks into ``out_dir``.

    ``data`` maps a task or group name to its data directory (see :func:`resolve_data`).
    Use ``out_dir`` as ``lm_eval --include_path`` or ``TaskManager(include_path=...)``.
    Returns ``{leaf task: {split: files}}``.
    """
    template = string.Template(OVERRIDE_TEMPLATE.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, list[str]]] = {}
    for task, root in data.items():
        for leaf, yaml_path, cfg in _leaf_tasks(task):
            shots = (num_fewshot or {}).get(task)
            shots = cfg.get("num_fewshot", 0) if shots is None else shots
            builder, files = _data_files(task, _full_config(yaml_path), Path(root), shots or 0)
            text = template.substitute(
                BUILTIN_YAML=json.dumps(str(yaml_path)),
                BUILDER=builder,
                DATA_FILES=json.dumps(files),
            )
            (out_dir / f"{leaf}.yaml").write_text(text)
            written[leaf] = files
    return written


def _full_config(yaml_path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(yaml_path, resolve_func=False)


# --- runs -------------------------------------------------------------------------------


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _v1(base_url: str, path: str) -> str:
    base = base_url.rstrip("/")
    base = base.removesuffix("/v1")
    return f"{base}/v1/{path}"


def run_lm_eval(
    base_url: str,
    model_name: str,
    task: TaskParams,
    data: str | Path | None = None,
    *,
    tokenizer: str | Path | None = None,
    api_key: str | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    bootstrap_iters: int = 100_000,
    timeout_s: int = 600,
) -> AccuracyResult:
    """Run one lm-eval task against an OpenAI-compatible vLLM server.

    ``task.api`` picks ``local-completions`` (``/v1/completions``, text prompts, the server
    tokenizes) or ``local-chat-completions`` (``/v1/chat/completions``; forces the chat
    template, since the server applies it). Without ``tokenizer`` no tokenizer is loaded on
    the client (``tokenizer_backend=None``, ``tokenized_requests=False``): fine for
    generate-only tasks such as gsm8k, mmlu_pro and chartqa, and nothing is downloaded. With a
    local tokenizer path, lm-eval uses it to left-truncate prompts that would not fit.
    ``data`` is resolved by :func:`resolve_data` (``task.data`` when the task has one).
    ``api_key`` goes in the Authorization header of a server started with ``--api-key``.
    """
    chat = task.api == "chat-completions"
    model_args: dict[str, Any] = {
        "model": model_name,
        "base_url": _v1(base_url, "chat/completions" if chat else "completions"),
        "num_concurrent": task.concurrency,
        "max_retries": 3,
        "tokenized_requests": False,
        "timeout": timeout_s,
    }
    if api_key:
        model_args["header"] = {"Authorization": f"Bearer {api_key}"}
    if tokenizer is not None:
        model_args |= {"tokenizer_backend": "huggingface", "tokenizer": str(tokenizer)}
    else:
        model_args["tokenizer_backend"] = None
    return _evaluate(
        "local-chat-completions" if chat else "local-completions",
        model_args,
        task,
        data,
        model_label=model_name,
        apply_chat_template=chat or task.apply_chat_template,
        gen_kwargs=gen_kwargs,
        bootstrap_iters=bootstrap_iters,
    )


def reference_score(
    model_dir: Path,
    task: TaskParams,
    data: str | Path | None = None,
    *,
    gen_kwargs: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    cache: bool = True,
    bootstrap_iters: int = 100_000,
) -> AccuracyResult:
    """The reference implementation's score: transformers, greedy, on the same documents.

    lm-eval's ``hf`` backend on the local model directory (CPU, batch size 1 so no padding
    can change a result), with the same task override, prompt, chat-template flag and
    filters as :func:`run_lm_eval`. Cached beside the model in ``<model_dir>.accuracy/``,
    keyed by everything that can change the score (task settings, data files, lm-eval,
    transformers and torch versions, dtype).
    """
    import torch
    import transformers

    model_dir = Path(model_dir)
    resolved = resolve_data(task.task, _task_data(task, data))
    key_src = {
        "task": _task_fields(task),
        "gen_kwargs": dict(gen_kwargs or {}),
        "data": _fingerprint(resolved),
        "lm_eval": _lm_eval_version(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": dtype,
        "model": _fingerprint(model_dir, pattern="*"),
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    cache_file = model_dir.parent / f"{model_dir.name}.accuracy" / f"{task.task}-{key}.json"
    if cache and cache_file.is_file():
        return AccuracyResult.from_dict(json.loads(cache_file.read_text())["result"])
    result = _evaluate(
        "hf",
        {"pretrained": str(model_dir), "device": "cpu", "dtype": dtype},
        task,
        resolved,
        model_label=f"hf:{model_dir.name}",
        apply_chat_template=task.api == "chat-completions" or task.apply_chat_template,
        gen_kwargs=gen_kwargs,
        bootstrap_iters=bootstrap_iters,
    )
    if cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key_src, "result": result.to_dict()}, indent=1))
        tmp.replace(cache_file)
    return result


def _task_data(task: TaskParams, data: str | Path | None) -> str | Path | None:
    return data if data is not None else getattr(task, "data", None)


def _task_fields(task: TaskParams) -> dict[str, Any]:
    fields = ("task", "metric", "api", "num_fewshot", "apply_chat_template", "limit")
    out = {f: getattr(task, f) for f in fields}
    out["gen_kwargs"] = dict(getattr(task, "gen_kwargs", None) or {})
    out["system_instruction"] = getattr(task, "system_instruction", None)
    out["seed"] = getattr(task, "seed", 1234)
    return out


def _fingerprint(root: Path, pattern: str = "**/*") -> list[tuple[str, int, int]]:
    paths = [root] if root.is_file() else sorted(p for p in root.glob(pattern) if p.is_file())
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def _evaluate(
    model: str,
    model_args: dict[str, Any],
    task: TaskParams,
    data: str | Path | None,
    *,
    model_label: str,
    apply_chat_template: bool,
    gen_kwargs: Mapping[str, Any] | None,
    bootstrap_iters: int,
) -> AccuracyResult:
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = resolve_data(task.task, _task_data(task, data))
    kwargs = {**dict(getattr(task, "gen_kwargs", None) or {}), **dict(gen_kwargs or {})}
    seed = getattr(task, "seed", 1234)
    with tempfile.TemporaryDirectory(prefix="vllm-conformance-tasks-") as tmp:
        files = write_task_overrides(
            Path(tmp), {task.task: root}, num_fewshot={task.task: task.num_fewshot}
        )
        manager = TaskManager(include_path=tmp)
        start = time.monotonic()
        out = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=[task.task],
            num_fewshot=task.num_fewshot,
            limit=task.limit,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=False,
            system_instruction=getattr(task, "system_instruction", None),
            gen_kwargs=kwargs or None,
            task_manager=manager,
            batch_size=1,
            bootstrap_iters=bootstrap_iters,
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        elapsed = time.monotonic() - start
    if out is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return parse_results(
        out,
        task.task,
        task.metric,
        model=model_label,
        api=model,
        apply_chat_template=apply_chat_template,
        gen_kwargs=kwargs,
        data=files,
        elapsed_s=elapsed,
        lm_eval_version=getattr(lm_eval, "__version__", None) or _lm_eval_version(),
    )


def parse_results(
    out: Mapping[str, Any],
    task: str,
    metric_key: str,
    *,
    model: str = "",
    api: str = "",
    apply_chat_template: bool = False,
    gen_kwargs: Mapping[str, Any] | None = None,
    data: Mapping[str, Mapping[str, list[str]]] | None = None,
    elapsed_s: float = 0.0,
    lm_eval_version: str = "",
) -> AccuracyResult:
    """Read one task's (or group's) score out of ``simple_evaluate``'s return value.

    The standard error is lm-eval's when it computed one; with ``bootstrap_iters=0`` it
    reports ``"N/A"`` and the binomial standard error of the logged samples is used. Every
    other ``metric,filter`` of the run is kept in ``others`` (see :meth:`AccuracyResult.select`).
    """
    table = out.get("results", {}).get(task) or out.get("groups", {}).get(task)
    metric, filt = split_metric(metric_key)
    key = f"{metric},{filt}"
    if table is None or key not in table:
        have = sorted(k for k in (table or {}) if "," in k and "_stderr" not in k)
        raise KeyError(f"lm-eval results for {task!r} have no {key!r} (have: {have})")
    leaves = _result_leaves(out, task)
    n_samples = out.get("n-samples", {})
    n_total = sum(int(n_samples.get(leaf, {}).get("effective", 0)) for leaf in leaves)
    scores = {
        k: _metric_score(out, table, k, leaves, n_total)
        for k in table
        if "," in k and "_stderr," not in k and isinstance(table[k], (int, float))
    }
    all_versions, all_shots = out.get("versions", {}), out.get("n-shot", {})
    chosen = scores[key]
    return AccuracyResult(
        task=task,
        metric=metric,
        filter=filt,
        value=chosen["value"],
        stderr=chosen["stderr"],
        n=chosen["n"],
        lm_eval_version=lm_eval_version,
        task_versions={t: all_versions[t] for t in (task, *leaves) if t in all_versions},
        n_shot={t: all_shots[t] for t in leaves if t in all_shots},
        model=model,
        api=api,
        apply_chat_template=apply_chat_template,
        gen_kwargs=dict(gen_kwargs or {}),
        data={k: dict(v) for k, v in (data or {}).items()},
        per_doc=chosen["per_doc"],
        stderr_source=chosen["stderr_source"],
        elapsed_s=round(elapsed_s, 1),
        others={k: v for k, v in scores.items() if k != key},
    )


def _metric_score(
    out: Mapping[str, Any],
    table: Mapping[str, Any],
    key: str,
    leaves: list[str],
    n_total: int,
) -> dict[str, Any]:
    metric, filt = split_metric(key)
    per_doc: dict[str, float] = {}
    for leaf in leaves:
        for sample in out.get("samples", {}).get(leaf, []):
            if sample.get("filter", filt) != filt or metric not in sample:
                continue
            per_doc[f"{leaf}/{sample['doc_id']}"] = float(sample[metric])
    n = n_total or len(per_doc)
    value = float(table[key])
    raw_se = table.get(f"{metric}_stderr,{filt}")
    if isinstance(raw_se, (int, float)) and not math.isnan(raw_se):
        stderr, source = float(raw_se), "lm-eval"
    else:
        p = sum(per_doc.values()) / len(per_doc) if per_doc else value
        stderr, source = binomial_stderr(p, n), "computed"
    return {"value": value, "stderr": stderr, "n": n, "stderr_source": source, "per_doc": per_doc}


def _result_leaves(out: Mapping[str, Any], task: str) -> list[str]:
    subtasks = out.get("group_subtasks", {})
    if task not in subtasks or not subtasks[task]:
        return [task]
    leaves: list[str] = []
    for child in subtasks[task]:
        leaves.extend(_result_leaves(out, child))
    return leaves


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_conformance.client.accuracy write-tasks OUT TASK=PATH ...``: render the
    overrides for the lm_eval CLI (``lm_eval --include_path OUT --tasks TASK ...``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vllm_conformance.client.accuracy")
    sub = parser.add_subparsers(dest="cmd", required=True)
    write = sub.add_parser("write-tasks", help="render offline task overrides")
    write.add_argument("out", type=Path)
    write.add_argument("data", nargs="+", help="TASK=PATH, TASK=$ENV or TASK=fixture")
    args = parser.parse_args(argv)
    data = {}
    for item in args.data:
        name, _, value = item.partition("=")
        data[name] = resolve_data(name, value or None)
    for leaf, files in write_task_overrides(args.out, data).items():
        print(f"{leaf}: {json.dumps(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
