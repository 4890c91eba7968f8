"""HaluEval QA (Li et al. 2023) as hybrid data: a fixed split, QA rows, judge pairs.

Each line is `{"knowledge", "question", "right_answer", "hallucinated_answer"}`.
The split is fixed and documented: `order = list(range(n)); random.Random(seed).shuffle(order)`;
the first `n_test` line numbers (default 1000, seed 0) are test, the rest train.
No test line is ever used for training anything (embedder, generator, judge, DPO).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from core.errors import InputError

DEFAULT_PATH = Path(__file__).resolve().parents[3] / "shared" / "data" / "halueval_qa" / "dataset_halueval_qa.jsonl"


def load_lines(path: str | Path | None = None) -> list[dict]:
    """All HaluEval QA lines (raises InputError naming the expected path when absent)."""
    path = Path(path) if path else DEFAULT_PATH
    if not path.exists():
        raise InputError(f"HaluEval QA not found at {path}; pass --halueval PATH to dataset_halueval_qa.jsonl")
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def doc_ids(lines: list[dict]) -> dict[str, str]:
    """Knowledge text (stripped) -> the document id the HaluEval index gives it: `h{line:05d}` of
    the first line holding it (benchmarks/experiments/retrieval_halueval.py builds the index that way)."""
    out: dict[str, str] = {}
    for i, row in enumerate(lines):
        out.setdefault(row["knowledge"].strip(), f"h{i:05d}")
    return out


def split(n: int, n_test: int = 1000, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train line numbers, test line numbers), both sorted."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_test:]), sorted(order[:n_test])


def judge_pairs(lines: list[dict], idx: list[int], swapped: bool = False, seed: int = 0,
                hallucinated: bool = True, neighbours: dict[int, int] | None = None,
                answerability: bool = False) -> list[tuple[str, str, str, int]]:
    """(passage, question, answer, label) with label 1 = supported (right), 0 = unsupported.

    Negatives are HaluEval's hallucinated answers (unless `hallucinated` is False); with `swapped`, also the right answer of
    another question in `idx` over this question's knowledge. HaluEval's hallucinated answers
    differ from the right ones in style, so a judge trained on them alone can score well on
    HaluEval without reading the passage; swapped answers are written like right answers and
    are only wrong given the passage.

    With `neighbours` (line -> line of the most similar *other* knowledge), two negatives
    that differ from a positive only in grounding: the right answer over the neighbour's
    knowledge (the evidence was not retrieved), and the neighbour's own right answer over
    the neighbour's knowledge (a span that is in the passage but answers another question,
    what a small RAG model writes when the evidence is missing).

    With `answerability` (and `neighbours`), also the question with an empty answer over its
    own knowledge (1) and over the neighbour's (0): "does this passage answer the question?",
    which the judge gate asks without looking at the model's wording.
    """
    rng = random.Random(seed)
    out = []
    for i in idx:
        row = lines[i]
        out.append((row["knowledge"], row["question"], row["right_answer"], 1))
        if hallucinated:
            out.append((row["knowledge"], row["question"], row["hallucinated_answer"], 0))
        if swapped:
            other = lines[rng.choice(idx)]["right_answer"]
            if other.lower() not in row["knowledge"].lower():
                out.append((row["knowledge"], row["question"], other, 0))
        if neighbours and i in neighbours:
            near = lines[neighbours[i]]
            if row["right_answer"].lower() not in near["knowledge"].lower():
                out.append((near["knowledge"], row["question"], row["right_answer"], 0))
            if near["right_answer"].lower() != row["right_answer"].lower():
                out.append((near["knowledge"], row["question"], near["right_answer"], 0))
            if answerability:
                out.append((row["knowledge"], row["question"], "", 1))
                out.append((near["knowledge"], row["question"], "", 0))
    return out


def nearest_other(lines: list[dict], idx: list[int], embedder) -> dict[int, int]:
    """For each line in `idx`, the line in `idx` whose knowledge is most similar to its question
    (its own knowledge, and identical knowledge texts, excluded).

    Args:
        lines: HaluEval lines.
        idx: line numbers to pair among (one split only, so no test text is touched).
        embedder: a retrieval.embedder.Embedder (normalised embeddings).
    Returns:
        {line: neighbour line}.
    """
    q = embedder.encode([lines[i]["question"] for i in idx])
    k = embedder.encode([lines[i]["knowledge"] for i in idx])
    sims = q @ k.T  # (n, n) cosine: embeddings are normalised
    out = {}
    for a, i in enumerate(idx):
        for b in sims[a].argsort()[::-1]:
            j = idx[int(b)]
            if lines[j]["knowledge"].strip() != lines[i]["knowledge"].strip():
                out[i] = j
                break
    return out
