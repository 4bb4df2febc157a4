"""vLLM version ranges of versioned expectations, as PEP 440 specifier sets (``">=0.30"``).

An expectation that changed between vLLM releases (how an over-long request is answered, a
KV-capacity floor) is written once per range of versions it holds for; the served version
(``/version``) picks the one that applies. Development and local builds (``0.32.1.dev3+g…``,
``0.26.0+cu130``) belong to the range of their release, as pip would see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version


def specifier_set(text: str) -> SpecifierSet:
    """The range ``text`` names; ValueError when it is not a non-empty specifier set."""
    try:
        spec = SpecifierSet(text)
    except InvalidSpecifier:
        raise ValueError(f"not a PEP 440 version range: {text!r} (e.g. '>=0.30,<0.33')") from None
    if not str(spec):
        raise ValueError("an empty version range holds for every version: leave 'vllm' out")
    return spec


def contains(spec: str, version: str) -> bool:
    """Whether vLLM ``version`` is in the range ``spec``."""
    try:
        parsed = Version(version)
    except InvalidVersion:
        raise ValueError(f"vLLM reports a version that is not PEP 440: {version!r}") from None
    return specifier_set(spec).contains(parsed, prereleases=True)


def _probes(specs: Sequence[str]) -> list[Version]:
    """Versions named in ``specs`` and just above each: two ranges that overlap share one.

    Each range is a union of intervals whose ends are the versions it names, so a common
    interval holds one of its ends or a version just above one (``0.30`` -> ``0.30.0.0.1``).
    """
    probes = [Version("0")]
    for text in specs:
        for item in specifier_set(text):
            named = Version(item.version.removesuffix(".*"))
            probes += [named, Version(".".join(map(str, (*named.release, 0, 0, 1))))]
    return probes


def overlap(specs: Sequence[str]) -> tuple[str, str, Version] | None:
    """Two of ``specs`` and a version both hold for, or None when they are disjoint."""
    probes = _probes(specs)
    for a, b in combinations(specs, 2):
        sa, sb = specifier_set(a), specifier_set(b)
        for version in probes:
            if sa.contains(version, prereleases=True) and sb.contains(version, prereleases=True):
                return a, b, version
    return None
