"""One request to an OpenAI-compatible endpoint, observed completely.

Returns an :class:`Outcome` rather than raising, so that a check can record what happened
(status, error body, usage, finish reason) before asserting. Streams are parsed to the end:
an error that arrives inside an HTTP 200 stream (vLLM sends an error chunk, then
``[DONE]``) is an error, not a success.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from vllm_conformance.client import sse
from vllm_conformance.client.errors import ApiError, parse_error


@dataclass
class Outcome:
    status: int
    error: ApiError | None = None
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    text: str = ""
    stream_error: ApiError | None = None
    body_excerpt: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.stream_error is None

    @property
    def prompt_tokens(self) -> int | None:
        return (self.usage or {}).get("prompt_tokens")

    @property
    def completion_tokens(self) -> int | None:
        return (self.usage or {}).get("completion_tokens")

    def as_record(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error": self.error.as_record() if self.error else None,
            "stream_error": self.stream_error.as_record() if self.stream_error else None,
            "usage": self.usage,
            "finish_reason": self.finish_reason,
            "body_excerpt": self.body_excerpt,
        }


def _summarize(body: dict[str, Any]) -> dict[str, Any]:
    """The request as recorded: long prompts become their lengths."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key == "prompt" and isinstance(value, list):
            out["prompt_token_ids"] = len(value)
        elif key == "prompt" and isinstance(value, str) and len(value) > 200:
            out["prompt_chars"] = len(value)
        elif key == "messages":
            out["messages"] = [
                {"role": m.get("role"), "content_chars": len(str(m.get("content", "")))}
                for m in value
            ]
        else:
            out[key] = value
    return out


def summarize_request(path: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"path": path, **_summarize(body)}


def _read_stream(response: httpx.Response, outcome: Outcome, first_token: bool) -> None:
    pieces: list[str] = []
    for chunk in sse.events(response.iter_lines()):
        if sse.is_error(chunk):
            outcome.stream_error = parse_error(200, chunk)
            continue
        if chunk.get("usage"):
            outcome.usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            pieces.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
            outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
        if first_token and chunk.get("choices"):
            outcome.extra["closed_after_first_token"] = True
            break
    outcome.text = "".join(pieces)


def post(http: httpx.Client, path: str, body: dict[str, Any], first_token: bool = False) -> Outcome:
    """POST ``body`` to ``path``; streams when ``body["stream"]`` is true.

    With ``first_token`` (streams only) the stream is closed as soon as the first generated
    token arrives: vLLM then aborts the request, so a check that a long generation is
    *accepted* costs one decode step, not all of them.
    """
    if first_token and not body.get("stream"):
        raise ValueError("first_token needs a streamed request")
    if body.get("stream"):
        body = {**body, "stream_options": {"include_usage": True}}
        with http.stream("POST", path, json=body) as response:
            outcome = Outcome(response.status_code)
            if response.status_code != 200:
                response.read()
                outcome.error = parse_error(response.status_code, response.content)
                outcome.body_excerpt = response.text[:500]
            else:
                _read_stream(response, outcome, first_token)
            return outcome
    response = http.post(path, json=body)
    outcome = Outcome(response.status_code, body_excerpt=response.text[:500])
    if response.status_code != 200:
        outcome.error = parse_error(response.status_code, response.content)
        return outcome
    data = response.json()
    outcome.usage = data.get("usage")
    choice = (data.get("choices") or [{}])[0]
    outcome.finish_reason = choice.get("finish_reason")
    outcome.text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
    return outcome
