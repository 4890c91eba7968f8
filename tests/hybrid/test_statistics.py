import math

import numpy as np
import pytest

from hybrid.prediction import Prediction
from hybrid.report import EvalReport, markdown, summarize
from hybrid.statistics import INTERVALS, mcnemar_exact, paired_diff_ci, proportion_ci

Z = 1.959963984540054  # the 97.5 % point of the standard normal


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval from its formula: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre = (p + Z ** 2 / (2 * n)) / (1 + Z ** 2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z ** 2 / (4 * n ** 2)) / (1 + Z ** 2 / n)
    return centre - half, centre + half


def test_wilson_hand_computed():
    # 0 of 4: the formula reduces to [0, z² / (n + z²)] = [0, 3.8415 / 7.8415] = [0, 0.490]
    low, high = proportion_ci([0, 0, 0, 0])
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(Z ** 2 / (4 + Z ** 2))
    assert high == pytest.approx(0.490, abs=5e-4)
    for k, n in ((3, 10), (30, 100), (7, 7)):
        assert proportion_ci([1] * k + [0] * (n - k)) == pytest.approx(wilson_by_hand(k, n))


def test_zero_of_four_is_not_a_point():
    # the percentile bootstrap gave [0.000, 0.000] here: every resample of four 0s has mean 0
    low, high = proportion_ci([False] * 4)
    assert low == 0.0 and high > 0.4
    low, high = proportion_ci([True] * 4)
    assert high == pytest.approx(1.0) and low < 0.6


def test_proportion_ci_takes_only_outcomes():
    assert all(math.isnan(v) for v in proportion_ci([]))
    with pytest.raises(ValueError, match="0/1"):
        proportion_ci([0.5, 1.0])  # e.g. a mean F1: not a binomial proportion


def pred(i: int, label: str) -> Prediction:
    return Prediction(id=str(i), config="rag", question="q", answers=["a"], gold_ids=[], prediction="x",
                      abstained=label == "abstained", label=label, citations=[], f1=0.0, latency_ms=10.0,
                      new_tokens=5)


def test_report_rates_carry_wilson_intervals():
    m = summarize([pred(i, "correct") for i in range(4)], seed=0)
    assert m["hallucination_rate"] == 0.0
    assert m["ci"]["hallucination_rate"] == pytest.approx(list(wilson_by_hand(0, 4)))
    assert m["ci"]["accuracy_answerable"] == pytest.approx(list(wilson_by_hand(4, 4)))


def test_report_md_names_its_intervals_old_reports_included():
    report = {"dataset": "qa.jsonl", "n_questions": 4, "n_unanswerable": 0, "seed": 0, "models": {},
              "configs": {"rag": summarize([pred(i, "correct") for i in range(4)], seed=0)}, "comparisons": []}
    # a report.json written before the key existed
    assert "rates percentile bootstrap" in markdown(EvalReport.from_json(report))
    assert "rates wilson, differences paired percentile bootstrap" in \
        markdown(EvalReport.from_json({**report, "intervals": INTERVALS}))


def discordant(a_only: int, b_only: int, both: int = 3, neither: int = 2):
    a = [1] * a_only + [0] * b_only + [1] * both + [0] * neither
    b = [0] * a_only + [1] * b_only + [1] * both + [0] * neither
    return a, b


def test_mcnemar_hand_computed():
    # 10 discordant pairs, all favouring a: p = 2 * 0.5**10
    out = mcnemar_exact(*discordant(10, 0))
    assert out["a_only"] == 10 and out["b_only"] == 0
    assert out["p_value"] == pytest.approx(2 * 0.5 ** 10)
    # 2 against 8: p = 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(*discordant(2, 8))["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 1024)
    # 5 against 5: the two tails overlap, p capped at 1
    assert mcnemar_exact(*discordant(5, 5))["p_value"] == 1.0
    assert mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0


def test_paired_difference_is_a_deterministic_bootstrap():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    b = np.array([0, 1, 0, 0, 0, 0, 0, 1])
    diff, low, high = paired_diff_ci(a, b, seed=0)
    assert diff == pytest.approx(-3 / 8) and low <= diff <= high
    assert paired_diff_ci(a, b, seed=0) == (diff, low, high)
    # resampled pairs: a difference of -3/8 over 8 questions cannot reach below -1 or above 0 here
    assert -1.0 <= low < diff < high <= 0.0
