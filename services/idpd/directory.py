"""Directory sync over SCIM 2.0 (RFC 7643, RFC 7644): static bindings for fixed devices.

Reads every ``/Users`` and ``/Groups`` page with a client-credentials token. A directory
entry gets a binding for each address in the configured attribute (an extension attribute
by default) when it is active and its groups map to roles.

Safety: a read is all or nothing. A page that is not a SCIM ListResponse, or a listing
that ends before ``totalResults`` resources were seen, fails the whole read
(:class:`IdpUnavailable`), so a partial answer can never look like mass deletion. One bad
entry (an address that is not an address) is skipped with a warning naming it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vpnr.idpd.oauth import IdpUnavailable

LIST_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
MAX_PAGES = 10_000  # bounds the loop whatever totalResults says
PARALLEL_PAGES = 4  # pages asked for at once once totalResults is known

GetJson = Callable[[str, dict[str, Any], str], Awaitable[Any]]


@dataclass(frozen=True)
class DirectoryEntry:
    """One active directory resource with addresses."""

    id: str
    username: str
    addresses: tuple[str, ...]   # normalized CIDR prefixes
    claims: dict[str, Any] = field(hash=False)


@dataclass
class DirectoryRead:
    """What one read of the directory gave."""

    entries: list[DirectoryEntry]
    users_seen: int
    warnings: list[str]


def _attribute(resource: dict[str, Any], path: str) -> Any:
    """``urn:...:User:ipAddresses`` -> resource[urn...:User][ipAddresses]; plain names too."""
    urn, sep, attr = path.rpartition(":")
    if sep and urn in resource and isinstance(resource[urn], dict):
        return resource[urn].get(attr)
    return resource.get(path)


@functools.lru_cache(maxsize=1 << 17)
def normalize_address(value: str) -> str:
    """An address or prefix as a strict CIDR; a bare address becomes /32 or /128."""
    net = ipaddress.ip_network(value.strip(), strict=True)
    return str(net)


async def _list_sequential(get: GetJson, url: str, page_size: int, where: str,
                           total: int) -> list[dict[str, Any]]:
    resources: list[dict[str, Any]] = []
    for _ in range(MAX_PAGES):
        items, page_total = _page_items(
            await get(url, {"startIndex": len(resources) + 1, "count": page_size}, where),
            where)
        if page_total != total:
            raise IdpUnavailable(f"{where}: totalResults changed from {total} to {page_total} "
                                 "during the read; retrying later")
        resources.extend(items)
        if len(resources) >= total:
            return resources
        if not items:
            raise IdpUnavailable(f"{where}: listing ended after {len(resources)} of {total} "
                                 "resources (an incomplete read is never applied)")
    raise IdpUnavailable(f"{where}: more than {MAX_PAGES} pages")


def _page_items(page: Any, where: str) -> tuple[list[dict[str, Any]], int]:
    """(resources, totalResults) of one ListResponse page, or IdpUnavailable."""
    if not isinstance(page, dict) or LIST_RESPONSE not in (page.get("schemas") or []):
        raise IdpUnavailable(f"{where}: the answer is not a SCIM ListResponse")
    items = page.get("Resources", [])
    total = page.get("totalResults")
    if not isinstance(items, list) or isinstance(total, bool) or not isinstance(total, int) \
            or total < 0:
        raise IdpUnavailable(f"{where}: ListResponse without totalResults and Resources")
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise IdpUnavailable(f"{where}: a resource without an id")
    return items, total


async def _list_all(get: GetJson, url: str, page_size: int, where: str) -> list[dict[str, Any]]:
    """Every resource of a listing: the first page gives the total, the rest are asked for
    a few at a time. Any inconsistency fails the whole read."""
    first, total = _page_items(await get(url, {"startIndex": 1, "count": page_size}, where),
                               where)
    size = len(first)
    resources = list(first)
    if len(resources) < total and size == 0:
        raise IdpUnavailable(f"{where}: listing ended after 0 of {total} resources")
    starts = list(range(1 + size, total + 1, size)) if size else []
    if len(starts) > MAX_PAGES:
        raise IdpUnavailable(f"{where}: more than {MAX_PAGES} pages")
    gate = asyncio.Semaphore(PARALLEL_PAGES)

    async def page(start: int) -> list[dict[str, Any]]:
        async with gate:
            items, page_total = _page_items(
                await get(url, {"startIndex": start, "count": page_size}, where), where)
        if page_total != total:
            raise IdpUnavailable(f"{where}: totalResults changed from {total} to "
                                 f"{page_total} during the read; retrying later")
        return items

    for items in await asyncio.gather(*(page(start) for start in starts)):
        resources.extend(items)
    if len(resources) != total:
        # Pages of varying size (or a short listing): read again, one page after the other.
        resources = await _list_sequential(get, url, page_size, where, total)
    ids = [r["id"] for r in resources]
    if len(set(ids)) != len(ids):
        raise IdpUnavailable(f"{where}: the same resource appeared twice while paging")
    return resources


async def read_directory(get: GetJson, base_url: str, *, page_size: int,
                         address_attribute: str) -> DirectoryRead:
    """Read users and groups; return active entries with addresses."""
    base = base_url.rstrip("/")
    users = await _list_all(get, base + "/Users", page_size, "SCIM /Users")
    groups = await _list_all(get, base + "/Groups", page_size, "SCIM /Groups")
    member_of: dict[str, set[str]] = {}
    for group in groups:
        name = group.get("displayName")
        if not isinstance(name, str) or not name:
            continue
        for member in group.get("members") or []:
            if isinstance(member, dict) and isinstance(member.get("value"), str):
                member_of.setdefault(member["value"], set()).add(name)
    entries: list[DirectoryEntry] = []
    warnings: list[str] = []
    for user in users:
        raw = _attribute(user, address_attribute)
        if raw is None or user.get("active") is False:
            continue
        uid = user["id"]
        name = user.get("userName") if isinstance(user.get("userName"), str) else uid
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            warnings.append(f"directory entry {name!r}: {address_attribute} is not a list of "
                            "strings; skipped")
            continue
        try:
            addresses = tuple(sorted({normalize_address(v) for v in values}))
        except ValueError as exc:
            warnings.append(f"directory entry {name!r}: {exc}; skipped")
            continue
        names = set(member_of.get(uid, ()))
        for g in user.get("groups") or []:
            if isinstance(g, dict) and isinstance(g.get("display"), str):
                names.add(g["display"])
        claims: dict[str, Any] = {k: v for k, v in user.items()
                                  if isinstance(v, str) and k not in ("id",)}
        claims["groups"] = sorted(names)
        entries.append(DirectoryEntry(uid, str(name), addresses, claims))
    return DirectoryRead(entries, len(users), warnings)
