from tests.conftest import config
import json

import pytest
import torch

from core.errors import InputError
from tests.conftest import BUNDLED
from training.peak_memory import process_peak_rss
from tuning.tune_generator import GeneratorTuneConfig, tune_generator


def small_qa(tmp_path, n=24):
    rows = [json.loads(l) for l in (BUNDLED / "qa.jsonl").read_text().splitlines()]
    answerable = [r for r in rows if r["answers"]][: n - 4]
    unanswerable = [r for r in rows if not r["answers"]][:4]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in answerable + unanswerable))
    return path


def cfg_for(tmp_path, index, llm, **kw):
    base = dict(index=str(index), qa=str(small_qa(tmp_path)), out=str(tmp_path / "adapter"), base_model=str(llm),
                max_steps=3, save_steps=2, num_distractors=2, max_length=1024, grad_accum=1, learning_rate=1e-2,
                neftune_alpha=5.0, test_fraction=0.2, val_fraction=0.2)
    base.update(kw)
    return config(GeneratorTuneConfig, **base)


def test_lora_sft_trains_adapter_only_and_saves_plain_peft_dir(tmp_path, bundled_tiny_index, tiny_llm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rec = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir), progress=False, log=lambda *_: None)
    out = tmp_path / "adapter"
    assert rec.record["strategy"] == "lora" and rec.record["steps"] == 3
    assert (out / "adapter_config.json").exists() and (out / "loss.png").stat().st_size > 1000
    assert rec.record["final_val_loss"] is not None and len(rec.record["train_loss"]) == 3
    assert rec.record["data"]["train"]["examples"] > 0 and rec.record["data"]["held_out_ids"]
    # the plan is sized for the longest example (batches pad to it), not for --max-length 1024
    assert rec.record["memory_plan"]["seq_len"] == rec.record["data"]["max_tokens"] < 1024
    # the plan is checked against the run itself: peak RSS after the steps, beside the plan's total
    m = rec.record["memory_measured"]
    assert m["device"] == "cpu" and m["steps"] == 3 and m["planned_bytes"] == rec.record["memory_plan"]["estimates"]["lora"]["total"]
    assert 100 * 2**20 < m["peak_bytes"] <= process_peak_rss()  # torch alone is over 100 MiB; ru_maxrss only grows
    assert m["planned_over_measured"] == round(m["planned_bytes"] / m["peak_bytes"], 3)
    held = [json.loads(l)["id"] for l in (out / "held_out.jsonl").read_text().splitlines()]
    assert held == rec.record["data"]["held_out_ids"]
    trained = {json.loads(l)["id"] for l in (out / "raft_train.jsonl").read_text().splitlines()}
    assert trained and not trained & set(held)
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    before = {n: p.clone() for n, p in base.named_parameters()}
    tuned = PeftModel.from_pretrained(base, out)
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: training moved it
    for n, p in tuned.get_base_model().named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, before[key]), n  # the frozen base did not change
    assert not (tmp_path / "adapter.checkpoints").exists()


def test_sequence_length_smaller_than_prompt_is_refused(tmp_path, bundled_tiny_index, tiny_llm_dir):
    with pytest.raises(InputError, match="--max-length 64 is smaller"):
        tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_length=64), progress=False,
                       log=lambda *_: None)
    assert not (tmp_path / "adapter").exists()


def test_qa_without_gold_ids_is_refused(tmp_path, bundled_tiny_index, tiny_llm_dir):
    qa = tmp_path / "bad.jsonl"
    qa.write_text(json.dumps({"id": "1", "question": "q?", "answers": ["x"]}) + "\n")
    with pytest.raises(InputError, match="no 'gold_ids'"):
        tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, qa=str(qa)), progress=False)


def _adapter_tensors(d):
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def test_interrupted_run_keeps_previous_adapter_and_resume_continues_from_the_checkpoint(
        tmp_path, bundled_tiny_index, tiny_llm_dir, monkeypatch):
    import transformers

    quiet = lambda *_: None  # noqa: E731
    out = tmp_path / "adapter"
    first = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_steps=1, val_fraction=0),
                           progress=False, log=quiet)
    before = (out / "adapter_model.safetensors").read_bytes()
    common = dict(max_steps=4, save_steps=2, val_fraction=0, learning_rate=5e-2)
    # the reference: the same seed, data and max_steps, never interrupted
    straight = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, out=str(tmp_path / "straight"),
                                      **common), progress=False, log=quiet)

    real_step = transformers.Trainer.training_step
    started_at: list[int] = []  # the optimizer step reached when each micro-batch starts (grad_accum 1)
    stop = {"at": 2}

    def recording(self, *a, **k):
        if self.state.global_step == stop["at"]:  # after the step-2 checkpoint
            raise KeyboardInterrupt
        started_at.append(self.state.global_step)
        return real_step(self, *a, **k)

    monkeypatch.setattr(transformers.Trainer, "training_step", recording)
    cfg2 = cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, **common)
    with pytest.raises(KeyboardInterrupt):
        tune_generator(cfg2, progress=False, log=quiet)
    assert started_at == [0, 1]
    assert (out / "adapter_model.safetensors").read_bytes() == before  # previous adapter intact
    ckpt = tmp_path / "adapter.checkpoints" / "checkpoint-2"
    ckpt_log = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in ckpt_log if "loss" in h] == [1, 2]

    started_at.clear()
    stop["at"] = None
    cfg2.resume = True
    rec = tune_generator(cfg2, progress=False, log=quiet)
    # it continued from the checkpoint: only steps 3 and 4 ran now (ignoring --resume would run 0-3)
    assert started_at == [2, 3]
    assert rec.record["steps"] == 4 and [h["step"] for h in rec.record["train_loss"]] == [1, 2, 3, 4]
    assert rec.record["train_loss"][:2] == [h for h in ckpt_log if "loss" in h]  # steps 1-2 restored, not rerun
    # ... and ended where the uninterrupted run did: same losses, same adapter tensors
    assert [h["loss"] for h in rec.record["train_loss"]] == pytest.approx([h["loss"] for h in straight.record["train_loss"]],
                                                                   rel=1e-5)
    resumed, ref = _adapter_tensors(out), _adapter_tensors(tmp_path / "straight")
    assert resumed.keys() == ref.keys() and resumed
    for name in ref:
        assert torch.allclose(resumed[name], ref[name], rtol=1e-5, atol=1e-7), name
    from safetensors.torch import load

    previous = load(before)  # and it replaced the previous adapter
    assert any(not torch.equal(resumed[n], previous[n]) for n in ref if "lora_B" in n)
    assert first.record["config"]["train"]["learning_rate"] != rec.record["config"]["train"]["learning_rate"]


def test_merge_exports_a_full_model_equal_to_base_plus_adapter(tmp_path, bundled_tiny_index, tiny_llm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_steps=2, val_fraction=0, merge=True),
                   progress=False, log=lambda *_: None)
    out = tmp_path / "adapter"
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), out)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-4)


def _on_first_step(monkeypatch, inspect):
    """Call `inspect(trainer, model)` once, at the first loss of the next SFT run (inside the training
    step, the model in training mode, before its forward pass)."""
    from tuning.completion_loss import CompletionSFTTrainer

    real_loss = CompletionSFTTrainer.compute_loss
    seen = []

    def first_loss(self, model, *a, **k):
        if not seen:
            seen.append(inspect(self, model))
        return real_loss(self, model, *a, **k)

    monkeypatch.setattr(CompletionSFTTrainer, "compute_loss", first_loss)
    return seen


def test_qlora_trains_only_the_adapter_on_an_nf4_double_quantised_4bit_base(tmp_path, bundled_tiny_index,
                                                                            tiny_llm_dir, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (4-bit NF4 runs on CPU from 0.43)")

    def snapshot(trainer, model):
        quant = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        return {"model": model, "quant": quant,
                "packed": {n: m.weight.data.clone() for n, m in quant.items()},
                "absmax": {n: m.weight.quant_state.absmax.clone() for n, m in quant.items()},
                "lora": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
                "float": {n: p.detach().clone() for n, p in model.named_parameters()
                          if "lora_" not in n and p.dtype.is_floating_point}}

    seen = _on_first_step(monkeypatch, snapshot)
    # two steps: the first one's learning rate is 0 (linear warmup starts at 0)
    rec = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, strategy="qlora", max_steps=2,
                                 val_fraction=0), progress=False, log=lambda *_: None)
    assert rec.record["strategy"] == "qlora" == rec.record["memory_plan"]["chosen"] and rec.record["steps"] == 2
    (s,) = seen
    # every linear layer of the two decoder blocks is a bitsandbytes 4-bit layer: NF4, double
    # quantisation (the absmax statistics are quantised again), float32 compute on CPU
    quant = s["quant"]
    per_block = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.split(".")[-2] if n.endswith("base_layer") else n.split(".")[-1] for n in quant} == per_block
    assert len(quant) == 2 * len(per_block)
    for n, m in quant.items():
        w = m.weight
        assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8, n
        assert w.quant_type == "nf4" and w.compress_statistics and w.quant_state.nested, n
        assert m.compute_dtype == torch.float32, n
    # LoRA sits on the 4-bit q_proj / v_proj
    lora_bases = [n for n in quant if n.endswith("base_layer")]
    assert sorted(n.split(".")[-2] for n in lora_bases) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    # training moved the adapter only: LoRA B left zero, the packed 4-bit weights, their
    # statistics and the float parameters (embeddings, norms) did not change
    model = s["model"]
    now = dict(model.named_parameters())
    assert s["lora"] and all(not p.any() for n, p in s["lora"].items() if "lora_B" in n)
    assert any(now[n].detach().abs().sum() > 0 for n in s["lora"] if "lora_B" in n)
    for n, m in quant.items():
        assert torch.equal(m.weight.data, s["packed"][n]) and torch.equal(m.weight.quant_state.absmax, s["absmax"][n]), n
    for n, p in s["float"].items():
        assert torch.equal(now[n].detach(), p), n
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the adapter file holds LoRA weights only
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)


@pytest.mark.parametrize("on", [True, False], ids=["neftune5-checkpointing", "neftune0-no-checkpointing"])
def test_neftune_noise_and_gradient_checkpointing_are_on_during_training_exactly_when_asked(
        tmp_path, bundled_tiny_index, tiny_llm_dir, monkeypatch, on):
    import torch.nn.functional as F

    calls = {"checkpointed": 0}

    def inspect(trainer, model):
        base = model.get_base_model()
        emb = base.get_input_embeddings()
        hooks = [h for h in emb._forward_hooks.values() if getattr(h, "__name__", "") == "neftune_post_forward_hook"]
        ids = torch.arange(12).reshape(1, 12)
        with torch.no_grad():
            noisy = emb(ids) - F.embedding(ids, emb.weight)  # the hook adds uniform noise in training mode
        layers = list(base.model.layers)
        for layer in layers:  # count the decoder layers that really run through the checkpoint function
            real = getattr(layer, "_gradient_checkpointing_func", None)
            if real is not None:
                def counted(*a, _real=real, **k):
                    calls["checkpointed"] += 1
                    return _real(*a, **k)
                layer._gradient_checkpointing_func = counted
        return {"training": emb.training, "hooks": len(hooks), "alpha": getattr(emb, "neftune_noise_alpha", None),
                "noise": noisy.abs().max().item(), "bound": 5.0 / (12 * emb.weight.shape[1]) ** 0.5,
                "checkpointing": base.is_activation_checkpointing,
                "layers_checkpointed": [layer.gradient_checkpointing for layer in layers]}

    seen = _on_first_step(monkeypatch, inspect)
    kw = {} if on else {"neftune_alpha": 0.0, "gradient_checkpointing": False}
    rec = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_steps=1, val_fraction=0, **kw),
                         progress=False, log=lambda *_: None)
    (s,) = seen
    assert s["training"] and rec.record["steps"] == 1 and len(s["layers_checkpointed"]) == 2
    if on:  # cfg_for's default --neftune-alpha 5, --gradient-checkpointing on (the CLI default)
        assert s["hooks"] == 1 and s["alpha"] == 5.0
        assert 0 < s["noise"] <= s["bound"] + 1e-6  # alpha / sqrt(seq_len * hidden), NEFTune's scale
        assert s["checkpointing"] and s["layers_checkpointed"] == [True, True]
        assert calls["checkpointed"] >= 2  # both layers went through the checkpoint function in the forward
    else:
        assert s["hooks"] == 0 and s["noise"] == 0.0
        assert not s["checkpointing"] and s["layers_checkpointed"] == [False, False] and calls["checkpointed"] == 0


def test_a_batch_the_plan_cannot_hold_is_split_into_accumulated_micro_batches(tmp_path, bundled_tiny_index,
                                                                              tiny_llm_dir, monkeypatch):
    import training.memory_plan as mp

    log = lambda *_: None  # noqa: E731
    sampler = _on_first_step(monkeypatch, lambda trainer, model: trainer.args.train_sampling_strategy)
    whole = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, out=str(tmp_path / "whole"), batch_size=2,
                                   max_steps=2, val_fraction=0), progress=False, log=log)
    assert (whole.record["memory_plan"]["batch"], whole.record["memory_plan"]["accum_factor"]) == (2, 1)
    assert sampler == ["group_by_length"]  # two sequences a batch: grouped by length, less padding
    one = whole.record["memory_plan"]["estimates"]["lora"]["total"]  # two sequences' worth; one sequence needs less
    monkeypatch.setattr(mp, "available_bytes", lambda device: int(one / 0.9) - 1)
    split = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, out=str(tmp_path / "split"), batch_size=2,
                                   max_steps=2, val_fraction=0), progress=False, log=log)
    assert (split.record["memory_plan"]["batch"], split.record["memory_plan"]["accum_factor"]) == (1, 2)
    # the same sequences per optimizer step: the tokens counted at each step match the unsplit run
    tokens = lambda rec: [h["num_tokens"] for h in rec.record["train_loss"]]  # noqa: E731
    assert tokens(split) == tokens(whole) and len(tokens(whole)) == 2


def test_two_process_torchrun_trains_like_one_process_and_writes_one_adapter(tmp_path, bundled_tiny_index,
                                                                           tiny_llm_dir):
    """DDP on CPU (gloo): 2 ranks x grad_accum 1 against 1 process x grad_accum 2, the same global batches.

    With LoRA dropout and NEFTune off nothing is random but the data order, which the trainer keeps:
    rank r takes the r-th micro-batch of each global batch, as accumulation takes them in turn. The
    gradients are then the same averages, so the two runs must agree to float precision (measured:
    identical losses, lora_B difference 0.0); 1e-4 leaves room for a different reduction order."""
    import subprocess
    import sys

    qa = small_qa(tmp_path)
    common = ["--index", str(bundled_tiny_index), "--qa", str(qa), "--base-model", str(tiny_llm_dir), "-q",
              "--num-distractors", "1", "--val-fraction", "0", "--test-fraction", "0", "--max-steps", "3",
              "--learning-rate", "1e-3", "--max-length", "1024", "--save-steps", "1000",
              "--lora-dropout", "0", "--neftune-alpha", "0"]  # no randomness but the data order
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "hybrid.cli", "tune", "generator", *common, "--out", str(tmp_path / "ddp"),
                          "--grad-accum", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "hybrid.cli", "tune", "generator", *common,
                          "--out", str(tmp_path / "one"), "--grad-accum", "2"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    rec_ddp = json.loads((tmp_path / "ddp" / "hybrid_run.json").read_text())
    rec_one = json.loads((tmp_path / "one" / "hybrid_run.json").read_text())
    assert rec_ddp["steps"] == rec_one["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ddp")) == ["ddp"]  # one adapter, no leftovers
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()
    ddp_loss = [h["loss"] for h in rec_ddp["train_loss"]]
    one_loss = [h["loss"] for h in rec_one["train_loss"]]
    assert all(abs(x - y) <= 1e-4 * abs(y) for x, y in zip(ddp_loss, one_loss)), (ddp_loss, one_loss)
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ddp", "one"))
    assert a.keys() == b.keys()
    diffs = {k: float((a[k] - b[k]).norm() / b[k].norm()) for k in a if "lora_B" in k}
    assert max(diffs.values()) < 1e-4, diffs

    # DPO on top, from prepared pairs (sampled pairs would differ per rank): the same agreement
    examples = [json.loads(l) for l in (tmp_path / "one" / "raft_train.jsonl").read_text().splitlines()][:4]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": e["id"], "prompt": e["prompt"], "chosen": e["completion"], "rejected": [
        {"role": "assistant", "content": "##Answer: forty goats"}]}) + "\n" for e in examples))
    dpo = ["tune", "dpo", "--pairs-file", str(pairs), "--adapter", str(tmp_path / "one"), "--max-steps", "2",
           "--batch-size", "1", "-q"]
    # this one launches itself: --distributed ddp starts torchrun with the same config
    ddp = subprocess.run([sys.executable, "-m", "hybrid.cli", *dpo, "--out", str(tmp_path / "dpo_ddp"), "--grad-accum",
                          "1", "--distributed", "ddp", "--num-processes", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "hybrid.cli", *dpo, "--out", str(tmp_path / "dpo_one"),
                          "--grad-accum", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    logs = [[h["loss"] for h in json.loads((tmp_path / d / "hybrid_run.json").read_text())["train_log"]]
            for d in ("dpo_ddp", "dpo_one")]
    assert len(logs[0]) == len(logs[1]) == 2 and all(abs(x - y) <= 1e-4 * abs(y) for x, y in zip(*logs)), logs
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("dpo_ddp", "dpo_one"))
    assert max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a if "lora_B" in k) < 1e-4
