import json

import pytest

from benchmarks.analyses.paired_readers import main, paired

# id: (answerable?, label of A, label of B)
ROWS = {"q1": (True, "correct", "correct"), "q2": (True, "hallucinated", "correct"),
        "q3": (True, "hallucinated", "correct"), "q4": (True, "correct", "hallucinated"),
        "q5": (False, "hallucinated", "abstained"), "q6": (False, "hallucinated", "hallucinated")}


def _write(d, which, extra=()):
    d.mkdir()
    rows = [{"id": q, "config": "rag", "answers": ["x"] if ans else [], "label": labels[which]}
            for q, (ans, *labels) in ROWS.items()]
    rows += [{"id": "q9", "config": "rag", "answers": ["x"], "label": "correct"} for _ in extra]
    rows.append({"id": "q1", "config": "rag+raft", "answers": ["x"], "label": "hallucinated"})
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def test_paired_rates_counts_and_p_by_hand(tmp_path):
    a, b = _write(tmp_path / "a", 0, extra=[1]), _write(tmp_path / "b", 1)  # q9 only in A: not paired
    out = paired(a, b)
    assert (out["n"], out["n_answerable"]) == (6, 4)
    assert out["a"] == {"accuracy_answerable": 0.5, "hallucination_rate": 4 / 6}
    assert out["b"] == {"accuracy_answerable": 0.75, "hallucination_rate": 2 / 6}
    acc, hal = out["accuracy_answerable"], out["hallucination_rate"]
    assert acc["b_minus_a"] == pytest.approx(0.25) and (acc["a_only"], acc["b_only"]) == (1, 2)
    assert acc["mcnemar_p"] == pytest.approx(1.0)  # 1 vs 2 discordant: two-sided binomial p = 1
    assert hal["b_minus_a"] == pytest.approx(-2 / 6) and (hal["a_only"], hal["b_only"]) == (3, 1)
    assert hal["mcnemar_p"] == pytest.approx(0.625)  # 2 * P(X <= 1), X ~ Bin(4, 1/2) = 2 * 5/16
    assert acc["ci"][0] <= acc["b_minus_a"] <= acc["ci"][1]


def test_a_directory_without_predictions_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["paired_readers.py", str(tmp_path), _write(tmp_path / "b", 1)])
    assert main() == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: no predictions.jsonl") and err.count("\n") == 1
