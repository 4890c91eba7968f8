"""The SFT loss with the LM head on the completion only (tuning/completion_loss.py): the same loss and
the same gradients as the full computation, in fp32 and under bf16 autocast, and the trainer's record
naming the precision it ran at."""

import pytest
import torch

from tests.tuning.test_tune_generator import cfg_for
from tuning.completion_loss import add_completion_head, completion_loss
from tuning.tune_generator import tune_generator


def _batch(vocab: int, seed: int = 0):
    """Two right-padded sequences (lengths 40 and 31), prompts unlabelled, completions of 6 and 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 31:] = 0
    labels = torch.full((2, 40), -100)
    labels[0, 34:40] = ids[0, 34:40]
    labels[1, 27:31] = ids[1, 27:31]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def lora_model(tiny_llm_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM", init_lora_weights=False))
    add_completion_head(model)
    return model


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_completion_only_logits_give_the_full_computations_loss_and_gradients(lora_model):
    batch = _batch(lora_model.config.vocab_size)
    full = lora_model(**batch).loss  # transformers' own loss: every position's logits
    full.backward()
    want = _grads(lora_model)
    lora_model.zero_grad()
    ours = completion_loss(lora_model, batch)
    ours.backward()
    got = _grads(lora_model)
    assert torch.allclose(ours, full, atol=1e-5, rtol=1e-5)
    assert set(got) == set(want) and all("lora_" in n for n in got)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-4), n


def test_the_loss_is_divided_by_the_optimizer_steps_tokens_when_given(lora_model):
    batch = _batch(lora_model.config.vocab_size)
    mean = completion_loss(lora_model, batch)
    # 10 labelled tokens in this batch; an optimizer step of 25 divides their sum by 25
    assert torch.allclose(completion_loss(lora_model, batch, num_items_in_batch=25), mean * 10 / 25, atol=1e-6)


def test_under_bf16_autocast_the_loss_stays_fp32_and_close_to_the_fp32_one(lora_model):
    batch = _batch(lora_model.config.vocab_size, seed=1)
    with torch.no_grad():
        fp32 = completion_loss(lora_model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = completion_loss(lora_model, batch)
            full_bf16 = lora_model(**batch).loss
    assert bf16.dtype == torch.float32
    assert abs(float(bf16) - float(fp32)) < 0.02 * float(fp32)
    assert abs(float(bf16) - float(full_bf16)) < 0.02 * float(fp32)


def test_generation_keeps_the_models_own_forward(lora_model, tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with lora_model.disable_adapter(), torch.no_grad():
        assert torch.equal(lora_model.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
                           plain.generate(input_ids=ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_record_names_the_precision_it_trained_at(tmp_path, bundled_tiny_index, tiny_llm_dir, precision,
                                                        monkeypatch):
    from transformers import AutoConfig

    from tests.tuning.test_tune_generator import _on_first_step

    def watch(trainer, model):  # at the first training step: what a frozen projection computes in
        dtypes = []
        base = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
        base.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        return dtypes, {p.dtype for p in model.parameters() if p.requires_grad}

    seen = _on_first_step(monkeypatch, watch)
    rec = tune_generator(cfg_for(tmp_path, bundled_tiny_index, tiny_llm_dir, max_steps=1, val_fraction=0,
                                 precision=precision), progress=False, log=lambda *_: None)
    assert rec.record["precision"] == precision == rec.record["memory_plan"]["precision"]
    (dtypes, trainable), = seen  # bf16 matmuls exactly when the run is bf16; trainable weights stay fp32
    assert dtypes[0] == (torch.bfloat16 if precision == "bf16" else torch.float32) and trainable == {torch.float32}
    assert rec.record["train_loss"] and all(h["loss"] > 0 for h in rec.record["train_loss"])
    # the plan's logits term counts the completion's positions only
    assert rec.record["memory_plan"]["estimates"]["lora"]["logits"] == \
        3 * rec.record["data"]["scored_tokens"] * rec.record["memory_plan"]["batch"] * AutoConfig.from_pretrained(str(tiny_llm_dir)).vocab_size * 4
