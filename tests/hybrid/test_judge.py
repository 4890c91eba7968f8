import numpy as np
import pytest

from hybrid import halueval
from hybrid.judge import auroc
from tests.hybrid.test_cli import run


def test_auroc_hand_computed():
    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5], [1, 0]) == 0.5


def test_halueval_split_is_fixed_and_disjoint():
    train, test = halueval.split(10_000)
    assert len(test) == 1000 and not set(train) & set(test)
    assert halueval.split(10_000) == (train, test)


@pytest.mark.skipif(not halueval.DEFAULT_PATH.exists(), reason=f"HaluEval data not at {halueval.DEFAULT_PATH}")
def test_tune_judge_cli_trains_and_reports(tmp_path):
    res = run("tune", "judge", "--out", tmp_path / "judge", "--train-questions", 16, "--batch-size", 8,
              "--n-test", 20, "--json")
    assert res.exit_code == 0, res.output
    import json

    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["halueval_test"]["n"] == 40 and 0 <= rep["halueval_test"]["auroc"] <= 1
    assert rep["bundled"]["n"] > 200
    from hybrid.judge import Judge

    judge = Judge.load(tmp_path / "judge")
    flags = judge.unsupported(["q"], ["a"], [[{"text": "t"}]])
    assert flags in ([True], [False])
