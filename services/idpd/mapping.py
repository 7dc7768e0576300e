"""Claims to roles: the ``[[idpd.role_mappings]]`` rules of the config.

Each rule names a claim (``groups`` by default), how to compare (exact, prefix, or a
regular expression matching the whole value) and the roles it grants. An identity gets the
union of the roles of every rule that matches any of its claim values; no match, no roles,
no binding. The config loader has already checked the rules (regex syntax, role names), so
building a :class:`RoleMapper` cannot fail on a loaded config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vpnr.core.config import RoleMappingConfig


@dataclass(frozen=True)
class _Rule:
    claim: str
    match: str
    value: str
    roles: tuple[str, ...]
    pattern: re.Pattern[str] | None

    def matches(self, candidate: str) -> bool:
        if self.match == "exact":
            return candidate == self.value
        if self.match == "prefix":
            return candidate.startswith(self.value)
        assert self.pattern is not None
        return self.pattern.fullmatch(candidate) is not None


def claim_values(claims: Mapping[str, Any], claim: str) -> list[str]:
    """The string values of ``claim``: a string is one value, a list gives its strings.

    Anything else (numbers, objects) gives no value: a malformed claim grants nothing.
    """
    value = claims.get(claim)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


class RoleMapper:
    """Applies the configured rules to an identity's claims."""

    def __init__(self, rules: Sequence[RoleMappingConfig]) -> None:
        self.rules = [
            _Rule(r.claim, r.match, r.value, tuple(r.roles),
                  re.compile(r.value) if r.match == "regex" else None)
            for r in rules
        ]
        self._claims = sorted({r.claim for r in self.rules})
        self._cache: dict[tuple[tuple[str, ...], ...], tuple[str, ...]] = {}

    @property
    def claims(self) -> list[str]:
        """Every claim some rule looks at."""
        return self._claims

    def roles(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        """Sorted, de-duplicated roles for an identity with ``claims`` (memoized on the
        values of the claims the rules read: directories repeat a few group sets)."""
        values = {c: claim_values(claims, c) for c in self.claims}
        key = tuple(tuple(values[c]) for c in self.claims)
        found = self._cache.get(key)
        if found is not None:
            return found
        granted: set[str] = set()
        for rule in self.rules:
            if any(rule.matches(v) for v in values[rule.claim]):
                granted.update(rule.roles)
        result = tuple(sorted(granted))
        if len(self._cache) < 65536:
            self._cache[key] = result
        return result

    def describe(self) -> list[str]:
        """One human-readable line per rule, e.g. ``groups =~ ^eng- -> eng``."""
        ops = {"exact": "==", "prefix": "^=", "regex": "=~"}
        return [f"{r.claim} {ops[r.match]} {r.value} -> {', '.join(r.roles)}"
                for r in self.rules]


def groups_only(names: Iterable[str]) -> dict[str, Any]:
    """Claims of a directory entry known only by its group names."""
    return {"groups": sorted(set(names))}
