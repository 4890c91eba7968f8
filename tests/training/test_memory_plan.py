import pytest
from transformers import LlamaConfig

from training.memory_plan import GiB, ModelShape, describe, estimate, lora_params, plan

SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def test_shape_counts_smollm2_parameters():
    shape = ModelShape.from_config(SMOL)
    assert abs(shape.params - 134_515_008) / 134_515_008 < 0.01  # SmolLM2-135M's published size
    # q_proj (576->576) and v_proj (576->192) at r=8 over 30 layers
    assert lora_params(shape, 8, ["q_proj", "v_proj"]) == 30 * 8 * ((576 + 576) + (576 + 192))


def test_estimate_orders_strategies_and_knobs():
    shape = ModelShape.from_config(SMOL)
    full = estimate(shape, "full", 512, 1, False)
    lora = estimate(shape, "lora", 512, 1, False)
    qlora = estimate(shape, "qlora", 512, 1, False, device="cuda")
    assert full.total > lora.total > qlora.total
    assert qlora.weights < lora.weights / 2
    # On CPU, 4-bit saves the weights but costs more per token (measured: benchmarks/performance/memory_plan.py).
    cpu_q = estimate(shape, "qlora", 512, 1, True)
    assert cpu_q.weights < lora.weights and cpu_q.activations > estimate(shape, "lora", 512, 1, True).activations
    assert estimate(shape, "lora", 512, 1, True).activations < lora.activations
    assert estimate(shape, "lora", 1024, 2, False).logits == 4 * lora.logits


def test_plan_picks_what_fits_or_refuses():
    shape = ModelShape.from_config(SMOL)
    roomy = plan(shape, "auto", 512, 1, True, 8, ["q_proj", "v_proj"], "cpu", available=16 * GiB)
    assert roomy["chosen"] == "lora"
    cuda = plan(shape, "auto", 512, 1, True, 8, ["q_proj", "v_proj"], "cuda", available=16 * GiB)
    lora_total, qlora_total = cuda["estimates"]["lora"]["total"], cuda["estimates"]["qlora"]["total"]
    assert qlora_total < lora_total
    tight = plan(shape, "lora", 512, 1, True, 8, ["q_proj", "v_proj"], "cuda",
                 available=int((lora_total + qlora_total) / 2 / 0.9))
    assert not tight["fits"]  # LoRA asked for and does not fit: refused, not silently swapped
    assert plan(shape, "auto", 512, 1, True, 8, ["q_proj", "v_proj"], "cuda",
                available=int((lora_total + qlora_total) / 2 / 0.9))["chosen"] == "qlora"
    assert plan(shape, "auto", 512, 1, True, 8, ["q_proj", "v_proj"], "cuda", available=16 * GiB)["chosen"] == "qlora"
    none = plan(shape, "auto", 512, 1, True, 8, ["q_proj", "v_proj"], "cpu", available=GiB // 4)
    assert none["chosen"] is None and not none["fits"]
    assert plan(shape, "full", 512, 1, True, 8, ["q_proj"], "cpu", available=64 * GiB)["chosen"] == "full"


def test_plan_splits_a_batch_that_does_not_fit_into_accumulated_micro_batches():
    shape = ModelShape.from_config(SMOL)
    at = lambda b: estimate(shape, "lora", 1024, b, True, 8, ["q_proj", "v_proj"]).total  # noqa: E731
    # room for 4 sequences at once but not 5: 12 asked -> micro-batch 4 (largest divisor of 12 that fits), x3
    p = plan(shape, "lora", 1024, 12, True, 8, ["q_proj", "v_proj"], "cpu", available=int((at(4) + at(5)) / 2 / 0.9))
    assert (p["chosen"], p["batch"], p["requested_batch"], p["accum_factor"]) == ("lora", 4, 12, 3)
    assert p["estimates"]["lora"]["total"] == at(4)  # the estimate is for what will run
    assert "micro-batch 4, gradient accumulation x3" in describe(p)
    # a batch that fits is left alone
    roomy = plan(shape, "lora", 1024, 12, True, 8, ["q_proj", "v_proj"], "cpu", available=64 * GiB)
    assert (roomy["batch"], roomy["accum_factor"]) == (12, 1) and "micro-batch" not in describe(roomy)
    # not even one sequence: refused, and the estimates say what one sequence needs
    none = plan(shape, "lora", 1024, 12, True, 8, ["q_proj", "v_proj"], "cpu", available=int(at(1) / 0.9) - 1)
    assert not none["fits"] and none["estimates"]["lora"]["total"] == at(1)


def test_on_cpu_the_processes_a_launcher_started_share_the_hosts_memory(monkeypatch):
    from training.memory_plan import available_bytes

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = available_bytes("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    shared = available_bytes("cpu")
    assert 0.2 < shared / alone < 0.3  # a quarter each (MemAvailable moves a little between the reads)
