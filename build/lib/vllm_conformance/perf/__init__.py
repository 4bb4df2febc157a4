"""Performance measurement: workloads, a load generator, metrics, statistics and reports.

Every client-side metric is defined exactly as ``vllm bench serve`` defines it (vLLM 0.32,
``vllm/benchmarks/serve.py`` and ``vllm/benchmarks/lib/endpoint_request_func.py``), so a
number from this package can be put beside one from ``vllm bench serve`` without a footnote.
``benchmarks/fidelity.py`` checks that claim against a live server.

Modules (import what you need; plotting and HTTP clients are only loaded on use):

- :mod:`~vllm_conformance.perf.workload`: seeded random prompts of exact token lengths and
  named workload descriptions (:data:`~vllm_conformance.perf.workload.SEED_WORKLOAD`).
- :mod:`~vllm_conformance.perf.loadgen`: the async load generator (concurrency or rate).
- :mod:`~vllm_conformance.perf.metrics`: aggregation under ``vllm bench serve``'s names.
- :mod:`~vllm_conformance.perf.stats`: baselines and significance-tested comparisons.
- :mod:`~vllm_conformance.perf.server_metrics`: server-side histograms from ``/metrics``.
- :mod:`~vllm_conformance.perf.report`: JSON, Markdown and PNG reports.
"""

from __future__ import annotations

__all__ = ["loadgen", "metrics", "report", "server_metrics", "stats", "workload"]
