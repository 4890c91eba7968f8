"""The groundedness judge: AUROC, best-passage support, training on pairs, access and gate refusals."""

import json
import random

import pytest

from core import access
from core.errors import InputError
from tests.hybrid.test_cli import assert_clean_error, run
from tuning.judge import Judge, auroc, gate_abstains
from tuning.tune_judge import read_pairs, write_pairs

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida", "Jon", "Kim", "Lea", "Max", "Ned", "Ola", "Pia"]
CITIES = ["Oslo", "Rome", "Lima", "Kyiv", "Bern", "Riga", "Doha", "Baku", "Agra", "Cork"]


def born_pairs(seed: int, n: int) -> list[tuple[str, str, str, int]]:
    """The right city (supported) and another city (unsupported) over the same passage."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        who, city = rng.choice(NAMES), rng.choice(CITIES)
        other = rng.choice([c for c in CITIES if c != city])
        passage = f"{who} was born in {city} and still lives there."
        out += [(passage, f"Where was {who} born?", city, 1), (passage, f"Where was {who} born?", other, 0)]
    return out


def test_auroc_hand_computed():
    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5], [1, 0]) == 0.5
    assert auroc([0.9, 0.4, 0.6], [1, 1, 0]) == 0.5  # one of the two positives outranks the negative


def test_gate_rule_hand_cases():
    assert gate_abstains(0.2) and not gate_abstains(0.5) and not gate_abstains(0.9)
    assert not gate_abstains(None)  # no verdict, no gate
    assert gate_abstains(0.6, threshold=0.7)


def test_support_is_the_best_passage():
    class Model:  # "supports" when the answer occurs in the passage
        def predict(self, pairs, **_):
            return [0.9 if q.split("Answer: ")[1] in p else 0.1 for q, p in pairs]

    judge = Judge(Model())
    ctx = [[{"text": "nothing here"}, {"text": "Oslo is a city"}], [{"text": "nothing"}], []]
    assert judge.support(["q"] * 3, ["Oslo"] * 3, ctx).tolist() == [0.9, 0.1, 0.0]
    assert judge.unsupported(["q"] * 3, ["Oslo"] * 3, ctx) == [False, True, True]


def test_tune_judge_learns_crafted_pairs_and_is_tagged_with_their_groups(tmp_path):
    """Trained on 'is the answer the city in the passage', it ranks held-out pairs the same way."""
    train, test = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    write_pairs(train, born_pairs(0, 47))
    with train.open("a") as fh:  # one pair of text restricted to hr: the judge's weights then hold hr text
        fh.write(json.dumps({"passage": "Pia was born in Riga.", "question": "Where was Pia born?", "answer": "Riga",
                             "label": 1, "groups": ["hr"]}) + "\n")
    write_pairs(test, born_pairs(1, 20))
    assert_clean_error(run("tune", "judge", "--out", tmp_path / "j", "--pairs", train), "group(s) hr", "--group")
    res = run("tune", "judge", "--out", tmp_path / "judge", "--pairs", train, "--test-pairs", test,
              "--learning-rate", 1e-4, "--batch-size", 8, "--epochs", 3, "--max-length", 64, "--group", "hr", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["train_pairs"] == 95 and rep["tests"]["held"]["n"] == 40
    assert rep["tests"]["held"]["auroc"] > 0.9, rep  # an untrained head scores about 0.5
    assert rep["answerability"] is False  # no empty-answer pairs: it never learnt the gate's question
    assert access.scope(tmp_path / "judge") == ["hr"]
    with pytest.raises(InputError, match="lacks hr"):
        Judge.load(tmp_path / "judge")
    judge = Judge.load(tmp_path / "judge", groups=["hr"])
    probs = judge.supported_prob(["Eve was born in Bern."] * 2, ["Where was Eve born?"] * 2, ["Bern", "Cork"])
    assert probs[0] > probs[1]
    with pytest.raises(InputError, match="trained without answerability pairs"):
        Judge.load(tmp_path / "judge", groups=["hr"], gate=True)


def test_bad_pairs_and_judge_records_end_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"passage": "p", "question": "q", "answer": "a", "label": 2}\n')
    assert_clean_error(run("tune", "judge", "--out", tmp_path / "j", "--pairs", bad), "bad.jsonl:1", '"label": 0 or 1')
    one_sided = tmp_path / "ones.jsonl"
    write_pairs(one_sided, [("p", "q", "a", 1)])
    assert_clean_error(run("tune", "judge", "--out", tmp_path / "j", "--pairs", one_sided), "label 0")
    assert read_pairs(one_sided, "--pairs", [])[0] == [("p", "q", "a", 1)]
    jdir = tmp_path / "judge"
    jdir.mkdir()
    (jdir / "hybrid_judge.json").write_text('{"tests": {}')  # truncated
    with pytest.raises(InputError, match="unreadable"):
        Judge.load(jdir)
    (jdir / "hybrid_judge.json").write_text("[]")
    with pytest.raises(InputError, match="answerability"):
        Judge.load(jdir)
    assert not (tmp_path / "j").exists()


def test_judge_pairs_from_a_qa_file_over_the_index_hold_only_what_the_trainer_may_read(tmp_path, small_index):
    from tuning.tune_judge import index_pairs

    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(r) for r in [
        {"id": "k", "question": "How long does the Kestrel buoy battery last?", "answers": ["14 months"],
         "gold_ids": ["buoys/kestrel"]},
        {"id": "o", "question": "How long does the Osprey buoy battery last?", "answers": ["9 months"],
         "gold_ids": ["buoys/osprey"], "source_chunk": "buoys/osprey#0"},
        {"id": "s", "question": "What does band L3 pay?", "answers": ["61000"], "gold_ids": ["salaries"],
         "groups": ["hr"]},
        {"id": "u", "question": "What colour is the Kestrel buoy?", "answers": []}]) + "\n")
    pairs, seen = index_pairs(qa, small_index)
    assert seen == set() and not any("SECRET" in p or "L3" in q for p, q, *_ in pairs)
    kestrel = [(a, l) for p, q, a, l in pairs if q.startswith("How long does the Kestrel") and "Kestrel" in p]
    assert ("14 months", 1) in kestrel and ("", 1) in kestrel and ("9 months", 0) in kestrel
    assert [(a, l) for _, q, a, l in pairs if q == "What colour is the Kestrel buoy?"] == [("", 0)]
    hr_pairs, hr_seen = index_pairs(qa, small_index, ["hr"])
    assert hr_seen == {"hr"} and ("61000", 1) in [(a, l) for p, q, a, l in hr_pairs if "SECRET-HR" in p]


def test_tune_judge_from_qa_and_index_cli(tmp_path, small_index):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "k", "question": "How long does the Kestrel buoy battery last?",
                              "answers": ["14 months"], "gold_ids": ["buoys/kestrel"]}) + "\n" +
                  json.dumps({"id": "o", "question": "Which extension is support on?", "answers": ["4411"],
                              "gold_ids": ["support"]}) + "\n")
    res = run("tune", "judge", "--qa", qa, "--index", small_index, "--out", tmp_path / "j", "--max-steps", 1)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "j" / access.ACCESS_FILE).read_text()) == {"scope": "public"}
    assert_clean_error(run("tune", "judge", "--qa", qa, "--out", tmp_path / "j2"), "--qa needs --index")
    assert_clean_error(run("tune", "judge", "--out", tmp_path / "j3"), "--pairs, or --qa")
