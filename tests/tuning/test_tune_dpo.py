from tests.conftest import config
import json

import pytest
import torch

from core.errors import InputError
from tests.tuning.test_tune_generator import cfg_for, small_qa
from tuning.tune_dpo import DPOTuneConfig, score, tune_dpo
from tuning.prompting import ABSTAIN
from tuning.tune_generator import tune_generator


def test_score_prefers_grounded_correct_answers_and_abstention_without_oracle():
    ps = [{"text": "The Kestrel-7 battery lasts 14 months."}]
    good = "##Reason: ##begin_quote## The Kestrel-7 battery lasts 14 months. ##end_quote## ##Answer: 14 months"
    made_up = "##Reason: ##begin_quote## It lasts a decade. ##end_quote## ##Answer: 10 years"
    abstain = f"##Answer: {ABSTAIN}"
    assert score(good, ["14 months"], ps, True, None) > score(abstain, ["14 months"], ps, True, None) \
        > score(made_up, ["14 months"], ps, True, None)
    assert score(abstain, ["14 months"], ps, False, None) > score(good, ["14 months"], ps, False, None)
    assert score(good, ["14 months"], ps, True, True) < score(good, ["14 months"], ps, True, False)


def test_a_malformed_sample_scores_below_every_other_so_it_is_never_preferred():
    ps = [{"text": "The Kestrel-7 battery lasts 14 months."}]
    malformed = "##Answer: ##begin_quote## ##end_quote## ##Answer: ##begin"
    worst = "##Reason: ##begin_quote## It lasts a decade. ##end_quote## ##Answer: 10 years"
    for oracle in (True, False):  # without the oracle an abstention scores +1: a malformed one must not
        assert score(malformed, ["14 months"], ps, oracle, None) < score(worst, ["14 months"], ps, oracle, True)


def test_dpo_continues_sft_adapter_and_saves_loadable_adapter(tmp_path, bundled_tiny_index, tiny_llm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_steps=1, val_fraction=0), progress=False,
                   log=lambda *_: None)
    qa = small_qa(tmp_path)
    rows = [json.loads(l) for l in qa.read_text().splitlines()]
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"id": r["id"], "wrong_answer": "forty goats"}) + "\n" for r in rows if r["answers"]))
    cfg = config(DPOTuneConfig, index=str(bundled_tiny_index), qa=str(qa), adapter=str(tmp_path / "adapter"),
                        out=str(tmp_path / "dpo"), wrong_answers=str(wrong), n_samples=2, max_new_tokens=6,
                        num_distractors=1, max_steps=2, grad_accum=1, learning_rate=1e-2, max_questions=6)
    rec = tune_dpo(cfg, progress=False, log=lambda *_: None)
    assert rec.record["steps"] == 2 and rec.record["data"]["pairs"] >= 1 and rec.record["data"]["by_source"]["dataset"] >= 1
    m = rec.record["memory_measured"]  # planned (a pair = two sequences) and measured
    assert m["steps"] == 2 and m["peak_bytes"] > 100 * 2**20 and m["planned_bytes"] == rec.record["memory_plan"]["estimates"]["lora"]["total"]
    held = set(rec.record["data"]["held_out_ids"])
    pairs = [json.loads(l) for l in (tmp_path / "dpo" / "dpo_pairs.jsonl").read_text().splitlines()]
    assert not held & {p["id"] for p in pairs}  # held-out questions never become training pairs
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), tmp_path / "adapter")
    dpo = PeftModel.from_pretrained(base, tmp_path / "dpo")
    sft_w = {n: p for n, p in sft.named_parameters() if "lora_" in n}
    changed = [n for n, p in dpo.named_parameters() if "lora_" in n and not torch.allclose(p, sft_w[n])]
    assert changed  # DPO moved the adapter away from the SFT one
    assert not any("ref" in n for n, _ in dpo.named_parameters())  # the reference copy is not saved


def _completion_logps(model, batch) -> list[float]:
    """Summed log-probs of each row's completion tokens (the rows are [chosen, rejected])."""
    ids, mask = batch["input_ids"], batch["completion_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * mask[:, 1:]).sum(1).tolist()


def test_dpo_reference_is_the_frozen_sft_adapter_not_the_base_model(tmp_path, bundled_tiny_index, tiny_llm_dir,
                                                                    monkeypatch):
    import math

    import trl
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    quiet = lambda *_: None  # noqa: E731
    tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_steps=1, val_fraction=0), progress=False,
                   log=quiet)
    # make the SFT adapter clearly differ from the base: LoRA B is random, not (near) zero
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors, gen = load_file(str(weights)), torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.5 if "lora_B" in k else v for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})

    real_loss, steps = trl.DPOTrainer._compute_loss, []

    def recording(self, model, inputs, return_outputs):
        out = real_loss(self, model, inputs, return_outputs)
        m = self._metrics["train"]
        steps.append({"batch": {k: inputs[k].detach().clone() for k in ("input_ids", "attention_mask", "completion_mask")},
                      **{k: m[k][-1] for k in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")}})
        return out

    monkeypatch.setattr(trl.DPOTrainer, "_compute_loss", recording)
    cfg = config(DPOTuneConfig, index=str(bundled_tiny_index), qa=str(small_qa(tmp_path)),
                 adapter=str(tmp_path / "adapter"), out=str(tmp_path / "dpo"), pairs="contrastive", num_distractors=1,
                 max_steps=2, warmup_ratio=0, grad_accum=1, batch_size=1, learning_rate=5e-2, max_questions=3, beta=0.5)
    rec = tune_dpo(cfg, progress=False, log=quiet)
    assert rec.record["steps"] == 2 and len(steps) == 2
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), tmp_path / "adapter").eval()
    for n, st in enumerate(steps):
        # the reference log-probs the trainer used: logps - rewards / beta (rewards = beta * (policy - reference))
        used = [st["logps/chosen"] - st["rewards/chosen"] / cfg.beta, st["logps/rejected"] - st["rewards/rejected"] / cfg.beta]
        with_sft, with_base = _completion_logps(sft, st["batch"]), _completion_logps(base, st["batch"])
        assert min(abs(a - b) for a, b in zip(with_sft, with_base)) > 1.0, n  # base and SFT clearly differ
        assert used == pytest.approx(with_sft, abs=1e-3), n  # the reference is the SFT adapter, at every step
        assert all(abs(u - b) > 0.5 for u, b in zip(used, with_base)), n
    # at step 1 the policy is the SFT adapter itself: zero rewards, loss log 2
    assert [steps[0]["logps/chosen"], steps[0]["logps/rejected"]] == pytest.approx(
        _completion_logps(sft, steps[0]["batch"]), abs=1e-3)
    assert steps[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5) and steps[0]["rewards/rejected"] == pytest.approx(0, abs=1e-5)
    assert rec.record["train_log"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert any(abs(st["rewards/chosen"]) > 1e-3 for st in steps[1:])  # step 2: the policy moved, the reference did not


def test_contrastive_dpo_trains_on_flipped_pairs_without_sampling(tmp_path, bundled_tiny_index, tiny_llm_dir):
    tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_steps=1, val_fraction=0), progress=False,
                   log=lambda *_: None)
    cfg = config(DPOTuneConfig, index=str(bundled_tiny_index), qa=str(small_qa(tmp_path)), adapter=str(tmp_path / "adapter"),
                        out=str(tmp_path / "dpo"), pairs="contrastive", num_distractors=1, max_steps=1, grad_accum=1,
                        max_questions=6)
    rec = tune_dpo(cfg, progress=False, log=lambda *_: None)
    by_source = rec.record["data"]["by_source"]
    assert by_source["answer"] == by_source["abstain"] >= 1 and by_source["sampled"] == 0
    pairs = [json.loads(l) for l in (tmp_path / "dpo" / "dpo_pairs.jsonl").read_text().splitlines()]
    assert {p["id"] for p in pairs if p["source"] == "answer"} == {p["id"] for p in pairs if p["source"] == "abstain"}


def test_unknown_pair_mode_is_refused(tmp_path):
    cfg = config(DPOTuneConfig, index="i", qa="q", adapter="a", out=str(tmp_path / "o"), pairs="mixed")
    with pytest.raises(Exception, match="--pairs"):
        tune_dpo(cfg, progress=False)


def test_dpo_plans_pairs_as_double_length_sequences_and_splits_what_does_not_fit(tmp_path, bundled_tiny_index,
                                                                                 tiny_llm_dir, monkeypatch):
    import training.memory_plan as mp

    quiet = lambda *_: None  # noqa: E731
    tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_steps=1, val_fraction=0), progress=False,
                   log=quiet)
    common = dict(index=str(bundled_tiny_index), qa=str(small_qa(tmp_path)), adapter=str(tmp_path / "adapter"),
                  pairs="contrastive", num_distractors=1, max_steps=2, grad_accum=1, max_questions=6, batch_size=2)
    whole = tune_dpo(config(DPOTuneConfig, out=str(tmp_path / "whole"), **common), progress=False, log=quiet)
    p = whole.record["memory_plan"]
    pairs = [json.loads(l) for l in (tmp_path / "whole" / "dpo_pairs.jsonl").read_text().splitlines()]
    assert p["seq_len"] % 2 == 0 and p["seq_len"] // 2 >= max(len(x["chosen"][0]["content"].split()) for x in pairs)
    assert (p["batch"], p["accum_factor"]) == (2, 1) and whole.record["memory_measured"]["planned_bytes"] == p["estimates"]["lora"]["total"]
    monkeypatch.setattr(mp, "available_bytes", lambda device: int(p["estimates"]["lora"]["total"] / 0.9) - 1)
    split = tune_dpo(config(DPOTuneConfig, out=str(tmp_path / "split"), **common), progress=False, log=quiet)
    assert (split.record["memory_plan"]["batch"], split.record["memory_plan"]["accum_factor"]) == (1, 2) and split.record["steps"] == 2
    # the same pairs reach each optimizer step: same tokens and log-probs per step, the same gradient
    for a, b in zip(whole.record["train_log"], split.record["train_log"], strict=True):
        assert a["num_tokens"] == b["num_tokens"] and a["logps/chosen"] == pytest.approx(b["logps/chosen"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    monkeypatch.setattr(mp, "available_bytes", lambda device: 1)
    with pytest.raises(InputError, match="--max-length 1024: one pair of"):
        tune_dpo(config(DPOTuneConfig, out=str(tmp_path / "none"), **common), progress=False, log=quiet)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("data,needle", [
    (None, "hybrid_run.json lacks data.held_out_ids (a list of question ids)"),
    ({"held_out_ids": "q1"}, 'hybrid_run.json field data.held_out_ids must be a list of question ids, not "q1"'),
])
def test_dpo_refuses_an_sft_run_record_without_its_split_in_one_line(tmp_path, data, needle):
    from core import access
    from tests.hybrid.test_cli import assert_clean_error, run
    from tests.training.test_run_record import SFT_RECORD
    from training import run_record

    sft = tmp_path / "sft"  # an adapter dir as 'tune generator' leaves it, its record broken (no weights needed)
    sft.mkdir()
    run_record.write(sft, {k: v for k, v in {**SFT_RECORD, "data": data}.items() if v is not None})
    access.write(sft, access.record([]))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"id": "q2", "prompt": [{"role": "user", "content": "?"}], '
                     '"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}\n')
    res = run("tune", "dpo", "--adapter", sft, "--out", tmp_path / "dpo", "--pairs-file", pairs)
    assert_clean_error(res, f"error: --adapter {sft}: {needle}; retrain it with 'hybrid tune generator'")
    assert not (tmp_path / "dpo").exists()


def test_dpo_bad_run_record_is_one_line_from_the_console_script(tmp_path):
    """In a fresh process, where importing TRL's stack logs its own warnings, the error is still one line."""
    import os
    import subprocess
    import sys

    from core import access
    from tests.training.test_run_record import SFT_RECORD
    from training import run_record

    sft = tmp_path / "sft"
    sft.mkdir()
    run_record.write(sft, {k: v for k, v in SFT_RECORD.items() if k != "data"})
    access.write(sft, access.record([]))
    res = subprocess.run([sys.executable, "-m", "hybrid.cli", "tune", "dpo", "--adapter", str(sft), "--out",
                          str(tmp_path / "dpo"), "--pairs-file", str(tmp_path / "pairs.jsonl")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"error: --adapter {sft}: hybrid_run.json lacks data.held_out_ids (a list of question ids); retrain it with "
        f"'hybrid tune generator'"], res.stderr
