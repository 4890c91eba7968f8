"""hybrid/prediction.py: a predictions.jsonl line as a record, read and written in the form eval
has always written (a user's old predictions.jsonl still reads)."""
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from core.qa import QARow
from hybrid.eval import prediction
from hybrid.eval_derived import picked_by_judge, with_calibration, with_gate
from hybrid.prediction import Prediction
from tuning.prompting import ABSTAIN

ROW = QARow(id="1", question="How long does the battery last?", answers=["14 months"], gold_ids=["spec"])
CTX = [{"doc_id": "spec", "text": "The battery lasts 14 months."}, {"doc_id": "office", "text": "Opens at 8."}]


def answer(text="It lasts 14 months.", abstained=False, **kw):
    return SimpleNamespace(answer=text, raw=f"##Answer: {text}", abstained=abstained,
                           citations=[{"doc_id": "spec", "quote": "14 months", "verified": True}], latency_ms=5.0,
                           new_tokens=4, **kw)


def judged(p: Prediction) -> Prediction:
    """As the eval's judge stage leaves a line."""
    return replace(p, support=0.9, unsupported=False, answerable=0.8, judge="ab12", judge_ms=1.5)


def test_a_fresh_line_has_exactly_the_keys_eval_always_wrote():
    p = prediction("rag", ROW, CTX, answer(malformed=False))
    assert p.to_json() == {  # key order included: a resumed eval appends lines like the ones already there
        "id": "1", "config": "rag", "question": ROW.question, "answers": ["14 months"], "gold_ids": ["spec"],
        "prediction": "It lasts 14 months.", "raw": "##Answer: It lasts 14 months.", "abstained": False,
        "label": "correct", "f1": p.f1, "citations": [{"doc_id": "spec", "quote": "14 months", "verified": True}],
        "support": None, "unsupported": None, "retrieved_doc_ids": ["spec", "office"], "latency_ms": 5.0,
        "new_tokens": 4, "malformed": False}
    assert list(p.to_json()) == ["id", "config", "question", "answers", "gold_ids", "prediction", "raw", "abstained",
                                 "label", "f1", "citations", "support", "unsupported", "retrieved_doc_ids",
                                 "latency_ms", "new_tokens", "malformed"]
    assert "malformed" in prediction("rag", ROW, CTX, answer()).to_json()  # an answer that does not say: False


def every_kind() -> list[Prediction]:
    """A line of every configuration kind, as the eval's own stages make them."""
    fixed = QARow(id="2", question="q", answers=[], passages=[{"id": "p", "text": "t"}])
    closed = prediction("closed_book", ROW, [], answer("Paris"))
    rag = judged(prediction("rag", ROW, CTX, answer()))
    fixed_rag = prediction("rag", fixed, [{"doc_id": "p", "text": "t"}], answer(ABSTAIN, abstained=True))
    calibrated = replace(judged(prediction("rag+a", ROW, CTX, answer(ABSTAIN, abstained=True, malformed=True))),
                         abstain_score=-3.0)
    answered = judged(prediction("rag+a+answered", ROW, CTX, answer()))
    other = replace(judged(prediction("rag+b", ROW, CTX, answer("12 months"))), support=0.2, abstain_score=-0.5)
    gate = with_gate(replace(rag, answerable=0.1))
    cal_abstain = with_calibration(replace(rag, config="rag+b", abstain_score=-0.1), threshold=-1.0)
    cal_answer = with_calibration(calibrated, threshold=-1.0, answered=answered)
    picked = picked_by_judge([calibrated, other], "rag+a|b")
    assert (gate.gated, cal_abstain.calibrated_abstain, cal_answer.calibrated_answer, picked.selected_from) == \
        (True, True, True, "rag+b")
    return [closed, rag, fixed_rag, calibrated, answered, other, gate, cal_abstain, cal_answer, picked]


@pytest.mark.parametrize("p", every_kind(), ids=lambda p: p.config)
def test_every_kind_of_line_round_trips(p):
    line = json.loads(json.dumps(p.to_json()))  # as it lies in predictions.jsonl
    assert Prediction.from_json(line) == p
    assert Prediction.from_json(line).to_json() == line


def test_optional_keys_are_written_only_where_today_s_eval_writes_them():
    fresh = prediction("rag", ROW, CTX, answer()).to_json()
    assert not {"abstain_score", "answerable", "judge", "judge_ms", "gated", "selected_from"} & set(fresh)
    scored = judged(prediction("closed_book", ROW, [], answer())).to_json()
    assert scored["judge"] == "ab12" and "answerable" in scored and "abstain_score" not in scored


def test_an_old_line_still_reads_and_keeps_its_form():
    # the shape the first eval wrote: no support, no malformed (and no judge fields, no abstain_score)
    old = {"id": "1", "config": "rag", "question": "q", "answers": ["a"], "gold_ids": [], "prediction": "a",
           "raw": "a", "abstained": False, "label": "correct", "f1": 1.0, "citations": [], "unsupported": None,
           "retrieved_doc_ids": None, "latency_ms": 3.0, "new_tokens": 1}
    p = Prediction.from_json(old)
    assert (p.malformed, p.support, p.abstain_score, p.judge, p.raw) == (None, None, None, None, "a")
    assert p.to_json() == {**old, "support": None}  # malformed stays absent: unknown, not False
    assert Prediction.from_json({k: v for k, v in old.items() if k != "raw"}).raw is None


@pytest.mark.parametrize("change,needle", [
    ({"f1": "x"}, "field 'f1' must be a number, not \"x\""),
    ({"new_tokens": 1.5}, "field 'new_tokens' must be an integer"),
    ({"malformed": "yes"}, "field 'malformed' must be true, false or null"),
    ({"raw": 3}, "field 'raw' must be a string or null"),
    ({"judge": 7}, "field 'judge' must be a string or null"),
    ({"abstain_score": None}, "field 'abstain_score' must be a number (or absent), not null"),
])
def test_a_mistyped_field_is_refused_naming_it(change, needle):
    line = {**prediction("rag", ROW, CTX, answer()).to_json(), **change}
    with pytest.raises(ValueError) as err:
        Prediction.from_json(line)
    assert needle in str(err.value) and "\n" not in str(err.value)
