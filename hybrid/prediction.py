"""One line of `hybrid eval`'s predictions.jsonl as a typed record: `Prediction`, written by
`to_json` and read by `from_json`, the one home of the line's contract.

The line's form does not change with the record: `to_json` writes the keys the eval has always
written, under the same names and omission rules, so a user's old predictions.jsonl still reads
and a resumed eval appends lines like the ones already there. Lines written before a field
existed read with its default (`malformed` absent: None, unknown; `support` absent: None).
Derived configurations (`+gate`, `+cal`, `A|B`) are new records made with `dataclasses.replace`;
the generated line they come from is left as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

LABELS = ("correct", "abstained", "hallucinated")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _citations(v) -> bool:
    return isinstance(v, list) and all(isinstance(c, dict) and isinstance(c.get("verified"), bool) for c in v)


def _string(v) -> bool:
    return isinstance(v, str)


def _bool(v) -> bool:
    return isinstance(v, bool)


# What a line must hold: every field the report, the derived configurations and a resumed or merged
# eval read. A line breaking it would otherwise surface as a traceback, or worse as a report whose
# rates no longer sum to 1 (an unknown label counts nowhere).
REQUIRED = {"id": ("a string", _string), "config": ("a string", _string), "question": ("a string", _string),
            "answers": ("a list of strings", _strings), "gold_ids": ("a list of strings", _strings),
            "prediction": ("a string", _string), "abstained": ("true or false", _bool),
            "label": (" | ".join(LABELS), lambda v: v in LABELS), "f1": ("a number", _number),
            "citations": ("a list of {..., \"verified\": true|false}", _citations),
            "latency_ms": ("a number", _number),
            "new_tokens": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))}
# Added by a judge, a calibration or retrieval, or absent from lines written before the field was;
# null (or absent) where there was none.
OPTIONAL = {"support": ("a number or null", _number), "unsupported": ("true, false or null", _bool),
            "answerable": ("a number or null", _number), "judge_ms": ("a number or null", _number),
            "retrieved_doc_ids": ("a list of strings or null", _strings),
            "malformed": ("true, false or null", _bool), "raw": ("a string or null", _string),
            "judge": ("a string or null", _string),
            "probe_answerable": ("a number or null", _number), "probe_score": ("a number or null", _number),
            "probe": ("a string or null", _string),
            # the derived configurations' marks: in memory only, never in a stored line
            "gated": ("true, false or null", _bool), "calibrated_abstain": ("true, false or null", _bool),
            "calibrated_answer": ("true, false or null", _bool), "selected_from": ("a string or null", _string),
            "probe_decided": ("before, after or null", lambda v: v in ("before", "after"))}


@dataclass(frozen=True)
class Prediction:
    """One (question, configuration) answer as served, graded once (tuning/grading.py)."""

    id: str  # the question's id in the QA file
    config: str  # the configuration's label (hybrid/eval_configuration.py)
    question: str
    answers: list[str]  # gold answers; []: unanswerable
    gold_ids: list[str]  # documents that answer it (retrieval metrics)
    prediction: str  # the answer as served (the abstention text when it abstained)
    abstained: bool
    label: str  # correct | abstained | hallucinated: agrees with `abstained`
    f1: float
    citations: list[dict]  # quotes with their `verified` mark (hybrid/answer.py)
    latency_ms: float  # every completion (and judge call) this served answer cost
    new_tokens: int
    raw: str | None = None  # the completion as generated (benchmarks/analyses/regrade.py reads it again)
    support: float | None = None  # judge: do the passages back the answer (None: no judge, or abstained)
    unsupported: bool | None = None  # judge: support below its threshold
    retrieved_doc_ids: list[str] | None = None  # None: fixed passages, or closed book
    malformed: bool | None = None  # the completion broke the template; None: a line from before it was recorded
    abstain_score: float | None = None  # calibrated adapters only; None (absent in the line): not scored yet
    answerable: float | None = None  # judge: does any passage answer the question (the gate's signal)
    judge: str | None = None  # fingerprint of the judge that scored this line (rescored when it changes)
    judge_ms: float | None = None  # the judge's time per answer; None (with the two above absent): not judged
    probe_answerable: float | None = None  # the probe: P(the passages answer the question)
    probe_score: float | None = None  # the probe's rule: P(this answer is not made up); None: abstained
    probe: str | None = None  # fingerprint of the probe that scored this line (rescored when it changes)
    # derived configurations only (hybrid/eval_derived.py): what decided the served answer
    gated: bool = False
    calibrated_abstain: bool = False
    calibrated_answer: bool = False
    selected_from: str | None = None
    probe_decided: str | None = None  # the probe refused the answer: "before" or "after" generating

    @property
    def judged(self) -> bool:
        """A judge scored this line: its `answerable`, `judge` and `judge_ms` keys are written."""
        return self.judge is not None or self.judge_ms is not None or self.answerable is not None

    def to_json(self) -> dict:
        """The predictions.jsonl line, keys in the order the eval writes a fresh line."""
        line = {"id": self.id, "config": self.config, "question": self.question, "answers": list(self.answers),
                "gold_ids": list(self.gold_ids), "prediction": self.prediction}
        if self.raw is not None:
            line["raw"] = self.raw
        line.update(abstained=self.abstained, label=self.label, f1=self.f1, citations=self.citations,
                    support=self.support, unsupported=self.unsupported, retrieved_doc_ids=self.retrieved_doc_ids,
                    latency_ms=self.latency_ms, new_tokens=self.new_tokens)
        if self.malformed is not None:  # absent from lines written before it was recorded: kept absent
            line["malformed"] = self.malformed
        if self.abstain_score is not None:  # absent = not scored yet (null would read as scored)
            line["abstain_score"] = self.abstain_score
        if self.judged:
            line.update(answerable=self.answerable, judge=self.judge, judge_ms=self.judge_ms)
        if self.probe is not None:
            line.update(probe_answerable=self.probe_answerable, probe_score=self.probe_score, probe=self.probe)
        for name in ("gated", "calibrated_abstain", "calibrated_answer"):  # written only where they hold
            if getattr(self, name):
                line[name] = True
        if self.selected_from is not None:
            line["selected_from"] = self.selected_from
        if self.probe_decided is not None:
            line["probe_decided"] = self.probe_decided
        return line

    @classmethod
    def from_json(cls, line) -> "Prediction":
        """The record of one predictions.jsonl line, today's or an older one.

        Raises:
            ValueError: the line breaks the contract; the message names the field (the caller adds
                FILE:LINE).
        """
        if why := problem(line):
            raise ValueError(why)
        optional = {name: line.get(name) for name in OPTIONAL}
        for name in ("gated", "calibrated_abstain", "calibrated_answer"):
            optional[name] = bool(optional[name])
        return cls(**{name: line[name] for name in REQUIRED}, **optional, abstain_score=line.get("abstain_score"))


def problem(line) -> str | None:
    """What is wrong with one prediction line (None: nothing), naming the field."""
    if not isinstance(line, dict):
        return f"a line must be a JSON object, not {json.dumps(line)[:40]}"
    for name, (want, ok) in REQUIRED.items():
        if name not in line:
            return f"no '{name}' field (must be {want})"
        if not ok(line[name]):
            return f"field '{name}' must be {want}, not {json.dumps(line[name])[:40]}"
    for name, (want, ok) in OPTIONAL.items():
        if line.get(name) is not None and not ok(line[name]):
            return f"field '{name}' must be {want}, not {json.dumps(line[name])[:40]}"
    if "abstain_score" in line and not _number(line["abstain_score"]):  # absent = not scored; null would pass unscored
        return f"field 'abstain_score' must be a number (or absent), not {json.dumps(line['abstain_score'])[:40]}"
    if (line["label"] == "abstained") != line["abstained"]:  # one answer, classified once: the two must agree
        return f"field 'label' is {line['label']} but 'abstained' is {json.dumps(line['abstained'])}"
    return None
