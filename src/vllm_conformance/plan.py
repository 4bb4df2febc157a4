"""The cost plan of a run: per entry, what the selected tests will do and how long it takes.

Built from the collected tests before anything starts (``pytest --collect-only`` prints it
after the test list, ``vllm-conformance plan`` prints only it): per entry the server starts,
the full-length prefills, the lm-eval documents, the load generator's requests and the
other (short) tests, each with its planned time from the entry's model shape and GPU
datasheet (:mod:`vllm_conformance.perf.estimate`); per GPU kind the time of one node, run
serially (``-n 1``) and packed as the GPU leases pack entries (``-n K``). A run writes the
plan as ``plan`` records at its start; :func:`versus` sets it against what the run measured.

The module sits at the package's top, beside ``report``: it is a view of a whole run that
draws on the matrix, the estimates, the launcher's packing rule and the suites' selection,
none of which owns the others.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_conformance.matrix import AccuracyExpect, Deployment
from vllm_conformance.perf import estimate
from vllm_conformance.progress import duration

#: The context suite's check that counts its full-length prefills (vLLM's prefix-cache
#: counters); its ``measured.full_prefills`` is the measured side of the plan.
PREFILL_CHECK = "context.prefill_budget"

#: Test-split documents of lm-eval's tasks, and the subtasks a per-task ``limit`` applies
#: to (lm-eval limits each of mmlu_pro's 14 subjects).
TASK_DOCUMENTS: dict[str, tuple[int, int]] = {
    "gsm8k": (1319, 1),
    "mmlu_pro": (12032, 14),
    "mmlu_pro_llama": (12032, 14),
    "chartqa": (2500, 1),
    "chartqa_llama_90": (2500, 1),
}

#: GPUs of one node when this machine shows none of a kind (the 8-GPU nodes of the matrix).
NODE_GPUS = 8

SERVER_START = "server start"
FULL_PREFILLS = "full prefills"
LOAD_RUN = "load run"
OTHER_TESTS = "other tests"
#: Suites whose tests have a step of their own; every other test counts as a short test.
_STEP_SUITES = ("accuracy", "performance")


@dataclass(frozen=True)
class Selected:
    """What the collected tests do for one entry: test counts by suite (``context`` for
    ``suites/test_context.py``), and how many tests expect the start to fail."""

    tests: Mapping[str, int]
    startup_failures: int = 0


@dataclass(frozen=True)
class Step:
    """One kind of work of an entry: how often, and its planned seconds (None: unknown)."""

    name: str
    count: int
    unit: str
    seconds: float | None


@dataclass(frozen=True)
class EntryPlan:
    entry: str
    gpu: str
    #: GPUs it holds (0: a CPU entry)
    gpus: int
    steps: tuple[Step, ...]

    @property
    def seconds(self) -> float | None:
        values = [s.seconds for s in self.steps]
        return None if None in values else sum(v for v in values if v is not None)

    def count(self, name: str) -> int:
        return sum(s.count for s in self.steps if s.name == name or s.name.startswith(name))

    def step_seconds(self) -> dict[str, float]:
        return {s.name: s.seconds for s in self.steps if s.seconds is not None}


@dataclass(frozen=True)
class NodePlan:
    """The entries of one GPU kind on one node: its time serially and packed."""

    gpu: str
    gpus: int
    workers: int
    entries: tuple[str, ...]
    serial_s: float | None
    packed_s: float | None
    #: entries that need more GPUs than the node has (skipped there)
    never_fit: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    entries: tuple[EntryPlan, ...]
    nodes: tuple[NodePlan, ...]
    workers: int
    node_gpus: Mapping[str, int] = field(default_factory=dict)

    @property
    def gpu_node_seconds(self) -> float | None:
        """Packed node time over every GPU kind (one node each; CPU entries not counted)."""
        values = [n.packed_s for n in self.nodes if n.gpu != "cpu"]
        return None if None in values else sum(v for v in values if v is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": self.records(),
            "nodes": [asdict(n) for n in self.nodes],
            "gpu_node_seconds": self.gpu_node_seconds,
        }

    def phase_seconds(self) -> dict[tuple[str, str], float]:
        """``(entry, step name) -> planned seconds`` (what progress lines take ETAs from)."""
        return {(e.entry, name): s for e in self.entries for name, s in e.step_seconds().items()}

    def records(self) -> list[dict[str, Any]]:
        """One ``plan`` record per entry, enough to rebuild the plan (:meth:`from_records`)."""
        return [
            {
                "entry": e.entry,
                "gpu": e.gpu,
                "gpus": e.gpus,
                "node_gpus": self.node_gpus[e.gpu],
                "workers": self.workers,
                "order": i,
                "steps": [asdict(s) for s in e.steps],
                "seconds": e.seconds,
            }
            for i, e in enumerate(self.entries)
        ]

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> Plan | None:
        rows = sorted((r for r in records if r.get("kind") == "plan"), key=lambda r: r["order"])
        if not rows:
            return None
        entries = [
            EntryPlan(r["entry"], r["gpu"], r["gpus"], tuple(Step(**s) for s in r["steps"]))
            for r in rows
        ]
        node_gpus = {r["gpu"]: r["node_gpus"] for r in rows}
        return _assemble(entries, rows[0]["workers"], node_gpus)


# -- per entry ------------------------------------------------------------------------


def accuracy_documents(exp: AccuracyExpect) -> int | None:
    """Documents one lm-eval run of ``exp`` scores: its ``limit`` (per subtask), else the
    whole test split; the shipped fixture sets are counted. None: a task of unknown size."""
    if exp.data == "fixture":
        from vllm_conformance.client import accuracy

        path = accuracy.DATA_ROOT / exp.task / "test.jsonl"
        if not path.is_file():
            return None
        total, subtasks = sum(1 for _ in path.open()), TASK_DOCUMENTS.get(exp.task, (0, 1))[1]
    elif exp.task in TASK_DOCUMENTS:
        total, subtasks = TASK_DOCUMENTS[exp.task]
    else:
        return exp.limit
    return total if exp.limit is None else min(total, exp.limit * subtasks)


def lm_eval_runs(entry: Deployment) -> list[AccuracyExpect]:
    """The entry's distinct lm-eval runs: expectations that differ only in their metric
    share one (as the accuracy suite runs them)."""
    runs: dict[tuple[Any, ...], AccuracyExpect] = {}
    for exp in entry.expect.accuracy:
        key = (exp.task, exp.api, exp.num_fewshot, exp.apply_chat_template, exp.limit,
               exp.data, json.dumps(exp.gen_kwargs, sort_keys=True))  # fmt: skip
        runs.setdefault(key, exp)
    return list(runs.values())


def plan_entry(entry: Deployment, selected: Selected) -> EntryPlan:
    """What ``selected`` tests cost for ``entry``."""
    tests = dict(selected.tests)
    normal = sum(tests.values()) - selected.startup_failures
    starts = (1 if normal > 0 else 0) + selected.startup_failures
    steps = [Step(SERVER_START, starts, "starts", starts * estimate.startup_seconds(entry))]
    ctx = entry.expect.context
    if tests.get("context") and ctx is not None and not entry.startup_fails:
        # The suite's budget is what it may cost; its last test fails when it costs more.
        n, length = ctx.full_prefill_budget, entry.serve.max_model_len
        one = estimate.prefill_seconds(entry, length)
        steps.append(
            Step(FULL_PREFILLS, n, f"x {length:,} tokens", None if one is None else n * one)
        )
    if tests.get("accuracy"):
        for exp in lm_eval_runs(entry):
            docs = accuracy_documents(exp)
            seconds = None
            if docs is not None:
                max_gen = exp.gen_kwargs.get("max_gen_toks")
                seconds = estimate.lm_eval_seconds(
                    entry, exp.task, docs, exp.num_fewshot, max_gen, exp.concurrency
                )
            steps.append(Step(f"lm-eval {exp.task}", docs or 0, "docs", seconds))
    perf = entry.expect.performance
    if tests.get("performance") and perf is not None:
        requests = perf.workload.num_prompts + perf.workload.warmup
        steps.append(
            Step(LOAD_RUN, requests, "requests", estimate.load_seconds(entry, perf.workload))
        )
    short = normal - sum(tests.get(s, 0) for s in _STEP_SUITES)
    if short > 0:
        steps.append(Step(OTHER_TESTS, short, "tests", short * estimate.SHORT_TEST_SECONDS))
    count = entry.hardware.count if entry.hardware.gpu != "cpu" else 0
    return EntryPlan(entry.id, entry.hardware.gpu, count, tuple(steps))


# -- per node ---------------------------------------------------------------------------


def packed_seconds(jobs: Sequence[tuple[int, float]], node_gpus: int, workers: int) -> float:
    """Node time of ``(gpus, seconds)`` jobs taken in order by ``workers`` workers, each
    granted its GPUs first come, first served (the rule of :class:`~launch.gpus.Leases`)."""
    pending = deque(jobs)
    waiting: deque[tuple[int, float]] = deque()
    running: list[tuple[float, int]] = []
    now, free, idle = 0.0, node_gpus, workers
    while pending or waiting or running:
        while idle and pending:
            waiting.append(pending.popleft())
            idle -= 1
        while waiting and waiting[0][0] <= free:
            gpus, seconds = waiting.popleft()
            free -= gpus
            heapq.heappush(running, (now + seconds, gpus))
        now, gpus = heapq.heappop(running)
        free += gpus
        idle += 1
    return now


def _assemble(entries: Sequence[EntryPlan], workers: int, node_gpus: Mapping[str, int]) -> Plan:
    nodes = []
    sizes = {gpu: node_gpus.get(gpu, NODE_GPUS) for gpu in dict.fromkeys(e.gpu for e in entries)}
    for gpu, size in sizes.items():
        mine = [e for e in entries if e.gpu == gpu]
        fit = [e for e in mine if e.gpus <= size or gpu == "cpu"]
        seconds = [e.seconds for e in fit]
        serial = packed = None
        if None not in seconds:
            jobs = [(e.gpus, e.seconds or 0.0) for e in fit]
            serial = packed_seconds(jobs, size, 1)
            packed = packed_seconds(jobs, size, workers)
        nodes.append(
            NodePlan(
                gpu, size, workers, tuple(e.entry for e in fit), serial, packed,
                tuple(e.entry for e in mine if e not in fit),
            )
        )  # fmt: skip
    return Plan(tuple(entries), tuple(nodes), workers, sizes)


def build(
    selected: Sequence[tuple[Deployment, Selected]],
    workers: int = 1,
    node_gpus: Mapping[str, int] | None = None,
) -> Plan:
    """The plan of ``selected`` entries, in the order they run, on nodes of ``node_gpus``
    GPUs per kind (default :data:`NODE_GPUS`) with ``workers`` xdist workers."""
    entries = [plan_entry(entry, sel) for entry, sel in selected]
    return _assemble(entries, max(1, workers), node_gpus or {})


def from_items(
    items: Iterable[Any], runs_elsewhere: Mapping[str, str]
) -> list[tuple[Deployment, Selected]]:
    """Per entry (in collection order), what the collected pytest ``items`` do.

    A test skipped at collection counts only if its reason is in ``runs_elsewhere`` (entry
    id -> the reason it is skipped here: its GPUs are not on this machine), because the plan
    is for the node that runs it.
    """
    tests: dict[str, Counter[str]] = {}
    failures: Counter[str] = Counter()
    entries: dict[str, Deployment] = {}
    for item in items:
        callspec = getattr(item, "callspec", None)
        entry = callspec.params.get("deployment") if callspec else None
        if not isinstance(entry, Deployment):
            continue
        skip = item.get_closest_marker("skip")
        if skip is not None and skip.kwargs.get("reason") != runs_elsewhere.get(entry.id):
            continue
        suite = item.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
        entries.setdefault(entry.id, entry)
        tests.setdefault(entry.id, Counter())[suite] += 1
        if item.get_closest_marker("expects_startup_failure") is not None:
            failures[entry.id] += 1
    return [(entries[i], Selected(dict(tests[i]), failures[i])) for i in entries]


# -- views ------------------------------------------------------------------------------


def _cell(step: Step | None) -> str:
    if step is None or step.count == 0:
        return "-"
    seconds = "?" if step.seconds is None else duration(step.seconds)
    unit = f" {step.unit}" if step.unit.startswith("x ") else ""
    return f"{step.count:,}{unit} ({seconds})"


def _sum_cell(steps: Sequence[Step]) -> str:
    if not steps:
        return "-"
    count = sum(s.count for s in steps)
    values = [s.seconds for s in steps]
    seconds = "?" if None in values else duration(sum(v for v in values if v is not None))
    return f"{count:,} ({seconds})"


def render(plan: Plan) -> str:
    """The plan as Markdown: one row per entry, then each node's time and the total."""
    lines = [
        "| entry | GPUs | server starts | full prefills | lm-eval docs | load requests "
        "| other tests | planned |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in plan.entries:
        by = {s.name: s for s in e.steps}
        gpus = f"{e.gpus} x {e.gpu}" if e.gpus else e.gpu
        lm_eval = [s for s in e.steps if s.name.startswith("lm-eval")]
        total = "?" if e.seconds is None else duration(e.seconds)
        lines.append(
            f"| {e.entry} | {gpus} | {_cell(by.get(SERVER_START))} "
            f"| {_cell(by.get(FULL_PREFILLS))} | {_sum_cell(lm_eval)} "
            f"| {_cell(by.get(LOAD_RUN))} | {_cell(by.get(OTHER_TESTS))} | {total} |"
        )
    lines.append("")
    for n in plan.nodes:
        where = "the CPU machine" if n.gpu == "cpu" else f"{n.gpu} node ({n.gpus} GPUs)"
        serial = "?" if n.serial_s is None else duration(n.serial_s)
        packed = "?" if n.packed_s is None else duration(n.packed_s)
        line = (
            f"- {where}: {len(n.entries)} entries, {serial} one at a time (-n 1), "
            f"{packed} packed (-n {n.workers})"
        )
        if n.never_fit:
            line += f"; never fit, skipped there: {', '.join(n.never_fit)}"
        lines.append(line)
    total = plan.gpu_node_seconds
    if any(n.gpu != "cpu" for n in plan.nodes):
        lines.append(
            f"- planned GPU-node time: {'?' if total is None else duration(total)} "
            f"(packed, -n {plan.workers}, one node per GPU kind)"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Versus:
    """Planned against measured for one entry (seconds; None: not measured)."""

    entry: str
    planned_s: float | None
    measured_s: float | None
    planned_start_s: float | None
    measured_start_s: float | None
    planned_prefills: int
    measured_prefills: int | None
    gpu_wait_s: float

    @property
    def ratio(self) -> float | None:
        if not self.planned_s or self.measured_s is None:
            return None
        return self.measured_s / self.planned_s


def versus(records: Sequence[Mapping[str, Any]]) -> list[Versus]:
    """Per planned entry of a run's records: planned against measured time.

    Measured is the wall time of the entry's tests (``timing`` records: setup, call and
    teardown, the server's start and stop included) less its wait for GPUs; the server
    start is the ``server`` records' ``startup_seconds``; full prefills as the context
    suite counted them (:data:`PREFILL_CHECK`).
    """
    plan = Plan.from_records(records)
    if plan is None:
        return []
    spent: Counter[str] = Counter()
    timed: set[str] = set()
    waited: Counter[str] = Counter()
    starts: dict[str, float] = {}
    prefills: dict[str, int] = {}
    for r in records:
        entry = r.get("entry")
        if r.get("kind") == "timing":
            spent[entry] += r["seconds"]
            timed.add(entry)
        elif r.get("kind") == "phase" and r.get("phase") == "waiting for GPUs":
            waited[entry] += r["seconds"]
        elif r.get("kind") == "check" and r.get("check") == PREFILL_CHECK:
            prefills[entry] = r["measured"]["full_prefills"]
        elif r.get("kind") == "server" and r.get("startup_seconds") is not None:
            starts[entry] = starts.get(entry, 0.0) + r["startup_seconds"]
    rows = []
    for e in plan.entries:
        start = next((s.seconds for s in e.steps if s.name == SERVER_START), None)
        rows.append(
            Versus(
                e.entry, e.seconds,
                spent[e.entry] - waited[e.entry] if e.entry in timed else None,
                start, starts.get(e.entry), e.count(FULL_PREFILLS), prefills.get(e.entry),
                waited[e.entry],
            )
        )  # fmt: skip
    return rows


VERSUS_HEADERS = (
    "entry", "planned", "measured", "measured / planned", "server start planned / measured",
    "full prefills planned / measured", "GPU wait",
)  # fmt: skip


def versus_cells(row: Mapping[str, Any]) -> list[str]:
    """One row of the planned-against-measured table (a :class:`Versus` as a dict)."""

    def t(value: float | None) -> str:
        return "-" if value is None else duration(value)

    planned, measured = row.get("planned_s"), row.get("measured_s")
    ratio = "-" if not planned or measured is None else f"{measured / planned:.2f}"
    counted = row.get("measured_prefills")
    wait = row.get("gpu_wait_s") or 0
    return [
        str(row["entry"]), t(planned), t(measured), ratio,
        f"{t(row.get('planned_start_s'))} / {t(row.get('measured_start_s'))}",
        f"{row.get('planned_prefills')} / {'-' if counted is None else counted}",
        t(wait) if wait else "-",
    ]  # fmt: skip


def render_versus(rows: Sequence[Versus]) -> str:
    """Planned against measured as Markdown (the terminal summary and ``plan --against``)."""
    if not rows:
        return ""
    lines = [
        "| " + " | ".join(VERSUS_HEADERS) + " |",
        "|---|" + "---:|" * (len(VERSUS_HEADERS) - 1),
    ]
    lines += ["| " + " | ".join(versus_cells(asdict(r))) + " |" for r in rows]
    return "\n".join(lines) + "\n"
