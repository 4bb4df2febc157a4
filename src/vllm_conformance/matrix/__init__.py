"""The hardware matrix: deployments and their expectations, as validated data.

- :mod:`~vllm_conformance.matrix.schema`: what an entry may say (pydantic, strict);
- :mod:`~vllm_conformance.matrix.load`: files, bundled seed entries, ``extends``, paths;
- :mod:`~vllm_conformance.matrix.markers`: the pytest markers an entry gets;
- :mod:`~vllm_conformance.matrix.settings`: the plugin's options and how they resolve.
"""

from vllm_conformance.matrix.load import (
    BUNDLED,
    Matrix,
    MatrixError,
    load,
    load_file,
    load_matrix,
    matrix_files,
)
from vllm_conformance.matrix.schema import (
    AccuracyExpect,
    ContextExpect,
    Deployment,
    Expect,
    ExpectationError,
    Family,
    GpuKind,
    Hardware,
    KnownIssue,
    KvCacheRatio,
    KvFloor,
    Model,
    OverflowPolicy,
    PerformanceExpect,
    Precision,
    Serve,
    Threshold,
    Workload,
    parse_token_count,
)

__all__ = [
    "BUNDLED",
    "AccuracyExpect",
    "ContextExpect",
    "Deployment",
    "Expect",
    "ExpectationError",
    "Family",
    "GpuKind",
    "Hardware",
    "KnownIssue",
    "KvCacheRatio",
    "KvFloor",
    "Matrix",
    "MatrixError",
    "Model",
    "OverflowPolicy",
    "PerformanceExpect",
    "Precision",
    "Serve",
    "Threshold",
    "Workload",
    "load",
    "load_file",
    "load_matrix",
    "matrix_files",
    "parse_token_count",
]
