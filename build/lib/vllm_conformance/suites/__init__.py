"""The conformance suites, run with ``pytest --pyargs vllm_conformance.suites``."""
