"""`hybrid tune generator`: RAFT supervised fine-tuning with LoRA or QLoRA.

One workflow, top to bottom: config -> QA split and RAFT data (JSONL; or a prepared
RAFT JSONL, `--examples`, which needs no index) -> memory
plan -> load base (fp32, or 4-bit NF4 for QLoRA) -> TRL SFTTrainer + PEFT LoRA,
completion-only loss, NEFTune, gradient accumulation/checkpointing, validation
loss, checkpoints -> save the adapter atomically with its run record and loss
curve -> optionally a merged full model.

Questions are split by a seeded hash: `test_fraction` of them are held back
(never trained on; `hybrid eval` scores them), `val_fraction` of the rest give
the validation loss.

Access: public chunks only unless `groups` names more (retrieval/access.py); the
adapter (and the merged model) is tagged with exactly those groups.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from retrieval import access
from retrieval.atomic import swap_dir_into_place, write_text_atomic
from retrieval.errors import InputError
from retrieval.qa import load_qa, split_rows
from retrieval.retriever import Retriever
from tuning.memory_plan import GiB, ModelShape, describe, plan
from tuning.prompting import sequence_tokens
from tuning.raft_data import RaftSettings, build_examples, check_rows, load_examples, stats, visible_rows, write_jsonl

RUN_FILE = "hybrid_run.json"


@dataclass
class GeneratorTuneConfig:
    """Settings of `hybrid tune generator` (YAML keys = field names)."""

    out: str
    index: str = ""  # with qa: mine RAFT examples from this index ...
    qa: str = ""
    examples: str = ""  # ... or train on prepared RAFT examples (JSONL), no index needed
    base_model: str | None = None
    strategy: Literal["auto", "full", "lora", "qlora"] = "auto"
    # RAFT data
    p_oracle: float = 0.8
    num_distractors: int = 4
    no_oracle: Literal["abstain", "answer", "both"] = "abstain"
    answer_format: Literal["cot", "short"] = "cot"
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    # LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: str = "q_proj,v_proj"
    # training
    max_length: int = 1024
    batch_size: int = 1
    grad_accum: int = 4
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    epochs: float = 1.0
    max_steps: int = 0
    neftune_alpha: float = 5.0
    gradient_checkpointing: bool = True
    save_steps: int = 25
    max_minutes: float = 0.0  # stop at the first step past this wall time and save; 0 = no limit
    seed: int = 13
    resume: bool = False
    merge: bool = False
    groups: list[str] = field(default_factory=list)  # access groups whose restricted chunks may be learned

    def problems(self) -> list[str]:
        out = access.group_problems(self.groups)
        if self.examples and (self.index or self.qa):
            out.append("--examples replaces --index and --qa; give one or the other")
        elif not self.examples and not (self.index and self.qa):
            out.append("--index and --qa are required (or --examples with prepared RAFT examples)")
        if not 0 <= self.p_oracle <= 1:
            out.append("--p-oracle must be in [0, 1]")
        if self.num_distractors < 0:
            out.append("--num-distractors must be >= 0")
        for name, allowed in (("strategy", ("auto", "full", "lora", "qlora")), ("no_oracle", ("abstain", "answer", "both")),
                              ("answer_format", ("cot", "short"))):
            if getattr(self, name) not in allowed:
                out.append(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
        if not 0 <= self.test_fraction < 1 or not 0 <= self.val_fraction < 1:
            out.append("--test-fraction and --val-fraction must be in [0, 1)")
        for name in ("lora_r", "lora_alpha", "max_length", "batch_size", "grad_accum", "save_steps"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.lora_dropout < 1:
            out.append("--lora-dropout must be in [0, 1)")
        if self.learning_rate <= 0 or self.epochs <= 0 or self.max_steps < 0 or self.neftune_alpha < 0 or self.max_minutes < 0:
            out.append("--learning-rate and --epochs must be > 0, --max-steps, --max-minutes and --neftune-alpha >= 0")
        return out

    @property
    def targets(self) -> list[str] | str:
        return "all-linear" if self.target_modules == "all-linear" else [t.strip() for t in self.target_modules.split(",") if t.strip()]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_lengths(examples: list[dict], tok, max_length: int) -> dict:
    """Token lengths of prompt + completion; refuse when a prompt alone does not fit."""
    lengths = [sequence_tokens(tok, e["prompt"], e["completion"][0]["content"]) for e in examples]
    too_long = [f for _, f in lengths if f > max_length]
    if too_long:
        raise InputError(f"--max-length {max_length} is smaller than {len(too_long)} of {len(lengths)} examples "
                         f"(longest prompt + answer: {max(too_long)} tokens); raise --max-length or lower --num-distractors")
    return {"max_tokens": max(f for _, f in lengths), "mean_tokens": sum(f for _, f in lengths) / len(lengths)}


def _prepared_examples(cfg: GeneratorTuneConfig) -> tuple[list[dict], list[dict], list[str]]:
    """Examples from --examples, split like QA rows: by a seeded hash of the question id, so both
    examples of a question (`no_oracle="both"`) land on the same side.

    Returns:
        (train examples, validation examples, held-out question ids (not trained on)).
    """
    from retrieval.qa import id_bucket

    examples = load_examples(cfg.examples)
    allowed = set(access.training_groups(cfg.groups))
    outside = sorted({g for e in examples for g in e["groups"]} - allowed)
    if outside:  # the adapter's tag must cover every text its weights may hold
        raise InputError(f"--examples {cfg.examples}: examples hold chunks restricted to group(s) {', '.join(outside)}; "
                         f"name them with --group or drop those examples")
    held = {e["id"] for e in examples if id_bucket(e["id"], cfg.seed) < cfg.test_fraction}
    val = {e["id"] for e in examples if e["id"] not in held and id_bucket(e["id"], cfg.seed + 1) < cfg.val_fraction}
    return [e for e in examples if e["id"] not in held | val], [e for e in examples if e["id"] in val], sorted(held)


def _loss_plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title("hybrid tune generator")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tune_generator(cfg: GeneratorTuneConfig, progress: bool = True, log=print) -> dict:
    """Run the whole workflow; returns the run record also written to OUT/hybrid_run.json."""
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig
    from trl import SFTConfig, SFTTrainer

    from tuning.generator import load_generator, load_tokenizer, resolve_generator
    from tuning.peak_memory import PeakMemory  # these two import transformers: kept out of CLI start-up
    from tuning.time_budget import TimeBudget

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / RUN_FILE).exists():
        raise InputError(f"--out {out}: exists and is not a hybrid adapter; choose a new directory")
    ckpt_dir = out.parent / f"{out.name}.checkpoints"
    if ckpt_dir.exists() and not cfg.resume:
        shutil.rmtree(ckpt_dir)

    # --- data --------------------------------------------------------------------------
    settings = RaftSettings(p_oracle=cfg.p_oracle, num_distractors=cfg.num_distractors, no_oracle=cfg.no_oracle,
                            answer_format=cfg.answer_format, seed=cfg.seed)
    if cfg.examples:
        train_ex, val_ex, held_ids = _prepared_examples(cfg)
        dropped = []  # the file's author chose the examples; access is checked on their groups
    else:
        retriever = Retriever.load(cfg.index)
        rows = load_qa(cfg.qa)
        check_rows(rows, retriever, cfg.qa)
        # Questions about documents out of the trainer's view are dropped (the split is a per-id
        # hash, so the remaining held-out questions are the same as with every group named).
        rows, dropped = visible_rows(rows, retriever, cfg.groups)
        train_rows, held_out = split_rows(rows, cfg.test_fraction, cfg.seed) if cfg.test_fraction else (rows, [])
        train_rows, val_rows = split_rows(train_rows, cfg.val_fraction, cfg.seed + 1) if cfg.val_fraction else (train_rows, [])
        held_ids = [r.id for r in held_out]
        train_ex = build_examples(train_rows, retriever, settings, groups=cfg.groups)
        val_ex = build_examples(val_rows, retriever, settings, groups=cfg.groups) if val_rows else []
    if not train_ex:
        raise InputError(f"--{'examples' if cfg.examples else 'qa'} {cfg.examples or cfg.qa}: no training questions "
                         f"left after the held-out split")

    device = _device()
    name, path = resolve_generator(cfg.base_model)
    length_stats = _check_lengths(train_ex + val_ex, load_tokenizer(path), cfg.max_length)

    # --- memory plan ---------------------------------------------------------------------
    shape = ModelShape.from_config(AutoConfig.from_pretrained(str(path)))
    # Batches are padded to their longest sequence, so the longest example (not --max-length)
    # bounds the per-token terms.
    seq_len = min(cfg.max_length, length_stats["max_tokens"])
    mplan = plan(shape, cfg.strategy, seq_len, cfg.batch_size, cfg.gradient_checkpointing, cfg.lora_r,
                 cfg.targets, device)
    if not mplan["fits"]:
        need = min(mplan["estimates"][s]["total"] for s in mplan["order"])
        raise InputError(f"--strategy {cfg.strategy}: needs ~{need / GiB:.1f} GiB for one sequence of {seq_len} tokens but "
                         f"{mplan['budget'] / GiB:.1f} GiB is free; lower --max-length, keep --gradient-checkpointing, "
                         f"or use --strategy qlora")
    strategy = mplan["chosen"]
    log(describe(mplan))
    if dropped:
        log(f"access: {len(dropped)} questions skipped, their gold documents are restricted to groups not named "
            f"with --group (e.g. {', '.join(dropped[:3])})")

    # --- load --------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model, tok, info = load_generator(cfg.base_model, quantize="4bit" if strategy == "qlora" else "none", device=device)
    cols = ["prompt", "completion"]
    train_ds = Dataset.from_list([{c: e[c] for c in cols} for e in train_ex])
    val_ds = Dataset.from_list([{c: e[c] for c in cols} for e in val_ex]) if val_ex else None
    peft_config = None if strategy == "full" else LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.targets,
        task_type="CAUSAL_LM")

    # --- train -------------------------------------------------------------------------
    args = SFTConfig(
        output_dir=str(ckpt_dir), max_length=cfg.max_length, completion_only_loss=True, packing=False,
        # the plan may split the micro-batch; accumulation keeps the sequences per optimizer step
        per_device_train_batch_size=mplan["batch"], per_device_eval_batch_size=mplan["batch"],
        gradient_accumulation_steps=cfg.grad_accum * mplan["accum_factor"], learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        neftune_noise_alpha=cfg.neftune_alpha or None, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        use_cpu=device == "cpu", bf16=device == "cuda" and strategy != "full", fp16=False,
        eval_strategy="steps" if val_ds is not None else "no", eval_steps=cfg.save_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, logging_steps=1,
        seed=cfg.seed, data_seed=cfg.seed, report_to="none", disable_tqdm=not progress,
        dataloader_num_workers=0, remove_unused_columns=True)
    budget, peak = TimeBudget(cfg.max_minutes), PeakMemory(device)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tok, peft_config=peft_config, callbacks=[budget, peak])
    resume = cfg.resume and any(ckpt_dir.glob("checkpoint-*"))
    if cfg.resume and not resume:
        log(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
    trainer.train(resume_from_checkpoint=True if resume else None)
    final_eval = trainer.evaluate() if val_ds is not None else {}
    measured = peak.record(mplan["estimates"][strategy]["total"])
    log(f"memory: planned {mplan['estimates'][strategy]['total'] / GiB:.2f} GiB, measured peak "
        f"{measured['peak_bytes'] / GiB:.2f} GiB ({measured['what']})")

    # --- save (atomic: the previous adapter stays until the new one is complete) ---------
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        trainer.model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        write_jsonl(tmp / "raft_train.jsonl", train_ex)
        # The held-back questions as a QA file, so `hybrid eval OUT/held_out.jsonl` scores unseen questions.
        if not cfg.examples:
            write_jsonl(tmp / "held_out.jsonl", [{"id": r.id, "question": r.question, "answers": list(r.answers),
                                                  "gold_ids": list(r.gold_ids)} for r in held_out])
        if val_ex:
            write_jsonl(tmp / "raft_val.jsonl", val_ex)
        history = trainer.state.log_history
        _loss_plot(history, tmp / "loss.png")
        record = {
            "kind": "hybrid-generator-adapter", "strategy": strategy,
            "base_model": {"name": info.name, "fingerprint": info.fingerprint},
            "config": asdict(cfg), "raft": asdict(settings) if not cfg.examples else {"examples": cfg.examples},
            "access": access.record(cfg.groups, stats(train_ex + val_ex)["groups_seen"]),
            "data": {"train": stats(train_ex), "val": stats(val_ex), **length_stats, "skipped_restricted": len(dropped),
                     "held_out_ids": held_ids, "qa": cfg.qa, "index": cfg.index,
                     "examples": cfg.examples},
            "memory_plan": mplan, "memory_measured": measured, "device": device,
            "train_loss": [h for h in history if "loss" in h], "val_loss": [h for h in history if "eval_loss" in h],
            "final_val_loss": final_eval.get("eval_loss"), "steps": trainer.state.global_step,
            "stopped_early": budget.stopped_early,
            "minutes": round((time.perf_counter() - t0) / 60, 2),
        }
        write_text_atomic(tmp / RUN_FILE, json.dumps(record, indent=2))
        access.write(tmp, record["access"])
        if cfg.merge:
            merged = trainer.model.merge_and_unload() if strategy != "full" else trainer.model
            merged.save_pretrained(str(tmp / "merged"))
            tok.save_pretrained(str(tmp / "merged"))
            access.write(tmp / "merged", record["access"])  # the merged weights hold the same text
        swap_dir_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return record
