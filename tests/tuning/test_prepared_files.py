"""Training from prepared JSONL (no index): RAFT examples for SFT, preference pairs for DPO; --max-minutes."""

from tests.conftest import config
import json
import sys

import pytest

from core.errors import InputError
from tests.tuning.test_tune_generator import cfg_for
from tuning.tune_dpo import DPOTuneConfig, tune_dpo
from tuning.tune_generator import GeneratorTuneConfig, tune_generator


def _quiet(*_):
    return None


@pytest.fixture()
def first_run(tmp_path, bundled_tiny_index, tiny_llm_dir):
    """An SFT run mined from the index; its raft_train.jsonl is the prepared file for the next run."""
    rec = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_steps=1, val_fraction=0,
                                 no_oracle="both"), progress=False, log=_quiet)
    return tmp_path / "adapter", rec


def test_sft_from_examples_needs_no_index_and_keeps_question_pairs_together(tmp_path, first_run, tiny_llm_dir,
                                                                             monkeypatch):
    adapter, _ = first_run
    monkeypatch.setitem(sys.modules, "faiss", None)  # a prepared file needs no FAISS (as on a bare GPU machine)
    cfg = config(GeneratorTuneConfig, out=str(tmp_path / "again"), examples=str(adapter / "raft_train.jsonl"),
                              base_model=str(tiny_llm_dir), max_steps=2, save_steps=1, grad_accum=1, learning_rate=1e-2,
                              test_fraction=0.3, val_fraction=0.3, max_length=1024)
    rec = tune_generator(cfg, progress=False, log=_quiet)
    assert rec.record["steps"] == 2 and rec.record["data"]["examples"] == cfg.examples and rec.record["final_val_loss"] is not None
    ids = lambda name: [json.loads(l)["id"] for l in (tmp_path / "again" / name).read_text().splitlines()]
    train, val, held = set(ids("raft_train.jsonl")), set(ids("raft_val.jsonl")), set(rec.record["data"]["held_out_ids"])
    source = [json.loads(l)["id"] for l in (adapter / "raft_train.jsonl").read_text().splitlines()]
    assert train and val and held and not (train & val or train & held or val & held)
    assert train | val | held == set(source)
    # both examples of a question (with and without its oracle) stay on one side of the split
    assert len(ids("raft_train.jsonl")) == sum(source.count(i) for i in train)
    assert not (tmp_path / "again" / "held_out.jsonl").exists()  # no answers in a RAFT file to write one from


def test_examples_with_restricted_groups_need_those_groups(tmp_path, first_run, tiny_llm_dir):
    adapter, _ = first_run
    rows = [json.loads(l) for l in (adapter / "raft_train.jsonl").read_text().splitlines()]
    rows[0]["groups"] = ["finance"]
    path = tmp_path / "restricted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(GeneratorTuneConfig, out=str(tmp_path / "o"), examples=str(path), base_model=str(tiny_llm_dir), max_steps=1)
    with pytest.raises(InputError, match="restricted to group\\(s\\) finance; name them with groups="):
        tune_generator(cfg, progress=False, log=_quiet)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q1", "prompt": "not messages"}) + "\n")
    with pytest.raises(InputError, match=f"--examples {bad}:1: needs 'id', 'prompt'"):
        tune_generator(config(GeneratorTuneConfig, out=str(tmp_path / "o"), examples=str(bad), base_model=str(tiny_llm_dir)),
                       progress=False, log=_quiet)
    assert not (tmp_path / "o").exists()


def test_examples_and_index_are_exclusive_and_one_is_needed(tmp_path):
    both = config(GeneratorTuneConfig, out="o", examples="e.jsonl", index="i", qa="q")
    assert any("--examples replaces --index and --qa" in p for p in both.problems())
    neither = config(GeneratorTuneConfig, out="o")
    assert any("--index and --qa are required" in p for p in neither.problems())
    assert any("--pairs-file replaces" in p for p in config(DPOTuneConfig, adapter="a", out="o", pairs_file="p", qa="q").problems())
    assert any("--max-minutes" in p for p in config(DPOTuneConfig, adapter="a", out="o", pairs_file="p", max_minutes=-1).problems())


def test_dpo_from_pairs_file_refuses_held_out_questions_and_trains_otherwise(tmp_path, first_run, bundled_tiny_index,
                                                                            monkeypatch):
    adapter, sft = first_run
    cfg = config(DPOTuneConfig, index=str(bundled_tiny_index), qa=str(tmp_path / "qa.jsonl"), adapter=str(adapter),
                        out=str(tmp_path / "dpo"), pairs="contrastive", num_distractors=1, max_steps=1, grad_accum=1,
                        max_questions=4)
    first = tune_dpo(cfg, progress=False, log=_quiet)
    pairs_path = tmp_path / "dpo" / "dpo_pairs.jsonl"
    monkeypatch.setitem(sys.modules, "faiss", None)
    again = tune_dpo(config(DPOTuneConfig, adapter=str(adapter), out=str(tmp_path / "dpo2"), pairs_file=str(pairs_path),
                                   max_steps=2, grad_accum=1), progress=False, log=_quiet)
    assert again.record["steps"] == 2 and again.record["data"]["pairs"] == first.record["data"]["pairs"]
    assert again.record["data"]["by_source"] == first.record["data"]["by_source"] and again.record["data"]["pairs_file"] == str(pairs_path)
    held = sft.record["data"]["held_out_ids"][0]
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text(pairs_path.read_text() + json.dumps({"id": held, "prompt": [{"role": "user", "content": "q"}],
                                                          "chosen": [{"role": "assistant", "content": "a"}],
                                                          "rejected": [{"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(InputError, match="1 pairs are about questions the SFT adapter held out"):
        tune_dpo(config(DPOTuneConfig, adapter=str(adapter), out=str(tmp_path / "dpo3"), pairs_file=str(leaky)), progress=False)
    assert not (tmp_path / "dpo3").exists()


def test_max_minutes_stops_training_early_and_saves(tmp_path, bundled_tiny_index, tiny_llm_dir):
    rec = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_steps=50, val_fraction=0,
                                 max_minutes=1e-6), progress=False, log=_quiet)
    assert rec.record["steps"] == 1 and rec.record["stopped_early"] is True
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    full = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, out=str(tmp_path / "full"), max_steps=2,
                                  val_fraction=0), progress=False, log=_quiet)
    assert full.record["steps"] == 2 and full.record["stopped_early"] is False


def test_load_pairs_names_the_bad_line_and_refuses_restricted_text(tmp_path):
    from tuning.tune_dpo import load_pairs

    msg = lambda role, text: [{"role": role, "content": text}]
    good = {"id": "q1", "prompt": msg("user", "q"), "chosen": msg("assistant", "a"), "rejected": msg("assistant", "b")}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": []}) + "\n")
    with pytest.raises(InputError, match=f"--pairs-file {path}:2: needs 'id', 'prompt', 'chosen' and 'rejected'"):
        load_pairs(path, set(), None)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(InputError, match=f"--pairs-file {path}:2: not valid JSON"):
        load_pairs(path, set(), None)
    path.write_text(json.dumps({**good, "groups": ["hr"]}) + "\n")
    with pytest.raises(InputError, match="restricted to group\\(s\\) hr; name them with groups="):
        load_pairs(path, set(), None)
    pairs = load_pairs(path, set(), ["hr"])
    assert pairs[0]["source"] == "file" and pairs[0]["groups"] == ["hr"]
