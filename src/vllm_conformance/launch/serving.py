"""Turn a matrix entry into something to launch or connect to."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from vllm_conformance import models
from vllm_conformance.launch.local import LaunchSpec
from vllm_conformance.matrix import Deployment


def model_path(entry: Deployment) -> str:
    """The checkpoint to serve: the entry's path, or the generated model's directory."""
    if entry.model.generate is not None:
        return str(models.materialize(entry.model.generate, entry.model.options))
    assert entry.model.path is not None
    return entry.model.path


def tokenizer_path(entry: Deployment) -> str:
    """Where the served model's tokenizer is (the model itself unless the entry says)."""
    return entry.model.tokenizer or model_path(entry)


def api_key(entry: Deployment) -> str | None:
    """The entry's API key: from the variable it names, else a fresh random secret."""
    name = entry.serve.api_key_env
    if name is None:
        return None
    return os.environ.get(name) or secrets.token_urlsafe(24)


def launch_spec(
    entry: Deployment, gpus: Sequence[int] | None, startup_timeout: float
) -> LaunchSpec:
    """The :class:`LaunchSpec` that serves ``entry`` on ``gpus``."""
    tokenizer = entry.model.tokenizer
    if tokenizer and Path(tokenizer).exists():
        tokenizer = str(Path(tokenizer).resolve())
    return LaunchSpec(
        model=model_path(entry),
        served_model_name=entry.served_model_name,
        tokenizer=tokenizer,
        args=entry.serve.argv(),
        env=dict(entry.serve.env),
        gpus=gpus,
        api_key=api_key(entry),
        startup_timeout=startup_timeout,
    )
