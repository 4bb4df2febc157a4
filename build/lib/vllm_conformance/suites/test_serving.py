"""Basic serving conformance: the deployment is what the matrix says, and it answers."""

from __future__ import annotations

from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.matrix import Deployment


def test_models_endpoint_matches_entry(endpoint: Endpoint, deployment: Deployment) -> None:
    """``/v1/models`` lists the entry's model with the promised ``max_model_len``."""
    assert endpoint.model == deployment.served_model_name
    assert endpoint.max_model_len == deployment.serve.max_model_len


def test_greedy_completion(endpoint: Endpoint) -> None:
    """A short greedy completion returns the requested number of tokens."""
    out = endpoint.client().completions.create(
        model=endpoint.model,
        prompt="The capital of",
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage is not None
    assert out.usage.completion_tokens == 4
    assert out.choices[0].finish_reason == "length"
