"""The rejection verdict names what went wrong, including a server that answers 500."""

from __future__ import annotations

import pytest

from vllm_conformance.client.calls import Outcome
from vllm_conformance.client.checks import RejectionError, assert_clean_rejection
from vllm_conformance.client.errors import describe_error, parse_error

# Bodies in vLLM 0.32.0's shape; the messages are the ones its CPU server answered in this
# project (the 500 from the head-size-16 model, whose engine dies on the first request).
BODY_400 = (
    '{"error":{"message":"This model\'s maximum context length is 32768 tokens. However, your '
    "prompt contains at least 32769 input tokens, which exceeds this limit even without any "
    'output tokens.","type":"BadRequestError","param":null,"code":400}}'
)
BODY_500 = (
    '{"error":{"message":"EngineCore encountered an issue. See stack trace (above) for the '
    'root cause.","type":"InternalServerError","param":null,"code":500}}'
)


def outcome(status: int, body: str) -> Outcome:
    return Outcome(status, error=parse_error(status, body), body_excerpt=body)


def test_clean_400_passes() -> None:
    assert_clean_rejection(outcome(400, BODY_400), 32768)


def test_500_is_named_as_a_server_error() -> None:
    with pytest.raises(RejectionError, match=r"server error \(HTTP 500\) instead of a clean 400"):
        assert_clean_rejection(outcome(500, BODY_500), 32768)


def test_success_instead_of_rejection() -> None:
    with pytest.raises(RejectionError, match="got HTTP 200, not 400"):
        assert_clean_rejection(outcome(200, '{"choices": []}'), 32768)


def test_400_without_error_body() -> None:
    with pytest.raises(RejectionError, match="without an OpenAI-style error body"):
        assert_clean_rejection(outcome(400, "Bad Request"), 32768)


def test_message_must_name_the_limit() -> None:
    with pytest.raises(RejectionError, match="does not name the limit 4096"):
        assert_clean_rejection(outcome(400, BODY_400), 4096)


def test_flat_pre_0_10_error_shape_parses() -> None:
    err = parse_error(
        400,
        '{"object":"error","message":"too long","type":"BadRequestError","param":null,"code":400}',
    )
    assert err is not None and err.type == "BadRequestError" and err.message == "too long"


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ('{"error": {"message": "too long", "type": "BadRequestError", "code": 400}}',
         "BadRequestError: too long"),
        ('{"message": "flat shape", "type": "invalid_request_error"}',
         "invalid_request_error: flat shape"),
        ('{"error": "Unauthorized"}', "Unauthorized"),
        (b'{"detail": "not the OpenAI shape"}\n', '{"detail": "not the OpenAI shape"}'),
        ("Internal Server Error\n", "Internal Server Error"),
    ],
)  # fmt: skip
def test_describe_error_reads_every_shape(body: str | bytes, text: str) -> None:
    assert describe_error(400, body) == text
