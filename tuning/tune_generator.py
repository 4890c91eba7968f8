"""`hybrid tune generator`: RAFT supervised fine-tuning with LoRA or QLoRA.

One workflow, top to bottom: config -> QA split and RAFT data (JSONL; or a prepared
RAFT JSONL, `--examples`, which needs no index) -> memory
plan -> load base (fp32, or 4-bit NF4 for QLoRA) -> TRL SFTTrainer + PEFT LoRA,
completion-only loss, NEFTune, gradient accumulation/checkpointing, validation
loss, checkpoints -> save the adapter atomically with its run record and loss
curve -> optionally a merged full model. The steps every trainer shares (validation, the
launcher, callbacks, arguments, the rank-0 save) are training/trainer_run.py's.

With `--distributed`, `python -m tuning.tune_generator --config FILE` is what each launched
process runs (the end of this file).

Questions are split by a seeded hash: `test_fraction` of them are held back
(never trained on; `hybrid eval` scores them), `val_fraction` of the rest give
the validation loss.

Access: public chunks only unless `groups` names more (core/access.py); the
adapter (and the merged model) is tagged with exactly those groups.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from core import access
from core.errors import Arg, InputError
from core.jsonl import write_jsonl
from core.qa import id_bucket, load_qa, split_rows
from retrieval.retriever import Retriever
from training import launch, run_record, trainer_run
from training.memory_plan import GiB, ModelShape, describe, plan
from training.train_settings import TrainSettings, literal_problems
from training.trainer_output import drop_step_printer, no_dataset_bars
from tuning.generation import BASE_MODEL_HELP, load_generator, load_tokenizer, resolve_generator
from tuning.prompting import sequence_tokens
from tuning.raft_data import RaftSettings, build_examples, check_rows, load_examples, stats, visible_rows

# hybrid's own warnings: on a module logger, not the root one, which in a library user's process printed them
# as `WARNING:root:...` (and set up the root logger for every other library too)
logger = logging.getLogger(__name__)


@dataclass
class GeneratorTuneConfig:
    """Settings of `hybrid tune generator` (YAML keys = field names; `train:` nests TrainSettings)."""

    out: str = field(metadata={"help": "Adapter directory to write (atomically)."})
    index: str = field(default="", metadata={"help": "Index to mine oracle and distractor chunks from (with --qa)."})
    qa: str = field(default="", metadata={"help": "QA JSONL; answerable rows need gold_ids."})
    examples: str = field(default="", metadata={
        "help": "Train on prepared RAFT examples instead of --index/--qa (an adapter's raft_train.jsonl, or a file "
                "of that form; no index needed)."})
    base_model: str | None = field(default=None, metadata={
        "help": BASE_MODEL_HELP, "default_help": "smollm2"})
    strategy: Literal["auto", "full", "lora", "qlora"] = field(default="auto", metadata={
        "help": "auto = QLoRA on CUDA, LoRA on CPU, whichever fits the memory plan."})
    # RAFT data
    p_oracle: float = field(default=0.8, metadata={"help": "Share of examples that include the oracle chunk."})
    num_distractors: int = field(default=4, metadata={"help": "Hard distractor chunks per example."})
    mode: Literal["dense", "lexical", "hybrid"] | None = field(default=None, metadata={
        "help": "Retrieval that mines the distractors: dense, lexical (BM25) or hybrid.", "default_help": "the index's"})
    no_oracle: Literal["abstain", "answer", "both"] = field(default="abstain", metadata={
        "help": "Target when the oracle is left out; both = every question with and without its oracle "
                "(--p-oracle ignored)."})
    answer_format: Literal["cot", "short"] = field(default="cot", metadata={
        "help": "cot = quote + answer (RAFT); short = the answer alone."})
    test_fraction: float = field(default=0.2, metadata={
        "help": "Questions held back from training (OUT/held_out.jsonl, for hybrid eval)."})
    val_fraction: float = field(default=0.1, metadata={"help": "Share of the rest for the validation loss."})
    # LoRA
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    target_modules: str = field(default="q_proj,v_proj", metadata={
        "help": "Comma-separated module names, or all-linear."})
    # trainer
    neftune_alpha: float = field(default=5.0, metadata={"help": "NEFTune noise alpha; 0 = off."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward."})
    save_steps: int = field(default=25, metadata={"help": "Checkpoint and validate every N steps."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run from OUT.checkpoints/."})
    merge: bool = field(default=False, metadata={"help": "Also export a merged full model to OUT/merged."})
    train: TrainSettings = field(default_factory=lambda: TrainSettings(learning_rate=2e-4, batch_size=1, grad_accum=4),
                                 metadata={"help": "training settings"})

    def problems(self) -> list[str]:
        out = self.train.problems() + literal_problems(self)
        if self.examples and (self.index or self.qa):
            out.append("--examples replaces --index and --qa; give one or the other")
        elif not self.examples and self.index and not self.qa:
            out.append("--qa is required with --index; without hand-written questions, write them from the documents "
                       "first: hybrid synth --index INDEX --out QA.jsonl")
        elif not self.examples and not (self.index and self.qa):
            out.append("--index and --qa are required (or --examples with prepared RAFT examples)")
        if not 0 <= self.p_oracle <= 1:
            out.append("--p-oracle must be in [0, 1]")
        if self.num_distractors < 0:
            out.append("--num-distractors must be >= 0")
        if not 0 <= self.test_fraction < 1 or not 0 <= self.val_fraction < 1:
            out.append("--test-fraction and --val-fraction must be in [0, 1)")
        for name in ("lora_r", "lora_alpha", "save_steps"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.lora_dropout < 1:
            out.append("--lora-dropout must be in [0, 1)")
        if self.neftune_alpha < 0:
            out.append("--neftune-alpha must be >= 0")
        return out + launch.problems(self.train, allowed=("ddp", "fsdp2", "zero2", "zero3"),
                                     quantized=self.strategy == "qlora", merge=self.merge)

    @property
    def targets(self) -> list[str] | str:
        return "all-linear" if self.target_modules == "all-linear" else [t.strip() for t in self.target_modules.split(",") if t.strip()]


def _check_lengths(examples: list[dict], tok, max_length: int) -> dict:
    """Token lengths of prompt + completion; refuse when a prompt alone does not fit."""
    lengths = [sequence_tokens(tok, e["prompt"], e["completion"][0]["content"]) for e in examples]
    too_long = [f for _, f in lengths if f > max_length]
    if too_long:
        raise InputError(f"--max-length {max_length} is smaller than {len(too_long)} of {len(lengths)} examples "
                         f"(longest prompt + answer: {max(too_long)} tokens); raise --max-length or lower --num-distractors")
    return {"max_tokens": max(f for _, f in lengths), "mean_tokens": sum(f for _, f in lengths) / len(lengths),
            # the positions whose logits the loss needs (tuning/completion_loss.py): the longest completion
            "scored_tokens": max(f - p for p, f in lengths)}


def _prepared_examples(cfg: GeneratorTuneConfig) -> tuple[list[dict], list[dict], list[str]]:
    """Examples from --examples, split like QA rows: by a seeded hash of the question id, so both
    examples of a question (`no_oracle="both"`) land on the same side.

    Returns:
        (train examples, validation examples, held-out question ids (not trained on)).
    """
    examples = load_examples(cfg.examples)
    allowed = set(access.training_groups(cfg.train.groups))
    outside = sorted({g for e in examples for g in e["groups"]} - allowed)
    if outside:  # the adapter's tag must cover every text its weights may hold
        raise InputError(f"--examples {cfg.examples}: examples hold chunks restricted to group(s) {', '.join(outside)}; "
                         f"name them with {Arg('groups')} or drop those examples")
    held = {e["id"] for e in examples if id_bucket(e["id"], cfg.train.seed) < cfg.test_fraction}
    val = {e["id"] for e in examples if e["id"] not in held and id_bucket(e["id"], cfg.train.seed + 1) < cfg.val_fraction}
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


@dataclass
class RaftData:
    """What the data stage hands on: the examples and which questions were held back or skipped."""

    settings: RaftSettings
    train: list[dict]
    val: list[dict]
    held_out: list  # QARow of the held-back questions (none with --examples)
    held_ids: list[str]
    dropped: list[str]  # questions whose gold documents the trainer may not read


@dataclass(frozen=True)
class GeneratorTuneResult:
    """What `hybrid tune generator` made: the summary the CLI prints, and the run record as written."""

    out: Path
    strategy: str
    steps: int
    minutes: float
    examples: int
    with_oracle: int
    abstain_targets: int
    final_val_loss: float | None
    loss_png: Path
    record: dict  # OUT/hybrid_run.json, as written

    @classmethod
    def from_record(cls, out: Path, record: dict) -> "GeneratorTuneResult":
        train = record["data"]["train"]
        return cls(out=out, strategy=record["strategy"], steps=record["steps"], minutes=record["minutes"],
                   examples=train["examples"], with_oracle=train["with_oracle"],
                   abstain_targets=train["abstain_targets"], final_val_loss=record["final_val_loss"],
                   loss_png=out / "loss.png", record=record)


def tune_generator(cfg: GeneratorTuneConfig, progress: bool = True, log=print) -> GeneratorTuneResult:
    """Run the whole workflow; the result holds the run record also written to OUT/hybrid_run.json.

    Stages, in order: config -> data -> plan -> load -> train -> save.
    """
    run = trainer_run.begin(cfg, progress, run_record.RUN_FILE, "exists and is not a hybrid adapter; choose a new directory")
    if trainer_run.relaunch("tuning.tune_generator", cfg, run, log):  # rank 0 of the N processes wrote OUT
        written = run_record.read(run.out, f"--out {run.out}")
        return GeneratorTuneResult.from_record(run.out, written)
    ckpt_dir = run.out.parent / f"{run.out.name}.checkpoints"
    if ckpt_dir.exists() and not cfg.resume:
        shutil.rmtree(ckpt_dir)
    data = raft_data(cfg)
    mplan, lengths = memory_plan(cfg, data, run)  # refuses a bad model or a plan that does not fit, before warning
    if data.dropped:
        logger.warning(f"access: {len(data.dropped)} questions skipped, their gold documents are restricted to groups "
                       f"not named with {Arg('groups')} (e.g. {', '.join(data.dropped[:3])})")
    log(describe(mplan))
    with no_dataset_bars():
        trainer, model_info, meters = load_trainer(cfg, data, mplan, ckpt_dir, run)
        resume = cfg.resume and any(ckpt_dir.glob("checkpoint-*"))
        if cfg.resume and not resume:
            log(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        trainer.train(resume_from_checkpoint=True if resume else None)
        final_eval = trainer.evaluate() if data.val else {}
    measured = meters.peak.record(mplan["estimates"][mplan["chosen"]]["total"])
    log(f"memory: planned {measured['planned_bytes'] / GiB:.2f} GiB, measured peak "
        f"{measured['peak_bytes'] / GiB:.2f} GiB ({measured['what']})")
    record = {
        "kind": "hybrid-generator-adapter", "strategy": mplan["chosen"],
        "base_model": {"name": model_info.name, "fingerprint": model_info.fingerprint},
        "config": asdict(cfg), "raft": asdict(data.settings) if not cfg.examples else {"examples": cfg.examples},
        "access": access.record(cfg.train.groups, stats(data.train + data.val)["groups_seen"]),
        "data": {"train": stats(data.train), "val": stats(data.val), **lengths, "skipped_restricted": len(data.dropped),
                 "held_out_ids": data.held_ids, "qa": cfg.qa, "index": cfg.index, "examples": cfg.examples},
        "memory_plan": mplan, "memory_measured": measured, "device": mplan["device"], "precision": mplan["precision"],
        "train_loss": [h for h in trainer.state.log_history if "loss" in h],
        "val_loss": [h for h in trainer.state.log_history if "eval_loss" in h],
        "final_val_loss": final_eval.get("eval_loss"), "steps": trainer.state.global_step,
        "stopped_early": meters.budget.stopped_early, "minutes": run.minutes(),
    }
    state = launch.full_state_dict(trainer)  # every rank: a collective when the weights are sharded
    trainer_run.save(trainer, run, lambda tmp: save(cfg, trainer, data, record, state, tmp), run_record.RUN_FILE,
                     record, record["access"], scratch=ckpt_dir)
    return GeneratorTuneResult.from_record(run.out, record)


def raft_data(cfg: GeneratorTuneConfig) -> RaftData:
    """Data stage: RAFT examples mined from --index/--qa (split by question), or read from --examples."""
    settings = RaftSettings(p_oracle=cfg.p_oracle, num_distractors=cfg.num_distractors, mode=cfg.mode, no_oracle=cfg.no_oracle,
                            answer_format=cfg.answer_format, seed=cfg.train.seed)
    if cfg.examples:
        train_ex, val_ex, held_ids = _prepared_examples(cfg)
        # the file's author chose the examples; access is checked on their groups
        return RaftData(settings, train_ex, val_ex, [], held_ids, [])
    retriever = Retriever.load(cfg.index)
    rows = load_qa(cfg.qa)
    check_rows(rows, retriever, cfg.qa)
    # Questions about documents out of the trainer's view are dropped (the split is a per-id
    # hash, so the remaining held-out questions are the same as with every group named).
    rows, dropped = visible_rows(rows, retriever, cfg.train.groups)
    seed = cfg.train.seed
    train_rows, held_out = split_rows(rows, cfg.test_fraction, seed) if cfg.test_fraction else (rows, [])
    train_rows, val_rows = split_rows(train_rows, cfg.val_fraction, seed + 1) if cfg.val_fraction else (train_rows, [])
    # one call per split: each split's examples draw from their own seeded stream, whatever the other split holds
    train_ex, val_ex = (build_examples(split, retriever, settings, groups=cfg.train.groups) if split else []
                        for split in (train_rows, val_rows))
    if not train_ex:
        raise InputError(f"--qa {cfg.qa}: no training questions left after the held-out split")
    return RaftData(settings, train_ex, val_ex, held_out, [r.id for r in held_out], dropped)


def memory_plan(cfg: GeneratorTuneConfig, data: RaftData, run: trainer_run.Run) -> tuple[dict, dict]:
    """Plan stage: the strategy and micro-batch that fit this device, and the examples' token lengths.

    Raises:
        InputError: an example longer than --max-length, or not even one sequence fits.
    """
    from transformers import AutoConfig

    if not data.train:
        raise InputError(f"--examples {cfg.examples}: no training examples left after the held-out split")
    _, path = resolve_generator(cfg.base_model)
    lengths = _check_lengths(data.train + data.val, load_tokenizer(path), cfg.train.max_length)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(str(path)))
    # Batches are padded to their longest sequence, so the longest example (not --max-length)
    # bounds the per-token terms.
    seq_len = min(cfg.train.max_length, lengths["max_tokens"])
    mplan = plan(shape, cfg.strategy, seq_len, cfg.train.batch_size, cfg.gradient_checkpointing, cfg.lora_r,
                 cfg.targets, run.device, precision=run.precision, scored_tokens=lengths["scored_tokens"])
    if not mplan["fits"]:
        need = min(mplan["estimates"][s]["total"] for s in mplan["order"])
        raise InputError(f"--strategy {cfg.strategy}: needs ~{need / GiB:.1f} GiB for one sequence of {seq_len} tokens "
                         f"but {mplan['budget'] / GiB:.1f} GiB is free; lower --max-length, keep "
                         f"--gradient-checkpointing, or use --strategy qlora")
    return {**mplan, "device": run.device}, lengths


def load_trainer(cfg: GeneratorTuneConfig, data: RaftData, mplan: dict, ckpt_dir: Path, run: trainer_run.Run):
    """Load stage: the base model (fp32 weights, or 4-bit NF4 for QLoRA) inside a TRL SFTTrainer with PEFT
    LoRA, completion-only loss with the LM head on the completion only (tuning/completion_loss.py), bf16
    autocast where the plan's precision is bf16, NEFTune, gradient accumulation and checkpointing,
    validation loss.

    Returns:
        (trainer, the base model's info, its meters: time budget and peak memory).
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    from tuning.completion_loss import CompletionSFTTrainer

    t, strategy = cfg.train, mplan["chosen"]
    torch.manual_seed(t.seed)
    model, tok, info = load_generator(cfg.base_model, quantize="4bit" if strategy == "qlora" else "none", device=run.device)
    cols = ["prompt", "completion"]
    train_ds = Dataset.from_list([{c: e[c] for c in cols} for e in data.train])
    val_ds = Dataset.from_list([{c: e[c] for c in cols} for e in data.val]) if data.val else None
    peft_config = None if strategy == "full" else LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.targets,
        task_type="CAUSAL_LM")
    args = SFTConfig(**trainer_run.arguments(
        t, run, output_dir=str(ckpt_dir), max_length=t.max_length, completion_only_loss=True, packing=False,
        # the plan may split the micro-batch; accumulation keeps the sequences per optimizer step
        per_device_train_batch_size=mplan["batch"], per_device_eval_batch_size=mplan["batch"],
        gradient_accumulation_steps=t.grad_accum * mplan["accum_factor"],
        # transformers 5's names: the old gradient_checkpointing* warn a FutureWarning on every run
        neftune_noise_alpha=cfg.neftune_alpha or None, activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        bf16=mplan["precision"] == "bf16", fp16=False,
        eval_strategy="steps" if val_ds is not None else "no", eval_steps=cfg.save_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, logging_steps=1,
        data_seed=t.seed, dataloader_num_workers=0, remove_unused_columns=True,
        # several sequences a batch pad to the longest: batch those of similar length (less padding computed).
        # By the batch asked for, not the micro-batch: the sampler groups an optimizer step's sequences, so a
        # batch the plan splits still sees the same sequences per step.
        train_sampling_strategy="group_by_length" if t.batch_size > 1 else "random"))
    meters = trainer_run.meters(t, run)
    trainer = CompletionSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                                   processing_class=tok, peft_config=peft_config, callbacks=meters.callbacks)
    drop_step_printer(trainer, run.progress)
    return trainer, info, meters


def save(cfg: GeneratorTuneConfig, trainer, data: RaftData, record: dict, state: dict | None, tmp: Path) -> None:
    """Save stage, into the staging directory (trainer_run.save swaps it in whole, with the run record
    and access tag): adapter, tokenizer, the loss curve, the RAFT examples, the held-back questions as a
    QA file, and optionally a merged full model."""
    trainer.model.save_pretrained(str(tmp), state_dict=state)  # state: the gathered weights of a launched run
    trainer.processing_class.save_pretrained(str(tmp))
    _loss_plot(trainer.state.log_history, tmp / "loss.png")
    write_jsonl(tmp / "raft_train.jsonl", data.train)
    # The held-back questions as a QA file, so `hybrid eval OUT/held_out.jsonl` scores unseen questions.
    if not cfg.examples:
        write_jsonl(tmp / "held_out.jsonl", [{"id": r.id, "question": r.question, "answers": list(r.answers),
                                              "gold_ids": list(r.gold_ids)} for r in data.held_out])
    if data.val:
        write_jsonl(tmp / "raft_val.jsonl", data.val)
    if cfg.merge:
        merged = trainer.model.merge_and_unload() if record["strategy"] != "full" else trainer.model
        merged.save_pretrained(str(tmp / "merged"))
        trainer.processing_class.save_pretrained(str(tmp / "merged"))
        access.write(tmp / "merged", record["access"])  # the merged weights hold the same text


if __name__ == "__main__":  # one process of a --distributed run (training/launch.py starts it)
    trainer_run.main(GeneratorTuneConfig, lambda cfg: tune_generator(cfg, log=trainer_run.stderr))
