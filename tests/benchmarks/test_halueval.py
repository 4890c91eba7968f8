"""benchmarks/data/halueval.py: the fixed split and the judge pairs built from HaluEval lines."""

import numpy as np

from benchmarks.data import halueval


def test_halueval_split_is_fixed_and_disjoint():
    train, test = halueval.split(10_000)
    assert len(test) == 1000 and not set(train) & set(test)
    assert halueval.split(10_000) == (train, test)


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
    both = halueval.judge_pairs(lines, [0], hallucinated=False, neighbours={0: 1}, answerability=True)
    assert both[-2:] == [("Ann was born in Oslo.", "Where was Ann born?", "", 1),
                         ("Bob was born in Lima.", "Where was Ann born?", "", 0)]


def test_nearest_other_skips_own_and_identical_knowledge():
    class Fake:  # embeds "X ..." as a one-hot on the first letter
        def encode(self, texts):
            return np.stack([np.eye(3)["ABC".index(t[0])] for t in texts])

    lines = [{"question": "A?", "knowledge": "A1"}, {"question": "A?", "knowledge": "A1"},
             {"question": "A?", "knowledge": "A2"}, {"question": "C?", "knowledge": "C1"}]
    near = halueval.nearest_other(lines, [0, 1, 2, 3], Fake())
    assert near[0] == 2 and near[1] == 2  # line 1 holds the same text as line 0: skipped
    assert near[2] in (0, 1)
