"""Each CLI command end to end through Typer's CliRunner, bad inputs included."""

import json

import pytest
from typer.testing import CliRunner

from hybrid.cli import app
from tests.conftest import write_doc

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, *needles):
    """Exit 2, one line on stderr that names the problem, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture()
def cli_index(small_corpus, tmp_path, tiny_embedder_dir):
    out = tmp_path / "idx"
    res = run("index", small_corpus, "--out", out, "--embedder", tiny_embedder_dir, "--chunk-tokens", 64,
              "--overlap", 8, "-q")
    assert res.exit_code == 0, res.output
    assert "indexed 6 documents (6 embedded, 0 reused" in res.stdout
    return out


def test_index_search_json_and_acl(cli_index):
    res = run("search", "salary band", "--index", cli_index, "-k", 50, "--json")
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)["hits"]
    assert hits and all(set(h) == {"doc_id", "chunk_id", "score", "title", "text"} for h in hits)
    assert not {"salaries", "budget"} & {h["doc_id"] for h in hits}
    res = run("search", "salary band", "--index", cli_index, "-k", 50, "--json", "--group", "hr")
    assert "salaries" in {h["doc_id"] for h in json.loads(res.stdout)["hits"]}
    res = run("search", "salary band", "--index", cli_index, "-k", 2)
    assert res.exit_code == 0 and res.stdout.startswith("1. [")


def test_reindex_is_incremental(cli_index, small_corpus, tiny_embedder_dir):
    write_doc(small_corpus, "office.md", "Office guide", "Opens at 9.")
    res = run("index", small_corpus, "--out", cli_index, "--embedder", tiny_embedder_dir, "--chunk-tokens", 64,
              "--overlap", 8, "-q")
    assert "(1 embedded, 5 reused, 0 dropped" in res.stdout


def test_eval_retrieval_json_and_report_files(cli_index, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "1", "question": "battery of Kestrel", "answers": ["14 months"],
                              "gold_ids": ["buoys/kestrel"]}) + "\n"
                  + json.dumps({"id": "2", "question": "who is the CEO?", "answers": []}) + "\n")
    res = run("eval", qa, "--index", cli_index, "--only", "retrieval", "--json", "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    m = report["configs"]["retrieval"]
    assert m["n"] == 1 and set(m) >= {"recall@1", "recall@5", "recall@10", "mrr@10"}
    assert m["recall@10"] == 1.0  # 6 documents: the gold one is always in the first 10
    assert json.loads((tmp_path / "rep" / "report.json").read_text()) == report
    assert "| retrieval |" in (tmp_path / "rep" / "report.md").read_text()


def test_tune_embedder_prints_before_after_table(cli_index, tmp_path, small_corpus):
    res = run("tune", "embedder", "--index", cli_index, "--out", tmp_path / "emb", "--batch-size", 2,
              "--max-steps", 1, "--test-fraction", 0.34)
    assert res.exit_code == 0, res.output
    assert "| base |" in res.stdout and "| tuned |" in res.stdout
    assert (tmp_path / "emb" / "modules.json").exists()


def test_bad_inputs_exit_2_with_one_line(tmp_path, small_corpus, cli_index, tiny_embedder_dir):
    assert_clean_error(run("index", tmp_path / "missing", "--out", tmp_path / "o"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run("index", tmp_path / "empty", "--out", tmp_path / "o"), "holds no")
    assert_clean_error(run("index", small_corpus, "--out", tmp_path / "o", "--embedder", tmp_path / "nowhere"),
                       "--embedder", "not a local sentence-transformers model")
    assert_clean_error(run("index", small_corpus, "--out", tmp_path / "o", "--chunk-tokens", 16, "--overlap", 20),
                       "--overlap")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"id": "a", "text": "t"}\n{oops\n')
    assert_clean_error(run("index", bad, "--out", tmp_path / "o", "--embedder", tiny_embedder_dir), "x.jsonl:2")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("chunk_tokens: 64\nchunk_size: 3\n")
    assert_clean_error(run("index", small_corpus, "--out", tmp_path / "o", "--config", cfg), "unknown key(s) chunk_size")
    assert_clean_error(run("search", "x", "--index", cli_index, "-k", 0), "-k must be a positive integer")
    assert_clean_error(run("search", "x", "--index", tmp_path / "nope"), "no manifest.json")
    assert_clean_error(run("eval", tmp_path / "none.jsonl", "--index", cli_index), "does not exist")
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"id": "1", "question": "q", "answers": "not a list"}\n')
    assert_clean_error(run("eval", qa, "--index", cli_index), "qa.jsonl:1", "'answers'")
    f = cli_index / "chunks.sqlite"
    f.write_bytes(f.read_bytes()[:-100])
    assert_clean_error(run("search", "x", "--index", cli_index), "checksum mismatch")


def test_help_explains_every_option():
    import typer.main

    group = typer.main.get_command(app)
    commands = [["index"], ["search"], ["tune", "embedder"], ["tune", "generator"], ["tune", "dpo"],
                ["tune", "judge"], ["ask"], ["eval"]]
    for path in commands:
        cmd = group
        for name in path:
            cmd = cmd.commands[name]
        res = run(*path, "--help")
        assert res.exit_code == 0
        for param in cmd.params:
            if param.param_type_name == "option":
                assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"
                assert param.opts[0] in res.stdout, (path, param.opts[0])


def test_cli_start_up_loads_no_ml_stack():
    """`hybrid --help` and every bad-flag error stay instant: torch, transformers and FAISS load on use."""
    import subprocess
    import sys

    code = "import sys, hybrid.cli; print(sorted(m for m in ('torch', 'transformers', 'faiss', 'trl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
