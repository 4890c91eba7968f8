import json

import numpy as np
import pytest

from core.errors import InputError
from hybrid.eval import EvalConfig, run_eval
from hybrid.eval_probe import risk_coverage, with_probe
from hybrid.pipeline import Pipeline
from hybrid.prediction import Prediction
from tests.hybrid.test_cli import assert_clean_error, run
from tests.hybrid.test_eval import fixed_qa  # noqa: F401  (fixture reused)
from tests.tuning.test_probe import probe_qa, tiny_probe  # noqa: F401  (fixtures reused)
from tuning.probe import Probe


def pred(i, label, score=None, answerable=None):
    return Prediction(id=str(i), config="rag", question="q", answers=["x"] if label != "unans" else [],
                      gold_ids=[], prediction="x" if label != "abstained" else "-", abstained=label == "abstained",
                      label="hallucinated" if label == "unans" else label, f1=0.0, citations=[], latency_ms=1.0,
                      new_tokens=1, probe_score=score, probe_answerable=answerable)


def test_risk_coverage_hand_computed():
    # 5 questions: answers ranked by score 0.9 (right), 0.7 (made up), 0.4 (right), 0.2 (made up); one abstained
    preds = [pred(0, "correct", 0.9), pred(1, "hallucinated", 0.7), pred(2, "abstained"),
             pred(3, "correct", 0.4), pred(4, "unans", 0.2)]
    c = risk_coverage(preds)
    assert c["coverage"] == [0, 0.2, 0.4, 0.6, 0.8]
    assert c["hallucination"] == [0, 0, 0.2, 0.2, 0.4]
    # trapezoids: 0 + 0.2*0.1 + 0.2*0.2 + 0.2*0.3 = 0.12
    assert c["area"] == pytest.approx(0.12)
    # ranked the other way round, the same answers cost more area
    flipped = [pred(i, p.label if p.answers else "unans", None if p.probe_score is None else 1 - p.probe_score)
               for i, p in enumerate(preds)]
    assert risk_coverage(flipped)["area"] > c["area"]
    # without scores: one point
    assert risk_coverage([pred(0, "correct"), pred(1, "abstained")]) == {"coverage": [0.5], "hallucination": [0.0],
                                                                        "area": None}


def test_with_probe_refuses_before_and_after(tiny_probe):
    probe = Probe.load(tiny_probe)
    low = with_probe(pred(0, "hallucinated", score=1.0, answerable=probe.before - 1e-3), probe)
    assert low.abstained and low.probe_decided == "before" and low.config == "rag+probe"
    after = with_probe(pred(0, "hallucinated", score=probe.threshold - 1e-3, answerable=1.0), probe)
    assert after.abstained and after.probe_decided == "after" and after.label == "abstained"
    kept = with_probe(pred(0, "correct", score=probe.threshold, answerable=1.0), probe)
    assert not kept.abstained and kept.label == "correct" and kept.probe_decided is None


def test_eval_with_probe_scores_derives_and_draws(tmp_path, fixed_qa, tiny_probe, tiny_llm_dir, monkeypatch):
    out = tmp_path / "rep"
    cfg = EvalConfig(qa=str(fixed_qa), base_model=str(tiny_llm_dir), closed_book=False, max_new_tokens=8,
                     out=str(out), probe=str(tiny_probe), precision="fp32")
    report = run_eval(cfg, progress=False)
    assert list(report.configs) == ["rag", "rag+probe"]
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(x["probe_answerable"], float) and x["probe"] for x in lines)
    probe = Probe.load(tiny_probe)
    # the derived configuration is the rule applied to the stored scores, counted by hand
    refused = [x["abstained"] or probe.decide(x["probe_answerable"], x["probe_score"]) is not None for x in lines]
    assert report.configs["rag+probe"]["abstention_rate"] == pytest.approx(np.mean(refused))
    assert report.configs["rag"]["abstention_rate"] == pytest.approx(np.mean([x["abstained"] for x in lines]))
    assert report.risk_coverage["rag"]["coverage"][-1] == pytest.approx(
        sum(not x["abstained"] for x in lines) / len(lines))
    assert (out / "risk_coverage.png").stat().st_size > 5000 and "Risk–coverage" in (out / "report.md").read_text()
    # a finished run with the same probe: nothing generated or read again
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("loaded the model again"))
    again = run_eval(cfg, progress=False)
    assert again.configs == report.configs


def test_probe_of_an_adapter_not_given_is_refused(tmp_path, fixed_qa, tiny_probe):
    rec_path = tiny_probe / "hybrid_probe.json"
    rec = json.loads(rec_path.read_text())
    moved = tmp_path / "probe"
    moved.mkdir()
    for f in tiny_probe.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    (moved / "hybrid_probe.json").write_text(json.dumps({**rec, "adapter": "runs/raft", "adapter_run": "ab" * 32}))
    with pytest.raises(InputError, match="pass that adapter with --adapter"):
        run_eval(EvalConfig(qa=str(fixed_qa), probe=str(moved), closed_book=False), progress=False)
    result = run("eval", fixed_qa, "--probe", tmp_path / "nothing", "--no-closed-book")
    assert_clean_error(result, "--probe", "hybrid tune probe")


def test_ask_with_probe_says_which_decided(tmp_path, tiny_probe, tiny_llm_dir):
    pipe = Pipeline.load(None, base_model=str(tiny_llm_dir), probe=str(tiny_probe), precision="fp32",
                         max_new_tokens=8)
    ps = [{"text": "The Kestrel-7 battery lasts 14 months.", "doc_id": "a"}]
    pipe.probe.before = 2.0  # no answerability reaches it: refused before anything is generated
    a = pipe.answer("How long does the battery last?", ps)
    assert a.abstained and a.probe_decided == "before" and a.raw == "" and a.probe_answerable is not None
    pipe.probe.before, pipe.probe.threshold = -1.0, 2.0  # every answer is refused after
    a = pipe.answer("How long does the battery last?", ps)
    assert a.probe_decided in ("after", None) and a.abstained
    assert a.probe_decided == "after" or a.raw  # a greedy abstention is the model's own, not the probe's
    pipe.probe.threshold = -1.0  # nothing refused
    a = pipe.answer("How long does the battery last?", ps)
    assert a.probe_decided is None and a.probe_answerable is not None
