"""Server-sent events as vLLM's OpenAI server writes them (``data: {json}``, then ``[DONE]``).

One reader for both clients: the synchronous one of the suites (line by line, through
httpx) and the load generator (arbitrary byte chunks, through aiohttp).
"""

from __future__ import annotations

import codecs
import json

DONE = "[DONE]"


def data_of(message: str) -> str | None:
    """The payload of one SSE line or message; None for comments, other fields and blanks."""
    if not message.startswith("data:"):
        return None
    return message[5:].strip()


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
