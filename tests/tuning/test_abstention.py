import json
import shutil

import numpy as np
import pytest

from hybrid.factuality import EvalConfig, run_eval
from hybrid.pipeline import Pipeline
from retrieval.errors import InputError
from tests.hybrid.test_cli import assert_clean_error, run
from tests.hybrid.test_factuality import fixed_qa  # noqa: F401  (fixture reused)
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
    assert rep["configs"]["rag+a+cal"]["abstention_rate"] == 1.0 and rep["abstain_thresholds"] == {"rag+a": -1e9}
    assert rep["configs"]["rag+a"]["n"] == rep["configs"]["rag+a+cal"]["n"] == 3
    _set_threshold(adapter, 1e9)  # recalibrated: the same answers, re-derived without generating again
    rep = run_eval(EvalConfig(qa=str(fixed_qa), adapters={"a": str(adapter)}, closed_book=False, max_new_tokens=4,
                              out=str(tmp_path / "rep")), progress=False)
    assert rep["configs"]["rag+a+cal"]["abstention_rate"] == rep["configs"]["rag+a"]["abstention_rate"]


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
