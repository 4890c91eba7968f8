"""benchmarks/analyses/regrade.py reads stored completions again with today's parser, hand-checked lines."""
import json

from benchmarks.analyses.regrade import regrade_dir


def line(i, config, raw, label, answers):
    return {"id": str(i), "config": config, "question": "q", "answers": answers, "gold_ids": [], "raw": raw,
            "prediction": "I cannot answer this from the provided documents.", "abstained": label == "abstained",
            "label": label, "f1": 0.0, "citations": [], "latency_ms": 1.0, "new_tokens": 1}


def test_a_bare_quote_is_read_as_the_answer_and_derived_lines_are_left_out(tmp_path):
    lines = [line(0, "rag", "##begin_quote##Fascination Records##end_quote##", "abstained", ["Fascination Records"]),
             line(1, "rag", "##begin_quote##Rihanna##end_quote##", "abstained", []),
             line(2, "rag", "##Reason: x ##Answer: 14 months", "correct", ["14 months"]),
             line(0, "rag+raft+answered", "##Answer: Paris", "hallucinated", ["Fascination Records"])]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))
    r = regrade_dir(tmp_path)
    assert list(r) == ["rag"]
    rag = r["rag"]
    assert rag["changed"] == 2 and {(c["id"], c["reread"]) for c in rag["changes"]} == {("0", "correct"),
                                                                                         ("1", "hallucinated")}
    assert rag["stored"]["accuracy_answerable"] == 0.5 and rag["reread"]["accuracy_answerable"] == 1.0
    assert rag["stored"]["hallucination_rate"] == 0.0 and rag["reread"]["hallucination_rate"] == 1 / 3


def test_a_qa_file_with_aliases_grades_the_stored_answers_again(tmp_path):
    """`--qa`: the same completions graded against a QA file's answers (an alias added by the grader audit's
    rule); a QA file that turns a question unanswerable is another test set and is refused."""
    import pytest

    from benchmarks.analyses.regrade import qa_answers
    from core.errors import InputError

    lines = [line(0, "rag", "##Reason: x ##Answer: up to 12 retries", "hallucinated", ["12 times"]),
             line(1, "rag", "##Reason: x ##Answer: 14 months", "correct", ["14 months"])]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "0", "question": "How many retries?", "answers": ["12 times", "12 retries"]}) + "\n"
                  + json.dumps({"id": "1", "question": "How long?", "answers": ["14 months"]}) + "\n")
    assert regrade_dir(tmp_path)["rag"]["changed"] == 0  # the stored golds: no alias
    rag = regrade_dir(tmp_path, golds=qa_answers(qa))["rag"]
    assert [(c["id"], c["stored"], c["reread"]) for c in rag["changes"]] == [("0", "hallucinated", "correct")]
    qa.write_text(json.dumps({"id": "0", "question": "How many retries?", "answers": []}) + "\n")
    with pytest.raises(InputError, match="answerable"):
        regrade_dir(tmp_path, golds=qa_answers(qa))


def test_a_missing_qa_file_is_one_line_and_exit_2(tmp_path, capsys):
    import pytest

    from benchmarks.analyses.regrade import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--qa", str(tmp_path / "nope.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "nope.jsonl" in err[0]
