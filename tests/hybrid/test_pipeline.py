from tests.conftest import config
import json

import pytest

from hybrid.pipeline import Pipeline, verify
from core.errors import InputError
from tuning.prompting import ABSTAIN, parse_answer
from tuning.tune_generator import GeneratorTuneConfig, tune_generator
from tests.tuning.test_tune_generator import small_qa


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, bundled_tiny_index, tiny_llm_dir):
    root = tmp_path_factory.mktemp("adapters")
    outs = {}
    for name, lr in (("a", 1e-2), ("b", 3e-2)):
        cfg = config(GeneratorTuneConfig, index=str(bundled_tiny_index), qa=str(small_qa(root)), out=str(root / name),
                                  base_model=str(tiny_llm_dir), max_steps=2, num_distractors=1, learning_rate=lr,
                                  grad_accum=1, val_fraction=0, seed=1 if name == "a" else 2)
        tune_generator(cfg, progress=False, log=lambda *_: None)
        outs[name] = str(root / name)
    return outs


def test_several_adapters_share_one_base_and_switch_per_call(bundled_tiny_index, two_adapters):
    pipe = Pipeline.load(bundled_tiny_index, adapters=two_adapters, max_new_tokens=8)
    base_id = id(pipe.model.get_base_model())
    passages = [{"doc_id": "d", "text": "The Kestrel-7 battery lasts 14 months.", "title": "Spec"}]
    outs = {name: pipe.generate([[{"role": "user", "content": "hi"}]], adapter=name)[0][0]
            for name in (None, "a", "b", "a")}
    assert id(pipe.model.get_base_model()) == base_id  # never reloaded
    import torch

    logits = {}
    enc = pipe.tok("hello world", return_tensors="pt")
    for name in (None, "a", "b"):
        with pipe._active_adapter(name), torch.no_grad():
            logits[name] = pipe.model(**enc).logits
    assert not torch.allclose(logits[None], logits["a"]) and not torch.allclose(logits["a"], logits["b"])
    with pipe._active_adapter("a"), torch.no_grad():
        assert torch.allclose(pipe.model(**enc).logits, logits["a"])  # switching back is exact
    res = pipe.answer("How long does the battery last?", passages, adapter="b")
    assert set(res.to_dict()) == {"answer", "abstained", "citations", "passages", "support", "answerable", "gated",
                                  "abstain_score", "calibrated_abstain", "calibrated_answer", "selected_from",
                                  "malformed", "probe_answerable", "probe_score", "probe_decided"}
    with pytest.raises(InputError, match="adapter='zzz': not loaded"):
        pipe.answer("q", passages, adapter="zzz")


def test_adapter_for_another_base_is_refused(bundled_tiny_index, two_adapters, tmp_path):
    run = json.loads((__import__("pathlib").Path(two_adapters["a"]) / "hybrid_run.json").read_text())
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(two_adapters["a"], bad)
    run["base_model"]["fingerprint"] = "0" * 64
    (bad / "hybrid_run.json").write_text(json.dumps(run))
    with pytest.raises(InputError, match="trained on base model"):
        Pipeline.load(bundled_tiny_index, adapters={"bad": str(bad)})


def test_quotes_are_verified_against_the_given_passages():
    passages = [{"doc_id": "spec", "text": "The Kestrel-7 battery lasts   14 months in cold water."},
                {"doc_id": "other", "text": "Unrelated."}]
    parsed = parse_answer("##Reason: ##begin_quote## the kestrel-7 battery lasts 14 months ##end_quote## "
                          "and ##begin_quote## it lasts forever ##end_quote## ##Answer: 14 months")
    cites = verify(parsed, passages)
    assert cites == [{"doc_id": "spec", "chunk_id": None, "quote": "the kestrel-7 battery lasts 14 months",
                      "verified": True},
                     {"doc_id": None, "chunk_id": None, "quote": "it lasts forever", "verified": False}]
    assert parsed.answer == "14 months" and not parsed.abstained


@pytest.mark.parametrize("text,abstained", [
    (f"##Reason: none. ##Answer: {ABSTAIN}", True),
    ("The documents do not mention the CFO.", True),
    ("##Answer: ", True),
    ("##Answer: Lisbon", False),
    ("Paris is the capital.", False),
    ("##begin_quote## Paris is the capital. ##end_quote##", False),  # a bare quote answers with itself
    ("##Reason: ##begin_quote## It is not mentioned. ##end_quote##", True),
])
def test_parser_recognises_abstentions(text, abstained):
    assert parse_answer(text).abstained is abstained


def test_require_support_abstains_on_unsupported_answers(bundled_tiny_index, two_adapters):
    pipe = Pipeline.load(bundled_tiny_index, adapters=two_adapters, max_new_tokens=4, require_support=True)
    pipe.generate = lambda msgs, adapter=None, on_token=None: [("##Answer: Atlantis", 3)] * len(msgs)
    res = pipe.answer("Where?", [{"doc_id": "d", "text": "The office is in Tarrow."}])
    assert res.abstained and res.answer == ABSTAIN
    pipe.generate = lambda msgs, adapter=None, on_token=None: [("##Answer: Tarrow", 3)] * len(msgs)
    assert not pipe.answer("Where?", [{"doc_id": "d", "text": "The office is in Tarrow."}]).abstained


def test_ask_abstains_without_visible_passages(bundled_tiny_index, two_adapters, monkeypatch):
    pipe = Pipeline.load(bundled_tiny_index, adapters=two_adapters, max_new_tokens=4)
    monkeypatch.setattr(pipe, "retrieve", lambda *a, **k: [[]])
    res = pipe.ask("anything")
    assert res.abstained and res.answer == ABSTAIN and res.passages == []


def test_gate_and_calibration_decide_before_generating_and_stream_only_what_is_served(two_adapters):
    from tuning.judge import Judge

    class Model:  # answerable: the passage names Ann; supported: the answer is in the passage
        def predict(self, pairs, **_):
            return [(0.9 if "Ann" in p else 0.1) if not q.split("Answer: ")[1] else
                    (0.9 if q.split("Answer: ")[1] in p else 0.1) for q, p in pairs]

    pipe = Pipeline.load(None, adapters=two_adapters, max_new_tokens=4)
    pipe.judge = Judge(Model())
    asked, streamed = [], []
    scripted = {"Oslo": "##Answer: Oslo", "Bergen": "##Answer: Bergen", "self": f"##Answer: {ABSTAIN}"}

    def generate(msgs, adapter=None, on_token=None):
        out = []
        for m in msgs:
            text = scripted[next(k for k in scripted if f"{k}?" in m[-1]["content"])]
            asked.append(text)
            if on_token:
                on_token(text)
            out.append((text, 3))
        return out

    pipe.generate = generate
    ctx = [[{"text": "Ann lives in Oslo"}], [{"text": "Bob lives in Rome"}], [{"text": "Ann lives in Oslo"}],
           [{"text": "Ann lives in Oslo"}]]
    qs = ["Oslo?", "Oslo?", "Bergen?", "self?"]
    answers = pipe.answer_batch(qs, ctx, adapter="a", on_token=streamed.append)
    assert [(a.abstained, a.gated, a.support, a.answerable) for a in answers] == [
        (False, False, 0.9, 0.9),   # answerable and supported
        (True, True, None, 0.1),    # the passage does not answer the question: gated, never generated
        (False, False, 0.1, 0.9),   # answerable passage, unsupported answer: kept (the gate asks about passages)
        (True, False, None, 0.9)]   # the model abstained itself
    assert asked == [scripted["Oslo"], scripted["Bergen"], scripted["self"]]  # the gated question was not generated
    assert answers[1].answer == ABSTAIN and answers[1].to_dict()["gated"] is True
    # A calibrated adapter's score needs no answer either: at or above its threshold, nothing is generated.
    pipe.judge, pipe.thresholds = None, {"a": -1e9}
    asked.clear(), streamed.clear()
    res = pipe.answer("Oslo?", ctx[0], adapter="a", on_token=streamed.append)
    assert res.abstained and res.calibrated_abstain and res.abstain_score is not None
    assert asked == [] and streamed == []
    # require_support needs the whole answer: it is decided after generating, so nothing is streamed.
    pipe.thresholds, pipe.require_support = {}, True
    res = pipe.answer("Bergen?", ctx[0], adapter="a", on_token=streamed.append)
    assert res.abstained and asked == [scripted["Bergen"]] and streamed == []


def test_answer_selected_serves_the_best_supported_answer_and_the_best_calibrated_adapter_abstains(
        two_adapters, monkeypatch):
    from tuning.judge import Judge
    from hybrid.pipeline import Answer

    class Model:  # support: the answer is in the passage (0.9), else 0.1; "14" is supported more than "Oslo"
        def predict(self, pairs, **_):
            return [(0.95 if "14" in q else 0.9) if q.split("Answer: ")[1] in p else 0.1 for q, p in pairs]

    pipe = Pipeline.load(None, adapters=two_adapters, max_new_tokens=4)
    with pytest.raises(InputError, match=r"select=\['a', 'b'\]: needs judge="):
        pipe.answer_selected(["q"], [[{"text": "t"}]], ["a", "b"])
    pipe.judge = Judge(Model())
    scripted = {"a": [Answer("Bergen", False), Answer(ABSTAIN, True), Answer("14 months", False), Answer(ABSTAIN, True)],
                "b": [Answer("Oslo", False), Answer("Rome", False), Answer("Oslo", False), Answer(ABSTAIN, True)]}
    monkeypatch.setattr(pipe, "_generated", lambda qs, ps, adapter, on_token, groups: [
        Answer(a.answer, a.abstained) for a in scripted[adapter]])  # fresh copies per call
    ctx = [[{"text": "Ann lives in Oslo, 14 months a year"}]] * 4
    got = pipe.answer_selected(["Where does Ann live?"] * 4, ctx, ["a", "b"])
    assert [(g.answer, g.selected_from) for g in got] == [
        ("Oslo", "b"),          # a's "Bergen" is not in the passage (0.1), b's "Oslo" is (0.9)
        ("Rome", "b"),          # a abstained: b's answer, even unsupported
        ("14 months", "a"),     # both supported: the higher support wins
        (ABSTAIN, "a")]         # both abstained: the abstention
    # b is calibrated with the better AUROC: b's score decides; a's threshold is ignored
    pipe.thresholds, pipe.aurocs = {"a": -100.0, "b": -1.0}, {"a": 0.7, "b": 0.9}
    monkeypatch.setattr(pipe, "abstain_scores", lambda qs, ps, adapter=None: (
        [-2.0, -0.5, -2.0, -2.0] if adapter == "b" else pytest.fail("a decided")))
    got = pipe.answer_selected(["Where does Ann live?"] * 4, ctx, ["a", "b"])
    assert [(g.abstained, g.calibrated_abstain) for g in got] == [(False, False), (True, True), (False, False),
                                                                  (True, False)]
    assert got[1].answer == ABSTAIN and got[0].abstain_score == -2.0


def test_one_question_at_a_time_reuses_the_system_prompts_cache_with_the_same_answers(two_adapters):
    from tuning.generation import PrefixCache

    pipe = Pipeline.load(None, adapters=two_adapters, max_new_tokens=6)
    ps = [{"doc_id": "d", "text": "The office is in Tarrow. It opens at 8 am."}]
    questions = ["Where is the office?", "When does it open?", "Who runs it?"]
    plain = PrefixCache(min_tokens=10 ** 9)  # never long enough: every prompt prefilled in full
    for adapter in ("a", None):
        pipe.prefix_cache = plain
        want = [pipe.answer(q, ps, adapter=adapter).raw for q in questions]
        pipe.prefix_cache = PrefixCache()
        got = [pipe.answer(q, ps, adapter=adapter).raw for q in questions]
        streamed = []
        got.append(pipe.answer(questions[0], ps, adapter=adapter, on_token=streamed.append).raw)
        assert got == want + [want[0]] and "".join(streamed) == want[0]
        assert pipe.prefix_cache.hits >= 2
    pipe.add_adapter("c", two_adapters["b"])  # new weights under a name: nothing cached survives
    assert pipe.prefix_cache.cache is None


def test_a_malformed_completion_is_served_as_the_abstention_and_says_so():
    pipe = Pipeline(None, None, None, None, [])  # no model: the completion is given
    demo = "##Answer: ##begin_quote## The office is in Tarrow. ##end_quote## ##Answer: ##begin"
    pipe.generate = lambda msgs, adapter=None, on_token=None: [(demo, 20)] * len(msgs)
    res = pipe.answer("Where?", [{"doc_id": "d", "text": "The office is in Tarrow."}])
    assert (res.answer, res.abstained, res.citations, res.malformed, res.raw) == (ABSTAIN, True, [], True, demo)
    assert res.to_dict()["malformed"] is True
    pipe.generate = lambda msgs, adapter=None, on_token=None: [("##Answer: Tarrow", 3)] * len(msgs)
    assert not pipe.answer("Where?", [{"doc_id": "d", "text": "The office is in Tarrow."}]).malformed


def test_streamed_generation_stops_where_the_template_repeats(tiny_llm_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tuning.test_generation import scripted
    from tuning.generation import load_tokenizer
    from tuning.prompting import build_messages

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32).eval()
    tok = load_tokenizer(tiny_llm_dir)
    pipe = Pipeline(None, model, tok, None, [], max_new_tokens=60)
    n_script, = scripted(model, tok, ["##Answer: Tarrow ##Answer: Tarrow ##Answer: Tarrow ##Answer: Tarrow"])
    pieces = []
    (text, n), = pipe.generate([build_messages("Where?", [])], on_token=pieces.append)
    assert "".join(pieces) == text and text.startswith("##Answer: Tarrow ##Answer") and n < n_script
