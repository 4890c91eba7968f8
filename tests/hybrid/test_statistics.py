import numpy as np
import pytest

from hybrid.statistics import bootstrap_ci, mcnemar_exact, paired_diff_ci


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    x = [1] * 30 + [0] * 70
    low, high = bootstrap_ci(x, seed=1)
    assert low < 0.3 < high and 0.18 < low and high < 0.42
    assert bootstrap_ci(x, seed=1) == (low, high)
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)


def test_mcnemar_hand_computed():
    # 10 discordant pairs, all favouring a: p = 2 * 0.5**10
    a = [1] * 10 + [0] * 5 + [1] * 5
    b = [0] * 10 + [0] * 5 + [1] * 5
    out = mcnemar_exact(a, b)
    assert out["a_only"] == 10 and out["b_only"] == 0
    assert out["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0


def test_paired_difference():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    b = np.array([0, 1, 0, 0, 0, 0, 0, 1])
    diff, low, high = paired_diff_ci(a, b, seed=0)
    assert diff == pytest.approx(-3 / 8) and low <= diff <= high
