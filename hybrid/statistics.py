"""Confidence intervals and paired significance tests for per-question outcomes.

Every rate in a report is a mean of 0/1 outcomes over the same questions, so:
  - a 95 % interval comes from a percentile bootstrap over questions (seeded);
  - two configurations are compared on the *same* questions with McNemar's exact
    test (a two-sided binomial test on the discordant pairs) and a paired
    bootstrap interval of the difference.
"""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean.

    Args:
        values: per-question outcomes (n,), 0/1 or real.
        n_boot: resamples.
        seed: RNG seed (reports are deterministic).

    Returns:
        (low, high); (nan, nan) for an empty input.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def mcnemar_exact(a, b) -> dict:
    """McNemar's exact test on paired 0/1 outcomes.

    Args:
        a, b: outcomes of two configurations on the same questions (n,).

    Returns:
        {"a_only": count a=1,b=0, "b_only": count a=0,b=1, "p_value"}.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    from scipy.stats import binomtest  # scipy.stats takes ~1 s to import: kept out of CLI start-up

    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5, alternative="two-sided").pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def paired_diff_ci(a, b, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a with a paired bootstrap 95 % interval: (diff, low, high)."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    low, high = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    return float(d.mean()) if d.size else float("nan"), low, high
