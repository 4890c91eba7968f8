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


def test_grounding_negatives_differ_only_in_grounding():
    lines = [{"knowledge": "Ann was born in Oslo.", "question": "Where was Ann born?", "right_answer": "Oslo",
              "hallucinated_answer": "Rome"},
             {"knowledge": "Bob was born in Lima.", "question": "Where was Bob born?", "right_answer": "Lima",
              "hallucinated_answer": "Kyiv"}]
    pairs = halueval.judge_pairs(lines, [0], hallucinated=False, neighbours={0: 1})
    assert pairs == [("Ann was born in Oslo.", "Where was Ann born?", "Oslo", 1),
                     ("Bob was born in Lima.", "Where was Ann born?", "Oslo", 0),
                     ("Bob was born in Lima.", "Where was Ann born?", "Lima", 0)]
    assert len(halueval.judge_pairs(lines, [0], neighbours={0: 1})) == 4  # + HaluEval's hallucinated answer


def test_nearest_other_skips_own_and_identical_knowledge():
    class Fake:  # embeds "X ..." as a one-hot on the first letter
        def encode(self, texts):
            return np.stack([np.eye(3)["ABC".index(t[0])] for t in texts])

    lines = [{"question": "A?", "knowledge": "A1"}, {"question": "A?", "knowledge": "A1"},
             {"question": "A?", "knowledge": "A2"}, {"question": "C?", "knowledge": "C1"}]
    near = halueval.nearest_other(lines, [0, 1, 2, 3], Fake())
    assert near[0] == 2 and near[1] == 2  # line 1 holds the same text as line 0: skipped
    assert near[2] in (0, 1)


def test_support_is_the_best_passage():
    from hybrid.judge import Judge

    class Model:  # "supports" when the answer occurs in the passage
        def predict(self, pairs, **_):
            return [0.9 if q.split("Answer: ")[1] in p else 0.1 for q, p in pairs]

    judge = Judge(Model())
    ctx = [[{"text": "nothing here"}, {"text": "Oslo is a city"}], [{"text": "nothing"}], []]
    assert judge.support(["q"] * 3, ["Oslo"] * 3, ctx).tolist() == [0.9, 0.1, 0.0]
    assert judge.unsupported(["q"] * 3, ["Oslo"] * 3, ctx) == [False, True, True]


def test_answerability_pairs_need_grounding_negatives(tmp_path):
    res = run("tune", "judge", "--out", tmp_path / "j", "--no-grounding-negatives")
    assert res.exit_code == 2 and "--answerability-pairs needs --grounding-negatives" in res.stderr
    assert not (tmp_path / "j").exists()
