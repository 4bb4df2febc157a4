"""The SSE reader: the same events however the stream arrives (byte chunks, lines, a whole
body, raw socket bytes), ``[DONE]`` ends them, and vLLM's mid-stream error is recognized."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_conformance.client import fuzz, sse
from vllm_conformance.client.errors import parse_error

EVENTS = [{"choices": [{"text": t}]} for t in ("Hello", " wörld", " ✓", "")]
STREAM = (
    b": keep-alive\n\n"
    + b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in EVENTS)
    + b"data: [DONE]\n\n"
)
ERROR = {"error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}}


def read(chunks: list[bytes]) -> list[str]:
    buffer = sse.SSEBuffer()
    return [m for chunk in chunks for m in buffer.add(chunk)]


def chunked(cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(STREAM)]
    return [STREAM[a:b] for a, b in itertools.pairwise(points)]


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_chunking_gives_the_same_messages(cuts: list[int]) -> None:
    messages = read(chunked(cuts))
    payloads = [sse.data_of(m) for m in messages]
    assert payloads == [None, *(json.dumps(e, ensure_ascii=False) for e in EVENTS), sse.DONE]


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_chunks_lines_and_a_whole_body_give_the_same_events(cuts: list[int]) -> None:
    buffer = sse.SSEBuffer()
    from_chunks = [e for chunk in chunked(cuts) for e in sse.events(buffer.add(chunk))]
    from_lines = list(sse.events(STREAM.decode().splitlines()))
    assert from_chunks == from_lines == EVENTS


def test_last_message_without_blank_line_counts_once_complete() -> None:
    assert read([b'data: {"a": 1}']) == ['data: {"a": 1}']
    assert read([b'data: {"a": ']) == []


def test_events_end_at_done_and_skip_what_is_not_data() -> None:
    lines = [": ping", "event: x", "", 'data:{"a": 1}', "data: [DONE]", 'data: {"b": 2}']
    assert list(sse.events(lines)) == [{"a": 1}]


def test_an_event_that_is_not_json_raises() -> None:
    with pytest.raises(json.JSONDecodeError):
        list(sse.events(["data: {not json"]))


def test_payloads_of_a_body_keep_done_and_bad_events() -> None:
    body = 'data: {"a": 1}\n\n: ping\n\ndata: oops\n\ndata: [DONE]\n\n'
    assert sse.payloads(body) == ['{"a": 1}', "oops", sse.DONE]
    assert sse.payloads("") == []


@pytest.mark.parametrize(
    ("event", "error"),
    [
        (ERROR, True),
        ({"error": "Unauthorized"}, True),
        ({"object": "error", "message": "boom", "type": "BadRequestError"}, True),
        (EVENTS[0], False),
        ({"object": "text_completion", "choices": []}, False),
        (["error"], False),
        ("error", False),
    ],
)
def test_is_error(event: object, error: bool) -> None:
    assert sse.is_error(event) is error


def test_raw_socket_bytes() -> None:
    """What a socket reads: the HTTP head, then chunked transfer framing around each event."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    event = b'data: {"choices": []}\n\n'
    done = b"data: [DONE]\n\n"
    raw = head + b"%x\r\n" % len(event) + event + b"\r\n"
    assert not sse.has_data(head) and not sse.has_done(head)
    assert sse.has_data(raw) and not sse.has_done(raw)
    raw += b"%x\r\n" % len(done) + done + b"\r\n0\r\n\r\n"
    assert sse.has_done(raw)
    assert sse.MEDIA_TYPE in head.decode()


@pytest.mark.parametrize("error", [ERROR, {"object": "error", **ERROR["error"]}])
def test_every_reader_sees_the_error_event(error: dict[str, object]) -> None:
    """The fuzz checks and the client read one error event, nested or flat, the same way."""
    body = f"data: {json.dumps(EVENTS[0])}\n\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n"
    assert fuzz.check_stream(body).startswith("error inside a 200 stream: ")
    assert fuzz.stream_error(body) == {k: ERROR["error"][k] for k in ("type", "param", "code")} | {
        "message": "boom"
    }
    [event] = [e for e in sse.events(body.splitlines()) if sse.is_error(e)]
    parsed = parse_error(200, event)
    assert parsed is not None and (parsed.type, parsed.message) == ("InternalServerError", "boom")
