"""Identities to bindings: the whole set idpd owns at policyd, compiled in one place.

Inputs are the active logins (address, roles from their claims) and the directory entries
(addresses, roles from their groups). Precedence when two want the same prefix: a directory
entry (a fixed device) wins over a login, and between logins the newest wins. Roles policyd
does not define are left out with a warning, and so are prefixes another owner (an
administrator's binding) already holds: idpd never fights over a prefix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vpnr.idpd.directory import DirectoryEntry
from vpnr.idpd.mapping import RoleMapper
from vpnr.idpd.store import LoginRecord

MAX_WARNINGS = 50


@dataclass(frozen=True)
class Entry:
    """One binding idpd wants in force."""

    prefix: str
    roles: tuple[str, ...]
    subject: str
    username: str
    origin: str                 # "login" or "directory"
    groups: tuple[str, ...] = ()

    def key(self) -> tuple[tuple[str, ...], str]:
        """What policyd stores of it (a change in either is a changed binding)."""
        return self.roles, self.subject


@dataclass
class Compiled:
    """The binding set and what was left out on the way."""

    entries: dict[str, Entry]
    warnings: list[str]


def _warn(warnings: list[str], text: str) -> None:
    if len(warnings) < MAX_WARNINGS:
        warnings.append(text)
    elif len(warnings) == MAX_WARNINGS:
        warnings.append("more warnings left out")


def compile_bindings(logins: Iterable[LoginRecord], directory: Iterable[DirectoryEntry],
                     mapper: RoleMapper, known_roles: set[str] | None,
                     foreign: Mapping[str, str]) -> Compiled:
    """The complete set; ``known_roles`` None skips the role check, ``foreign`` maps a
    prefix to the other owner holding it."""
    warnings: list[str] = []
    entries: dict[str, Entry] = {}

    def keep_known(who: str, roles: tuple[str, ...]) -> tuple[str, ...]:
        if known_roles is None:
            return roles
        unknown = [r for r in roles if r not in known_roles]
        if unknown:
            _warn(warnings, f"{who}: role(s) {', '.join(unknown)} not defined at policyd; "
                            "left out")
        return tuple(r for r in roles if r in known_roles)

    def place(entry: Entry) -> None:
        owner = foreign.get(entry.prefix)
        if owner is not None:
            _warn(warnings, f"{entry.origin} {entry.username!r}: {entry.prefix} is bound by "
                            f"{owner!r} at policyd; left out")
            return
        if not entry.roles:
            return
        entries[entry.prefix] = entry

    for login in sorted((x for x in logins if x.active), key=lambda x: x.created_at):
        roles = keep_known(f"login {login.username!r}", login.roles)
        groups = tuple(sorted(g for g in login.claims.get("groups", []) if isinstance(g, str)))
        place(Entry(login.address, roles, f"user:{login.username or login.subject}",
                    login.username, "login", groups))
    for item in directory:
        roles = keep_known(f"directory entry {item.username!r}", mapper.roles(item.claims))
        groups = tuple(item.claims.get("groups", ()))
        for prefix in item.addresses:
            if prefix in entries and entries[prefix].origin == "directory":
                _warn(warnings, f"directory entries {entries[prefix].username!r} and "
                                f"{item.username!r} both claim {prefix}; the first is kept")
                continue
            place(Entry(prefix, roles, f"device:{item.username}", item.username, "directory",
                        groups))
    return Compiled(entries, warnings)


@dataclass
class Diff:
    """Bindings added, removed and changed from one set to the next."""

    added: list[Entry]
    removed: list[Entry]
    changed: list[tuple[Entry, Entry]]

    @property
    def empty(self) -> bool:
        """Nothing changes."""
        return not (self.added or self.removed or self.changed)


def diff(old: Mapping[str, Entry], new: Mapping[str, Entry]) -> Diff:
    """From ``old`` to ``new``, by prefix."""
    added = [new[p] for p in sorted(new.keys() - old.keys())]
    removed = [old[p] for p in sorted(old.keys() - new.keys())]
    changed = [(old[p], new[p]) for p in sorted(old.keys() & new.keys())
               if old[p].key() != new[p].key()]
    return Diff(added, removed, changed)
