"""vllm-conformance: a pytest conformance and regression suite for vLLM deployments.

The parts, one subpackage each: :mod:`~vllm_conformance.matrix` (what is deployed and
expected), :mod:`~vllm_conformance.launch` (getting a server), :mod:`~vllm_conformance.models`
(generated models), :mod:`~vllm_conformance.client` (requests and their verdicts),
:mod:`~vllm_conformance.perf` (load and statistics), :mod:`~vllm_conformance.report`
(records and their views); the pytest side is :mod:`~vllm_conformance.plugin`,
:mod:`~vllm_conformance.fixtures` and :mod:`~vllm_conformance.suites`.
"""

from vllm_conformance import _moved

_moved.install()
