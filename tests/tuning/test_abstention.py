import json
import shutil

import numpy as np
import pytest

from hybrid.eval import EvalConfig, run_eval
from hybrid.pipeline import Pipeline
from core.errors import InputError
from tests.hybrid.test_cli import assert_clean_error, run
from tests.hybrid.test_eval import fixed_qa  # noqa: F401  (fixture reused)
from tests.hybrid.test_pipeline import two_adapters  # noqa: F401  (module fixture reused)
from tuning.abstention import CAL_FILE, abstain_scores, youden_threshold
from tuning.prompting import abstain_answer, build_messages


def test_youden_threshold_hand_computed():
    # abstain at or above t; answerable rows should stay below it
    scores = np.array([-3.0, -2.0, -1.5, -1.0, -0.5, -0.2])
    answerable = np.array([True, True, False, True, False, False])
    cut = youden_threshold(scores, answerable)
    # t = -0.5 keeps all 3 answerable rows and answers 1 of 3 unanswerable: J = 1 - 1/3 (the best)
    assert cut == {"threshold": -0.5, "tpr": 1.0, "fpr": pytest.approx(1 / 3)}


def test_abstain_score_is_the_mean_log_prob_of_the_abstention(two_adapters):
    import torch

    pipe = Pipeline.load(None, adapters={"a": two_adapters["a"]})
    ps = [{"text": "The Kestrel-7 battery lasts 14 months."}]
    got = pipe.abstain_scores(["How long does the battery last?"], [ps], adapter="a")
    tok, model = pipe.tok, pipe.model
    prompt = tok.apply_chat_template(build_messages("How long does the battery last?", ps), add_generation_prompt=True,
                                     tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(abstain_answer() + tok.eos_token, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0]
    by_hand = np.mean([torch.log_softmax(logits[len(p_ids) - 1 + i], -1)[t].item() for i, t in enumerate(c_ids)])
    assert got.shape == (1,) and got[0] == pytest.approx(by_hand, abs=1e-4)
    with pipe._active_adapter(None):  # the base model scores differently: the adapter is what is measured
        assert abstain_scores(model, tok, ["How long does the battery last?"], [ps])[0] != pytest.approx(got[0], abs=1e-6)


def test_pipeline_completion_logprobs_are_the_abstain_score_per_token(two_adapters):
    from hybrid.pipeline import Pipeline

    pipe = Pipeline.load(None, adapters={"a": two_adapters["a"]})
    ps = [{"text": "The Kestrel-7 battery lasts 14 months."}]
    msgs = build_messages("How long does the battery last?", ps)
    per_token = pipe.completion_logprobs(msgs, abstain_answer(), adapter="a")
    assert per_token.ndim == 1 and per_token.size > 1 and (per_token <= 0).all()
    assert per_token.mean() == pytest.approx(pipe.abstain_scores(["How long does the battery last?"], [ps], adapter="a")[0])
    # the adapter is applied: the base model gives other log-probabilities
    assert pipe.completion_logprobs(msgs, abstain_answer()).mean() != pytest.approx(per_token.mean(), abs=1e-6)


def _set_threshold(adapter, t):
    path = adapter / CAL_FILE
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "threshold": t}))


def test_calibrate_writes_threshold_that_ask_and_eval_apply(tmp_path, two_adapters, fixed_qa):
    adapter = tmp_path / "a"
    shutil.copytree(two_adapters["a"], adapter)
    res = run("tune", "calibrate", "--adapter", str(adapter), "--qa", str(fixed_qa))
    assert res.exit_code == 0, res.output
    rec = json.loads((adapter / CAL_FILE).read_text())
    assert rec["n"] == 3 and rec["n_unanswerable"] == 1 and 0 <= rec["auroc"] <= 1 and rec["qa_sha256"]

    ps = [{"text": "The Kestrel-7 battery lasts 14 months."}]
    _set_threshold(adapter, -1e9)  # every prompt reaches it: always abstain
    pipe = Pipeline.load(None, adapters={"a": str(adapter)}, max_new_tokens=4)
    a = pipe.answer("How long does the battery last?", ps, adapter="a")
    assert a.abstained and a.calibrated_abstain and a.abstain_score is not None
    raw = Pipeline.load(None, adapters={"a": str(adapter)}, max_new_tokens=4, calibrated=False)
    assert not raw.answer("How long does the battery last?", ps, adapter="a").calibrated_abstain

    rep = run_eval(EvalConfig(qa=str(fixed_qa), adapters={"a": str(adapter)}, closed_book=False, max_new_tokens=4,
                              out=str(tmp_path / "rep")), progress=False)
    assert rep.configs["rag+a+cal"]["abstention_rate"] == 1.0 and rep.abstain_thresholds == {"rag+a": -1e9}
    assert rep.configs["rag+a"]["n"] == rep.configs["rag+a+cal"]["n"] == 3
    _set_threshold(adapter, 1e9)  # recalibrated: nothing reaches it, so every question is answered (the greedy
    rep = run_eval(EvalConfig(qa=str(fixed_qa), adapters={"a": str(adapter)}, closed_book=False, max_new_tokens=4,
                              out=str(tmp_path / "rep")), progress=False)  # abstentions again, from the opening)
    assert rep.configs["rag+a+cal"]["abstention_rate"] == 0.0


def test_calibrate_returns_the_record_it_writes(tmp_path, two_adapters, fixed_qa):
    """calibrate returns a typed Calibration; hybrid_abstain.json is its to_json, keys in today's order."""
    from hybrid.tune_calibrate import CalibrateConfig, calibrate

    adapter = tmp_path / "a"
    shutil.copytree(two_adapters["a"], adapter)
    rec = calibrate(CalibrateConfig(adapter=str(adapter), qa=str(fixed_qa)), log=lambda m: None)
    on_disk = json.loads((adapter / CAL_FILE).read_text())
    assert on_disk == rec.to_json() and list(on_disk) == [
        "threshold", "tpr", "fpr", "auroc", "n", "n_unanswerable", "qa", "qa_sha256", "adapter_run", "score", "minutes"]
    assert rec.n == 3 and rec.n_unanswerable == 1


def test_calibration_of_another_training_run_is_refused(tmp_path, two_adapters, fixed_qa):
    adapter = tmp_path / "a"
    shutil.copytree(two_adapters["a"], adapter)
    (adapter / CAL_FILE).write_text(json.dumps({"threshold": -1.0, "adapter_run": "0" * 64}))
    with pytest.raises(InputError, match="another training run"):
        Pipeline.load(None, adapters={"a": str(adapter)})
    # the fix the error names works: recalibrating replaces the stale file
    assert run("tune", "calibrate", "--adapter", adapter, "--qa", fixed_qa).exit_code == 0
    assert Pipeline.load(None, adapters={"a": str(adapter)}).thresholds["a"] is not None


def test_calibrate_needs_both_kinds_of_rows(tmp_path, two_adapters):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "1", "question": "q?", "answers": ["x"], "passages": [{"id": "p", "text": "x"}]}) + "\n")
    assert_clean_error(run("tune", "calibrate", "--adapter", two_adapters["a"], "--qa", str(qa)), str(qa), "unanswerable")


def test_below_its_threshold_a_calibrated_adapter_answers_even_where_greedy_abstained(two_adapters):
    """The threshold decides both ways: a greedy abstention scored below it is answered again, the
    completion continuing the answer's opening (the chat template's open assistant turn)."""
    from tuning.prompting import ABSTAIN, ANSWER_OPENING

    pipe = Pipeline.load(None, adapters=two_adapters, max_new_tokens=4)
    calls, streamed = [], []

    def generate(msgs, adapter=None, on_token=None, **_):
        calls.append([m[-1] for m in msgs])
        return [("Tarrow. ##end_quote## ##Answer: Tarrow", 5) if m[-1]["role"] == "assistant" else
                (f"##Answer: {ABSTAIN}", 3) for m in msgs]

    pipe.generate = generate
    pipe.abstain_scores = lambda qs, ps, adapter=None: np.full(len(qs), -2.0)
    ps = [{"doc_id": "d", "text": "The office is in Tarrow."}]
    pipe.thresholds = {"a": -1.0}  # score -2 < -1: answer
    res = pipe.answer("Where is the office?", ps, adapter="a", on_token=streamed.append)
    assert not res.abstained and res.calibrated_answer and res.answer == "Tarrow"
    assert res.raw == ANSWER_OPENING["cot"] + "Tarrow. ##end_quote## ##Answer: Tarrow"
    assert res.citations[0]["verified"] and streamed == []  # a calibrated row is never streamed half-decided
    assert calls[0][0]["role"] == "user" and calls[1][0] == {"role": "assistant", "content": ANSWER_OPENING["cot"]}
    assert res.to_dict()["calibrated_answer"] is True
    calls.clear()
    pipe.thresholds = {"a": -3.0}  # score -2 >= -3: abstain, nothing generated
    res = pipe.answer("Where is the office?", ps, adapter="a")
    assert res.abstained and res.calibrated_abstain and not res.calibrated_answer and calls == []
    pipe.thresholds = {}  # uncalibrated: the greedy abstention stands
    res = pipe.answer("Where is the office?", ps, adapter="a")
    assert res.abstained and not res.calibrated_answer and len(calls) == 1


def test_the_chat_template_continues_an_open_assistant_turn(two_adapters):
    from tuning.prompting import chat_text

    pipe = Pipeline.load(None, adapters=two_adapters, max_new_tokens=4)
    msgs = build_messages("Where?", [{"text": "x"}])
    fresh = chat_text(pipe.tok, msgs)
    opened = chat_text(pipe.tok, msgs + [{"role": "assistant", "content": "##Answer:"}])
    assert opened.startswith(fresh) and opened.endswith("##Answer:")


def test_eval_cal_answers_again_only_where_the_threshold_overrules_a_greedy_abstention(tmp_path, two_adapters,
                                                                                     fixed_qa, monkeypatch):
    from tuning.prompting import ABSTAIN

    adapter = tmp_path / "a"
    shutil.copytree(two_adapters["a"], adapter)
    assert run("tune", "calibrate", "--adapter", str(adapter), "--qa", str(fixed_qa)).exit_code == 0
    opened = []
    real = Pipeline.answer_batch

    def scripted(self, questions, passages_batch, adapter=None, opening=False, **kw):
        answers = real(self, questions, passages_batch, adapter=adapter, opening=opening, **kw)
        for q, a in zip(questions, answers):
            if adapter == "a" and not opening:  # the adapter's greedy completions all abstain
                a.answer, a.abstained, a.citations = ABSTAIN, True, []
            if opening:
                opened.append(q)
        return answers

    monkeypatch.setattr(Pipeline, "answer_batch", scripted)
    scores = {"How long does the battery last?": -5.0, "When does the office open?": -1.0, "Who is the CFO?": -0.5}
    monkeypatch.setattr(Pipeline, "abstain_scores", lambda self, qs, ps, adapter=None: np.array([scores[q] for q in qs]))
    cfg = EvalConfig(qa=str(fixed_qa), adapters={"a": str(adapter)}, closed_book=False, max_new_tokens=4,
                     out=str(tmp_path / "rep"))
    (adapter / CAL_FILE).rename(tmp_path / "cal.json")  # first an uncalibrated run: no scores, nothing again
    assert "rag+a+cal" not in run_eval(cfg, progress=False).configs and opened == []
    (tmp_path / "cal.json").rename(adapter / CAL_FILE)
    _set_threshold(adapter, -2.0)  # calibrated afterwards: only the battery question scores below it
    rep = run_eval(cfg, progress=False)  # scores added (the file rewritten), the overruled one answered again
    assert opened == ["How long does the battery last?"]
    preds = [json.loads(l) for l in (tmp_path / "rep" / "predictions.jsonl").read_text().splitlines()]
    again = [p for p in preds if p["config"] == "rag+a+answered"]
    assert [p["id"] for p in again] == ["1"] and not again[0]["abstained"]
    assert rep.configs["rag+a"]["abstention_rate"] == 1.0
    assert rep.configs["rag+a+cal"]["abstention_rate"] == pytest.approx(2 / 3)
    opened.clear()
    assert run_eval(cfg, progress=False).configs["rag+a+cal"] == rep.configs["rag+a+cal"]
    assert opened == []  # resumed: nothing generated again
    _set_threshold(adapter, -0.9)  # recalibrated: the office question is overruled too, and only it is generated
    rep = run_eval(cfg, progress=False)
    assert opened == ["When does the office open?"]
    assert rep.configs["rag+a+cal"]["abstention_rate"] == pytest.approx(1 / 3)
