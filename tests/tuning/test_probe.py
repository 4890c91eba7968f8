import json

import numpy as np
import pytest

from core.errors import InputError
from tests.conftest import BUNDLED
from tuning import tune_probe as tp
from tuning.probe import Probe, fit_head, probe_layers
from tuning.tune_probe import ProbeTuneConfig, choose_cut, tune_probe


def toy_states(n=80, h=16, seed=0):
    """States (n, 2 layers, h): layer 1 carries the label along one direction, layer 0 is noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2 == 0
    x = rng.normal(size=(n, 2, h))
    x[:, 1, 3] += np.where(y, 2.5, -2.5)
    return x, y


def test_head_learns_a_separable_signal_and_its_layer():
    x, y = toy_states()
    head = fit_head(x, [4, 8], y, np.arange(len(y)), seed=0)
    assert head.layer == 8 and head.cv_auroc > 0.95
    xt, yt = toy_states(seed=1)
    p = head.probability(xt, [4, 8])
    assert ((p > 0.5) == yt).mean() > 0.9


def test_head_finds_nothing_when_the_features_are_shuffled():
    x, y = toy_states(n=120)
    shuffled = x[np.random.default_rng(5).permutation(len(x))]  # the states no longer belong to their labels
    head = fit_head(shuffled, [4, 8], y, np.arange(len(y)), seed=0)
    assert head.cv_auroc < 0.7


def test_head_refuses_too_few_rows_of_a_label():
    x, y = toy_states(n=20)
    y[:] = True
    y[:2] = False
    with pytest.raises(InputError, match="at least 4 rows of each label"):
        fit_head(x, [4, 8], y, np.arange(len(y)), seed=0)


def test_choose_cut_hand_computed():
    # scores of 6 rows (NaN: the reader abstained); labels as graded
    scores = np.array([0.9, 0.8, 0.6, 0.4, 0.3, np.nan])
    p_answerable = np.array([0.9, 0.7, 0.5, 0.2, 0.6, 0.1])
    labels = ["correct", "correct", "hallucinated", "hallucinated", "correct", "abstained"]
    # target 1/6: serving 0.9, 0.8, 0.6 makes 1 made-up answer of 6 rows; lower cuts make 2
    threshold, before = choose_cut(scores, p_answerable, labels, target=1 / 6)
    assert threshold == 0.6 and before == 0.5
    # target 0: only the two right answers above the first made-up one
    assert choose_cut(scores, p_answerable, labels, target=0.0) == (0.8, 0.7)
    # the cut is chosen on the rows given: other rows' scores never move it
    assert choose_cut(scores[:5], p_answerable[:5], labels[:5], target=1 / 5)[0] == 0.6


def test_probe_layers_read_a_spread_of_depths():
    assert probe_layers(24) == [8, 12, 16, 20, 24]
    assert probe_layers(2) == [1, 2]


@pytest.fixture(scope="module")
def probe_qa(tmp_path_factory):
    """Answerable rows on the bundled corpus (with gold ids) and unanswerable ones."""
    rows = [json.loads(line) for line in (BUNDLED / "qa.jsonl").read_text().splitlines()]
    keep = [r for r in rows if r["answers"] and not r.get("groups")][:24] + [r for r in rows if not r["answers"]][:8]
    path = tmp_path_factory.mktemp("probe") / "qa.jsonl"
    path.write_text("".join(json.dumps({**r, "groups": []}) + "\n" for r in keep))
    return path


def fake_reader(monkeypatch):
    """A reader that answers right where the passages hold the answer and makes one up elsewhere:
    the tiny random model cannot read, and the probe's plumbing is what is tested."""
    def generate(model, tok, messages_batch, max_new_tokens, *a, **k):
        out = []
        for m in messages_batch:
            user = m[-1]["content"]
            answer = next((ans for ans in ANSWERS if ans in user), "42 widgets")
            out.append((f"##Reason: ##begin_quote## {answer} ##end_quote## ##Answer: {answer}", 5))
        return out

    monkeypatch.setattr("tuning.generation.generate_batch", generate)


ANSWERS: list[str] = []


def test_tune_probe_end_to_end(tmp_path, monkeypatch, probe_qa, bundled_tiny_index, tiny_llm_dir):
    ANSWERS[:] = sorted({a for line in probe_qa.read_text().splitlines() for a in json.loads(line)["answers"]},
                        key=len, reverse=True)
    fake_reader(monkeypatch)
    cfg = ProbeTuneConfig(out=str(tmp_path / "probe"), index=str(bundled_tiny_index), qa=str(probe_qa),
                          base_model=str(tiny_llm_dir), held_out_fraction=0.5, batch_size=4, precision="fp32")
    rep = tune_probe(cfg, progress=False)
    # each answerable question twice (with its chunk, withheld), each unanswerable once; public view only
    assert rep.rows > 40 and (rep.rows - 8) % 2 == 0 and 0 < rep.held_out < rep.rows
    probe = Probe.load(tmp_path / "probe")
    assert probe.record["base_model"]["name"] and probe.record["adapter_run"] is None
    assert rep.held_out_hallucination_ruled <= max(rep.held_out_hallucination / 2, 0) + 1e-9
    assert not (tmp_path / "probe.answers.jsonl").exists()  # saved: the answers' cache is gone
    # an interrupted run resumes from its cached answers: nothing is generated again
    cache = tmp_path / "again.answers.jsonl"
    cfg.out = str(tmp_path / "again")
    real = tp.answer_rows

    def interrupted(model, tok, rows, path, *a):
        real(model, tok, rows, path, *a)
        raise KeyboardInterrupt  # after every answer was cached, before the probe is saved

    monkeypatch.setattr(tp, "answer_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune_probe(cfg, progress=False)
    assert cache.stat().st_mode & 0o077 == 0 and not (tmp_path / "again" / "hybrid_probe.json").exists()
    monkeypatch.setattr(tp, "answer_rows", real)
    monkeypatch.setattr("tuning.generation.generate_batch", lambda *a, **k: pytest.fail("generated again"))
    assert tune_probe(cfg, progress=False).rows == rep.rows


def test_probe_for_another_scope_or_reader_is_refused(tmp_path, monkeypatch, probe_qa, bundled_tiny_index,
                                                      tiny_llm_dir):
    ANSWERS[:] = sorted({a for line in probe_qa.read_text().splitlines() for a in json.loads(line)["answers"]},
                        key=len, reverse=True)
    fake_reader(monkeypatch)
    cfg = ProbeTuneConfig(out=str(tmp_path / "probe"), index=str(bundled_tiny_index), qa=str(probe_qa),
                          base_model=str(tiny_llm_dir), held_out_fraction=0.5, batch_size=4, precision="fp32",
                          groups=["hr"])
    tune_probe(cfg, progress=False)
    with pytest.raises(InputError, match="hr"):
        Probe.load(tmp_path / "probe", groups=[])
    probe = Probe.load(tmp_path / "probe", groups=["hr"])

    class Other:
        name, fingerprint = "other", "f" * 64

    with pytest.raises(InputError, match="trained on the states of"):
        probe.check_reader(Other(), None, "--probe")
    with pytest.raises(InputError, match="the base model alone"):
        from tuning.generation import load_generator

        probe.check_reader(load_generator(str(tiny_llm_dir))[2], "adapter-fingerprint", "--probe")


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory, probe_qa, bundled_tiny_index, tiny_llm_dir):
    """A probe of the tiny model's states, trained on the fake reader's answers (public scope)."""
    ANSWERS[:] = sorted({a for line in probe_qa.read_text().splitlines() for a in json.loads(line)["answers"]},
                        key=len, reverse=True)
    out = tmp_path_factory.mktemp("tiny_probe") / "probe"
    with pytest.MonkeyPatch.context() as mp:
        fake_reader(mp)
        tune_probe(ProbeTuneConfig(out=str(out), index=str(bundled_tiny_index), qa=str(probe_qa),
                                   base_model=str(tiny_llm_dir), held_out_fraction=0.5, batch_size=4,
                                   precision="fp32"), progress=False)
    return out


def test_config_problems_name_the_flag():
    cfg = ProbeTuneConfig(out="o", index="i", qa="q", held_out_fraction=0.95, max_hallucination=1.5)
    problems = "; ".join(cfg.problems())
    assert "--held-out-fraction" in problems and "--max-hallucination" in problems
    assert tp.ProbeTuneConfig  # the module the command table names


def test_cli_tune_probe_and_ask_with_it(tmp_path, monkeypatch, probe_qa, bundled_tiny_index, tiny_llm_dir):
    from tests.hybrid.test_cli import assert_clean_error, run

    ANSWERS[:] = sorted({a for line in probe_qa.read_text().splitlines() for a in json.loads(line)["answers"]},
                        key=len, reverse=True)
    fake_reader(monkeypatch)
    res = run("tune", "probe", "--index", bundled_tiny_index, "--qa", probe_qa, "--out", tmp_path / "probe",
              "--base-model", tiny_llm_dir, "--held-out-fraction", 0.5, "--precision", "fp32", "-q")
    assert res.exit_code == 0, res.output
    assert f"probe saved to {tmp_path / 'probe'}" in res.stdout and "held out: made-up answers" in res.stdout
    assert res.stderr.strip() == ""  # -q: the summary only
    monkeypatch.undo()
    rec = json.loads((tmp_path / "probe" / "hybrid_probe.json").read_text())
    rec["rule"]["before"] = 2.0  # nothing reaches it: the probe refuses before generating
    (tmp_path / "probe" / "hybrid_probe.json").write_text(json.dumps(rec))
    res = run("ask", "How long does the Kestrel-7 battery last?", "--index", bundled_tiny_index, "--base-model",
              tiny_llm_dir, "--probe", tmp_path / "probe", "-k", 3, "--max-new-tokens", 8)
    assert res.exit_code == 0, res.output
    assert "abstained: the probe finds the passages do not answer it" in res.stdout
    assert_clean_error(run("tune", "probe", "--index", bundled_tiny_index, "--qa", probe_qa, "--out", tmp_path / "p2",
                           "--held-out-fraction", 0.9), "--held-out-fraction")


def test_head_reads_a_separable_signal_from_the_tiny_models_states(tiny_llm_dir):
    """On the tiny model's own states: passages that hold the asked fact vs passages that do not."""
    from tuning.generation import load_generator
    from tuning.probe import read_states

    model, tok, _ = load_generator(str(tiny_llm_dir), precision="fp32")
    rng = np.random.default_rng(0)
    words = ["battery", "mooring", "anchor", "sensor", "hull", "office", "depot", "coating"]
    questions, passages, labels = [], [], []
    for i in range(48):
        w = words[i % len(words)]
        holds = i % 2 == 0
        text = f"The {w} lasts 14 months." if holds else f"The {rng.choice(words)} was painted in {2000 + i}."
        questions.append(f"How long does the {w} last?")
        passages.append([{"title": "Doc", "text": text}])
        labels.append(holds)
    states = read_states(model, tok, questions, passages, [None] * len(questions))
    y = np.array(labels)
    head = fit_head(states.prompt, states.layers, y, np.arange(len(y)), seed=0)
    assert head.cv_auroc > 0.9
    shuffled = states.prompt[np.random.default_rng(1).permutation(len(y))]
    assert fit_head(shuffled, states.layers, y, np.arange(len(y)), seed=0).cv_auroc < 0.75
