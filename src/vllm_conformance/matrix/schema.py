"""The hardware matrix: deployments and their expectations, as validated data.

A matrix file is YAML with a top-level ``deployments`` list (one file per model family).
Each entry says what to serve (model, hardware, every ``vllm serve`` argument) and what the
deployment must show (context, accuracy, performance), each expectation with its source.
The matrix is the only place where a deployment, a flag or a threshold is written.

This module is the schema (pydantic, strict: an unknown key, a wrong type or an inconsistent
value is an error); :mod:`vllm_conformance.matrix.load` reads files into it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from vllm_conformance.matrix import versions

GpuKind = Literal["cpu", "a100", "h100", "h200", "b200"]
Precision = Literal["bf16", "fp16", "fp8", "fp4", "int4"]
Family = Literal["scout", "maverick", "tiny"]
PositiveInt = Annotated[int, Field(gt=0)]

_ID_RE = r"^[a-z0-9][a-z0-9._-]*$"


class _Strict(BaseModel):
    """Base for every matrix model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_token_count(value: int | str) -> int:
    """Parse a token count the way ``vllm serve`` does: ``1k`` = 1000, ``1K`` = 1024.

    Plain integers (and underscores or commas as thousands separators) pass through.
    """
    if isinstance(value, int):
        return value
    text = value.strip().replace("_", "").replace(",", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG]?)", text)
    if not match:
        raise ValueError(f"not a token count: {value!r}")
    number, suffix = match.groups()
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    result = float(number) * scale[suffix]
    if result != int(result):
        raise ValueError(f"not a whole number of tokens: {value!r}")
    return int(result)


TokenCount = Annotated[int, Field(gt=0)]


class Model(_Strict):
    """What to serve: a checkpoint (hub id or local path) or a generated model."""

    family: Family
    precision: Precision = Field(description="weight precision of the served checkpoint")
    path: str | None = Field(None, description="hub id or local directory of the checkpoint")
    generate: str | None = Field(None, description="modelgen recipe that builds the model")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the recipe")
    tokenizer: str | None = Field(None, description="tokenizer path or id; default: the model")
    served_model_name: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Model:
        if (self.path is None) == (self.generate is None):
            raise ValueError("give exactly one of 'path' or 'generate'")
        if self.options and self.generate is None:
            raise ValueError("'options' only apply to a generated model")
        return self


class Hardware(_Strict):
    """Where it runs: GPU kind, how many of them the deployment needs, over how many nodes."""

    gpu: GpuKind
    count: int = Field(1, ge=1, description="GPUs of the whole deployment, all nodes together")
    nodes: int = Field(
        1,
        ge=1,
        description="nodes one deployment spans (vLLM's --nnodes; needs --launcher ray)",
    )

    @model_validator(mode="after")
    def _cpu_has_no_count(self) -> Hardware:
        if self.gpu == "cpu" and self.count != 1:
            raise ValueError("a cpu deployment has count 1")
        if self.gpu != "cpu" and self.count % self.nodes:
            raise ValueError(
                f"hardware.count ({self.count}) does not split evenly over hardware.nodes "
                f"({self.nodes}): vLLM runs the same number of GPUs on every node"
            )
        return self


class Serve(_Strict):
    """The ``vllm serve`` arguments of a deployment, named as vLLM names them."""

    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    dtype: str | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    max_model_len: TokenCount
    max_num_seqs: PositiveInt | None = None
    max_num_batched_tokens: PositiveInt | None = None
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    limit_mm_per_prompt: dict[str, int] | None = None
    override_generation_config: dict[str, Any] | None = None
    generation_config: str | None = None
    compilation_config: dict[str, Any] | None = None
    async_scheduling: bool | None = None
    enable_prefix_caching: bool | None = None
    load_format: str | None = Field(
        None, description="'dummy': random weights from config.json (real sizes, no download)"
    )
    api_key_env: str | None = Field(
        None, description="name of the environment variable that holds --api-key"
    )
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("max_model_len", mode="before")
    @classmethod
    def _suffixes(cls, value: Any) -> Any:
        return parse_token_count(value) if isinstance(value, str) else value

    @property
    def max_new_tokens(self) -> int | None:
        """The server-wide output cap, from ``override_generation_config``."""
        value = (self.override_generation_config or {}).get("max_new_tokens")
        return int(value) if value is not None else None

    def argv(self) -> list[str]:
        """The command-line arguments for ``vllm serve`` (without the model)."""
        args: list[str] = []
        for name, value in self.model_dump(exclude={"extra_args", "env", "api_key_env"}).items():
            flag = "--" + name.replace("_", "-")
            if value is None:
                continue
            if name in ("tensor_parallel_size", "pipeline_parallel_size") and value == 1:
                continue
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, dict):
                args += [flag, json.dumps(value, separators=(",", ":"))]
            else:
                args += [flag, str(value)]
        return args + list(self.extra_args)


class KvCacheRatio(_Strict):
    """The KV capacity relative to another entry's, both started in the same run.

    A ratio, not an absolute figure: it holds whatever the GPU's free memory is, so it
    checks what a flag such as ``--kv-cache-dtype fp8`` promises ("about twice the tokens").
    """

    to: str = Field(description="id of the entry whose logged KV capacity is compared with")
    ratio: float = Field(gt=0)
    rel: float = Field(0.1, gt=0, lt=1, description="relative tolerance on the ratio")
    source: str


class ExpectationError(ValueError):
    """No expectation of an entry applies to what is served (e.g. no range holds its version)."""


class ForVllm(_Strict):
    """An expectation that holds for a range of vLLM versions, with where it comes from."""

    vllm: str = Field(description="PEP 440 range of vLLM versions, e.g. '>=0.32' or '==0.26.0'")
    source: str

    @field_validator("vllm")
    @classmethod
    def _range(cls, value: str) -> str:
        versions.specifier_set(value)
        return value

    def holds_for(self, version: str) -> bool:
        return versions.contains(self.vllm, version)


Policy = Literal["reject", "clamp"]


class OverflowPolicy(ForVllm):
    """How the server answers a fitting prompt whose ``max_tokens`` overshoots the limit."""

    policy: Policy


class KvFloor(ForVllm):
    """A KV capacity ("KV cache size: N tokens") measured on ``vllm`` at ``max_model_len``.

    Both are part of the floor: the same flags give other capacities on other vLLM
    versions, and for hybrid (chunked local plus global) layouts vLLM's figure moves with
    ``--max-model-len``, so a floor only applies where both match what is served.
    """

    tokens: PositiveInt
    max_model_len: TokenCount = Field(description="the --max-model-len it was measured at")

    @field_validator("max_model_len", mode="before")
    @classmethod
    def _suffixes(cls, value: Any) -> Any:
        return parse_token_count(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class Applied:
    """The expectation that applies to one served version, for the report."""

    value: Any
    vllm: str | None = None  # None: the expectation holds for every version
    source: str = ""

    def as_record(self) -> dict[str, Any]:
        return {"value": self.value, "vllm": self.vllm or "any", "source": self.source}


def _disjoint(items: list[ForVllm], what: str) -> None:
    if clash := versions.overlap([i.vllm for i in items]):
        a, b, version = clash
        raise ValueError(f"{what}: the ranges {a!r} and {b!r} both hold for vLLM {version}")


class ContextExpect(_Strict):
    """What the context suite checks: the promised length and the KV capacity."""

    source: str
    startup: Literal["ok", "fails"] = "ok"
    failure_reasons: list[Literal["kv_cache", "oom"]] = Field(
        default_factory=list, description="accepted reasons when startup is expected to fail"
    )
    min_kv_cache_tokens: list[KvFloor] = Field(
        default_factory=list, description="KV capacity floors, each for a vLLM range"
    )
    overflow_policy: Policy | list[OverflowPolicy] | None = Field(
        None,
        description="what the server does when prompt + max_tokens exceeds max_model_len: "
        "one policy for every version, or one per vLLM range; unset: observed, not judged",
    )
    # 2, not 3: on one H100 (vLLM 0.26.0, half-depth Scout, 262,144 tokens) three concurrent
    # near-maximum requests also recomputed the shared prompt (none of its blocks came from
    # the cache), 4 full prefills in all; with 2 the worst case is the first prefill plus 2.
    max_concurrent_checks: int = Field(
        2, ge=1, description="cap on the concurrent near-maximum requests of the KV check"
    )
    full_prefill_budget: int = Field(
        3,
        ge=1,
        description="most full-length prefills the context suite may cost (project goal: 3)",
    )
    kv_cache_ratio: KvCacheRatio | None = None

    @field_validator("min_kv_cache_tokens", mode="before")
    @classmethod
    def _floors_say_where_from(cls, value: Any) -> Any:
        if isinstance(value, (int, str)):
            raise ValueError(
                "a KV floor names the vLLM version and max_model_len it was measured at: "
                "[{tokens: N, vllm: '==0.32.0', max_model_len: M, source: ...}]"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ContextExpect:
        if (self.startup == "fails") != bool(self.failure_reasons):
            raise ValueError("'failure_reasons' are given exactly when startup is 'fails'")
        if isinstance(self.overflow_policy, list):
            if not self.overflow_policy:
                raise ValueError("'overflow_policy' lists at least one vLLM range")
            _disjoint(list(self.overflow_policy), "overflow_policy")
        for length in {f.max_model_len for f in self.min_kv_cache_tokens}:
            same = [f for f in self.min_kv_cache_tokens if f.max_model_len == length]
            _disjoint(list(same), f"min_kv_cache_tokens at max_model_len {length}")
        if self.max_concurrent_checks > self.full_prefill_budget:
            raise ValueError(
                f"max_concurrent_checks {self.max_concurrent_checks} costs that many full "
                f"prefills, more than full_prefill_budget {self.full_prefill_budget}"
            )
        return self

    def policy_for(self, version: str | None) -> Applied | None:
        """The overflow policy declared for vLLM ``version`` (None: none is declared)."""
        declared = self.overflow_policy
        if declared is None:
            return None
        if isinstance(declared, str):
            return Applied(declared, None, self.source)
        ranges = ", ".join(repr(p.vllm) for p in declared)
        if version is None:
            raise ExpectationError(
                f"the served vLLM version is unknown (/version did not answer), so no "
                f"overflow_policy applies (declared for {ranges})"
            )
        for item in declared:
            if item.holds_for(version):
                return Applied(item.policy, item.vllm, item.source)
        raise ExpectationError(f"no overflow_policy for vLLM {version} (declared for {ranges})")

    def kv_floor(self, version: str | None, max_model_len: int) -> KvFloor | None:
        """The KV floor measured on this vLLM range at this ``max_model_len``, if any."""
        if version is None:
            return None
        return next(
            (
                f
                for f in self.min_kv_cache_tokens
                if f.max_model_len == max_model_len and f.holds_for(version)
            ),
            None,
        )


class AccuracyExpect(_Strict):
    """One lm-eval task with the value it must reach.

    ``against: reported`` compares with a published ``value``; ``against: reference``
    compares with the score of the reference implementation (transformers, greedy) on the
    same documents, which is how a generated model is checked for numerics conformance.
    Both ask "is the served model worse?" at the project's one significance level
    (:mod:`vllm_conformance.verdicts`); ``rtol`` is the drop tolerated on top of the noise.
    """

    task: str
    metric: str = Field(description="lm-eval result key, e.g. 'exact_match,flexible-extract'")
    against: Literal["reported", "reference"] = "reported"
    value: float | None = Field(None, ge=0, le=1)
    stderr: float | None = Field(
        None, ge=0, description="standard error of the reported value, when its source gives one"
    )
    source: str
    gen_kwargs: dict[str, Any] = Field(default_factory=dict)
    api: Literal["completions", "chat-completions"] = "completions"
    num_fewshot: int | None = Field(None, ge=0)
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    limit: PositiveInt | None = Field(
        None, description="documents per task (per subtask of a group), e.g. vLLM CI's sizes"
    )
    concurrency: PositiveInt = Field(128, description="concurrent requests lm-eval sends")
    one_sided: bool = Field(
        True, description="fail only a shortfall; false: a difference either way fails"
    )
    rtol: float = Field(
        0.0, ge=0, lt=1, description="relative drop tolerated besides the noise (vLLM CI: 0.08)"
    )
    data: str | None = Field(
        None, description="local data set path, $ENV_VAR holding one, or 'fixture'"
    )

    @model_validator(mode="after")
    def _value_iff_reported(self) -> AccuracyExpect:
        if (self.against == "reported") != (self.value is not None):
            raise ValueError("'value' is given exactly when 'against' is 'reported'")
        if self.against == "reference" and (self.stderr is not None or self.rtol):
            raise ValueError("'stderr' and 'rtol' apply to 'against: reported' only")
        return self


class Threshold(_Strict):
    """One performance gate, e.g. ``output_throughput >= 2600``."""

    metric: str
    min: float | None = None
    max: float | None = None
    source: str

    @model_validator(mode="after")
    def _one_bound(self) -> Threshold:
        if self.min is None and self.max is None:
            raise ValueError("give 'min' or 'max'")
        return self


class Workload(_Strict):
    """A ``vllm bench serve`` style workload."""

    dataset: Literal["random"] = "random"
    input_len: PositiveInt
    output_len: PositiveInt
    num_prompts: PositiveInt
    max_concurrency: PositiveInt | None = None
    request_rate: float | None = Field(None, gt=0)
    burstiness: float = Field(1.0, gt=0)
    ignore_eos: bool = True
    warmup: int = Field(2, ge=0)
    seed: int = 0


class PerformanceExpect(_Strict):
    """Workload plus thresholds (each with its own source)."""

    workload: Workload
    thresholds: list[Threshold] = Field(default_factory=list)
    slo: dict[str, float] = Field(default_factory=dict, description="goodput SLOs in ms")
    baseline: str | None = Field(
        None, description="baseline samples (JSON, relative to the matrix file's project)"
    )
    min_effect: float = Field(
        0.05, ge=0, description="smallest relative slow-down called a regression"
    )
    compare_metrics: list[Literal["ttft", "tpot", "itl", "e2el"]] = Field(
        default_factory=lambda: ["ttft", "tpot", "e2el"],
        description="per-request latencies compared with the baseline",
    )
    source: str


class Replay(_Strict):
    """A request that shows a known issue: a JSON ``body`` (``model`` and ``stream`` are set
    by the test) or raw bytes (``raw`` text, or ``raw_b64`` for bytes that are not UTF-8)."""

    api: Literal["completions", "chat"]
    body: dict[str, Any] | None = None
    raw: str | None = None
    raw_b64: str | None = None
    content_type: str | None = "application/json"

    @model_validator(mode="after")
    def _one_body(self) -> Replay:
        if sum(x is not None for x in (self.body, self.raw, self.raw_b64)) != 1:
            raise ValueError("give exactly one of 'body', 'raw' or 'raw_b64'")
        return self


class KnownIssue(_Strict):
    """A finding about the served vLLM that its tests keep asserting, as a strict xfail.

    The test still runs: while vLLM behaves as recorded it is reported as an expected
    failure; the day it is fixed the test passes unexpectedly and fails the run, so the
    entry is updated instead of a finding silently going stale.

    With a signature (``status``, ``error_type``, ``message``: what the finding's answer
    showed) only that finding is expected: a test that reports its findings (the fuzzer
    does) fails on any other finding, and on a known one that no longer shows. Without
    one, any failure of the named tests is expected.

    With ``vllm`` it is an expected failure only where the served version is in that range
    (of tests that take the ``endpoint`` fixture, once the server has said its version).
    """

    test: str = Field(description="test name, '*' matching anything: 'test_bad_input[*-x]'")
    status: int | None = Field(None, description="HTTP status of the finding's answer")
    error_type: str | None = Field(None, description="the error object's 'type', exactly")
    message: str | None = Field(
        None, description="regular expression searched in the error message and the problem"
    )
    replay: list[Replay] = Field(
        default_factory=list,
        description="requests that show it: the fuzzer sends them first, so the issue is "
        "exercised in every run (a signature without a replay may go undrawn)",
    )
    reason: str
    source: str
    vllm: str | None = Field(None, description="PEP 440 range of vLLM versions it holds for")

    @field_validator("vllm")
    @classmethod
    def _range(cls, value: str | None) -> str | None:
        if value is not None:
            versions.specifier_set(value)
        return value

    def holds_for(self, version: str | None) -> bool:
        """Whether the issue is one of vLLM ``version`` (an unknown version: no)."""
        return self.vllm is None or (version is not None and versions.contains(self.vllm, version))

    @field_validator("message")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _replay_needs_signature(self) -> KnownIssue:
        if self.replay and not self.has_signature:
            raise ValueError("a 'replay' is matched by the signature: give status, error_type "
                             "or message")  # fmt: skip
        if self.vllm is not None and self.has_signature:
            raise ValueError(
                "an issue of a vLLM range has no signature (status, error_type, message): "
                "it marks the named tests once the version is known"
            )
        return self

    @property
    def has_signature(self) -> bool:
        return (self.status, self.error_type, self.message) != (None, None, None)

    def matches(self, test_name: str) -> bool:
        """Whether ``test_name`` (with its parameters) is one this issue names."""
        pattern = ".*".join(re.escape(part) for part in self.test.split("*"))
        return re.fullmatch(pattern, test_name) is not None

    def matches_finding(self, status: int | None, error_type: str | None, text: str) -> bool:
        """Whether a finding (its answer's status, error type, and message plus problem
        text) is this issue; only the fields the issue gives are compared."""
        return (
            self.has_signature
            and (self.status is None or self.status == status)
            and (self.error_type is None or self.error_type == error_type)
            and (self.message is None or re.search(self.message, text) is not None)
        )


class Expect(_Strict):
    known_issues: list[KnownIssue] = Field(default_factory=list)
    context: ContextExpect | None = None
    accuracy: list[AccuracyExpect] = Field(default_factory=list)
    performance: PerformanceExpect | None = None


class Deployment(_Strict):
    """One row of the hardware matrix."""

    id: str = Field(pattern=_ID_RE)
    description: str = ""
    model: Model
    hardware: Hardware
    serve: Serve
    expect: Expect = Field(default_factory=Expect)
    source: str = Field(description="where this deployment comes from")

    @model_validator(mode="after")
    def _consistent(self) -> Deployment:
        gpus = self.serve.tensor_parallel_size * self.serve.pipeline_parallel_size
        hw = self.hardware
        if hw.gpu != "cpu" and gpus > hw.count:
            raise ValueError(
                f"tensor x pipeline parallel size is {gpus} but hardware.count is {hw.count}"
            )
        if hw.nodes > 1 and gpus % hw.nodes:
            raise ValueError(
                f"tensor x pipeline parallel size ({gpus}) is not a multiple of hardware.nodes "
                f"({hw.nodes}): vLLM gives every node the same number of ranks"
            )
        if hw.nodes > 1 and hw.gpu != "cpu" and gpus != hw.count:
            raise ValueError(
                f"a deployment over {hw.nodes} nodes runs one rank per GPU: tensor x pipeline "
                f"parallel size is {gpus}, hardware.count {hw.count}"
            )
        cap = self.serve.max_new_tokens
        if cap is not None and cap > self.serve.max_model_len:
            raise ValueError(
                f"override_generation_config.max_new_tokens ({cap}) is above "
                f"max_model_len ({self.serve.max_model_len})"
            )
        perf = self.expect.performance
        if perf and perf.workload.input_len + perf.workload.output_len > self.serve.max_model_len:
            raise ValueError("performance workload input_len + output_len exceeds max_model_len")
        return self

    @property
    def served_model_name(self) -> str:
        """The name clients send as ``model``."""
        return self.model.served_model_name or self.model.path or self.model.generate or self.id

    @property
    def startup_fails(self) -> bool:
        return self.expect.context is not None and self.expect.context.startup == "fails"
