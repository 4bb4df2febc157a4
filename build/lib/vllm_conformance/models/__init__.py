"""Build generated models on the spot and cache them.

No model can be downloaded in CI (nor on many GPU clusters), so the matrix can name a
*recipe* instead of a checkpoint: a function that writes a complete Hugging Face model
directory (config, weights, tokenizer, chat template). Builds are seeded, so the same recipe
and options give the same model; the result is cached under a key derived from both.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class Builder(Protocol):
    """A recipe module: ``build(out_dir, **options)`` plus a ``RECIPE_VERSION`` int."""

    RECIPE_VERSION: int

    def build(self, out_dir: Path, **options: Any) -> None: ...


#: recipe name -> module that implements it (imported lazily: training needs torch).
RECIPES: dict[str, str] = {
    "tiny-llama4": "vllm_conformance.models.tiny",
    "trained-arith": "vllm_conformance.models.trained",
    "tiny-idefics3": "vllm_conformance.models.vlm",
    "scout-shaped": "vllm_conformance.models.scout",
}


class UnknownRecipeError(ValueError):
    """The matrix names a recipe that does not exist."""


def cache_root() -> Path:
    """Where generated models live: ``$VLLM_CONFORMANCE_CACHE`` or ``~/.cache/vllm-conformance``."""
    env = os.environ.get("VLLM_CONFORMANCE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vllm-conformance"


def _builder(recipe: str) -> Builder:
    try:
        module = RECIPES[recipe]
    except KeyError:
        known = ", ".join(sorted(RECIPES))
        raise UnknownRecipeError(f"unknown model recipe {recipe!r} (known: {known})") from None
    return importlib.import_module(module)  # type: ignore[return-value]


def cache_key(recipe: str, options: Mapping[str, Any] | None = None) -> str:
    """The directory name a recipe and its options are cached under."""
    builder = _builder(recipe)
    blob = json.dumps(
        {"recipe": recipe, "version": builder.RECIPE_VERSION, "options": dict(options or {})},
        sort_keys=True,
    )
    return f"{recipe}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def materialize(
    recipe: str, options: Mapping[str, Any] | None = None, root: Path | None = None
) -> Path:
    """Return the directory of the model that ``recipe`` builds, building it once.

    Safe under pytest-xdist: concurrent callers wait on a file lock and the model appears
    atomically (built in a temporary directory, then renamed), so a half-written model is
    never served.
    """
    builder = _builder(recipe)
    models = (root or cache_root()) / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / cache_key(recipe, options)
    if target.is_dir():
        return target
    with open(models / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=models))
        try:
            builder.build(tmp, **dict(options or {}))
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return target


def config_of(recipe: str, options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``config.json`` the recipe writes, without building the model where the recipe
    can say it (``config(**options)``); else the cached model's, if it was built; else None.
    """
    builder = _builder(recipe)
    make = getattr(builder, "config", None)
    if make is not None:
        return make(**dict(options or {}))  # type: ignore[no-any-return]
    built = cache_root() / "models" / cache_key(recipe, options) / "config.json"
    return json.loads(built.read_text()) if built.is_file() else None
