"""Server-sent events as vLLM's OpenAI server writes them (``data: {json}``, then ``[DONE]``).

The one place that knows this framing, for every reader: the synchronous client of the
suites (lines, through httpx), the load generator (arbitrary byte chunks, through aiohttp),
the fuzz checks (a complete body as text) and the raw-socket tests (bytes with the HTTP
head and chunked framing still in them).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from typing import Any

#: The content type of a stream answer.
MEDIA_TYPE = "text/event-stream"
DONE = "[DONE]"
_DATA = "data:"


def data_of(message: str) -> str | None:
    """The payload of one SSE line or message; None for comments, other fields and blanks."""
    if not message.startswith(_DATA):
        return None
    return message[len(_DATA) :].strip()


def payloads(text: str) -> list[str]:
    """Every payload of a complete stream body, in order, ``[DONE]`` and non-JSON included."""
    return [data for line in text.splitlines() if (data := data_of(line)) is not None]


def events(messages: Iterable[str]) -> Iterator[Any]:
    """The decoded events of SSE lines or messages, up to ``[DONE]``.

    A payload that is not JSON raises :class:`json.JSONDecodeError`.
    """
    for message in messages:
        data = data_of(message)
        if data is None:
            continue
        if data == DONE:
            return
        yield json.loads(data)


def is_error(event: Any) -> bool:
    """Whether a decoded event is the error vLLM sends inside a 200 stream.

    vLLM nests it (``{"error": {...}}``); the flat form (``"object": "error"``) of vLLM's
    older error bodies counts too.
    """
    return isinstance(event, dict) and ("error" in event or event.get("object") == "error")


def has_data(raw: bytes) -> bool:
    """Whether bytes read off a stream's socket (HTTP head included) hold an event yet."""
    return _DATA.encode() in raw


def has_done(raw: bytes) -> bool:
    """Whether bytes read off a stream's socket hold its ``[DONE]`` (the stream is complete)."""
    # vLLM writes each message in one HTTP chunk, so chunked framing never splits it.
    return f"{_DATA} {DONE}".encode() in raw


class SSEBuffer:
    """Splits a byte stream into SSE messages (same rules as vLLM's StreamedResponseHandler)."""

    def __init__(self) -> None:
        self.buffer = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def add(self, chunk: bytes) -> list[str]:
        self.buffer += self._decoder.decode(chunk)
        messages: list[str] = []
        while "\n\n" in self.buffer:
            message, self.buffer = self.buffer.split("\n\n", 1)
            message = message.strip()
            if message:
                messages.append(message)
        # A final message without the blank line after it counts once it is complete JSON.
        content = data_of(self.buffer)
        if content == DONE or (content and _is_json(content)):
            messages.append(self.buffer.strip())
            self.buffer = ""
        return messages


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
