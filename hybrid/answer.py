"""What the pipeline answers: the `Answer` record (`to_dict` is `ask --json`'s schema), its quotes
verified against the passages, the passages it names, and which of several candidate answers is
served under `--select` (the pipeline and the eval apply the same rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retrieval.retriever import Retriever
from tuning.prompting import quote_in


@dataclass
class Answer:
    """What `ask`/`answer` return (`to_dict` is the `--json` schema)."""

    answer: str
    abstained: bool
    citations: list[dict] = field(default_factory=list)
    passages: list[dict] = field(default_factory=list)
    raw: str = ""
    latency_ms: float = 0.0
    new_tokens: int = 0
    support: float | None = None  # judge: does a passage back this answer (None: no judge, or it abstained)
    answerable: float | None = None  # judge: does any passage answer the question (the gate's signal)
    gated: bool = False  # the judge found no passage answering the question, so the pipeline abstained
    abstain_score: float | None = None  # the adapter's own abstention score (calibrated adapters only)
    calibrated_abstain: bool = False  # the score reached the adapter's threshold: the pipeline abstains
    # the score was below the threshold but the greedy completion abstained: answered again from the
    # answer's opening (the threshold decides both ways)
    calibrated_answer: bool = False
    selected_from: str | None = None  # with select: the adapter whose answer the judge supported most
    malformed: bool = False  # the completion broke the answer template (parse_answer): served as the abstention
    probe_answerable: float | None = None  # the probe: P(the passages answer the question) (None: no probe for this reader)
    probe_score: float | None = None  # the probe's rule: P(this answer is not made up) (None: nothing was answered)
    probe_decided: str | None = None  # the probe refused: "before" generating (answerability) or "after" (the rule)

    def to_dict(self) -> dict:
        return {"answer": self.answer, "abstained": self.abstained, "citations": self.citations,
                "passages": self.passages, "support": self.support, "answerable": self.answerable,
                "gated": self.gated, "abstain_score": self.abstain_score,
                "calibrated_abstain": self.calibrated_abstain, "calibrated_answer": self.calibrated_answer,
                "selected_from": self.selected_from, "malformed": self.malformed,
                "probe_answerable": self.probe_answerable, "probe_score": self.probe_score,
                "probe_decided": self.probe_decided}


def verify(parsed, passages: list[dict]) -> list[dict]:
    """Each quote with the document and chunk it was found in (verbatim, whitespace/case aside), or unverified."""
    cites = []
    for q in parsed.quotes:
        p = next((p for p in passages if quote_in(q, p["text"])), None)
        doc = None if p is None else p.get("doc_id") or str(p.get("id", ""))
        cites.append({"doc_id": doc, "chunk_id": None if p is None else p.get("chunk_id"), "quote": q,
                      "verified": p is not None})
    return cites


def passages_for(retriever: Retriever, questions: list[str], k: int, groups=None,
                 mode: str | None = None) -> list[list[dict]]:
    """Top-k visible chunks per question as passage dicts (doc_id, chunk_id, title, text, score)."""
    hits = retriever.search_batch(questions, k=k, groups=groups, mode=mode)
    return [[{"doc_id": h.doc_id, "chunk_id": h.chunk_id, "title": h.title, "text": h.text, "score": h.score}
             for h in hs] for hs in hits]


def passage_refs(passages: list[dict]) -> list[dict]:
    """What an Answer says of its passages: document, chunk and retrieval score (no text)."""
    return [{"doc_id": p.get("doc_id") or str(p.get("id", "")), "chunk_id": p.get("chunk_id", ""),
             "score": round(p.get("score", 0.0), 6)} for p in passages]


def best_supported(abstained: list[bool], supports: list[float | None]) -> int:
    """Which candidate answer to serve under `--select`: the non-abstaining one with the highest
    judge support (ties: the first listed); the first when all abstained."""
    live = [i for i, a in enumerate(abstained) if not a]
    return max(live, key=lambda i: -1.0 if supports[i] is None else supports[i]) if live else 0


def deciding_adapter(select: list[str], aurocs: dict[str, float]) -> str | None:
    """Under `--select`, whose calibrated abstention decides: the calibrated adapter whose score
    separated its calibration rows best (highest AUROC); None when none is calibrated."""
    calibrated = [n for n in select if n in aurocs]
    return max(calibrated, key=lambda n: aurocs[n]) if calibrated else None
