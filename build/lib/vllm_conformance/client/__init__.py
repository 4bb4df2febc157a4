"""What a client sends and how its answers are judged.

- :mod:`~vllm_conformance.client.calls`: one request, observed completely (:class:`Outcome`);
- :mod:`~vllm_conformance.client.sse`: the server-sent-events reader every stream goes through;
- :mod:`~vllm_conformance.client.errors`: OpenAI-style error bodies, parsed and described;
- :mod:`~vllm_conformance.client.prompts`: prompts of an exact token count;
- :mod:`~vllm_conformance.client.checks`: verdicts shared by the suites;
- :mod:`~vllm_conformance.client.fuzz`: bad-input strategies (hypothesis);
- :mod:`~vllm_conformance.client.accuracy`: lm-eval against the server, and its statistics.
"""
