"""Confidence intervals and paired significance tests for per-question outcomes.

Every rate in a report (accuracy, abstention, hallucination, accuracy on answerable questions) is
a share of questions, a mean of 0/1 outcomes, so:
  - its 95 % interval is Wilson's score interval for a binomial proportion
    (`scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`);
  - two configurations are compared on the *same* questions with McNemar's exact test (a
    two-sided binomial test on the discordant pairs, `scipy.stats.binomtest`) and a paired
    percentile bootstrap interval of the difference. A difference of paired 0/1 outcomes takes
    the values -1, 0 and 1: it is not a binomial proportion, so it keeps the bootstrap.

Why not the percentile bootstrap for a rate (what reports used before): at 0 of n or n of n every
resample has the same mean, so it returns [0, 0]: "never hallucinates" from 4 questions. Wilson
does not collapse there (0 of 4: [0, 0.490]).

Why Wilson rather than Clopper-Pearson: Clopper-Pearson guarantees at least 95 % coverage at
every true rate by being conservative (0 of 4: [0, 0.602]), so its intervals are wider than 95 %
needs. Wilson's coverage is 95 % on average over true rates, at the price of dipping below 95 % in
narrow ranges of true rates near 0 or 1. Exact coverage (binomial sums) over 999 true rates from 0.001 to 0.999:
    n = 4:   Wilson mean 0.955, lowest 0.83;  Clopper-Pearson mean 0.992, lowest 0.975
    n = 181: Wilson mean 0.951, lowest 0.90;  Clopper-Pearson mean 0.961, lowest 0.951
A report compares rates across configurations, so intervals that are right on average, not
padded everywhere, are the ones to read side by side.

scipy.stats takes about a second to import, so it is imported inside the functions that need it,
keeping it out of the CLI's start-up.
"""

from __future__ import annotations

import numpy as np

# Written into report.json ("intervals"), so a reader can tell a report's intervals apart from
# those of reports written before: those have no such key and carry percentile bootstrap
# intervals on the rates too.
INTERVALS = {"rate": "wilson", "difference": "paired percentile bootstrap", "test": "mcnemar exact"}


def proportion_ci(outcomes, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a share of 0/1 outcomes.

    Args:
        outcomes: per-question outcomes (n,), each 0/1 or False/True.
        alpha: 1 - the confidence level.

    Returns:
        (low, high); (nan, nan) for an empty input.

    Raises:
        ValueError: an outcome that is not 0 or 1 (a mean of other values is not a binomial
            proportion, and its Wilson interval would mean nothing).
    """
    x = np.asarray(outcomes, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("proportion_ci takes 0/1 outcomes; a mean of other values needs another interval")
    from scipy.stats import binomtest

    ci = binomtest(int(x.sum()), int(x.size)).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


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
    from scipy.stats import binomtest

    # Under "no difference" each discordant pair goes either way with probability 1/2; the
    # concordant pairs carry no information about the difference.
    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5, alternative="two-sided").pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def paired_diff_ci(a, b, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a with a paired bootstrap 95 % interval: (diff, low, high).

    Questions are resampled as pairs, so the interval keeps the correlation between the two
    configurations' outcomes on the same question. With no discordant pair every difference is
    0 and so is the interval: read it beside McNemar's p (1.0 there), not alone.
    """
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    low, high = _bootstrap_mean_ci(d, n_boot=n_boot, seed=seed)
    return float(d.mean()) if d.size else float("nan"), low, high


def _bootstrap_mean_ci(values, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, seeded (reports are deterministic); (nan, nan) if empty."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))
