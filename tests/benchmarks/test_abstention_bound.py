"""The abstention bound's arithmetic on a hand-computed case."""
import numpy as np

from benchmarks.abstention_bound import bound, rates

# 4 answerable (2 correct, 1 wrong, 1 abstained), 2 unanswerable (both answered = hallucinated)
CORRECT = np.array([True, True, False, False, False, False])
ABSTAINED = np.array([False, False, False, True, False, False])
ANSWERABLE = np.array([True, True, True, True, False, False])


def test_rates_count_served_answers_only():
    keep_all = np.ones(6, bool)
    assert rates(keep_all, CORRECT, ABSTAINED, ANSWERABLE) == (0.5, 0.5)  # 2/4 correct; 3/6 hallucinated
    keep = np.array([True, False, False, True, False, True])  # drop a correct, the wrong one, one unanswerable
    assert rates(keep, CORRECT, ABSTAINED, ANSWERABLE) == (0.25, 1 / 6)


def test_bound_finds_the_best_cut_on_each_side():
    # the signal ranks the correct answers first, then an unanswerable row, then the wrong answer
    signal = np.array([0.9, 0.8, 0.3, 0.1, 0.5, 0.2])
    b = bound(signal, CORRECT, ABSTAINED, ANSWERABLE, base_acc=0.5, max_hall=0.25)
    # keep >= 0.5: both correct + one unanswerable answered -> acc 0.5, hallucination 1/6
    assert b["best_acc"] == (0.5, 1 / 6)
    assert b["best_hall"] == (0.5, 0.0)  # keep >= 0.8: both correct, nothing hallucinated
    assert b["auroc"] == 0.625  # answerable {.9,.8,.3,.1} vs unanswerable {.5,.2}: 5 of 8 pairs ranked right
