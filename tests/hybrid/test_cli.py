"""Each CLI command end to end through Typer's CliRunner, bad inputs included."""

import json

import pytest
from typer.testing import CliRunner

from hybrid.tune_calibrate import CalibrateConfig
from hybrid.cli import app
from hybrid.eval import EvalConfig
from hybrid.ask import AskConfig
from retrieval.tune_embedder import EmbedderTuneConfig
from retrieval.index import IndexConfig
from retrieval.tune_reranker import RerankerTuneConfig
from tests.conftest import write_doc
from tuning.tune_dpo import DPOTuneConfig
from tuning.tune_judge import JudgeTuneConfig
from tuning.tune_generator import GeneratorTuneConfig

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


def test_eval_retrieval_returns_the_report_it_writes(cli_index, tmp_path):
    """evaluate_retrieval returns a typed RetrievalReport; report.json is its to_json, keys in today's order."""
    from hybrid.eval_retrieval import evaluate_retrieval, write_report

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "1", "question": "battery of Kestrel", "answers": ["14 months"],
                              "gold_ids": ["buoys/kestrel"]}) + "\n")
    rep = evaluate_retrieval(qa, cli_index)
    write_report(rep, tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == rep.to_json() and on_disk["configs"] == {"retrieval": rep.metrics}
    assert list(on_disk) == ["configs", "dataset", "index", "mode", "rerank", "embedder", "groups", "precision"]


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
    assert_clean_error(run("index", bad, "--out", tmp_path / "o", "--embedder", tiny_embedder_dir, "--on-bad-file", "fail"),
                       "x.jsonl:2")
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
    commands = [["index"], ["search"], ["synth"], ["tune", "embedder"], ["tune", "reranker"], ["tune", "generator"],
                ["tune", "dpo"], ["tune", "judge"], ["tune", "calibrate"], ["ask"], ["eval"], ["serve"]]
    loop_commands = [["init"], ["run"], ["config", "show"]]  # these take a loop file, not --config
    for path in commands + loop_commands:
        cmd = group
        for name in path:
            cmd = cmd.commands[name]
        res = run(*path, "--help")
        assert res.exit_code == 0 and ("--config" in res.stdout or path in loop_commands), path  # all read YAML
        for param in cmd.params:
            if param.param_type_name == "option":
                assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"
                assert param.opts[0] in res.stdout, (path, param.opts[0])


def test_model_flags_name_every_packaged_model():
    import typer.main

    from tuning.generation import PACKAGED

    group = typer.main.get_command(app)
    for path, flag, names in [(["ask"], "--base-model", PACKAGED), (["eval"], "--base-model", PACKAGED),
                              (["serve"], "--base-model", PACKAGED), (["tune", "generator"], "--base-model", PACKAGED),
                              (["index"], "--embedder", ["minilm", "mpnet"])]:
        cmd = group
        for name in path:
            cmd = cmd.commands[name]
        param = next(p for p in cmd.params if flag in p.opts)
        assert all(n in param.help for n in names), (path, flag, param.help)


def test_cli_start_up_loads_no_ml_stack():
    """`hybrid --help` and every bad-flag error stay instant: torch, transformers and FAISS load on use."""
    import subprocess
    import sys

    code = "import sys, hybrid.cli; print(sorted(m for m in ('torch', 'transformers', 'faiss', 'trl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_yaml_config_is_applied_and_flags_win(tmp_path, small_corpus, tiny_embedder_dir):
    from hybrid.config import build_config
    from tuning.tune_generator import GeneratorTuneConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("chunk_tokens: 48\noverlap: 4\n")
    res = run("index", small_corpus, "--out", tmp_path / "i", "--embedder", tiny_embedder_dir, "--config", cfg_file,
              "--overlap", 6, "-q")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert (manifest["config"]["chunk_tokens"], manifest["config"]["overlap"]) == (48, 6)  # YAML, then the flag
    gen = tmp_path / "g.yaml"
    gen.write_text("lora_r: 4\ntrain:\n  learning_rate: 0.001\n  max_steps: 7\n")
    cfg = build_config(GeneratorTuneConfig, gen, {"out": "o", "examples": "e.jsonl", "train": {"max_steps": 9}})
    assert (cfg.lora_r, cfg.train.learning_rate, cfg.train.max_steps) == (4, 0.001, 9)
    assert cfg.train.grad_accum == 4  # the workflow's own default for a key YAML left out


def test_wrong_yaml_types_are_named_before_any_work(tmp_path, small_corpus):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_r: 8.5\nqa: [a, b]\ntrain:\n  learning_rate: fast\n  batch: 2\n")
    res = run("tune", "generator", "--out", tmp_path / "o", "--index", tmp_path, "--config", cfg)
    assert_clean_error(res, "lora_r: expected an integer, got 8.5", "qa: expected a string",
                       "train.learning_rate: expected a number", "unknown key(s) train.batch")
    cfg.write_text("- just\n- a list\n")
    assert_clean_error(run("index", small_corpus, "--out", tmp_path / "o", "--config", cfg), "must be a YAML mapping")
    assert not (tmp_path / "o").exists()


def test_usage_errors_are_one_line(tmp_path, cli_index):
    assert_clean_error(run("search", "x", "--index", cli_index, "-k", "many"), "Invalid value for '-k'")
    assert_clean_error(run("search", "x", "--index", cli_index, "--no-such-flag"), "No such option: --no-such-flag")
    assert_clean_error(run("index", "--out", tmp_path / "o"), "CORPUS_DIR")
    assert_clean_error(run("eval", "q.jsonl", "--only", "everything"), "--only", "'everything' is not one of")


def test_empty_query_question_and_gold_less_retrieval_eval_are_refused(tmp_path, cli_index):
    assert_clean_error(run("search", "  ", "--index", cli_index), "QUERY is empty")
    assert_clean_error(run("ask", " ", "--index", cli_index), "QUESTION is empty")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "1", "question": "q", "answers": ["a"]}) + "\n")
    assert_clean_error(run("eval", qa, "--index", cli_index, "--only", "retrieval"), "no row has 'gold_ids'")
    qa.write_text(json.dumps({"id": "1", "question": "q", "answers": ["a"], "gold_ids": ["elsewhere/doc"]}) + "\n")
    assert_clean_error(run("eval", qa, "--index", cli_index, "--only", "retrieval"), "none of its gold_ids",
                       "elsewhere/doc")
    # a restricted gold document reads exactly like an absent one to a caller outside its group
    qa.write_text(json.dumps({"id": "1", "question": "q", "answers": ["a"], "gold_ids": ["salaries"]}) + "\n")
    assert_clean_error(run("eval", qa, "--index", cli_index, "--only", "retrieval"), "none of its gold_ids")
    assert run("eval", qa, "--index", cli_index, "--only", "retrieval", "--group", "hr").exit_code == 0


def test_eval_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "1", "question": "q", "answers": ["a"], "passages": [{"text": "t"}]}) + "\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    import hybrid.pipeline

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(hybrid.pipeline.Pipeline, "load", must_not_load)
    assert_clean_error(run("eval", qa, "--out", blocker / "rep"), "--out", "cannot write there")


def test_every_config_field_is_a_flag_with_its_real_default():
    import dataclasses

    import typer.main

    from hybrid.config import flags_of

    group = typer.main.get_command(app)
    for path, cls in [(["index"], IndexConfig), (["tune", "generator"], GeneratorTuneConfig),
                      (["tune", "dpo"], DPOTuneConfig), (["tune", "embedder"], EmbedderTuneConfig),
                      (["tune", "reranker"], RerankerTuneConfig),
                      (["tune", "judge"], JudgeTuneConfig), (["tune", "calibrate"], CalibrateConfig),
                      (["ask"], AskConfig), (["eval"], EvalConfig)]:
        cmd = group
        for name in path:
            cmd = cmd.commands[name]
        names = {p.name for p in cmd.params}
        for flag in flags_of(cls):
            assert flag.param in names, (path, flag.path)
        train = next((f for f in dataclasses.fields(cls) if f.name == "train"), None)
        if train is not None:  # the help shows this workflow's default, not TrainSettings' own
            lr = next(p for p in cmd.params if p.name == "train_learning_rate")
            assert f"[default: {train.default_factory().learning_rate}]" in lr.help, (path, lr.help)


def test_an_out_path_through_a_file_is_one_line_for_index_and_any_os_error(tmp_path, small_corpus, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_clean_error(run("index", small_corpus, "--out", blocker / "idx"), "--out", "cannot write there")
    import retrieval.retriever

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "idx"))

    monkeypatch.setattr(retrieval.retriever.Retriever, "load", disk_full)
    assert_clean_error(run("search", "x", "--index", tmp_path / "idx"), "No space left on device", str(tmp_path))


def test_threads_default_to_one_on_a_busy_small_machine_and_the_callers_value_wins(monkeypatch):
    import hybrid.cli as cli

    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    for load, want in ((1.2, "1"), (0.1, None)):
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(cli.os, "getloadavg", lambda: (load, load, load))
        cli._offline()
        assert cli.os.environ.get("OMP_NUM_THREADS") == want
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    cli._offline()
    assert cli.os.environ["OMP_NUM_THREADS"] == "2"


def test_ask_says_when_a_malformed_completion_was_served_as_the_abstention(monkeypatch):
    import hybrid.cli
    from hybrid.pipeline import Answer
    from tuning.prompting import ABSTAIN

    class Pipe:
        def ask(self, question, **_):
            return Answer(answer=ABSTAIN, abstained=True, raw="##Answer: ##begin_quote##", malformed=True)

    monkeypatch.setattr(hybrid.cli.Pipeline, "load", lambda *a, **k: Pipe())
    res = run("ask", "Where is the office?", "--index", "unused")
    assert res.exit_code == 0, res.output
    assert f"answer: {ABSTAIN}  (malformed completion, served as abstention" in res.stdout
    res = run("ask", "Where is the office?", "--index", "unused", "--json")
    assert json.loads(res.stdout)["malformed"] is True


def test_an_error_names_the_flag_on_the_command_line_and_the_argument_in_the_library(cli_index):
    """The same refusal in both spellings: `--index DIR` to a shell, `index_dir='DIR'` to Python."""
    from core.errors import InputError
    from retrieval.index import MANIFEST_FILE
    from retrieval.retriever import Retriever

    m = json.loads((cli_index / MANIFEST_FILE).read_text())
    del m["lexical"], m["search"]  # an index built before lexical search
    (cli_index / MANIFEST_FILE).write_text(json.dumps(m))
    assert_clean_error(run("search", "x", "--index", cli_index, "--mode", "lexical"),
                       f"error: --index {cli_index}: built before lexical search existed")
    with pytest.raises(InputError, match=f"^index_dir='{cli_index}': built before lexical search existed"):
        Retriever.load(cli_index).search("x", mode="lexical")
    with pytest.raises(InputError, match="^k=0: must be a positive integer"):
        Retriever.load(cli_index).search("x", k=0)


def _commands():
    """(path, click command) for every command of the app, nested groups walked."""
    import typer.main

    todo = [([], typer.main.get_command(app))]
    while todo:
        path, cmd = todo.pop()
        if hasattr(cmd, "commands"):
            todo += [(path + [name], sub) for name, sub in cmd.commands.items()]
        else:
            yield path, cmd


def test_version_is_the_package_metadata():
    from importlib.metadata import version

    res = run("--version")
    assert res.exit_code == 0 and res.stdout == f"hybrid {version('hybrid')}\n"


def test_every_help_names_values_as_a_person_reads_them():
    """No Python type names (`<list[str]>`, `<str>`, `<float>`, `{QA}`) and no doubled [required]."""
    import re

    paths = [path for path, _ in _commands()]
    assert len(paths) >= 15 and ["tune", "generator"] in paths
    for path in paths + [[], ["tune"], ["config"]]:
        res = run(*path, "--help")
        assert res.exit_code == 0, path
        assert not re.search(r"<[\w|\[\], .-]+>", res.stdout), (path, re.findall(r"<[\w|\[\], .-]+>", res.stdout))
        assert "{" not in res.stdout.split("\n", 1)[0], (path, res.stdout.splitlines()[0])  # the Usage line
        entries = re.split(r"\n  (?=[-A-Z\[])", res.stdout)
        assert all(e.count("[required]") <= 1 for e in entries), (path, [e for e in entries if e.count("[required]") > 1])
    assert "--group GROUP " in run("tune", "generator", "--help").stdout
    assert "  QA  " in run("eval", "--help").stdout


def test_every_command_that_shows_progress_takes_quiet():
    progress = {("index",), ("synth",), ("tune", "embedder"), ("tune", "reranker"), ("tune", "generator"),
                ("tune", "dpo"), ("tune", "judge"), ("eval",), ("run",)}
    quiet = {tuple(path) for path, cmd in _commands() if any("-q" in p.opts for p in cmd.params)}
    assert progress <= quiet, progress - quiet


def test_eval_quiet_prints_the_summary_only(tmp_path, bundled_tiny_index, tiny_llm_dir):
    from tests.conftest import BUNDLED

    args = ["eval", BUNDLED / "qa.jsonl", "--index", bundled_tiny_index, "--base-model", tiny_llm_dir, "--limit", 2,
            "--no-closed-book", "--max-new-tokens", 4, "-k", 2]
    loud = run(*args)
    assert loud.exit_code == 0, loud.output
    assert "eval:" in loud.stderr  # the progress bar this test is about
    res = run(*args, "-q")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""  # nothing but the summary (its latency columns vary from run to run)
    assert res.stdout.splitlines()[:3] == loud.stdout.splitlines()[:3] and "| rag |" in res.stdout


@pytest.mark.parametrize("command", [["eval", "qa.jsonl"], ["ask", "Who?", "--index", "idx"]])
@pytest.mark.parametrize("spec", ["s50_p0.8=some/dir", "runs/lr2e-4_p0.8"])
def test_an_adapter_name_with_a_dot_is_refused_in_one_line(command, spec):
    # PEFT turns the name into a torch module name and fails with a traceback deep in loading
    assert_clean_error(run(*command, "--adapter", spec), "--adapter", "contains '.'", "_p0_8=DIR")


def test_the_library_refuses_an_adapter_name_with_a_dot():
    from hybrid.pipeline import Pipeline
    from retrieval import InputError

    pipe = Pipeline.__new__(Pipeline)  # the name is refused before any file or model is read
    pipe.groups = []
    with pytest.raises(InputError, match="contains '.'"):
        pipe.add_adapter("a.b", "some/dir")
