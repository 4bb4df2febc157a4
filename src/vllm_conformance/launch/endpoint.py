"""A handle on a serving vLLM deployment, whether launched here or already running.

Suites only ever see an :class:`Endpoint`: base URL, served model name, the effective
``max_model_len`` (from ``/v1/models``), vLLM version (``/version``) and, when the server
was launched here, the KV capacity parsed from its startup log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

if TYPE_CHECKING:
    import openai

    from vllm_conformance.launch.logparse import KvCacheInfo


class EndpointError(RuntimeError):
    """The endpoint is unreachable, or serves something other than the entry describes."""


class ServerDiedError(RuntimeError):
    """The server behind an endpoint is gone."""


class Watched(Protocol):
    """What an endpoint needs from a locally launched server to notice its death."""

    log_path: Path

    def alive(self) -> bool: ...

    def death_message(self) -> str: ...


@dataclass
class Endpoint:
    """Where and what a deployment serves."""

    base_url: str
    model: str
    max_model_len: int
    version: str | None
    api_key: str | None = None
    kv_cache: KvCacheInfo | None = None
    server: Watched | None = field(default=None, repr=False)
    #: the startup log of a server this harness did not start (``--server-log``)
    startup_log: Path | None = None
    request_timeout: float = 600.0

    @property
    def launched(self) -> bool:
        """True when this harness started the server (so its log is available)."""
        return self.server is not None

    @property
    def log_path(self) -> Path | None:
        return self.server.log_path if self.server else self.startup_log

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def check_alive(self) -> None:
        """Raise :class:`ServerDiedError` at once if the launched server has exited."""
        if self.server is not None and not self.server.alive():
            raise ServerDiedError(self.server.death_message())

    def http(self, timeout: float | None = None) -> httpx.Client:
        """A plain HTTP client for this endpoint (for status codes and raw bodies)."""
        return httpx.Client(
            base_url=self.base_url,
            headers=self.headers(),
            timeout=timeout or self.request_timeout,
        )

    def client(self, timeout: float | None = None, max_retries: int = 0) -> openai.OpenAI:
        """An ``openai`` client; no retries, so a failure is seen as it happened."""
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.api_key or "EMPTY",
            timeout=timeout or self.request_timeout,
            max_retries=max_retries,
        )

    def probe(self, timeout: float = 60.0) -> None:
        """Liveness by a real one-token completion under a deadline."""
        self.check_alive()
        body = {"model": self.model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        try:
            with self.http(timeout) as http:
                response = http.post("/v1/completions", json=body)
        except httpx.TimeoutException:
            self.check_alive()
            raise EndpointError(
                f"{self.base_url}: a one-token completion did not finish within {timeout:.0f} s "
                "(server stalled?)"
            ) from None
        except httpx.HTTPError as exc:
            self.check_alive()
            raise EndpointError(f"{self.base_url}: request failed: {exc}") from None
        if response.status_code != 200:
            raise EndpointError(
                f"{self.base_url}: one-token completion answered HTTP {response.status_code}: "
                f"{response.text[:300]}"
            )


def _get_json(http: httpx.Client, path: str) -> Any:
    response = http.get(path)
    if response.status_code == 401:
        raise EndpointError(f"{http.base_url}{path}: HTTP 401 (missing or wrong API key)")
    response.raise_for_status()
    return response.json()


def connect(
    base_url: str,
    api_key: str | None = None,
    expected_model: str | None = None,
    server: Watched | None = None,
    timeout: float = 10.0,
) -> Endpoint:
    """Build an :class:`Endpoint` from what the server itself reports.

    Raises :class:`EndpointError` with one clear message when the URL is unreachable or
    ``/v1/models`` does not list ``expected_model``.
    """
    base_url = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=timeout) as http:
            models = _get_json(http, "/v1/models")
            try:
                version = _get_json(http, "/version").get("version")
            except httpx.HTTPError:
                version = None
    except httpx.HTTPStatusError as exc:
        raise EndpointError(
            f"{base_url}: {exc.request.url.path} answered HTTP {exc.response.status_code}"
        ) from None
    except httpx.HTTPError as exc:
        raise EndpointError(f"{base_url}: endpoint unreachable: {exc}") from None
    served = {m["id"]: m for m in models.get("data", [])}
    if expected_model is None:
        if len(served) != 1:
            raise EndpointError(f"{base_url}: serves {sorted(served)}; name the model to use")
        expected_model = next(iter(served))
    if expected_model not in served:
        raise EndpointError(
            f"{base_url}: /v1/models lists {sorted(served)}, not the entry's model "
            f"{expected_model!r}"
        )
    max_len = served[expected_model].get("max_model_len")
    if not isinstance(max_len, int):
        raise EndpointError(f"{base_url}: /v1/models gives no max_model_len for {expected_model}")
    return Endpoint(base_url, expected_model, max_len, version, api_key, server=server)
