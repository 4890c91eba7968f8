"""Speed rows `sft`, `dpo` and `embedder`: seconds per optimizer step of hybrid's trainer against the
plain loop (or the library's trainer called directly), the sides alternated; see speed.py's docstring."""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path

from benchmarks.performance.alternation import alternate, ratio
from benchmarks.performance.speed_inputs import BUNDLED, bundled_index, example_lengths, raft_examples


# --- step timing -------------------------------------------------------------------------------------
def step_clock():
    """A TrainerCallback class recording the wall time of every optimizer step (end to end)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.args = None
            self.dataset = None
            self.model = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]
            self.args = args

        def on_step_end(self, args, state, control, train_dataloader=None, model=None, **kwargs):
            self.marks.append(time.perf_counter())
            if self.dataset is None and train_dataloader is not None:
                self.dataset = train_dataloader.dataset
                self.model = model

        def steps(self) -> list[float]:
            """Seconds per optimizer step, the first (warm-up) left out."""
            return [b - a for a, b in zip(self.marks[1:], self.marks[2:])]

    return StepClock


@contextlib.contextmanager
def clocked_entry_points():
    """Time the optimizer steps of hybrid's own trainers, unchanged: each of them builds its Trainer with
    `training.time_budget.TimeBudget` (imported at call time), so a subclass that also records step
    times is put in its place for the block. Yields the list the clocks are appended to."""
    from training import time_budget

    clocks = []
    original = time_budget.TimeBudget
    Clock = step_clock()

    class ClockedBudget(original, Clock):
        def __init__(self, *a, **kw):
            original.__init__(self, *a, **kw)
            Clock.__init__(self)
            clocks.append(self)

        def on_train_begin(self, *a, **kw):
            original.on_train_begin(self, *a, **kw)
            Clock.on_train_begin(self, *a, **kw)

        def on_step_end(self, *a, **kw):
            Clock.on_step_end(self, *a, **kw)
            return original.on_step_end(self, *a, **kw)

    time_budget.TimeBudget = ClockedBudget
    try:
        yield clocks
    finally:
        time_budget.TimeBudget = original


# --- SFT ---------------------------------------------------------------------------------------------
def sft_config(work: Path, examples: Path, s: dict, out: Path):
    from training.train_settings import TrainSettings
    from tuning.tune_generator import GeneratorTuneConfig

    return GeneratorTuneConfig(out=str(out), examples=str(examples), test_fraction=0.0, val_fraction=0.0,
                               save_steps=10_000, strategy="lora",
                               train=TrainSettings(learning_rate=2e-4, batch_size=1, grad_accum=s["sft_accum"],
                                                   max_steps=s["sft_steps"], max_length=s["sft_max_length"]))


def hybrid_steps(entry_point, cfg, **kwargs) -> list[float]:
    """Seconds per optimizer step of one of hybrid's trainers (`tune_generator`, `tune_dpo`), run as
    `hybrid tune ...` runs it, into a fresh output directory."""
    import shutil

    shutil.rmtree(cfg.out, ignore_errors=True)
    with clocked_entry_points() as clocks:
        entry_point(cfg, progress=False, **kwargs)
    return clocks[-1].steps()


def sft_hybrid(cfg) -> list[float]:
    from tuning.tune_generator import tune_generator

    return hybrid_steps(tune_generator, cfg, log=lambda *a: None)


def sft_plain(cfg) -> list[float]:
    """The same training as `tune_generator` does, written as a plain PEFT + torch loop."""
    import torch
    from peft import LoraConfig, get_peft_model

    from core.jsonl import read_jsonl
    from tuning.generation import load_generator

    t = cfg.train
    torch.manual_seed(t.seed)
    model, tok, _ = load_generator(cfg.base_model, device="cpu")
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=cfg.targets, task_type="CAUSAL_LM"))
    if cfg.neftune_alpha:  # NEFTune: uniform noise on the input embeddings while training
        def neftune(module, inputs, output):
            if module.training:
                mag = cfg.neftune_alpha / math.sqrt(output.shape[1] * output.shape[2])
                output = output + torch.zeros_like(output).uniform_(-mag, mag)
            return output

        model.get_input_embeddings().register_forward_hook(neftune)
    # completion-only loss: labels -100 on the prompt, as TRL's completion_only_loss does
    rows = []
    for _, e in read_jsonl(cfg.examples, "--examples", "RAFT examples"):
        prompt = tok.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(e["prompt"] + e["completion"], tokenize=True, return_dict=False)
        prompt, full = list(prompt), list(full)[:t.max_length]
        rows.append((torch.tensor([full]), torch.tensor([[-100] * len(prompt) + full[len(prompt):]])))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=0.0)
    steps = t.max_steps
    warm = int(math.ceil(t.warmup_ratio * steps)) if t.warmup_ratio < 1 else int(t.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / max(1, warm) if i < warm else max(0.0, (steps - i) / max(1, steps - warm)))
    model.train()
    marks = [time.perf_counter()]
    g = torch.Generator().manual_seed(t.seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    k = 0
    for _ in range(steps):
        for _ in range(t.grad_accum):
            ids, labels = rows[order[k % len(rows)]]
            k += 1
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss / t.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer logs every step's loss: the same sync here
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks[1:], marks[2:])]


def run_sft(work: Path, s: dict, log) -> tuple[dict, Path]:
    index = bundled_index(work)
    n_examples = max(8, s["sft_steps"] * s["sft_accum"])
    examples = raft_examples(work, index, s["sft_distractors"], s["sft_max_length"], n_examples)
    lengths = example_lengths(examples)
    adapter = work / "sft_adapter"
    cfg = sft_config(work, examples, s, adapter)
    runs = alternate({"hybrid": lambda: sft_hybrid(cfg), "plain": lambda: sft_plain(cfg)}, s["repeats"], log)
    r = ratio(runs["hybrid"], runs["plain"])
    r["settings"] = {"model": "smollm2 (SmolLM2-135M-Instruct, fp32)", "examples": len(lengths),
                     "tokens_per_example": [min(lengths), max(lengths)], "batch": 1, "grad_accum": s["sft_accum"],
                     "max_length": s["sft_max_length"], "lora": f"r={cfg.lora_r} alpha={cfg.lora_alpha} "
                     f"dropout={cfg.lora_dropout} targets={cfg.target_modules}",
                     "gradient_checkpointing": cfg.gradient_checkpointing, "neftune_alpha": cfg.neftune_alpha,
                     "steps_per_run": s["sft_steps"], "timed_steps_per_run": s["sft_steps"] - 1,
                     "repeats": s["repeats"], "order": "hybrid, plain, hybrid, plain"}
    r["runs"] = runs
    return r, adapter


# --- DPO ---------------------------------------------------------------------------------------------
def dpo_pairs(work: Path, examples: Path) -> Path:
    """Preference pairs from the SFT examples: the RAFT answer over the abstention (the form
    `hybrid tune dpo --pairs contrastive` writes)."""
    from core.jsonl import read_jsonl, write_jsonl
    from tuning.prompting import abstain_answer

    path = work / f"pairs_{examples.stem}.jsonl"
    pairs = [{"id": e["id"], "prompt": e["prompt"], "chosen": e["completion"],
              "rejected": [{"role": "assistant", "content": abstain_answer()}], "source": "answer", "groups": []}
             for _, e in read_jsonl(examples, "x", "x")]
    write_jsonl(path, pairs)
    return path


def dpo_config(adapter: Path, pairs: Path, s: dict, out: Path):
    from training.train_settings import TrainSettings
    from tuning.tune_dpo import DPOTuneConfig

    return DPOTuneConfig(adapter=str(adapter), out=str(out), pairs_file=str(pairs),
                         train=TrainSettings(learning_rate=5e-5, batch_size=1, grad_accum=1, max_steps=s["dpo_steps"],
                                             max_length=s["sft_max_length"]))


def dpo_hybrid(cfg) -> list[float]:
    from tuning.tune_dpo import tune_dpo

    return hybrid_steps(tune_dpo, cfg, log=lambda *a: None)


def dpo_plain(cfg) -> list[float]:
    """TRL's DPOTrainer called directly: the SFT adapter trainable on the base, ref_model=None."""
    import torch

    from training.trainer_output import drop_step_printer
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    from core.jsonl import read_jsonl
    from tuning.generation import load_generator

    t = cfg.train
    torch.manual_seed(t.seed)
    base, tok, _ = load_generator(None, device="cpu")
    model = PeftModel.from_pretrained(base, cfg.adapter, is_trainable=True)
    model.train()
    pairs = [p for _, p in read_jsonl(cfg.pairs_file, "x", "x")]
    ds = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, beta=cfg.beta, loss_type=[cfg.loss_type], max_length=t.max_length,
                         per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                         learning_rate=t.learning_rate, max_steps=t.max_steps, use_cpu=True, bf16=False,
                         gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                         seed=t.seed, disable_tqdm=True, warmup_steps=t.warmup_ratio)
        clock = step_clock()()
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[clock])
        drop_step_printer(trainer, False)  # as hybrid's trainers: no per-step loss dicts on stdout
        trainer.train()
    return clock.steps()


def run_dpo(work: Path, s: dict, adapter: Path, log) -> dict:
    examples = sorted(work.glob(f"raft_d{s['sft_distractors']}_L{s['sft_max_length']}_n*.jsonl"))[0]
    pairs = dpo_pairs(work, examples)
    cfg = dpo_config(adapter, pairs, s, work / "dpo_adapter")
    runs = alternate({"hybrid": lambda: dpo_hybrid(cfg), "plain": lambda: dpo_plain(cfg)}, s["repeats"], log)
    r = ratio(runs["hybrid"], runs["plain"])
    r["settings"] = {"model": "smollm2 + the SFT row's adapter (trainable), ref = adapter disabled",
                     "pairs": sum(1 for _ in open(pairs)), "batch": 1, "grad_accum": 1, "max_length": s["sft_max_length"],
                     "beta": cfg.beta, "loss": cfg.loss_type, "gradient_checkpointing": False,
                     "steps_per_run": s["dpo_steps"], "timed_steps_per_run": s["dpo_steps"] - 1, "repeats": s["repeats"],
                     "order": "hybrid, plain, hybrid, plain"}
    r["runs"] = runs
    return r


# --- embedder ----------------------------------------------------------------------------------------
def embedder_config(index: Path, s: dict, out: Path):
    from retrieval.tune_embedder import EmbedderTuneConfig
    from training.train_settings import TrainSettings

    return EmbedderTuneConfig(index=str(index), out=str(out), qa=str(BUNDLED / "qa.jsonl"),
                              train=TrainSettings(learning_rate=5e-5, batch_size=s["emb_batch"], epochs=50,
                                                  max_steps=s["emb_steps"], max_length=s["emb_max_length"]))


def embedder_hybrid(cfg, captured: dict) -> list[float]:
    import shutil

    from retrieval.tune_embedder import tune_embedder

    shutil.rmtree(cfg.out, ignore_errors=True)
    with clocked_entry_points() as clocks:
        tune_embedder(cfg, progress=False)
    captured.setdefault("dataset", clocks[-1].dataset)  # the rows (with mined negatives) it trained on
    return clocks[-1].steps()


def embedder_plain(cfg, captured: dict) -> list[float]:
    """sentence-transformers' trainer called directly on the rows the hybrid run trained on."""
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.training_args import BatchSamplers

    from retrieval.embedder import resolve_embedder
    from training.trainer_output import drop_step_printer

    t = cfg.train
    model = SentenceTransformer(str(resolve_embedder(None)[1]), device="cpu", local_files_only=True)
    model.max_seq_length = min(t.max_length, model.max_seq_length)
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, num_train_epochs=t.epochs, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, warmup_steps=t.warmup_ratio,
            batch_sampler=BatchSamplers.NO_DUPLICATES, seed=t.seed, save_strategy="no", report_to="none",
            logging_steps=10, disable_tqdm=True, use_cpu=True, dataloader_drop_last=True)
        clock = step_clock()()
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=captured["dataset"],
                                             loss=losses.MultipleNegativesRankingLoss(model), callbacks=[clock])
        drop_step_printer(trainer, False)
        trainer.train()
    return clock.steps()


def run_embedder(work: Path, s: dict, log) -> dict:
    index = bundled_index(work)
    cfg = embedder_config(index, s, work / "embedder_out")
    captured: dict = {}
    runs = alternate({"hybrid": lambda: embedder_hybrid(cfg, captured), "plain": lambda: embedder_plain(cfg, captured)},
                     s["repeats"], log)
    r = ratio(runs["hybrid"], runs["plain"])
    ds = captured.get("dataset")
    r["settings"] = {"model": "packaged all-MiniLM-L6-v2", "rows": len(ds) if ds is not None else None,
                     "columns": list(ds.column_names) if ds is not None else None, "batch": s["emb_batch"],
                     "max_length": s["emb_max_length"], "loss": "MultipleNegativesRankingLoss",
                     "sampler": "no duplicates", "steps_per_run": s["emb_steps"],
                     "timed_steps_per_run": s["emb_steps"] - 1, "repeats": s["repeats"],
                     "order": "hybrid, plain, hybrid, plain"}
    r["runs"] = runs
    return r
