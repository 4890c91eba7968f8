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
