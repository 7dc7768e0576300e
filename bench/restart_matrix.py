"""Restart and upgrade matrix under continuous lab traffic (vpnr.lab.matrix).

Brings up its own two-site lab (a unique name, real IdP), then for each daemon of site A:
kill -9 and start, SIGTERM and start, and upgrade (SIGTERM, start another build: a changed
BPF program for policyd and tunneld, a new proto field for all four; then the normal build
again; tunneld's new decap program is compiled before the stop, `python -m
vpnr.tunneld.decap`, unless --no-prepare). Allowed flows (LAN and both ways through the
tunnel), denied probes (XDP and the tunnel's decap program) and a capture of the underlay
run through every case. Prints the table, the target verdicts and, as the last line,
JSON: {"cases": [...], "targets": {...}, "all_met": bool, "load": {...}}.

Targets: no leak and no mismatch anywhere; no allowed packet and no audit event lost for
policyd, auditd and idpd; tunnel traffic back within 1 s of tunneld answering SERVING
(the outage from the signal is reported beside it).

Run as root: .venv/bin/python bench/restart_matrix.py [--cases policyd:kill9,...] [--no-prepare]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from vpnr.lab.lab import Lab
from vpnr.lab.matrix import CASES, CaseResult, Rates, run_matrix, table
from vpnr.lab.topology import LabSpec


def parse_cases(text: str) -> tuple[tuple[str, str], ...]:
    """"policyd:kill9,tunneld:upgrade" -> the cases, in the matrix's order."""
    if not text:
        return CASES
    wanted = {tuple(item.split(":", 1)) for item in text.split(",")}
    unknown = wanted - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases: {sorted(unknown)}; known: "
                         + ", ".join(f"{d}:{o}" for d, o in CASES))
    return tuple(c for c in CASES if c in wanted)


def main() -> int:
    """Run the matrix on a fresh lab; exit 0 when every target is met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="", help="comma-separated daemon:operation")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="allowed datagrams per second (LAN and tunnel-out)")
    parser.add_argument("--denied-rate", type=float, default=20.0,
                        help="probes per second of each denied flow")
    parser.add_argument("--after", type=float, default=2.0,
                        help="seconds of traffic after the daemon is healthy")
    parser.add_argument("--no-prepare", action="store_true",
                        help="upgrade tunneld without compiling its decap program first")
    args = parser.parse_args()
    cases = parse_cases(args.cases)
    rates = Rates(allowed=args.rate, tunnel_in=args.rate / 2, denied=args.denied_rate,
                  before_s=1.0, after_s=args.after)
    name = f"rm{os.getpid() % 10000}{secrets.token_hex(2)}"
    base = Path(tempfile.mkdtemp(prefix="vpnr-restart-matrix-"))
    load_before = os.getloadavg()
    started = time.monotonic()
    lab = Lab(LabSpec(name=name, instance_prefix=f"{name}-", base_dir=base, with_idp=True,
                      hosts_per_site=3))

    def show(result: CaseResult) -> None:
        print(f"{result.daemon} {result.operation}: lost {result.allowed_lost}, leaks "
              f"{len(result.leaks)}, mismatches {len(result.mismatches)}, audit lost "
              f"{result.audit_lost}, SERVING {result.serving_s:.2f} s", flush=True)

    try:
        lab.up()
        results = run_matrix(lab, base, cases, rates, on_result=show,
                             prepare_decap=not args.no_prepare)
    finally:
        lab.down()
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(table(results))
    verdicts = {f"{r.daemon} {r.operation}": r.verdicts() for r in results}
    missed = [f"{case}: {name}" for case, v in verdicts.items() for name, ok in v.items()
              if not ok]
    print("\ntargets: " + ("all met" if not missed else "MISSED " + "; ".join(missed)))
    print(json.dumps({
        "cases": [r.as_dict() for r in results],
        "rates": asdict(rates),
        "tunneld_upgrade_prepared": not args.no_prepare,
        "targets": verdicts,
        "all_met": not missed,
        "seconds": round(time.monotonic() - started, 1),
        "load": {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()},
    }, default=str))
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
