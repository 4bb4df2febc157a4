"""Versioned context expectations: strict validation, and which one applies to a version."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from vllm_conformance.matrix import ContextExpect, ExpectationError, load_matrix

POLICY = [
    {"vllm": "<=0.30.0", "policy": "reject", "source": "measured on 0.30.0"},
    {"vllm": ">=0.32.0", "policy": "clamp", "source": "measured on 0.32.0"},
]


def ctx(**fields: Any) -> ContextExpect:
    return ContextExpect.model_validate({"source": "self-test", **fields})


@pytest.mark.parametrize(
    ("version", "policy", "vllm"),
    [
        ("0.26.0+cu130", "reject", "<=0.30.0"),
        ("0.30.0", "reject", "<=0.30.0"),
        ("0.32.0", "clamp", ">=0.32.0"),
        ("0.33.1.dev12+g1234abc", "clamp", ">=0.32.0"),
    ],
)
def test_the_range_of_the_served_version_applies(version: str, policy: str, vllm: str) -> None:
    applied = ctx(overflow_policy=POLICY).policy_for(version)
    assert applied is not None
    assert (applied.value, applied.vllm) == (policy, vllm)
    assert applied.as_record()["source"].startswith("measured")


def test_a_version_between_the_ranges_is_named() -> None:
    with pytest.raises(ExpectationError, match=r"no overflow_policy for vLLM 0\.31\.2 .*'<=0\.30"):
        ctx(overflow_policy=POLICY).policy_for("0.31.2")


def test_an_unknown_version_cannot_pick_a_range() -> None:
    with pytest.raises(ExpectationError, match="version is unknown"):
        ctx(overflow_policy=POLICY).policy_for(None)


def test_one_policy_for_every_version_and_none() -> None:
    applied = ctx(overflow_policy="clamp").policy_for(None)
    assert applied is not None and applied.value == "clamp" and applied.vllm is None
    assert ctx().policy_for("0.32.0") is None


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ([">=0.30", "<0.31"], "both hold for vLLM 0.30"),
        (["<0.30", ">0.29"], "both hold for vLLM 0.29.0.0.1"),
        ([">=0.30", "==0.32.*"], "both hold for vLLM 0.32"),
        (["~=0.30.1", ">=0.30.5,<0.31"], "both hold"),
    ],
)
def test_overlapping_ranges_are_an_error(ranges: list[str], message: str) -> None:
    items = [{"vllm": r, "policy": "reject", "source": "x"} for r in ranges]
    with pytest.raises(ValidationError, match=message):
        ctx(overflow_policy=items)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([{"vllm": "0.30", "policy": "reject", "source": "x"}], "not a PEP 440 version range"),
        ([{"vllm": "", "policy": "reject", "source": "x"}], "empty version range"),
        ([{"vllm": ">=0.30", "policy": "truncate", "source": "x"}], "'reject' or 'clamp'"),
        ([{"vllm": ">=0.30", "policy": "reject"}], "source"),
        ([], "at least one vLLM range"),
    ],
)
def test_bad_policies_are_named(value: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ctx(overflow_policy=value)


def test_a_kv_floor_says_where_it_holds() -> None:
    with pytest.raises(ValidationError, match="names the vLLM version and max_model_len"):
        ctx(min_kv_cache_tokens=538512)
    floors = [
        {"tokens": 100, "vllm": "==0.26.0", "max_model_len": "4M", "source": "a"},
        {"tokens": 200, "vllm": ">=0.32", "max_model_len": 4_000_000, "source": "b"},
    ]
    c = ctx(min_kv_cache_tokens=floors)
    assert c.kv_floor("0.26.0+cu130", 4_194_304) is not None
    assert c.kv_floor("0.26.0", 4_000_000) is None  # measured at another max_model_len
    hit = c.kv_floor("0.32.0", 4_000_000)
    assert hit is not None and hit.tokens == 200
    assert c.kv_floor(None, 4_000_000) is None
    with pytest.raises(ValidationError, match="at max_model_len 4000000"):
        ctx(min_kv_cache_tokens=[floors[1], {**floors[1], "vllm": ">=0.33"}])


def test_concurrent_checks_fit_the_prefill_budget() -> None:
    with pytest.raises(ValidationError, match="more than full_prefill_budget 3"):
        ctx(max_concurrent_checks=4)
    assert ctx(max_concurrent_checks=4, full_prefill_budget=4).max_concurrent_checks == 4


def test_every_seed_floor_names_version_and_length() -> None:
    """No seed floor is copied from another vLLM version or max_model_len without saying so."""
    for entry in load_matrix([]):
        c = entry.expect.context
        for floor in c.min_kv_cache_tokens if c else []:
            assert floor.max_model_len == entry.serve.max_model_len, entry.id


def test_a_known_issue_can_hold_for_a_vllm_range() -> None:
    from vllm_conformance.matrix import KnownIssue

    issue = KnownIssue(test="test_x[*]", reason="r", source="s", vllm="==0.32.0")
    assert issue.holds_for("0.32.0") and not issue.holds_for("0.30.0")
    assert not issue.holds_for(None)
    assert KnownIssue(test="t", reason="r", source="s").holds_for(None)
    with pytest.raises(ValidationError, match="not a PEP 440 version range"):
        KnownIssue(test="t", reason="r", source="s", vllm="0.32")
