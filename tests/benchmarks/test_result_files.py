"""Every script's result file carries the harness's header and schema, and `--json` prints the same results;
a script that resumes from its own result file reads an older bare file and a new one alike. Tiny fake
inputs only: no model is loaded."""

import json
from types import SimpleNamespace

import pytest

from benchmarks import harness
from benchmarks.analyses import abstention_bound, downstream_retrieval, paired_readers, regrade
from benchmarks.comparisons import readers
from benchmarks.experiments import documents_only_halueval
from benchmarks.performance import precision


def _header_of(path, module):
    doc = json.loads(path.read_text())
    assert doc["schema"] == harness.SCHEMA
    assert doc["header"]["benchmark"] == module and doc["header"]["command"].startswith(f"python -m {module}")
    return doc


def _last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


def _eval_dir(d, labels, config="rag", retrieved=("d1",)):
    """A `hybrid eval --out` directory: predictions.jsonl with one line per (id, label)."""
    d.mkdir(parents=True)
    rows = [{"id": f"q{i}", "config": config, "answers": ["x"] if label != "abstained" else [], "label": label,
             "abstained": label == "abstained", "gold_ids": ["d1"], "retrieved_doc_ids": list(retrieved),
             "question": "q", "raw": "##Answer: x", "prediction": "x", "f1": 0.0, "citations": [],
             "latency_ms": 1.0, "new_tokens": 1} for i, label in enumerate(labels)]
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_paired_readers_prints_a_table_and_writes_and_prints_the_result(tmp_path, capsys):
    a = _eval_dir(tmp_path / "a", ["correct", "hallucinated", "correct", "hallucinated"])
    b = _eval_dir(tmp_path / "b", ["correct", "correct", "correct", "hallucinated"])
    out = tmp_path / "paired.json"
    assert paired_readers.main([str(a), str(b), "--out", str(out), "--json"]) == 0
    printed = capsys.readouterr().out
    assert "| accuracy_answerable | 0.500 | 0.750 |" in printed
    doc = _header_of(out, "benchmarks.analyses.paired_readers")
    assert doc["results"] == _last_json(printed)
    assert doc["results"]["a"]["accuracy_answerable"] == 0.5 and doc["results"]["config"] == "rag"


def test_regrade_writes_with_out_and_prints_with_json(tmp_path, capsys):
    d = _eval_dir(tmp_path / "e", ["correct", "abstained"])
    out = tmp_path / "regrade.json"
    regrade.main([str(d), "--out", str(out), "--json"])
    doc = _header_of(out, "benchmarks.analyses.regrade")
    assert doc["results"] == _last_json(capsys.readouterr().out) == {str(d): regrade.regrade_dir(d)}


def test_downstream_retrieval_result_file(tmp_path, capsys):
    dense = _eval_dir(tmp_path / "dense", ["correct", "hallucinated"])
    lexical = _eval_dir(tmp_path / "lexical", ["correct", "correct"], retrieved=("d9",))
    out = tmp_path / "down.json"
    assert downstream_retrieval.main(["--out", str(out), "--json", f"dense={dense}", f"lexical={lexical}"]) == 0
    r = harness.read_result(out)
    assert r == _last_json(capsys.readouterr().out)
    assert r["dense"]["gold_in_top4"] == 1.0 and r["lexical"]["gold_in_top4"] == 0.0
    assert "lexical vs dense accuracy" in r


def test_abstention_bound_result_file(tmp_path, capsys):
    lines = []
    for i, (label, score) in enumerate([("correct", 0.1), ("correct", 0.2), ("hallucinated", 0.9), ("abstained", 0.8)]):
        for config in ("rag", "rag+a"):
            lines.append({"id": f"q{i}", "config": config, "answers": ["x"] if i < 3 else [], "label": label,
                          "abstained": label == "abstained", "abstain_score": score})
    preds = tmp_path / "predictions.jsonl"
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "bound.json"
    abstention_bound.main([str(preds), "--config", "rag+a", "--out", str(out), "--json"])
    r = _header_of(out, "benchmarks.analyses.abstention_bound")["results"]
    assert r == _last_json(capsys.readouterr().out)
    assert (r["n"], r["n_answerable"]) == (4, 3) and set(r["signals"]) == {"adapter score"}
    assert r["signals"]["adapter score"]["auroc_right_wrong"] == 1.0  # the wrong answer scored surest to abstain


@pytest.mark.parametrize("old_format", ["bare", "harness"])
def test_readers_adds_to_an_older_or_newer_results_file(tmp_path, monkeypatch, capsys, old_format):
    row = lambda model: {"model": model, "params_m": 1, "load_s": 1.0, "peak_rss_gib": 1.0, "prefill_tok_s": 10.0,  # noqa: E731
                         "decode_tok_s": 2.0, "bundled": {"n": 2, "accuracy_answerable": 0.5,
                                                          "abstention_unanswerable": 1.0, "hallucination_rate": 0.25,
                                                          "ci": {"hallucination_rate": [0.1, 0.4]}}}
    old = {"old@0/2": row("old")}
    if old_format == "bare":
        (tmp_path / "results.json").write_text(json.dumps(old))
    else:
        harness.write_result(tmp_path / "results.json", "benchmarks.comparisons.readers", old)
    children = []

    def child(cmd, **kw):  # the per-model child process: its row, printed last
        children.append(cmd)
        return SimpleNamespace(returncode=0, stdout=json.dumps(row(cmd[cmd.index("--one") + 1])) + "\n", stderr="")

    monkeypatch.setattr(readers, "subprocess", SimpleNamespace(run=child))  # the header's git calls stay real
    assert readers.main(["--out", str(tmp_path), "--models", "new", "--halueval-limit", "0", "--bundled-limit", "0",
                         "--json"]) == 0
    assert children[0][children[0].index("--out") + 1] == str(tmp_path)  # the child works in the same directory
    r = _header_of(tmp_path / "results.json", "benchmarks.comparisons.readers")["results"]
    assert list(r) == ["old@0/2", "new@0/0"] and r == _last_json(capsys.readouterr().out)
    assert "| new | 1M |" in readers.table(r)


def test_documents_only_rewrites_an_older_timings_file_with_the_header(tmp_path, capsys):
    (tmp_path / "timings.json").write_text(json.dumps({"synth_min": 30.0}))  # before the harness's format
    documents_only_halueval.main(["--work", str(tmp_path), "--steps", "none", "--json"])  # --work: the older name
    doc = _header_of(tmp_path / "timings.json", "benchmarks.experiments.documents_only_halueval")
    assert doc["results"] == {"synth_min": 30.0} == _last_json(capsys.readouterr().out)


def test_precision_merges_rows_into_an_older_report(tmp_path, monkeypatch, capsys):
    (tmp_path / "report.json").write_text(json.dumps({"matmul": {"speedup": 2.0}}))
    monkeypatch.setattr(precision, "machine", lambda: {"cpu": "fake"})
    monkeypatch.setitem(precision.RUNNERS, "matmul", lambda w, r, log: {"speedup": 3.0})
    assert precision.main(["--out", str(tmp_path), "--rows", "matmul", "--json"]) == 0
    r = _header_of(tmp_path / "report.json", "benchmarks.performance.precision")["results"]
    assert r == {"matmul": {"speedup": 3.0, "machine": {"cpu": "fake"}}, "machine": {"cpu": "fake"}}
    assert r == _last_json(capsys.readouterr().out)


def test_finish_writes_nothing_without_out_and_prints_only_with_json(tmp_path, capsys):
    args = harness.parser("doc").parse_args([])
    assert harness.finish(args, "benchmarks.x", {"a": 1}) is None and capsys.readouterr().out == ""
    args = harness.parser("doc").parse_args(["--out", str(tmp_path / "r.json"), "--json"])
    assert harness.read_result(harness.finish(args, "benchmarks.x", {"a": 1}, [])) == {"a": 1}
    assert _last_json(capsys.readouterr().out) == {"a": 1}


def test_an_out_alias_keeps_an_older_option_name():
    p = harness.parser("doc", out="d", out_aliases=("--work",))
    assert p.parse_args(["--work", "w"]).out == "w" and p.parse_args([]).out == "d"
