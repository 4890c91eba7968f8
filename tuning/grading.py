"""Grading an answer against its gold answers: the one rule training and evaluation share.

    >>> classify("It was built in 1889.", False, ["1889"])
    'correct'
    >>> classify("I cannot answer", True, [])
    'abstained'
    >>> round(token_f1("the Eiffel Tower", ["Eiffel Tower"]), 2)
    1.0

Each answer is exactly one of:
  correct       the normalised gold answer (SQuAD/HotpotQA normalisation) equals or
                is contained in the normalised final answer; a yes/no gold must equal
                the answer's first word
  abstained     the abstention sentence or a recognised refusal
  hallucinated  anything else: a wrong answer, or any answer to an unanswerable question
"""

from __future__ import annotations

from collections import Counter

from tuning.prompting import normalize


def classify(answer: str, abstained: bool, golds: list[str] | tuple[str, ...]) -> str:
    """correct | abstained | hallucinated (see the module docstring)."""
    if abstained:
        return "abstained"
    if not golds:
        return "hallucinated"
    pred = normalize(answer)
    for g in golds:
        ng = normalize(g)
        if ng in ("yes", "no"):
            if pred.split()[:1] == [ng]:
                return "correct"
        elif ng and ng in pred:
            return "correct"
    return "hallucinated"


def token_f1(answer: str, golds) -> float:
    """SQuAD token F1 against the best gold (0 for unanswerable questions)."""
    best = 0.0
    pred = normalize(answer).split()
    for g in golds:
        gold = normalize(g).split()
        common = Counter(pred) & Counter(gold)
        same = sum(common.values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best
