"""The abstention bound's arithmetic on a hand-computed case."""
import json
import sys

import numpy as np
import pytest

from benchmarks.analyses.abstention_bound import bound, main, rates, read_confidence

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


def _predictions(path):
    """Six predictions of config rag+a matching CORRECT / ABSTAINED / ANSWERABLE, plus their rag baseline."""
    lines = []
    for i, (c, a, ans) in enumerate(zip(CORRECT, ABSTAINED, ANSWERABLE)):
        label = "correct" if c else "abstained" if a else "hallucinated"
        for config in ("rag", "rag+a"):
            lines.append({"id": f"q{i}", "config": config, "answers": ["x"] if ans else [], "label": label,
                          "abstained": bool(a)})
    path.write_text("".join(json.dumps(p) + "\n" for p in lines))
    return path


def test_confidence_is_swept_as_a_signal_with_its_right_vs_wrong_auroc(tmp_path, capsys, monkeypatch):
    preds = _predictions(tmp_path / "predictions.jsonl")
    conf = tmp_path / "conf.jsonl"
    # the right answers above the wrong one, but one unanswerable row answered surest of all
    values = [-0.1, -0.2, -2.0, -1.0, -0.5, -0.05]
    conf.write_text("".join(json.dumps({"id": f"q{i}", "config": "rag+a", "confidence": v}) + "\n"
                            for i, v in enumerate(values)))
    monkeypatch.setattr(sys, "argv", ["abstention_bound.py", str(preds), "--config", "rag+a", "--confidence", str(conf)])
    main()
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| answer confidence"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # among answerable answers only: right {-.1, -.2} above the wrong -2.0 (unanswerable rows and the
    # abstention are not counted; counting them would give 0.75)
    assert cells[2] == "1.000"
    # keeping both right answers (cut -0.2) keeps the sure unanswerable answer too: 1 of 6 hallucinated
    assert cells[4] == "0.500 (hallucination 0.167)"


def test_a_confidence_file_for_other_questions_is_refused_in_one_line(tmp_path, capsys):
    conf = tmp_path / "conf.jsonl"
    conf.write_text(json.dumps({"id": "q0", "config": "rag+a", "confidence": -1.0}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        read_confidence(str(conf), "rag+a", ["q0", "q1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: --confidence") and "q1" in err and len(err.splitlines()) == 1
