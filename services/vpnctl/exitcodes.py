"""vpnctl's exit codes, as data: ``vpnctl --help``, docs/vpnctl.md and the errors read them.

A failed call exits with the code of its gRPC status (:data:`GRPC_EXIT_CODES`), so a script
can tell "not there" from "cannot reach the daemon" from "someone changed it first" without
parsing the message; a status not listed is a plain failure (1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_DENIED = 6
EXIT_TIMEOUT = 7
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell shows for a writer killed by a closed pipe

# gRPC status name -> exit code; every other non-OK status exits EXIT_FAILURE.
GRPC_EXIT_CODES: dict[str, int] = {
    "INVALID_ARGUMENT": EXIT_USAGE,
    "OUT_OF_RANGE": EXIT_USAGE,
    "UNAVAILABLE": EXIT_UNREACHABLE,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "ALREADY_EXISTS": EXIT_CONFLICT,
    "FAILED_PRECONDITION": EXIT_CONFLICT,
    "ABORTED": EXIT_CONFLICT,
    "PERMISSION_DENIED": EXIT_DENIED,
    "UNAUTHENTICATED": EXIT_DENIED,
    "DEADLINE_EXCEEDED": EXIT_TIMEOUT,
}

# (code, meaning) in the order --help and docs/vpnctl.md show them.
EXIT_TABLE: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success (status, health: every daemon up and serving; checks: all passed)"),
    (EXIT_FAILURE, "failed: a gRPC status not listed below (INTERNAL, UNIMPLEMENTED, ...), "
                   "or a result that is not good (a daemon down in status/health, a "
                   "policy check test failing, a sync failed or held, a login denied)"),
    (EXIT_USAGE, "usage error: bad arguments, unknown or ambiguous symbol, invalid request "
                 "JSON, or the daemon refused the request as INVALID_ARGUMENT/OUT_OF_RANGE"),
    (EXIT_UNREACHABLE, "daemon unreachable: no socket, stale socket, permission denied on "
                       "the socket, or UNAVAILABLE"),
    (EXIT_NOT_FOUND, "NOT_FOUND: the role, rule, peer, snapshot, ... does not exist"),
    (EXIT_CONFLICT, "conflict: ALREADY_EXISTS, FAILED_PRECONDITION (e.g. "
                    "--expected-version is not the live version) or ABORTED"),
    (EXIT_DENIED, "PERMISSION_DENIED or UNAUTHENTICATED"),
    (EXIT_TIMEOUT, "DEADLINE_EXCEEDED: no answer within --timeout"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_PIPE, "output closed early (e.g. piped into head -1): vpnctl stops quietly, "
                "with no traceback, like a command killed by SIGPIPE"),
)


def exit_code_of(grpc_code: str) -> int:
    """The exit code of a call that ended with the gRPC status named ``grpc_code``."""
    return GRPC_EXIT_CODES.get(grpc_code, EXIT_FAILURE)


def exit_codes_text(indent: str = "  ") -> str:
    """The ``exit codes:`` block of ``vpnctl --help`` (meanings wrapped at 90 columns)."""
    lines = ["exit codes:"]
    for code, meaning in EXIT_TABLE:
        words = meaning.split()
        current = f"{indent}{code:<5}"
        for word in words:
            if len(current) + 1 + len(word) > 90 and current.strip() != str(code):
                lines.append(current)
                current = indent + " " * 5 + word
            else:
                current += ("" if current.endswith(" ") else " ") + word
        lines.append(current)
    return "\n".join(lines)
