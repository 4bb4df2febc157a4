"""The SSE reader yields the same messages however the byte stream is cut into chunks."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from vllm_conformance.client import sse

EVENTS = [{"choices": [{"text": t}]} for t in ("Hello", " wörld", " ✓", "")]
STREAM = (
    b": keep-alive\n\n"
    + b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in EVENTS)
    + b"data: [DONE]\n\n"
)


def read(chunks: list[bytes]) -> list[str]:
    buffer = sse.SSEBuffer()
    return [m for chunk in chunks for m in buffer.add(chunk)]


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_chunking_gives_the_same_messages(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(points)]
    messages = read(chunks)
    payloads = [sse.data_of(m) for m in messages]
    assert payloads == [None, *(json.dumps(e, ensure_ascii=False) for e in EVENTS), sse.DONE]


def test_last_message_without_blank_line_counts_once_complete() -> None:
    assert read([b'data: {"a": 1}']) == ['data: {"a": 1}']
    assert read([b'data: {"a": ']) == []
