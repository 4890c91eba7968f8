import dataclasses

import pytest

from core.qa import load_qa
from retrieval.retriever import Retriever
from tests.tuning.test_tune_generator import small_qa
from tuning.tune_dpo import contrastive_pairs
from tuning.prompting import ABSTAIN, abstain_answer
from tuning.raft_data import RaftSettings, build_examples, visible_rows


def _examples(tmp_path, index, **kw):
    retriever = Retriever.load(index)
    rows, _ = visible_rows(load_qa(small_qa(tmp_path)), retriever)  # public chunks only
    chunks = {h.chunk_id: h for h in retriever.chunks()}
    return rows, chunks, build_examples(rows, retriever, RaftSettings(num_distractors=2, **kw))


def test_both_writes_each_answerable_question_with_and_without_its_oracle(tmp_path, bundled_tiny_index):
    rows, chunks, examples = _examples(tmp_path, bundled_tiny_index, no_oracle="both", p_oracle=0.0)
    by_id = {}
    for ex in examples:
        by_id.setdefault(ex["id"], []).append(ex)
    for row in rows:
        exs = by_id[row.id]
        gold_in = [any(chunks[c].doc_id in row.gold_ids for c in ex["chunk_ids"]) for ex in exs]
        targets = [ex["completion"][0]["content"] for ex in exs]
        if not row.answers:  # unanswerable: one abstention, no second copy
            assert len(exs) == 1 and targets == [abstain_answer()] and not exs[0]["oracle"]
            continue
        # p_oracle=0 is ignored: one copy holds the oracle and answers, the other neither
        assert [ex["oracle"] for ex in exs] == [True, False] and gold_in == [True, False]
        assert row.answers[0].lower() in targets[0].lower() and ABSTAIN not in targets[0]
        assert targets[1] == abstain_answer()
        assert len(exs[0]["chunk_ids"]) == len(exs[1]["chunk_ids"]) == 3  # the oracle's slot gets a distractor


def test_default_setting_still_samples_one_example_per_question(tmp_path, bundled_tiny_index):
    rows, _, examples = _examples(tmp_path, bundled_tiny_index, p_oracle=0.5)
    assert [ex["id"] for ex in examples] == [r.id for r in rows]


@pytest.mark.parametrize("p", [0.2, 0.8])
def test_oracle_share_over_many_draws_lies_in_the_binomial_interval_of_p_oracle(tmp_path, bundled_tiny_index, p):
    from scipy.stats import binom

    retriever = Retriever.load(bundled_tiny_index)
    rows, _ = visible_rows(load_qa(small_qa(tmp_path)), retriever)
    chunks = {h.chunk_id: h for h in retriever.chunks()}
    by_doc = {}
    for h in chunks.values():
        by_doc.setdefault(h.doc_id, []).append(h.text.lower())
    # answerable questions whose gold chunk quotes the answer (no per-question embedding to pick the oracle),
    # 25 draws each; the unanswerable ones once
    quoted = [r for r in rows if r.answers and any(a.lower() in t for g in r.gold_ids for t in by_doc.get(g, [])
                                                   for a in r.answers)]
    many = [dataclasses.replace(r, id=f"{r.id}-{i}") for i in range(25) for r in quoted]
    many += [r for r in rows if not r.answers]
    examples = build_examples(many, retriever, RaftSettings(num_distractors=2, p_oracle=p, seed=7))
    assert [ex["id"] for ex in examples] == [r.id for r in many]
    drawn = [(ex, r) for ex, r in zip(examples, many) if r.answers]  # unanswerable rows draw nothing
    # the flag tells the truth: a gold chunk is in the prompt exactly when "oracle" says so
    for ex, r in zip(examples, many):
        assert ex["oracle"] == any(chunks[c].doc_id in r.gold_ids for c in ex["chunk_ids"]), ex["id"]
    n, k = len(drawn), sum(ex["oracle"] for ex, _ in drawn)
    lo, hi = binom.interval(0.999, n, p)  # 99.9 %: a correct sampler fails this about once in 1000 seeds
    assert n >= 400 and lo <= k <= hi, (k, n, lo, hi)
    assert not any(ex["oracle"] for ex, r in zip(examples, many) if not r.answers)


def test_contrastive_pairs_flip_the_same_two_answers_on_the_evidence(tmp_path, bundled_tiny_index):
    rows, chunks, examples = _examples(tmp_path, bundled_tiny_index, no_oracle="both")
    pairs = contrastive_pairs(examples, {r.id: r for r in rows}, chunks)
    answerable = [r for r in rows if r.answers]
    assert len(pairs) == 2 * len(answerable)  # unanswerable rows have no answer to reject
    for row in answerable:
        with_oracle, without = [p for p in pairs if p["id"] == row.id]
        assert (with_oracle["source"], without["source"]) == ("answer", "abstain")
        answer = with_oracle["chosen"][0]["content"]
        assert with_oracle["rejected"][0]["content"] == without["chosen"][0]["content"] == abstain_answer()
        assert without["rejected"][0]["content"] == answer
        assert any(a.lower() in answer.lower() for a in row.answers)
        assert with_oracle["prompt"] != without["prompt"]  # only the evidence differs


def test_quote_is_the_shortest_sentence_holding_the_answer_even_in_glued_paragraphs():
    from tuning.raft_data import quote_for

    text = ("Longs Drugs was bought by CVS in 2008.Longs Drugs is an American chain of drug stores "
            "located in Hawaii. It was founded in 1938 by the U.S.A. brothers Longs.")
    assert quote_for("Hawaii", "Where are the stores?", text) == \
        "Longs Drugs is an American chain of drug stores located in Hawaii."
    assert quote_for("rc.N", "Tag form?", "Tags have the form `gw-4.3.0-rc.N` for Gullwing.") == \
        "Tags have the form `gw-4.3.0-rc.N` for Gullwing."  # a version string is not a sentence end
    # no sentence holds the answer: the one sharing most words with question + answer
    assert quote_for("Joe and Tom Long", "Who founded Longs in 1938?", text).startswith("It was founded in 1938")


def test_no_distractor_states_a_gold_answer(tmp_path, bundled_tiny_index):
    """A passage from another document that states the answer is no distractor (it would teach abstaining,
    or quoting the wrong document, with the answer in view): give a question, as an extra gold answer, a
    phrase of one of its distractors, and that chunk leaves its contexts; words inside other words do not count."""
    from tuning.raft_data import states_answer

    retriever = Retriever.load(bundled_tiny_index)
    rows, _ = visible_rows(load_qa(small_qa(tmp_path)), retriever)
    chunks = {h.chunk_id: h for h in retriever.chunks()}
    row = next(r for r in rows if r.answers)
    settings = RaftSettings(num_distractors=2, no_oracle="both")
    first = build_examples([row], retriever, settings)
    taken = next(c for c in first[1]["chunk_ids"] if chunks[c].doc_id not in row.gold_ids)
    phrase = " ".join(chunks[taken].text.split()[3:7])
    again = build_examples([dataclasses.replace(row, answers=(*row.answers, phrase))], retriever, settings)
    assert all(taken not in ex["chunk_ids"] for ex in again)
    assert all(not states_answer(chunks[c].text, (*row.answers, phrase)) for ex in again for c in ex["chunk_ids"]
               if chunks[c].doc_id not in row.gold_ids)
    assert states_answer("bolts to 12 N·m on the Kestrel-9", ["12 N·m"]) and not states_answer("in 2023", ["3"])
