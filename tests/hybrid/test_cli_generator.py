"""`hybrid tune generator` and `hybrid ask` end to end with the tiny random Llama."""

import json

import pytest

from tests.hybrid.test_cli import assert_clean_error, run
from tests.tuning.test_tune_generator import small_qa


@pytest.fixture(scope="module")
def cli_adapter(tmp_path_factory, bundled_tiny_index, tiny_llm_dir):
    root = tmp_path_factory.mktemp("cli_gen")
    res = run("tune", "generator", "--index", bundled_tiny_index, "--qa", small_qa(root), "--out", root / "adapter",
              "--base-model", tiny_llm_dir, "--max-steps", 2, "--num-distractors", 1, "--grad-accum", 1, "-q")
    assert res.exit_code == 0, res.output
    assert "lora adapter saved to" in res.stdout
    # -q: the summary only; no memory plan, no per-step loss dicts, no datasets progress bars
    assert "memory plan" not in res.stderr and "'loss'" not in res.output and "dataset" not in res.stderr
    return root / "adapter"


def test_ask_json_schema(cli_adapter, bundled_tiny_index):
    res = run("ask", "How long does the Kestrel-7 battery last?", "--index", bundled_tiny_index,
              "--adapter", f"raft={cli_adapter}", "--json", "--max-new-tokens", 8, "-k", 3)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) == {"answer", "abstained", "citations", "passages", "support", "answerable", "gated",
                        "abstain_score", "calibrated_abstain", "calibrated_answer", "selected_from", "malformed",
                        "probe_answerable", "probe_score", "probe_decided"}
    assert out["abstain_score"] is None and out["calibrated_abstain"] is False  # not calibrated
    assert len(out["passages"]) == 3 and all(set(p) == {"doc_id", "chunk_id", "score"} for p in out["passages"])
    assert isinstance(out["abstained"], bool)


def test_ask_plain_streams_and_lists_passages(cli_adapter, bundled_tiny_index):
    res = run("ask", "Who approves travel?", "--index", bundled_tiny_index, "--adapter", cli_adapter,
              "--max-new-tokens", 6, "-k", 2)
    assert res.exit_code == 0, res.output
    assert "answer: " in res.stdout and "passages: " in res.stdout


def test_generator_bad_inputs(tmp_path, bundled_tiny_index, tiny_llm_dir, cli_adapter, monkeypatch):
    qa = small_qa(tmp_path)
    assert_clean_error(run("tune", "generator", "--index", bundled_tiny_index, "--qa", qa, "--out", tmp_path / "o",
                           "--base-model", tmp_path / "nowhere"), "--base-model", "config.json")
    assert_clean_error(run("tune", "generator", "--index", bundled_tiny_index, "--qa", qa, "--out", tmp_path / "o",
                           "--base-model", tiny_llm_dir, "--max-length", 32), "--max-length 32 is smaller")
    bad = tmp_path / "nogold.jsonl"
    bad.write_text(json.dumps({"id": "1", "question": "q?", "answers": ["a"]}) + "\n")
    assert_clean_error(run("tune", "generator", "--index", bundled_tiny_index, "--qa", bad, "--out", tmp_path / "o",
                           "--base-model", tiny_llm_dir), "no 'gold_ids'")
    ghost = tmp_path / "ghost.jsonl"
    ghost.write_text(json.dumps({"id": "1", "question": "q?", "answers": ["a"], "gold_ids": ["ghost"]}) + "\n")
    assert_clean_error(run("tune", "generator", "--index", bundled_tiny_index, "--qa", ghost, "--out", tmp_path / "o",
                           "--base-model", tiny_llm_dir), "gold_ids not in index", "ghost")
    import training.memory_plan as mp

    monkeypatch.setattr(mp, "available_bytes", lambda device: 64 * 1024 * 1024)
    assert_clean_error(run("tune", "generator", "--index", bundled_tiny_index, "--qa", qa, "--out", tmp_path / "o",
                           "--base-model", tiny_llm_dir, "--num-distractors", 1), "free", "--max-length")
    monkeypatch.undo()
    assert_clean_error(run("ask", "q", "--index", bundled_tiny_index, "--adapter", tmp_path), "not an adapter made by")
    assert_clean_error(run("tune", "generator", "--index", bundled_tiny_index, "--qa", qa, "--out", tmp_path / "o",
                           "--strategy", "magic"), "--strategy", "'magic' is not one of")
    assert_clean_error(run("tune", "generator", "--index", bundled_tiny_index, "--qa", qa, "--out", tmp_path / "o",
                           "--lora-r", 0, "--learning-rate", 0), "--lora-r must be >= 1", "--learning-rate must be > 0")
    assert not (tmp_path / "o").exists()


def test_tune_dpo_cli(cli_adapter, bundled_tiny_index, tmp_path):
    qa = small_qa(tmp_path)
    res = run("tune", "dpo", "--index", bundled_tiny_index, "--qa", qa, "--adapter", cli_adapter,
              "--out", tmp_path / "dpo", "--n-samples", 2, "--max-steps", 1, "--max-questions", 4,
              "--num-distractors", 1)
    assert res.exit_code == 0, res.output
    assert "dpo adapter saved to" in res.stdout and (tmp_path / "dpo" / "adapter_model.safetensors").exists()
    assert "memory plan (cpu" in res.stderr and "dataset" not in res.stderr  # the default: plan, no library bars
    assert "'loss'" not in res.output  # the progress bar, not a loss dict per step
    assert_clean_error(run("tune", "dpo", "--index", bundled_tiny_index, "--qa", qa, "--adapter", tmp_path,
                           "--out", tmp_path / "x"), "not an adapter made by")


def test_generator_and_dpo_from_prepared_files(tmp_path, cli_adapter, tiny_llm_dir):
    res = run("tune", "generator", "--examples", cli_adapter / "raft_train.jsonl", "--out", tmp_path / "again",
              "--base-model", tiny_llm_dir, "--max-steps", 1, "--grad-accum", 1, "--test-fraction", 0, "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "again" / "hybrid_run.json").read_text())["raft"] == {
        "examples": str(cli_adapter / "raft_train.jsonl")}
    ex = json.loads((cli_adapter / "raft_train.jsonl").read_text().splitlines()[0])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": ex["id"], "prompt": ex["prompt"], "chosen": ex["completion"],
                                 "rejected": [{"role": "assistant", "content": "##Answer: forty goats"}]}) + "\n")
    res = run("tune", "dpo", "--pairs-file", pairs, "--adapter", tmp_path / "again", "--out", tmp_path / "dpo",
              "--max-steps", 1, "-q")
    assert res.exit_code == 0, res.output
    assert "dpo adapter saved to" in res.stdout and "'file': 1" in res.stdout
    assert_clean_error(run("tune", "generator", "--out", tmp_path / "x", "--base-model", tiny_llm_dir),
                       "--index and --qa are required (or --examples")
    assert_clean_error(run("tune", "dpo", "--adapter", cli_adapter, "--out", tmp_path / "y", "--pairs-file", pairs,
                           "--qa", pairs), "--pairs-file replaces --index, --qa and --wrong-answers")


def test_ask_select_needs_a_judge_and_two_loaded_adapters(cli_adapter, bundled_tiny_index, tmp_path):
    q = "How long does the Kestrel-7 battery last?"
    two = ["--adapter", f"a={cli_adapter}", "--adapter", f"b={cli_adapter}"]
    assert_clean_error(run("ask", q, "--index", bundled_tiny_index, *two, "--select", "a", "--select", "b"),
                       "--select a --select b: ", "needs --judge (it picks", "given with --adapter")
    assert_clean_error(run("ask", q, "--index", bundled_tiny_index, *two, "--select", "a", "--select", "c",
                           "--judge", tmp_path), "--select a --select c", "two or more distinct names")


def test_synth_cli_writes_a_qa_file_and_its_report(tmp_path, bundled_tiny_index, tiny_llm_dir):
    out = tmp_path / "synth" / "qa.jsonl"
    out.parent.mkdir()
    res = run("synth", "--index", bundled_tiny_index, "--out", out, "--teacher", tiny_llm_dir, "--max-chunks", 2,
              "--max-new-tokens", 8, "--unanswerable", 1.0, "-q")
    assert res.exit_code == 0, res.output
    rep = json.loads((out.parent / "synth_report.json").read_text())
    c = rep["counts"]
    assert c["chunks"] == 2 and len(rep["chunks_done"]) == 2 and rep["teacher"] == str(tiny_llm_dir.resolve())
    # every offered question is either kept or counted under exactly one filter
    assert c["offered"] == c["kept"] + sum(c["dropped"].values())
    assert c["unanswerable_offered"] == 2 == c["unanswerable_kept"] + sum(c["unanswerable_dropped"].values())
    assert f"over 2 chunks -> {out}" in res.stdout
    assert_clean_error(run("synth", "--index", bundled_tiny_index, "--out", out, "--per-chunk", 0), "--per-chunk")
    assert_clean_error(run("synth", "--index", bundled_tiny_index, "--out", tmp_path / "nowhere" / "qa.jsonl"),
                       "does not exist")
    assert_clean_error(run("tune", "generator", "--index", bundled_tiny_index, "--out", tmp_path / "a"),
                       "hybrid synth --index")


def test_an_access_refusal_names_the_flag_on_the_command_line_and_the_argument_in_the_library(
        cli_adapter, bundled_tiny_index, tmp_path):
    """One message, two readers: `--adapter hr=DIR ... pass --group hr` to a shell, `adapters={...} ...
    pass groups=['hr']` to Python (core/errors.py Arg)."""
    import shutil

    from hybrid.pipeline import Pipeline
    from core import access
    from core.errors import InputError

    hr = tmp_path / "hr"
    shutil.copytree(cli_adapter, hr)
    access.write(hr, access.record(["hr"], ["hr"]))  # as if trained on hr's documents
    assert_clean_error(run("ask", "Who approves travel?", "--index", bundled_tiny_index, "--adapter", f"hr={hr}"),
                       f"error: --adapter hr={hr}: trained on documents of access group(s) hr; the caller lacks hr "
                       f"(pass --group hr only if the caller belongs to them)")
    with pytest.raises(InputError) as err:
        Pipeline.load(bundled_tiny_index, adapters={"hr": str(hr)})
    assert str(err.value) == (f"adapters={{'hr': '{hr}'}}: trained on documents of access group(s) hr; the caller "
                              f"lacks hr (pass groups=['hr'] only if the caller belongs to them)")
