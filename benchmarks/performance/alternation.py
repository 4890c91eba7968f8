"""The two sides of a speed ratio, alternated A B A B within one run, and the statistics of their runs.

These machines drift by +-30 % between runs, so a ratio is only read off sides measured in turn.
(speed.py and precision.py both time this way; tests/benchmarks/test_speed.py checks it.)
"""

from __future__ import annotations

import math
import os
import statistics


def summary(xs: list[float]) -> dict:
    """Median, min, max and the relative spread (max - min) / median of some measurements."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "spread": None}
    med = statistics.median(xs)
    return {"n": len(xs), "median": med, "min": min(xs), "max": max(xs),
            "spread": (max(xs) - min(xs)) / med if med else None}


def ratio(a_runs: list[list[float]], b_runs: list[list[float]]) -> dict:
    """a / b of the median per-step seconds, from runs alternated a b a b.

    Returns the ratio of the medians over all steps of each side, and the per-repeat ratios
    (run i of a over run i of b: what the alternation controls for) with their min and max.
    """
    a_all = [x for r in a_runs for x in r]
    b_all = [x for r in b_runs for x in r]
    pairs = [statistics.median(a) / statistics.median(b) for a, b in zip(a_runs, b_runs) if a and b]
    return {"ratio": statistics.median(a_all) / statistics.median(b_all) if a_all and b_all else None,
            "per_repeat": pairs, "per_repeat_min": min(pairs) if pairs else None,
            "per_repeat_max": max(pairs) if pairs else None, "a": summary(a_all), "b": summary(b_all)}


def alternate(sides: dict, repeats: int, log=print) -> dict[str, list]:
    """Run each side's callable `repeats` times, in the order a b a b ... (never all of a, then all of b)."""
    out: dict[str, list] = {name: [] for name in sides}
    for i in range(repeats):
        for name, fn in sides.items():
            log(f"  {name} {i + 1}/{repeats} (load {os.getloadavg()[0]:.2f})")
            out[name].append(fn())
    return out


def verdict(value: float | None, target: float, at_most: bool) -> str:
    """'met' / 'MISSED' against a target (<= target when at_most, else >=)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    return "met" if (value <= target if at_most else value >= target) else "MISSED"
