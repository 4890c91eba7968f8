import math

import pytest

from retrieval.metrics import distinct_docs, mrr_at_k, ndcg_at_k, recall_at_k, retrieval_metrics


def test_hand_computed_cases():
    ranked = ["a", "b", "a", "c", "d"]
    docs = distinct_docs(ranked)
    assert docs == ["a", "b", "c", "d"]
    gold = {"c", "z"}
    assert recall_at_k(docs, gold, 1) == 0.0
    assert recall_at_k(docs, gold, 3) == 0.5
    assert mrr_at_k(docs, gold, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(docs, gold, 2) == 0.0
    # DCG = 1/log2(4); ideal for 2 gold = 1 + 1/log2(3)
    assert ndcg_at_k(docs, gold, 10) == pytest.approx((1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_retrieval_metrics_averages_and_skips_questions_without_gold():
    out = retrieval_metrics([["a", "b"], ["x", "a"], ["q"]], [{"a"}, {"a"}, set()], ks=(1, 5))
    assert out["n"] == 2
    assert out["recall@1"] == 0.5 and out["recall@5"] == 1.0
    assert out["mrr@10"] == pytest.approx(0.75)
