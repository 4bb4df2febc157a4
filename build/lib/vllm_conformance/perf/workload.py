"""Seeded, reproducible workloads: random prompts of exact token lengths.

A prompt's length is what the *server* counts, special tokens included, which is also what
``vllm bench serve``'s ``random`` dataset aims for: it samples a body of ``input_len - s``
tokens (``s`` = special tokens the tokenizer adds, e.g. BOS) and lets the server add the
specials back. The same seed, tokenizer and spec always give the same prompts.

Two prompt formats:

- ``"token_ids"`` (default): the prompt is sent as a list of token ids; the server cannot
  re-tokenize it, so the length is exact by construction even if the client's tokenizer
  drifts from the server's.
- ``"text"``: the prompt is decoded to text; it is re-encoded and adjusted until the
  tokenizer gives exactly the target length (a decode/encode round trip can merge or split
  tokens), as ``vllm bench serve`` does. Confirm against the server with
  :func:`vllm_conformance.perf.loadgen.server_token_counts`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

import numpy as np

PromptFormat = Literal["token_ids", "text"]


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    vocab_size: int
    all_special_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class WorkloadSpec:
    """A named workload, as a matrix entry or a report can refer to it.

    Mirrors the ``vllm bench serve`` flags of the same names; ``request_rate`` is in requests
    per second (``inf`` = send all at once, limited only by ``max_concurrency``).
    """

    name: str
    input_len: int
    output_len: int
    num_prompts: int
    dataset: Literal["random"] = "random"
    max_concurrency: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    range_ratio: float = 0.0
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    num_warmups: int = 1
    source: str = ""
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1 or self.num_prompts < 1:
            raise ValueError("input_len, output_len and num_prompts must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError("range_ratio must be in [0, 1)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 or None")
        if self.request_rate <= 0 or self.burstiness <= 0:
            raise ValueError("request_rate and burstiness must be > 0")

    def replace(self, **changes: Any) -> WorkloadSpec:
        """A copy with some fields changed (e.g. scaled down for a CPU run)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (``inf`` rate written as the string ``"inf"``, as vLLM does)."""
        d = asdict(self)
        if math.isinf(self.request_rate):
            d["request_rate"] = "inf"
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkloadSpec:
        """Inverse of :meth:`to_dict`."""
        d = dict(data)
        if d.get("request_rate") in ("inf", None):
            d["request_rate"] = math.inf
        return cls(**d)

    @classmethod
    def from_matrix(cls, workload: Any, *, name: str = "matrix", source: str = "") -> WorkloadSpec:
        """From a matrix ``Workload`` (``vllm_conformance.matrix``), read by attribute:
        ``request_rate`` None means unlimited, ``warmup`` is the warm-up request count."""
        rate = getattr(workload, "request_rate", None)
        return cls(
            name=name,
            dataset=getattr(workload, "dataset", "random"),
            input_len=int(workload.input_len),
            output_len=int(workload.output_len),
            num_prompts=int(workload.num_prompts),
            max_concurrency=getattr(workload, "max_concurrency", None),
            request_rate=math.inf if rate is None else float(rate),
            burstiness=float(getattr(workload, "burstiness", 1.0)),
            ignore_eos=bool(getattr(workload, "ignore_eos", True)),
            seed=int(getattr(workload, "seed", 0)),
            num_warmups=int(getattr(workload, "warmup", 1)),
            source=source,
        )

    def vllm_bench_args(self) -> list[str]:
        """The ``vllm bench serve`` flags for this workload (without host, port or model)."""
        args = [
            "--dataset-name", self.dataset,
            "--random-input-len", str(self.input_len),
            "--random-output-len", str(self.output_len),
            "--random-range-ratio", str(self.range_ratio),
            "--num-prompts", str(self.num_prompts),
            "--request-rate", "inf" if math.isinf(self.request_rate) else str(self.request_rate),
            "--burstiness", str(self.burstiness),
            "--temperature", str(self.temperature),
            "--seed", str(self.seed),
            "--num-warmups", str(self.num_warmups),
        ]  # fmt: skip
        if self.max_concurrency is not None:
            args += ["--max-concurrency", str(self.max_concurrency)]
        if self.ignore_eos:
            args.append("--ignore-eos")
        return args


#: The ``vllm bench serve`` workload of NVIDIA's Llama 4 Scout quick-start recipe.
SEED_WORKLOAD = WorkloadSpec(
    name="nvidia-llama4-scout-recipe",
    input_len=1024,
    output_len=1024,
    num_prompts=2560,
    max_concurrency=512,
    ignore_eos=True,
    source=(
        "NVIDIA 'Quick Start Recipe for Llama 4 Scout on vLLM', run_performance.sh: "
        "vllm bench serve --dataset-name random --random-input-len 1024 "
        "--random-output-len 1024 --ignore-eos --max-concurrency 512 --num-prompts 2560"
    ),
)


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: the prompt and the number of tokens to generate."""

    index: int
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The served model's tokenizer, via ``transformers.AutoTokenizer`` (local files only
    when the path exists)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    local = Path(name_or_path).exists()
    return AutoTokenizer.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, local_files_only=local
    )


def special_prefix(tokenizer: Tokenizer) -> list[int]:
    """The token ids the tokenizer adds around a text (e.g. ``[BOS]``), placed first."""
    return list(tokenizer.encode("", add_special_tokens=True))


def _allowed_ids(tokenizer: Tokenizer) -> np.ndarray:
    special = set(tokenizer.all_special_ids)
    ids = np.array([i for i in range(int(tokenizer.vocab_size)) if i not in special])
    if ids.size == 0:
        raise ValueError("tokenizer has no non-special tokens")
    return ids


def sample_lengths(
    rng: np.random.Generator,
    n: int,
    mean_len: int,
    range_ratio: float,
    *,
    minimum: int = 1,
) -> np.ndarray:
    """Integer lengths uniform on ``[floor(L(1-r)), ceil(L(1+r))]``, as vLLM's random dataset."""
    low = max(minimum, math.floor(mean_len * (1.0 - range_ratio)))
    high = max(low, math.ceil(mean_len * (1.0 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def exact_length_text(
    tokenizer: Tokenizer,
    body_len: int,
    rng: np.random.Generator,
    *,
    allowed: np.ndarray | None = None,
    max_adjust: int = 10,
    max_restarts: int = 20,
) -> tuple[str, list[int]]:
    """Random text whose encoding *without* special tokens is exactly ``body_len`` tokens.

    Drawn from the whole vocabulary, as ``vllm bench serve``'s random data set draws it, so
    that the two load generators see the same prompts; :mod:`vllm_conformance.client.prompts`
    builds readable word prompts instead, which chat templates can be sized around.

    Returns the text and its token ids. Raises ``ValueError`` when no such text is found
    (a tokenizer whose round trip never settles).
    """
    pool = _allowed_ids(tokenizer) if allowed is None else allowed
    for _ in range(max_restarts):
        ids = pool[rng.integers(0, len(pool), size=body_len)].tolist()
        for _ in range(max_adjust):
            text = tokenizer.decode(ids)
            enc = list(tokenizer.encode(text, add_special_tokens=False))
            if len(enc) == body_len:
                return text, enc
            if len(enc) > body_len:
                ids = enc[:body_len]
            else:
                extra = pool[rng.integers(0, len(pool), size=body_len - len(enc))].tolist()
                ids = enc + extra
    raise ValueError(f"could not build a text prompt of exactly {body_len} tokens")


def random_requests(
    tokenizer: Tokenizer,
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    prompt_format: PromptFormat = "token_ids",
) -> list[RequestSpec]:
    """Seeded random prompts whose server-side token count is exactly the sampled length.

    ``input_len`` counts special tokens (as the server's ``usage.prompt_tokens`` does);
    lengths are sampled like ``vllm bench serve --random-range-ratio``.
    """
    prefix = special_prefix(tokenizer)
    body_mean = input_len - len(prefix)
    if body_mean < 1:
        raise ValueError(f"input_len {input_len} leaves no room after {len(prefix)} specials")
    rng = np.random.default_rng(seed)
    body_lens = sample_lengths(rng, num_prompts, body_mean, range_ratio)
    out_lens = sample_lengths(rng, num_prompts, output_len, range_ratio)
    pool = _allowed_ids(tokenizer)
    requests: list[RequestSpec] = []
    for i in range(num_prompts):
        n = int(body_lens[i])
        if prompt_format == "text":
            text, _ = exact_length_text(tokenizer, n, rng, allowed=pool)
            prompt: str | list[int] = text
            total = len(tokenizer.encode(text, add_special_tokens=True))
            if total != n + len(prefix):
                want = n + len(prefix)
                raise ValueError(f"prompt {i}: {total} tokens with specials, want {want}")
        elif prompt_format == "token_ids":
            prompt = prefix + pool[rng.integers(0, len(pool), size=n)].tolist()
            total = len(prompt)
        else:
            raise ValueError(f"unknown prompt_format {prompt_format!r}")
        requests.append(RequestSpec(i, prompt, total, int(out_lens[i])))
    return requests


def build_requests(
    spec: WorkloadSpec, tokenizer: Tokenizer, *, prompt_format: PromptFormat = "token_ids"
) -> list[RequestSpec]:
    """The requests of a :class:`WorkloadSpec` (its ``seed`` drives the prompts)."""
    if spec.dataset != "random":
        raise ValueError(f"unsupported dataset {spec.dataset!r}")
    return random_requests(
        tokenizer,
        num_prompts=spec.num_prompts,
        input_len=spec.input_len,
        output_len=spec.output_len,
        range_ratio=spec.range_ratio,
        seed=spec.seed,
        prompt_format=prompt_format,
    )
