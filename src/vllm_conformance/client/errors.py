"""Read vLLM's error responses in both shapes it has used.

Since vLLM 0.10.1 the body is nested, ``{"error": {"message", "type", "param", "code"}}``;
before, it was flat. Checks assert on status, ``type`` and ``param`` (stable) and record the
message (reworded between versions).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class ApiError:
    status: int
    type: str | None
    message: str
    param: str | None = None
    code: int | str | None = None

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def parse_error(status: int, body: bytes | str | dict[str, Any]) -> ApiError | None:
    """The OpenAI-style error in ``body`` (text, or a stream event already decoded), or None
    when it is not one."""
    try:
        data = json.loads(body) if isinstance(body, (bytes, str)) else body
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    err = data.get("error", data)
    if isinstance(err, str):  # --api-key's {"error": "Unauthorized"}
        return ApiError(status, None, err)
    if not isinstance(err, dict) or "message" not in err:
        return None
    return ApiError(status, err.get("type"), str(err["message"]), err.get("param"), err.get("code"))


def describe_error(status: int, body: bytes | str | dict[str, Any]) -> str:
    """``type: message`` of an OpenAI-style error body; otherwise the body itself."""
    err = parse_error(status, body)
    if err is None:
        if isinstance(body, dict):
            return json.dumps(body)
        return (body.decode(errors="replace") if isinstance(body, bytes) else body).strip()
    return f"{err.type}: {err.message}" if err.type else err.message


def response_error(response: httpx.Response) -> ApiError | None:
    return parse_error(response.status_code, response.content)
