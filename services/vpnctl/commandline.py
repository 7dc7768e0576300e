"""Plumbing every vpnctl command shares: deadlines, printing and registering verbs.

Kept apart from ``main`` so that the modules of friendly verbs can use it without importing
the entry point that registers them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TypeAlias

DEFAULT_TIMEOUT = 5.0

Handler = Callable[[argparse.Namespace], int]
# What add_subparsers() returns; a string because the class is not subscriptable at runtime.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def call_timeout(args: argparse.Namespace, streaming: bool) -> float | None:
    """The deadline of one call: --timeout, else the default (none for streams)."""
    if args.timeout is None:
        return None if streaming else DEFAULT_TIMEOUT
    return float(args.timeout) or None


def bounded_int(kind: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type`` for a decimal integer in ``low..high``; ``kind`` names it in the
    message (``expected a port (1-65535), got 0``)."""
    def convert(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} ({low}-{high}), "
                                             f"got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {kind} ({low}-{high}), got {value}")
        return value
    convert.__name__ = kind  # argparse names the type in some messages
    return convert


def emit(text: str) -> None:
    """Write one rendered document to stdout now (streams print as they arrive)."""
    print(text, flush=True)


def examples_epilog(examples: Sequence[str], notes: str = "") -> str:
    """A verb's help epilog: optional notes, then ``examples:`` (bcc tools' habit)."""
    lines = [notes.rstrip("\n"), ""] if notes else []
    lines.append("examples:")
    lines.extend(f"  {example}" for example in examples)
    return "\n".join(lines)


def add_group(commands: Subcommands, common: argparse.ArgumentParser, name: str,
              help_text: str, examples: Sequence[str]) -> Subcommands:
    """A command that only holds verbs (``vpnctl role ...``); returns its verb table."""
    group = commands.add_parser(name, parents=[common], help=help_text,
                                description=help_text, epilog=examples_epilog(examples),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs: Subcommands = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    return verbs


def add_verb(verbs: Subcommands, common: argparse.ArgumentParser, name: str,
             help_text: str, examples: Sequence[str], handler: Handler,
             notes: str = "") -> argparse.ArgumentParser:
    """One verb of a group; ``handler`` runs it (main dispatches on ``args.handler``)."""
    verb: argparse.ArgumentParser = verbs.add_parser(
        name, parents=[common], help=help_text, description=help_text,
        epilog=examples_epilog(examples, notes),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    verb.set_defaults(handler=handler)
    return verb
