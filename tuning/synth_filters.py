"""The checks a `hybrid synth` offer must pass, each a function of the offer and what the teacher
or the index said about it (tuning/synth.py runs them in order and counts what each drops).

    >>> is_span("14 months", "The battery lasts 14 months."), leaks("How long, 14 months?", "14 months")
    (True, True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from retrieval.retriever import Hit
from tuning.grading import classify
from tuning.prompting import normalize, parse_answer, quote_in
from tuning.synth_prompts import MAX_ANSWER_WORDS


@dataclass
class Offer:
    chunk: Hit
    question: str
    answer: str  # "" for an unanswerable offer
    reason: str = ""
    reply: str = ""  # the teacher's answer when it checked the question


def is_span(answer: str, text: str) -> bool:
    """A short (<= 8 words) answer found verbatim, case and spacing aside, in the chunk."""
    return 0 < len(answer.split()) <= MAX_ANSWER_WORDS and quote_in(answer, text)


def leaks(question: str, answer: str) -> bool:
    return normalize(answer) in normalize(question)


def same_answer(answer: str, span: str) -> bool:
    """The eval's rule (tuning/grading.py), plus two spellings of the same fact it does not see:
    spacing inside a quantity ("18°C" for "18 °C") and a number without the unit the span gives it
    ("is 12." for "12 times").

    >>> same_answer("It is 18°C.", "18 °C"), same_answer("The limit is 12.", "12 times"), same_answer("120", "12 times")
    (True, True, False)
    """
    if classify(answer, False, [span]) == "correct":
        return True
    a, g = normalize(answer), normalize(span)
    if g.replace(" ", "") in a.replace(" ", ""):
        return True
    number = re.fullmatch(r"(\d[\d.,:]*) ([a-z]+)", g)  # "12 times": a number and one unit word
    if not number:
        return False
    words = a.split() + [""]
    # the number, followed by nothing or by a word that is no other unit ("14 days" is not "14 months")
    return any(w == number.group(1) and not (words[i + 1].isalpha() and words[i + 1] != number.group(2)
                                              and words[i + 1] not in ("and", "or", "to", "in", "for"))
               for i, w in enumerate(words[:-1]))


def consistent(reply: str, offer: Offer) -> tuple[bool, str]:
    """(the teacher's reply to its own question, chunk alone, gives the span; its reasoning when it
    quotes the chunk verbatim, else "")."""
    parsed = parse_answer(reply)
    if parsed.abstained or not same_answer(parsed.answer, offer.answer):
        return False, ""
    if parsed.quotes and all(quote_in(q, offer.chunk.text) for q in parsed.quotes) and "##Answer:" in reply:
        return True, reply.rsplit("##Answer:", 1)[0].strip()
    return True, ""


def answered_by_index(reply: str, retrieved: list[Hit]) -> bool:
    """The teacher, shown what the index retrieves for an 'unanswerable' question, answers it from them:
    its answer or a quote of it occurs in a retrieved chunk. A malformed reply (`parse_answer`) counts
    as answered: it is no abstention, so it cannot vouch that the index lacks the answer."""
    parsed = parse_answer(reply)
    if parsed.malformed:
        return True
    if parsed.abstained:
        return False
    texts = [h.text for h in retrieved]
    return any(quote_in(parsed.answer, t) for t in texts) or any(quote_in(q, t) for q in parsed.quotes for t in texts)


class Deduper:
    """Questions kept so far, as unit vectors; a new one within `cosine` of any is a duplicate."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], cosine: float, kept: list[str]):
        self.encode, self.cosine = encode, cosine
        self.vecs = self._unit(encode(kept)) if kept else None

    @staticmethod
    def _unit(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def keep(self, questions: list[str]) -> list[bool]:
        if not questions:
            return []
        out = []
        for v in self._unit(self.encode(questions)):
            dup = self.vecs is not None and float((self.vecs @ v).max()) >= self.cosine
            out.append(not dup)
            if not dup:
                self.vecs = v[None] if self.vecs is None else np.vstack([self.vecs, v])
        return out
