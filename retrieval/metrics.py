"""Document-level retrieval metrics: plain rankings and gold sets in, `dict[str, float]` out
(the sentence-transformers evaluator shape). `hybrid eval --only retrieval` runs them on an index
(hybrid/eval_retrieval.py).
"""

from __future__ import annotations

import math
from typing import Sequence


def distinct_docs(doc_ids: Sequence[str]) -> list[str]:
    """Document ids in first-seen order (chunks of one document collapse to its best rank)."""
    seen, out = set(), []
    for d in doc_ids:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def recall_at_k(ranked: Sequence[str], gold: set[str], k: int) -> float:
    """Share of gold documents among the first k distinct documents."""
    return len(gold.intersection(ranked[:k])) / len(gold) if gold else 0.0


def mrr_at_k(ranked: Sequence[str], gold: set[str], k: int) -> float:
    """1/rank of the first gold document within the first k, else 0."""
    for i, d in enumerate(ranked[:k], 1):
        if d in gold:
            return 1.0 / i
    return 0.0


def ndcg_at_k(ranked: Sequence[str], gold: set[str], k: int) -> float:
    """Binary-relevance nDCG@k."""
    dcg = sum(1.0 / math.log2(i + 1) for i, d in enumerate(ranked[:k], 1) if d in gold)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(gold), k) + 1))
    return dcg / ideal if ideal else 0.0


def retrieval_metrics(rankings: Sequence[Sequence[str]], golds: Sequence[set[str]],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Mean recall@k for each k, MRR@10 and nDCG@10 over questions with gold documents.

    Args:
        rankings: per question, document ids in rank order (duplicates allowed).
        golds: per question, the set of gold document ids (empty sets are skipped).
        ks: cut-offs for recall.

    Returns:
        {"n", "recall@k"..., "mrr@10", "ndcg@10"}.
    """
    pairs = [(distinct_docs(r), g) for r, g in zip(rankings, golds) if g]
    n = len(pairs)
    out: dict[str, float] = {"n": n}
    for k in ks:
        out[f"recall@{k}"] = sum(recall_at_k(r, g, k) for r, g in pairs) / n if n else 0.0
    out["mrr@10"] = sum(mrr_at_k(r, g, 10) for r, g in pairs) / n if n else 0.0
    out["ndcg@10"] = sum(ndcg_at_k(r, g, 10) for r, g in pairs) / n if n else 0.0
    return out
