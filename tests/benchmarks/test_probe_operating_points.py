import pytest

from benchmarks.analyses.probe_operating_points import operating_points
from tests.hybrid.test_eval_probe import pred


def test_operating_points_hand_computed():
    # ranked by score: right, made up, right, made up (unanswerable); one abstained; 4 answerable of 5
    preds = [pred(0, "correct", 0.9), pred(1, "hallucinated", 0.7), pred(2, "abstained"),
             pred(3, "correct", 0.4), pred(4, "unans", 0.2)]
    out = operating_points(preds, target=0.2)
    # within 0.2 (one made-up answer of 5): the top three keep both right answers
    assert out["best_within_target"] == {"right": 2, "hallucination": 0.2, "answered": 0.6,
                                         "accuracy_answerable": 0.5}
    assert out["no_right_answer_lost"] == {"hallucination": 0.2, "answered": 0.6}
    # within 0: only the first answer
    assert operating_points(preds, target=0.0)["best_within_target"]["right"] == 1
    assert operating_points(preds, target=0.0)["best_within_target"]["accuracy_answerable"] == pytest.approx(0.25)
