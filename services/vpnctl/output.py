"""Rendering of plain data (dicts from ``MessageToDict``) as a table, JSON or YAML."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import yaml

FORMATS = ("table", "json", "yaml")
INDENT = "  "


def render(data: Any, fmt: str) -> str:
    """One document in the chosen format, without a trailing newline."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False,
                              allow_unicode=True).rstrip("\n")
    if fmt == "table":
        return "\n".join(table_lines(data)) if data not in ({}, []) else "(empty)"
    raise ValueError(f"unknown output format {fmt!r}")


def render_stream_item(data: Any, fmt: str, first: bool) -> str:
    """One message of a server stream: YAML documents get ``---``, tables a blank line."""
    text = render(data, fmt)
    if fmt == "yaml":
        return "---\n" + text
    if fmt == "table" and not first:
        return "\n" + text
    return text


def scalar(value: Any) -> str:
    """A leaf value as table text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1e12 else repr(value)
    if isinstance(value, list):
        return ", ".join(scalar(item) for item in value)
    return str(value)


def _is_leaf(value: Any) -> bool:
    """Printable on one line: scalars and lists of scalars."""
    if isinstance(value, list):
        return all(not isinstance(item, (dict, list)) for item in value)
    return not isinstance(value, dict)


def _is_flat_rows(value: Any) -> bool:
    """A non-empty list of dicts whose values all fit in one table cell."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(row, dict) and all(_is_leaf(v) for v in row.values())
                    for row in value))


def columns(rows: Sequence[dict[str, Any]], indent: str = "") -> list[str]:
    """Aligned columns, headers upper-cased, keys in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys.extend(key for key in row if key not in keys)
    cells = [[scalar(row.get(key)) for key in keys] for row in rows]
    headers = [key.upper() for key in keys]
    widths = [max(len(text) for text in column) for column in zip(headers, *cells, strict=True)]

    def line(values: Sequence[str]) -> str:
        padded = (text.ljust(width) for text, width in zip(values, widths, strict=True))
        return (indent + "  ".join(padded)).rstrip()

    return [line(headers), *(line(row) for row in cells)]


def table_lines(data: Any, indent: str = "") -> list[str]:
    """Nested data as ``key: value`` lines (aligned), lists of flat rows as columns."""
    if isinstance(data, dict):
        return _mapping_lines(data, indent)
    if _is_flat_rows(data):
        return columns(data, indent)
    if isinstance(data, list):
        lines: list[str] = []
        for item in data:
            if isinstance(item, (dict, list)):
                body = table_lines(item, indent + INDENT)
                lines.append(indent + "- " + body[0][len(indent) + len(INDENT):])
                lines.extend(body[1:])
            else:
                lines.append(f"{indent}- {scalar(item)}")
        return lines
    return [indent + scalar(data)]


def _mapping_lines(data: dict[str, Any], indent: str) -> list[str]:
    width = max((len(str(key)) for key, value in data.items() if _is_leaf(value)), default=0)
    lines: list[str] = []
    for key, value in data.items():
        if _is_leaf(value):
            lines.append(f"{indent}{str(key) + ':':<{width + 1}} {scalar(value)}".rstrip())
        elif value in ({}, []):
            lines.append(f"{indent}{key}: (empty)")
        else:
            lines.append(f"{indent}{key}:")
            lines.extend(table_lines(value, indent + INDENT))
    return lines


def listing_text(listing: dict[str, dict[str, Any]]) -> str:
    """``vpnctl list``: each daemon's state and socket, then its services indented."""
    lines: list[str] = []
    for daemon, entry in listing.items():
        if entry["state"] == "up":
            lines.append(f"{daemon} (up, {entry['socket']})")
            lines.extend(f"  {name}" for name in entry["services"])
        else:
            lines.append(f"{daemon} (down: {entry['reason']}, {entry['socket']})")
    return "\n".join(lines)


def human_duration(seconds: float) -> str:
    """``3d04h``, ``1h02m``, ``5m07s``, ``42s``."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def status_details(entry: dict[str, Any]) -> str:
    """The facts of one ``vpnctl status`` entry on one line (``key=value`` pairs)."""
    if entry["state"] != "up":
        return f"{entry['reason']} ({entry['socket']})"
    parts: list[str] = []
    for key, value in entry.items():
        if key in ("state", "version", "pid", "uptime_seconds", "socket"):
            continue
        shown = value
        if key == "interfaces":
            shown = ", ".join(f"{i['name']}(prog {i['program_id']} {i['attach_mode'] or '-'}"
                              f"{' attached' if i['attached'] else ' detached'})"
                              for i in value) or "none"
        elif key == "warnings":
            shown = len(value)
        elif isinstance(value, bool):
            shown = str(value).lower()
        parts.append(f"{key}={shown if shown not in ('', None) else '-'}")
    return " ".join(parts)
