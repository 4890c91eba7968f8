"""The speed benchmark's harness: statistics, alternation, step clocks, token clocks, the JSON it prints."""

import json
import time
from types import SimpleNamespace

import pytest

from benchmarks.performance import alternation, speed, speed_generation, speed_limit, speed_threads, speed_training


def test_summary_and_ratio_of_alternated_runs():
    s = alternation.summary([1.0, 2.0, 4.0])
    assert s == {"n": 3, "median": 2.0, "min": 1.0, "max": 4.0, "spread": 1.5}
    assert alternation.summary([])["median"] is None
    r = alternation.ratio([[1.1, 1.2, 1.3], [2.2, 2.4]], [[1.0, 1.0, 1.0], [2.0, 2.0]])
    assert r["per_repeat"] == pytest.approx([1.2, 1.15])  # each hybrid run over the plain run beside it
    assert (r["per_repeat_min"], r["per_repeat_max"]) == pytest.approx((1.15, 1.2))
    assert r["ratio"] == pytest.approx(1.3 / 1.0)  # medians over every step: 1.3 (of 5) over 1.0
    assert r["a"]["n"] == 5 and r["b"]["median"] == 1.0


def test_alternate_runs_the_sides_a_b_a_b():
    order = []
    out = alternation.alternate({"h": lambda: order.append("h") or len(order), "p": lambda: order.append("p") or len(order)},
                          3, log=lambda *a: None)
    assert order == ["h", "p", "h", "p", "h", "p"]
    assert out == {"h": [1, 3, 5], "p": [2, 4, 6]}


def test_verdicts_never_soften_a_miss():
    assert alternation.verdict(1.05, 1.10, at_most=True) == "met"
    assert alternation.verdict(1.11, 1.10, at_most=True) == "MISSED"
    assert alternation.verdict(1.9, 2.0, at_most=False) == "MISSED"
    assert alternation.verdict(None, 2.0, at_most=False) == "not measured"


def test_clocked_entry_points_time_steps_inside_hybrids_own_budget_callback_and_restore_it():
    from training import time_budget

    original = time_budget.TimeBudget
    args, state = SimpleNamespace(), SimpleNamespace()
    with speed_training.clocked_entry_points() as clocks:
        budget = time_budget.TimeBudget(1e-9)  # what the trainers build: now also a clock
        control = SimpleNamespace(should_training_stop=False)
        budget.on_train_begin(args, state, control)
        for pause in (0.03, 0.01, 0.02):  # the first interval is the warm-up step
            time.sleep(pause)
            budget.on_step_end(args, state, control, train_dataloader=SimpleNamespace(dataset=["row"]), model="m")
    assert time_budget.TimeBudget is original
    assert clocks == [budget] and isinstance(budget, original)
    steps = budget.steps()
    assert len(steps) == 2 and 0.005 < steps[0] < 0.019 < steps[1]
    assert budget.dataset == ["row"] and budget.model == "m"
    assert control.should_training_stop  # the budget still stops training


def test_clock_generate_splits_prefill_from_decode():
    class FakeModel:
        def generate(self, *args, logits_processor=None, **kwargs):
            time.sleep(0.2)  # prefill (well above four decode sleeps, which a loaded machine stretches)
            for _ in range(5):
                for p in logits_processor:
                    p(None, None)
                time.sleep(0.01)  # one decode step each
            return "out"

    model = FakeModel()
    records = speed_generation.clock_generate(model)
    assert model.generate() == "out"
    (r,) = records
    assert r["decode_steps"] == 4 and r["prefill_s"] >= 0.2 and 0.035 < r["decode_s"] < r["prefill_s"]
    speed_generation.unwrap_generate(model)
    assert "generate" not in model.__dict__


def test_busy_process_is_started_and_ended():
    with speed_threads.busy_process(True) as proc:
        assert proc.poll() is None
    assert proc.poll() is not None
    with speed_threads.busy_process(False) as none:
        assert none is None


def test_graded_uses_evals_rule():
    rows = [{"answers": ["Hawaii"]}, {"answers": []}, {"answers": ["1970"]}]
    texts = ["##Answer: Hawaii", "##Answer: I cannot answer this from the provided documents.", "##Answer: 1971"]
    assert speed_limit.graded(texts, rows) == {"correct": 1, "abstained": 1, "hallucinated": 1}


def test_json_keys_and_table_from_a_report():
    report = {"loadavg": {"start": (1.0, 1.0, 1.0)},
              "sft": alternation.ratio([[1.0, 1.1]], [[1.0, 1.0]]), "dpo": alternation.ratio([[2.0]], [[2.0]]),
              "embedder": alternation.ratio([[3.0]], [[2.0]]),
              "generation": {"settings": {"batch": 4}, "batched": alternation.summary([20.0]),
                             "sequential": alternation.summary([10.0]), "batch_speedup": 2.0, "per_repeat": [2.0]},
              "limit": {"decode_tokens_per_s": 8.0, "fraction_of_bound": 0.4, "best_identical_speedup": 1.05}}
    out = speed.final_json(report)
    assert set(out) >= {"sft_ratio", "dpo_ratio", "embedder_ratio", "generation_batch_speedup",
                        "decode_fraction_of_bound"}
    assert out["embedder_ratio"] == 1.5 and out["generation_batch_speedup"] == 2.0
    json.dumps(out)
    text = speed.table(report)
    assert "| embedder s/step |" in text and "MISSED" in text and "≤ 1.1 | met" in text


def test_unknown_row_is_refused():
    with pytest.raises(SystemExit):
        speed.main(["--rows", "sft,nope"])


def test_limit_row_runs_end_to_end_on_a_tiny_model(tiny_llm_dir, monkeypatch):
    from tuning import generation

    def tiny(spec=None, device=None, **kw):
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32).eval()
        return model, generation.load_tokenizer(tiny_llm_dir), None

    rows = [{"question": f"How long does buoy {i} last?", "answers": ["14 months"] if i % 2 else [],
             "passages": [{"id": "a", "text": f"Buoy {i} lasts 14 months."}]} for i in range(3)]
    monkeypatch.setattr(generation, "load_generator", tiny)
    monkeypatch.setattr(speed_limit, "halueval_rows", lambda n: rows[:n])
    real = speed_limit.copy_bandwidth
    monkeypatch.setattr(speed_limit, "copy_bandwidth", lambda: real(mib=8, reps=2))
    out = speed_limit.run_limit(None, {"limit_rows": 3, "limit_tokens": 6}, log=lambda *a: None)
    names = [v["variant"] for v in out["variants"]]
    assert names == ["today", "prefix", "static", "eager", "int8_dynamic"]
    today = out["variants"][0]
    assert today["speedup"] == 1.0 and today["answers_changed"] == 0 and today["rows"] == 3
    assert sum(today["graded"].values()) == 3
    assert out["variants"][1]["answers_changed"] == 0  # the prefix cache changes no greedy answer
    assert 0 < out["fraction_of_bound"] and out["weight_bytes_per_token"] > 0
    assert out["bound_tokens_per_s"] == pytest.approx(
        out["bandwidth"]["gb_per_s"]["median"] * 1e9 / out["weight_bytes_per_token"])
    assert "| int8_dynamic |" in speed.detail_tables({"limit": out})
