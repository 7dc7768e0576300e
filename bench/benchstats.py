"""Percentiles for the benchmarks (imported by the scripts beside it)."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(values: Sequence[float], *, scale: float = 1e3, digits: int = 3,
               quantiles: Sequence[int] = (50, 99)) -> dict[str, float]:
    """``p50_ms``, ... ``max_ms`` and ``n`` of ``values`` (times ``scale`` to get ms)."""
    out: dict[str, float] = {f"p{q}_ms": round(percentile(values, q) * scale, digits)
                             for q in quantiles}
    out["max_ms"] = round(max(values) * scale, digits)
    out["n"] = len(values)
    return out
