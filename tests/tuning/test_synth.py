"""hybrid synth with a scripted teacher: each filter drops exactly the rows it should."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from core.errors import InputError
from retrieval.index import IndexConfig, build_index
from core.qa import load_qa
from retrieval.retriever import Retriever
from tests.conftest import write_doc
from tuning.prompting import ABSTAIN, SYSTEM, cot_answer
from tuning.raft_data import RaftSettings, build_examples, visible_rows
from tuning.synth import SynthConfig, read_output, sample_chunks, synthesize
from tuning.synth_filters import Deduper, answered_by_index
from tuning.synth_prompts import candidate_spans, parse_pairs, parse_question

DOCS = {  # name: (title, body, groups)
    "kestrel.md": ("Kestrel buoy", "The Kestrel buoy battery lasts 14 months.", None),
    "heron.md": ("Heron buoy", "The Heron buoy battery lasts 11 months.", None),
    "osprey.md": ("Osprey buoy", "The Osprey buoy battery lasts 9 months.", None),
    "support.md": ("Support", "Call support on extension 4411 for buoy faults.", None),
    "office.md": ("Office guide", "The office opens at 8 am sharp.", None),
    "mumble.md": ("Notes", "The Dunlin sensor reads 30 degrees.", None),
    "salaries.md": ("Salary bands", "SECRET-HR salary band L3 pays 61000 per year.", ["hr"]),
}
# span -> the question the scripted teacher writes for it
QUESTIONS = {
    "14 months": "How long does the Kestrel buoy battery last?",
    "11 months": "How long does the Kestrel buoy battery last?",  # the same question again: a duplicate
    "9 months": "Does the Osprey battery last 9 months?",  # gives its answer away
    "4411": "Which extension do you call for buoy faults?",  # the teacher will answer it wrongly
    "8 am": "When does the office open?",  # will not retrieve its document
    "30 degrees": "I am not sure what to ask.",  # no question at all
    "61000": "What does salary band L3 pay?",
}


class Scripted:
    """A teacher whose replies follow fixed rules, recording every prompt it is shown."""

    name = "scripted"

    def __init__(self, wrong: dict[str, str] | None = None, closed_book: dict[str, str] | None = None,
                 pairs: dict[str, str] | None = None, unanswerable: dict[str, str] | None = None):
        self.wrong, self.closed, self.pairs = wrong or {"4411": "4412"}, closed_book or {}, pairs or {}
        self.unanswerable = unanswerable or {}
        self.prompts: list[str] = []

    def chat(self, prompts, max_new_tokens):
        return [self.reply(p) for p in prompts]

    def reply(self, messages) -> str:
        system, user = messages[0]["content"], messages[-1]["content"]
        self.prompts.append(user)
        if system == SYSTEM:  # hybrid's answer template: consistency, closed book, unanswerable check
            question = user.rsplit("Question: ", 1)[1]
            if "(no documents)" in user:
                return f"##Answer: {self.closed.get(question, ABSTAIN)}"
            for span, q in QUESTIONS.items():
                sentence = next((s for s in re.split(r"(?<=\.)\s", user) if span in s), None)
                if q == question and sentence:
                    return cot_answer(sentence.split("\n")[-1], self.wrong.get(span, span))
            return f"##Answer: {ABSTAIN}"
        if m := re.search(r'whose answer is exactly "(.+?)"', user):
            return QUESTIONS.get(m.group(1), "no idea")
        if "does NOT answer" in user:
            return next((q for word, q in self.unanswerable.items() if word in user), "no idea")
        if "Reply with lines" in user:
            return next((r for word, r in self.pairs.items() if word in user), "nothing")
        raise AssertionError(f"unexpected prompt {user[:80]}")


@pytest.fixture()
def index(tmp_path, tiny_embedder):
    for name, (title, body, groups) in DOCS.items():
        write_doc(tmp_path / "corpus", name, title, body, groups)
    out = tmp_path / "index"
    build_index(tmp_path / "corpus", out, IndexConfig(chunk_tokens=64, overlap=0), embedder=tiny_embedder)
    return out


@pytest.fixture()
def round_trip_fails_for_office(monkeypatch):
    """The tiny random embedder retrieves at random: the search is scripted instead (every question
    finds its document, except the office question, which finds only the support document)."""
    real = Retriever.search_batch

    def search_batch(self, queries, k=5, groups=None, batch_size=64, mode=None):
        chunks = self.chunks(groups=groups)
        out = []
        for q in queries:
            words = set(re.findall(r"\w+", q.lower()))
            hits = sorted(chunks, key=lambda h: -len(words & set(re.findall(r"\w+", h.text.lower()))))
            out.append([h for h in hits if h.doc_id != "office"][:k])
        return out

    monkeypatch.setattr(Retriever, "search_batch", search_batch)
    # and near-duplicates are judged on word counts (a random embedder finds every pair of texts alike)
    init = Deduper.__init__
    monkeypatch.setattr(Deduper, "__init__", lambda self, encode, cosine, kept: init(self, bag_of_words, cosine, kept))
    yield
    monkeypatch.setattr(Retriever, "search_batch", real)


def bag_of_words(texts):
    vocab = sorted({w for t in QUESTIONS.values() for w in re.findall(r"\w+", t.lower())} | {"colour"})
    return np.array([[re.findall(r"\w+", t.lower()).count(w) for w in vocab] for t in texts], dtype=np.float32)


def _cfg(index, out, **kw):
    return SynthConfig(index=str(index), out=str(out), **{"unanswerable": 0.0, "batch_size": 3, **kw})


def test_candidate_spans_and_reply_parsers():
    assert [s for s, _ in candidate_spans("Scope 4:1 at exposed sites; 1. Confirm the 500 kg anchor by 2025.")] == \
        ["4:1", "500 kg", "2025"]
    # a date is one answer, not a day number; a number after a name is not a quantity with a unit
    assert [s for s, _ in candidate_spans("Rufai (born 24 August 1963) joined the Channel 4 science desk on "
                                          "March 30, 1983 and left in May 1990. Allow 24 hours.")] == \
        ["24 hours", "24 August 1963", "March 30, 1983", "May 1990"]
    # a span ends where its fact does: never inside a token, a qualifier with its noun (a reader taught
    # "5 working" answers "5 working" and is graded wrong against "5 working days")
    assert [s for s, _ in candidate_spans(
        "Requests take 5 working days. Torque the bolts to 15 N·m before use. The office is at 14 Chandlers Row, "
        "Harrowgate. Start a 30-day trial. After 3 consecutive missed transmissions, alert. Allow 24 hours. "
        "Open 08:00–17:00 daily. The fee is €450; below −120 dBm it drops.")] == \
        ["5 working days", "15 N·m", "14 Chandlers Row", "30-day", "3 consecutive missed transmissions", "24 hours",
         "08:00–17:00", "€450", "−120 dBm"]
    assert parse_question('1. Question: "How long does it last?"\nextra') == "How long does it last?"
    assert parse_question("It lasts long.") == ""
    assert parse_pairs("Question: What pays 61000?\nAnswer: band L3.\nQuestion: Bad\nAnswer: x") == \
        [("What pays 61000?", "band L3")]


def test_each_filter_drops_exactly_the_rows_it_should(index, tmp_path, round_trip_fails_for_office):
    out = tmp_path / "qa.jsonl"
    rep = synthesize(_cfg(index, out), teacher=Scripted(), progress=False, log=lambda m: None)
    c = rep.counts
    assert c["chunks"] == 6  # the public documents only
    assert c["offered"] == 6 and c["dropped"] == {"unparsed": 1, "not_a_span": 0, "answer_in_question": 1,
                                                  "round_trip": 1, "inconsistent": 1, "closed_book": 0,
                                                  "duplicate": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == c["kept"] == 1
    dropped = [json.loads(line) for line in (tmp_path / "synth_dropped.jsonl").read_text().splitlines()]
    assert sorted((d["filter"], d["answer"]) for d in dropped) == sorted([
        ("unparsed", "30 degrees"), ("answer_in_question", "9 months"), ("round_trip", "8 am"),
        ("inconsistent", "4411"), ("duplicate", "14 months" if rows[0]["answers"] == ["11 months"] else "11 months")])
    assert "4412" in next(d["teacher_reply"] for d in dropped if d["filter"] == "inconsistent")
    (row,) = rows
    assert row["question"] == "How long does the Kestrel buoy battery last?"
    assert row["answers"] in (["14 months"], ["11 months"]) and row["gold_ids"] in (["kestrel"], ["heron"])
    assert row["groups"] == [] and row["synth"] == {"teacher": "scripted", "method": "answer-first",
                                                    "kind": "answerable"}
    assert "##begin_quote##" in row["reason"] and row["answers"][0] in row["reason"]
    assert rep.round_trip_rate == pytest.approx(3 / 4)  # office failed among the four tested
    # the file is a QA file every command reads as it is
    (qa,) = load_qa(out)
    assert qa.answers == tuple(row["answers"]) and qa.reason == row["reason"] and qa.groups == ()


def test_the_returned_report_is_synth_report_json(index, tmp_path):
    """synthesize returns a typed SynthReport; the file beside the output holds its fields, keys in today's order."""
    rep = synthesize(_cfg(index, tmp_path / "qa.jsonl"), teacher=Scripted(), progress=False, log=lambda m: None)
    on_disk = json.loads((tmp_path / "synth_report.json").read_text())
    assert on_disk == rep.to_json() and list(on_disk) == [
        "out", "index", "teacher", "settings", "counts", "round_trip_rate", "seconds_per_kept_row", "planned_chunks",
        "stopped", "access", "chunks_done", "precision"]


def test_question_first_drops_answers_that_are_not_spans(index, tmp_path, round_trip_fails_for_office):
    teacher = Scripted(pairs={"Kestrel": "Question: How long does the Kestrel buoy battery last?\nAnswer: 14 months",
                              "Osprey": "Question: Who makes the Osprey buoy?\nAnswer: Brindle Marine"})
    rep = synthesize(_cfg(index, tmp_path / "qa.jsonl", method="question-first"), teacher=teacher, progress=False,
                     log=lambda m: None)
    d = rep.counts["dropped"]
    assert d["not_a_span"] == 1 and d["unparsed"] == 4 and rep.counts["kept"] == 1


def test_closed_book_drops_questions_the_teacher_answers_without_the_passage(index, tmp_path,
                                                                           round_trip_fails_for_office):
    teacher = Scripted(closed_book={"How long does the Kestrel buoy battery last?": "It lasts 14 months."})
    rep = synthesize(_cfg(index, tmp_path / "qa.jsonl", closed_book=True, max_chunks=6), teacher=teacher,
                     progress=False, log=lambda m: None)
    # Kestrel's question is answered closed book; Heron's identical question is not ("14 months" is not its
    # answer), so it is kept and the duplicate filter has nothing left to drop
    assert rep.counts["dropped"]["closed_book"] == 1 and rep.counts["dropped"]["duplicate"] == 0
    rows = load_qa(tmp_path / "qa.jsonl")
    assert [r.answers for r in rows] == [("11 months",)]


def test_unanswerable_rows_are_kept_only_when_no_retrieved_chunk_answers_them(index, tmp_path,
                                                                             round_trip_fails_for_office):
    teacher = Scripted(unanswerable={"Kestrel": "What colour is the Kestrel buoy?",
                                     "Osprey": "How long does the Kestrel buoy battery last?"})  # the index answers it
    rep = synthesize(_cfg(index, tmp_path / "qa.jsonl", unanswerable=1.0), teacher=teacher, progress=False,
                     log=lambda m: None)
    c = rep.counts
    assert c["unanswerable_offered"] == 6
    assert c["unanswerable_dropped"] == {"unparsed": 4, "answered_by_index": 1, "duplicate": 0}
    rows = [r for r in load_qa(tmp_path / "qa.jsonl") if not r.answers]
    assert [r.question for r in rows] == ["What colour is the Kestrel buoy?"] and rows[0].gold_ids == ()


def test_restricted_text_never_reaches_a_default_synth_file(index, tmp_path, round_trip_fails_for_office):
    public = tmp_path / "public" / "qa.jsonl"
    public.parent.mkdir()
    synthesize(_cfg(index, public), teacher=(t := Scripted()), progress=False, log=lambda m: None)
    assert "SECRET-HR" not in public.read_text() and not any("SECRET-HR" in p for p in t.prompts)
    hr = tmp_path / "hr" / "qa.jsonl"
    hr.parent.mkdir()
    rep = synthesize(_cfg(index, hr, groups=["hr"], unanswerable=1.0), progress=False, log=lambda m: None,
                     teacher=Scripted(unanswerable={"SECRET-HR": "What does SECRET-HR band L9 pay?"}))
    rows = load_qa(hr)
    salary = [r for r in rows if r.gold_ids == ("salaries",)]
    unanswerable = [r for r in rows if not r.answers]
    assert salary and salary[0].groups == ("hr",) and rep.access == {"scope": ["hr"], "groups_seen": ["hr"]}
    assert [r.groups for r in unanswerable] == [("hr",)] and "SECRET-HR" in unanswerable[0].question
    # a public trainer skips both rows written from hr text (the unanswerable one has no gold document to
    # give it away); an hr trainer keeps them
    retriever = Retriever.load(index)
    public_rows = visible_rows(rows, retriever)[0]
    assert public_rows and not any("SECRET-HR" in r.question or r.groups for r in public_rows)
    assert set(salary + unanswerable) <= set(visible_rows(rows, retriever, ["hr"])[0])


def test_resume_continues_without_duplicates_and_refuses_other_files(index, tmp_path, round_trip_fails_for_office):
    out = tmp_path / "qa.jsonl"
    cfg = _cfg(index, out, unanswerable=0.5, batch_size=1)
    first = synthesize(_cfg(index, out, unanswerable=0.5, batch_size=1, max_chunks=3), teacher=Scripted(),
                       progress=False, log=lambda m: None)
    assert first.counts["chunks"] == 3
    with open(out, "a") as fh:  # an append torn by a crash
        fh.write('{"id": "synth:torn", "question": "Half')
    again = Scripted()
    rep = synthesize(cfg, teacher=again, progress=False, log=lambda m: None)
    assert rep.counts["chunks"] == 6 and len(rep.chunks_done) == 6
    titles_done = {DOCS[c.split("#")[0] + ".md"][0] for c in first.chunks_done}
    assert len(titles_done) == 3 and not any(p.startswith(f"Document: {t}\n") for t in titles_done for p in again.prompts)
    rows = read_output(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) and "synth:torn" not in ids
    # the whole-run counts equal those of one uninterrupted run
    whole = tmp_path / "whole" / "qa.jsonl"
    whole.parent.mkdir()
    one = synthesize(_cfg(index, whole, unanswerable=0.5, batch_size=1), teacher=Scripted(), progress=False,
                     log=lambda m: None)
    assert [r["id"] for r in read_output(whole)] == ids and one.counts["dropped"] == rep.counts["dropped"]
    with pytest.raises(InputError, match="--method: .* was written with method='answer-first'"):
        synthesize(_cfg(index, out, unanswerable=0.5, method="question-first"), teacher=Scripted(), progress=False)
    other = tmp_path / "plain" / "qa.jsonl"
    other.parent.mkdir()
    other.write_text('{"id": "q1", "question": "Why?", "answers": []}\n')
    with pytest.raises(InputError, match="not a row written by hybrid synth"):
        synthesize(_cfg(index, other), teacher=Scripted(), progress=False)


def test_bad_input_is_refused_before_the_teacher_loads(index, tmp_path):
    with pytest.raises(InputError, match="--per-chunk must be >= 1"):
        synthesize(_cfg(index, tmp_path / "qa.jsonl", per_chunk=0), progress=False)
    with pytest.raises(InputError, match="--max-chunks must be >= 1"):
        synthesize(_cfg(index, tmp_path / "qa.jsonl", max_chunks=0), progress=False)
    with pytest.raises(InputError, match="directory .* does not exist"):
        synthesize(_cfg(index, tmp_path / "missing" / "qa.jsonl"), progress=False)


def test_no_visible_chunk_is_refused(tmp_path, tiny_embedder):
    write_doc(tmp_path / "corpus", "secret.md", "Secret", "SECRET-HR pay is 61000 per year.", ["hr"])
    build_index(tmp_path / "corpus", tmp_path / "index", IndexConfig(chunk_tokens=64, overlap=0),
                embedder=tiny_embedder)
    with pytest.raises(InputError, match="no chunk is visible to public callers; pass groups="):
        synthesize(_cfg(tmp_path / "index", tmp_path / "qa.jsonl"), teacher=Scripted(), progress=False)


def test_sample_is_stratified_by_document(index):
    chunks = Retriever.load(index).chunks(include_restricted=True)
    many = chunks + [c.__class__(**{**c.__dict__, "chunk_id": c.chunk_id + "b"}) for c in chunks]
    first = sample_chunks(many, len(chunks), seed=3)
    assert sorted(c.doc_id for c in first) == sorted(c.doc_id for c in chunks)  # one per document first
    assert sample_chunks(many, 5, seed=3) == first[:5]


def test_raft_targets_use_the_teachers_reason_when_it_quotes_the_oracle(index, tmp_path, round_trip_fails_for_office):
    out = tmp_path / "qa.jsonl"
    synthesize(_cfg(index, out), teacher=Scripted(), progress=False, log=lambda m: None)
    retriever = Retriever.load(index)
    (row,) = load_qa(out)
    (ex,) = build_examples([row], retriever, RaftSettings(num_distractors=1, p_oracle=1.0))
    assert ex["completion"][0]["content"] == f"{row.reason} ##Answer: {row.answers[0]}"
    forged = row.__class__(**{**row.__dict__, "reason": "##Reason: ##begin_quote## not in the text ##end_quote##"})
    (ex,) = build_examples([forged], retriever, RaftSettings(num_distractors=1, p_oracle=1.0))
    assert "not in the text" not in ex["completion"][0]["content"]  # falls back to the extracted sentence


def test_consistency_accepts_the_same_fact_spelled_differently_and_nothing_else():
    from tuning.synth_filters import same_answer

    assert same_answer("The water is 18°C.", "18 °C") and same_answer("It retries 12 times.", "12 times")
    assert same_answer("The limit is 12.", "12 times")  # the number without its unit word
    assert not same_answer("The limit is 120.", "12 times") and not same_answer("8 weeks", "12 months")
    assert not same_answer("14 days", "14 months")  # same number, another unit: a different answer


def test_max_minutes_stops_before_a_batch_that_would_overrun(index, tmp_path, round_trip_fails_for_office,
                                                             monkeypatch):
    import tuning.synth as synth_mod

    class Clock:  # every teacher call takes a minute of this clock
        now = 0.0

        def perf_counter(self):
            return self.now

    clock, ends = Clock(), []

    class Slow(Scripted):
        def chat(self, prompts, max_new_tokens):
            clock.now += 60.0
            return super().chat(prompts, max_new_tokens)

    append = synth_mod.append_rows

    def timed_append(path, rows):  # called once a batch for the output file: when each batch ended
        if path.name.endswith("qa.jsonl"):
            ends.append(clock.now)
        return append(path, rows)

    monkeypatch.setattr(synth_mod, "time", clock)
    monkeypatch.setattr(synth_mod, "append_rows", timed_append)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    whole = synthesize(_cfg(index, tmp_path / "a" / "qa.jsonl", batch_size=3, max_chunks=6), teacher=Slow(),
                       progress=False, log=lambda m: None)
    assert whole.stopped is None and len(ends) == 2 and ends[0] > 0
    # the first batch ends at ends[0]; a limit of 1.5 x that leaves room to start the second, not to
    # finish it (a batch as slow as the first): it is not started
    clock.now = 0.0
    rep = synthesize(_cfg(index, tmp_path / "b" / "qa.jsonl", batch_size=3, max_chunks=6,
                          max_minutes=1.5 * ends[0] / 60), teacher=Slow(), progress=False, log=lambda m: None)
    assert rep.stopped == "max_minutes" and rep.counts["chunks"] == 3 and clock.now == ends[0]


def test_a_malformed_reply_does_not_vouch_for_an_unanswerable_question():
    # parsed as an abstention, the repeated template would have kept the question as unanswerable
    assert answered_by_index("##Answer: ##begin_quote## ##end_quote## ##Answer: ##begin", [])
    assert not answered_by_index(f"##Answer: {ABSTAIN}", [])
