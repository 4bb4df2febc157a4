"""Compare two runs (before and after an upgrade): what changed, and is it a regression?

Reports are matched entry by entry; checks by ``(entry, check)`` (the n-th record of a
check name with the n-th), tests by ``(entry, nodeid)``. Every difference becomes a
:class:`Finding` of one kind:

- ``regression``: worse in a way clients or operators feel: a check or test that newly
  fails, a server that no longer starts, less KV capacity or concurrency or a shorter
  ``max_model_len``, a changed error contract (status code, error ``type``/``param``/
  ``code``, reject vs clamp), a new 5xx, or a statistically significant drop in accuracy or
  performance;
- ``improvement``: the same, the good way;
- ``change``: different, neither clearly worse nor better: an error *message* reworded
  (vLLM rewords them between versions; clients must not match on text), an observed value
  that moved, a much slower start (compile caches make it noisy, so it is not gated);
- ``note``: context: versions, serve arguments, numbers without an uncertainty that moved
  a little, checks present on one side only.

Numbers are judged by the rule the suites use (:mod:`vllm_conformance.verdicts`: one
``alpha``, one-sided bounds beyond a tolerated change): accuracy values with standard errors
by their difference (paired over the documents both runs scored, when they recorded
``per_doc``), per-request performance samples by :mod:`vllm_conformance.perf.stats`
(bootstrap bounds of the ratio, and a Fisher test of the failure rate). What the check
records must contain for that is in docs/upgrades.md.

The package keeps model (:mod:`.model`), analysis (:mod:`.analysis`, :mod:`.measures`) and
views (:mod:`.views`) apart.

Either side may be a run that was killed half-way: its records are read as far as they go.
"""

from vllm_conformance.report.compare.analysis import compare, compare_paths
from vllm_conformance.report.compare.model import (
    KINDS,
    CompareError,
    Diff,
    FailOn,
    Finding,
    Kind,
    Options,
    Side,
    load_side,
)
from vllm_conformance.report.compare.views import headline, render, to_json, to_markdown

__all__ = [
    "KINDS",
    "CompareError",
    "Diff",
    "FailOn",
    "Finding",
    "Kind",
    "Options",
    "Side",
    "compare",
    "compare_paths",
    "headline",
    "load_side",
    "render",
    "to_json",
    "to_markdown",
]
