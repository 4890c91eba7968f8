"""`hybrid tune dpo`: DPO for factuality on top of a RAFT adapter (Tian et al. 2023, FactTune).

One workflow, top to bottom: config -> load base + SFT adapter -> preference pairs (JSONL)
-> memory plan (a pair = two sequences) -> TRL DPOTrainer -> save the adapter atomically.

Pairs are built offline, FactTune-style. For each training question the SFT model
samples `n_samples` answers (temperature 1.0) to its RAFT prompt (oracle present
with probability `p_oracle`, hard distractors otherwise). Each sample is scored:
+2 correct (gold match), -2 wrong or an answer to an unanswerable / oracle-less
question, +1 abstaining when the oracle is absent, -1 abstaining when it is
present, +0.5 per verified quote, -0.5 per unverified quote, and -1 when the judge
(if given) calls it unsupported. A malformed completion (`parse_answer`) scores below
every other, so it is never preferred. The best sample is preferred over the worst; ties
are skipped. When the oracle is withheld, the abstention is preferred over a
fabricated answer; when the oracle is present and a sample abstained, the gold-quoting
answer is preferred over that abstention (`answer_over_abstain`; without these pairs a weak
SFT model's best samples are abstentions and DPO learns to abstain everywhere, as measured on
HaluEval). Dataset-provided wrong answers (`--wrong-answers` JSONL of
`{"id", "wrong_answer"}`, e.g. HaluEval's `hallucinated_answer`) add a second source:
the gold-quoting RAFT answer preferred over the wrong one.

`pairs="contrastive"` samples nothing: every answerable training question appears twice,
with its oracle (the gold-quoting answer preferred over the abstention) and with the oracle
replaced by one more distractor (the abstention preferred over that same answer, now made
up). The two pairs hold the same two completions with the preference flipped, so the pair
mix cannot favour either side (the sampled pairs set that lean by their mix: on HaluEval they
taught abstaining everywhere, or almost never). Measured on HaluEval, greedy decoding still
leaned to answering afterwards while the abstention score separated the two kinds better
(dev AUROC 0.88 -> 0.90): `hybrid tune calibrate` sets the cut.

Training continues the SFT adapter; TRL keeps a frozen copy of that adapter as
the reference policy ("ref"), so the reference is the SFT model without a second
copy of the base weights.

Access: as in SFT, public chunks only unless `groups` names more; the SFT adapter's
scope must be within those groups (its weights already hold that text), and the
DPO adapter is tagged with them.

The steps every trainer shares (validation, the launcher, callbacks, arguments, the rank-0 save)
are training/trainer_run.py's; with `--distributed`, `python -m tuning.tune_dpo --config FILE` is
what each launched process runs (the end of this file).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from core import access
from core.errors import Arg, InputError
from core.jsonl import read_jsonl, write_jsonl
from core.qa import load_qa, split_rows
from retrieval.retriever import Retriever
from training import launch, run_record, trainer_run
from training.memory_plan import GiB, ModelShape, describe, plan
from training.train_settings import TrainSettings, literal_problems
from training.trainer_output import drop_step_printer, no_dataset_bars
from tuning.generation import load_generator
from tuning.grading import classify
from tuning.judge import Judge
from tuning.prompting import abstain_answer, cot_answer, parse_answer, quote_in, sequence_tokens
from tuning.raft_data import RaftSettings, build_examples, check_rows, oracle_answer, visible_rows

@dataclass
class DPOTuneConfig:
    """Settings of `hybrid tune dpo` (YAML keys = field names; `train:` nests TrainSettings)."""

    adapter: str = field(metadata={"help": "SFT adapter dir from 'hybrid tune generator'."})
    out: str = field(metadata={"help": "Adapter directory to write (atomically)."})
    index: str = field(default="", metadata={"help": "Index the SFT adapter was trained with (with --qa)."})
    qa: str = field(default="", metadata={"help": "QA JSONL (the SFT run's held-out questions are excluded)."})
    pairs_file: str = field(default="", metadata={
        "help": "Train on prepared preference pairs instead of building them from --index/--qa (an earlier run's "
                "dpo_pairs.jsonl, or a file of that form; no index needed)."})
    wrong_answers: str | None = field(default=None, metadata={
        "help": 'JSONL of {"id", "wrong_answer"}: dataset-provided wrong answers as extra rejected answers.'})
    judge: str | None = field(default=None, metadata={"help": "Groundedness judge dir; unsupported samples score lower."})
    pairs: Literal["sampled", "contrastive"] = field(default="sampled", metadata={
        "help": "sampled = FactTune: the SFT model's samples, scored; contrastive = each question with and without "
                "its oracle, the same answer and abstention flipped (no sampling)."})
    n_samples: int = field(default=4, metadata={"help": "Samples per question at --temperature (sampled pairs)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (sampled pairs)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens per sample (sampled pairs)."})
    p_oracle: float = field(default=0.5, metadata={"help": "Share of prompts with the oracle (sampled pairs)."})
    num_distractors: int = field(default=4, metadata={"help": "Distractor chunks per prompt."})
    mode: Literal["dense", "lexical", "hybrid"] | None = field(default=None, metadata={
        "help": "Retrieval that mines the distractors: dense, lexical (BM25) or hybrid.", "default_help": "the index's"})
    answer_over_abstain: bool = field(default=True, metadata={
        "help": "With the oracle present and a sample abstaining, prefer the gold-quoting answer over the abstention."})
    test_fraction: float = field(default=0.2, metadata={
        "help": "Questions held back, split as the SFT run split them (its held-out ids are excluded as well)."})
    max_questions: int = field(default=0, metadata={"help": "Use at most N training questions; 0 = all."})
    beta: float = field(default=0.1, metadata={"help": "DPO beta (strength of the pull away from the reference)."})
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = field(default="sigmoid", metadata={"help": "DPO loss."})
    train: TrainSettings = field(default_factory=lambda: TrainSettings(learning_rate=5e-5, batch_size=1, grad_accum=4),
                                 metadata={"help": "training settings"})

    def problems(self) -> list[str]:
        out = self.train.problems() + literal_problems(self)
        if self.n_samples < 2:
            out.append("--n-samples must be >= 2 (a pair needs two samples)")
        if self.beta <= 0 or self.temperature <= 0:
            out.append("--beta and --temperature must be > 0")
        if self.pairs_file and (self.index or self.qa or self.wrong_answers):
            out.append("--pairs-file replaces --index, --qa and --wrong-answers; give one or the other")
        elif not self.pairs_file and self.index and not self.qa:
            out.append("--qa is required with --index; without hand-written questions, write them from the documents "
                       "first: hybrid synth --index INDEX --out QA.jsonl")
        elif not self.pairs_file and not (self.index and self.qa):
            out.append("--index and --qa are required (or --pairs-file with prepared preference pairs)")
        if self.max_new_tokens < 1:
            out.append("--max-new-tokens must be >= 1")
        if not 0 <= self.p_oracle <= 1 or not 0 <= self.test_fraction < 1:
            out.append("--p-oracle must be in [0, 1] and --test-fraction in [0, 1)")
        if self.num_distractors < 0 or self.max_questions < 0:
            out.append("--num-distractors and --max-questions must be >= 0")
        if self.train.distributed != "none" and not self.pairs_file:
            # every rank would sample its own pairs from the same questions: different data per rank
            out.append(f"--distributed {self.train.distributed}: sampled pairs would differ per process; sample them "
                       f"once (one process), then train on them with --pairs-file OUT/dpo_pairs.jsonl")
        return out + launch.problems(self.train, allowed=("ddp", "fsdp2", "zero2", "zero3"))


# Below any scored completion: one that breaks the template must never be the preferred sample,
# though as an abstention it would otherwise score +1 without the oracle.
MALFORMED_SCORE = float("-inf")


def score(text: str, golds, passages: list[dict], oracle: bool, unsupported: bool | None) -> float:
    """FactTune-style factuality score of one sampled completion (see module docstring)."""
    parsed = parse_answer(text)
    if parsed.malformed:
        return MALFORMED_SCORE
    label = classify(parsed.answer, parsed.abstained, golds if oracle else [])
    s = {"correct": 2.0, "hallucinated": -2.0}.get(label, 1.0 if not oracle or not golds else -1.0)
    for q in parsed.quotes:
        s += 0.5 if any(quote_in(q, p["text"]) for p in passages) else -0.5
    if unsupported:
        s -= 1.0
    return s


def gold_answer(ex: dict, row, chunks: dict) -> str | None:
    """The RAFT target for an example that holds its oracle: the oracle sentence quoted, then the
    gold answer (one the oracle contains, when there is one); None without an oracle chunk."""
    oracle = next((chunks[c] for c in ex["chunk_ids"] if chunks[c].doc_id in row.gold_ids), None)
    if oracle is None or not row.answers:
        return None
    answer, quote = oracle_answer(row, oracle.text)
    return cot_answer(quote, answer)


def build_pairs(examples: list[dict], rows_by_id: dict, chunks: dict, model, tok, cfg: DPOTuneConfig,
                judge=None) -> list[dict]:
    """Sample, score and pair; returns DPO rows {id, prompt, chosen, rejected, source, groups}.

    Args:
        examples: RAFT examples (prompt, oracle, chunk_ids).
        rows_by_id: QA rows by id (gold answers).
        chunks: chunk_id -> Hit, for quote verification against the example's passages.
    """
    import torch

    pairs = []
    for ex in examples:
        row = rows_by_id[ex["id"]]
        passages = [{"text": chunks[c].text} for c in ex["chunk_ids"]]
        text = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
        enc = tok([text], return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=1.0,
                                 max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.n_samples,
                                 pad_token_id=tok.pad_token_id)
        samples = [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
        unsup = [None] * len(samples)
        if judge is not None:
            unsup = judge.unsupported([row.question] * len(samples), [parse_answer(s).answer for s in samples],
                                      [passages] * len(samples))
        scored = sorted(zip((score(s, row.answers, passages, ex["oracle"], u) for s, u in zip(samples, unsup)), samples),
                        key=lambda t: t[0])
        (lo, worst), (hi, best) = scored[0], scored[-1]
        if ex["oracle"] and row.answers and cfg.answer_over_abstain:
            abstained = [s for _, s in scored if parse_answer(s).abstained]
            if abstained:  # the oracle is there: the gold-quoting answer beats giving up
                gold = gold_answer(ex, row, chunks)
                if gold is not None:
                    pairs.append({"id": ex["id"], "prompt": ex["prompt"], "chosen": [{"role": "assistant", "content": gold}],
                                  "rejected": [{"role": "assistant", "content": abstained[0]}], "source": "answer", "groups": ex["groups"]})
                    continue
        if not ex["oracle"]:
            fabricated = [s for sc, s in scored if not parse_answer(s).abstained]
            if fabricated:  # withheld oracle: the abstention beats a made-up answer
                pairs.append({"id": ex["id"], "prompt": ex["prompt"], "chosen": [{"role": "assistant", "content": abstain_answer()}],
                              "rejected": [{"role": "assistant", "content": fabricated[0]}], "source": "abstain", "groups": ex["groups"]})
                continue
        if hi > lo and best != worst:
            pairs.append({"id": ex["id"], "prompt": ex["prompt"], "chosen": [{"role": "assistant", "content": best}],
                          "rejected": [{"role": "assistant", "content": worst}], "source": "sampled", "groups": ex["groups"]})
    return pairs


def contrastive_pairs(examples: list[dict], rows_by_id: dict, chunks: dict) -> list[dict]:
    """Per answerable question: answer > abstain with the oracle, abstain > the same answer without it.

    Args:
        examples: RAFT examples built with `no_oracle="both"` (each answerable question twice).

    Returns:
        DPO rows {id, prompt, chosen, rejected, source ("answer" | "abstain"), groups}.
    """
    golds = {}  # id -> the gold-quoting answer, written from the oracle the with-oracle prompt holds
    for ex in examples:
        if ex["oracle"] and (gold := gold_answer(ex, rows_by_id[ex["id"]], chunks)) is not None:
            golds[ex["id"]] = gold
    out = []
    for ex in examples:
        if ex["id"] not in golds:  # unanswerable rows: no answer to reject
            continue
        answer, abstain = golds[ex["id"]], abstain_answer()
        chosen, rejected = (answer, abstain) if ex["oracle"] else (abstain, answer)
        out.append({"id": ex["id"], "prompt": ex["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "source": "answer" if ex["oracle"] else "abstain", "groups": ex["groups"]})
    return out


def dataset_pairs(examples: list[dict], rows_by_id: dict, wrong: dict[str, str], chunks: dict) -> list[dict]:
    """Gold-quoting answer preferred over a dataset-provided wrong answer (oracle present only)."""
    out = []
    for ex in examples:
        row = rows_by_id[ex["id"]]
        if ex["id"] not in wrong or not ex["oracle"] or not row.answers:
            continue
        gold = gold_answer(ex, row, chunks)
        if gold is None:
            continue
        out.append({"id": ex["id"], "prompt": ex["prompt"],
                    "chosen": [{"role": "assistant", "content": gold}],
                    "rejected": [{"role": "assistant", "content": f"##Reason: The documents say the answer is "
                                                                  f"{wrong[ex['id']]}. ##Answer: {wrong[ex['id']]}"}],
                    "source": "dataset", "groups": ex["groups"]})
    return out


def _qa_pairs(cfg: DPOTuneConfig, held: set[str], sft_run: dict, model, tok) -> tuple[list[dict], list[str]]:
    """Pairs for the SFT run's training questions in --qa, mined from --index.

    Returns:
        (pairs, ids of questions skipped because their gold documents are out of the trainer's view).
    """
    retriever = Retriever.load(cfg.index)
    rows = load_qa(cfg.qa)
    check_rows(rows, retriever, cfg.qa)
    rows, dropped = visible_rows(rows, retriever, cfg.train.groups)
    sft_seed = run_record.train_settings(sft_run)["seed"]
    train_rows, _ = split_rows(rows, cfg.test_fraction, sft_seed) if cfg.test_fraction else (rows, [])
    train_rows = [r for r in train_rows if r.id not in held]
    if cfg.max_questions:
        train_rows = random.Random(cfg.train.seed).sample(train_rows, min(cfg.max_questions, len(train_rows)))
    rows_by_id = {r.id: r for r in train_rows}
    settings = RaftSettings(p_oracle=cfg.p_oracle, num_distractors=cfg.num_distractors, mode=cfg.mode, seed=cfg.train.seed,
                            no_oracle="both" if cfg.pairs == "contrastive" else "abstain")
    examples = build_examples(train_rows, retriever, settings, groups=cfg.train.groups)
    chunks = {h.chunk_id: h for h in retriever.chunks(groups=access.training_groups(cfg.train.groups))}
    if cfg.pairs == "contrastive":  # contrastive pairs score nothing: no judge
        pairs = contrastive_pairs(examples, rows_by_id, chunks)
    else:
        judge = Judge.load(cfg.judge, groups=cfg.train.groups) if cfg.judge else None
        pairs = build_pairs(examples, rows_by_id, chunks, model, tok, cfg, judge)
    if cfg.wrong_answers:
        pairs += dataset_pairs(examples, rows_by_id, read_wrong_answers(cfg.wrong_answers), chunks)
    return pairs, dropped


def read_wrong_answers(path: str | Path) -> dict[str, str]:
    """{question id: wrong answer} from a JSONL of {"id", "wrong_answer"} (empty answers skipped)."""
    out = {}
    for n, j in read_jsonl(path, "--wrong-answers", 'wrong answers ({"id", "wrong_answer"})'):
        if not isinstance(j, dict) or not isinstance(j.get("id"), (str, int)) or isinstance(j.get("id"), bool) \
                or not isinstance(j.get("wrong_answer"), str):
            raise InputError(f'--wrong-answers {path}:{n}: each line must be {{"id": str, "wrong_answer": str}}')
        if j["wrong_answer"]:
            out[str(j["id"])] = j["wrong_answer"]
    return out


def load_pairs(path: str | Path, held: set[str], groups) -> list[dict]:
    """Prepared preference pairs (a dpo_pairs.jsonl this step wrote, or any JSONL of that form).

    Args:
        path: JSONL of {"id", "prompt": [messages], "chosen": [assistant message], "rejected": [...],
            "groups": [...] (optional, [] = public)}.
        held: question ids the SFT run held out; pairs about them are refused (they stay unseen).
        groups: the trainer's access groups; pairs holding other restricted text are refused.

    Returns:
        The pairs, each with "source" and "groups" filled in when absent.
    """
    pairs = []
    for n, pair in read_jsonl(path, "--pairs-file", "preference pairs"):
        if not (isinstance(pair, dict) and isinstance(pair.get("id"), str)
                and all(isinstance(pair.get(k), list) and pair[k] for k in ("prompt", "chosen", "rejected"))):
            raise InputError(f"--pairs-file {path}:{n}: needs 'id', 'prompt', 'chosen' and 'rejected' (chat messages), "
                             f"as hybrid tune dpo writes dpo_pairs.jsonl")
        pairs.append({"source": "file", "groups": [], **pair})
    unseen = sorted({q["id"] for q in pairs} & held)
    if unseen:
        raise InputError(f"--pairs-file {path}: {len(unseen)} pairs are about questions the SFT adapter held out "
                         f"(e.g. {', '.join(unseen[:3])}); drop them so they stay unseen")
    outside = sorted({g for q in pairs for g in q["groups"]} - set(access.training_groups(groups)))
    if outside:
        raise InputError(f"--pairs-file {path}: pairs hold chunks restricted to group(s) {', '.join(outside)}; "
                         f"name them with {Arg('groups')} or drop those pairs")
    return pairs


def _sources(pairs: list[dict]) -> list[str]:
    known = ["sampled", "abstain", "answer", "dataset"]
    return known + sorted({p["source"] for p in pairs} - set(known))


@dataclass(frozen=True)
class DPOTuneResult:
    """What `hybrid tune dpo` made: the summary the CLI prints, and the run record as written."""

    out: Path
    pairs: int
    by_source: dict[str, int]  # pairs per source: sampled, abstain, answer, dataset (, file)
    steps: int
    minutes: float
    record: dict  # OUT/hybrid_run.json, as written

    @classmethod
    def from_record(cls, out: Path, record: dict) -> "DPOTuneResult":
        return cls(out=out, pairs=record["data"]["pairs"], by_source=record["data"]["by_source"],
                   steps=record["steps"], minutes=record["minutes"], record=record)


def tune_dpo(cfg: DPOTuneConfig, progress: bool = True, log=print) -> DPOTuneResult:
    """Run the workflow; the result holds the run record written to OUT/hybrid_run.json.

    Stages, in order: config -> load -> data -> plan -> train -> save.
    """
    run = trainer_run.begin(cfg, progress, run_record.RUN_FILE, "exists and is not a hybrid adapter; choose a new directory")
    sft_dir = Path(cfg.adapter)
    sft_run = run_record.read_sft(sft_dir, f"--adapter {sft_dir}")  # every field read below, checked now
    access.check(sft_dir, cfg.train.groups, f"--adapter {sft_dir}")
    if trainer_run.relaunch("tuning.tune_dpo", cfg, run, log):  # rank 0 of the N processes wrote OUT
        return DPOTuneResult.from_record(run.out, run_record.read(run.out, f"--out {run.out}"))
    held = set(sft_run["data"]["held_out_ids"])
    prepared = load_pairs(cfg.pairs_file, held, cfg.train.groups) if cfg.pairs_file else None  # checked before any load
    model, tok = load_policy(cfg, sft_dir, sft_run)
    # data: the SFT run's training questions only (its held-out questions stay unseen)
    if prepared is not None:
        pairs, dropped = prepared, []
    else:
        pairs, dropped = _qa_pairs(cfg, held, sft_run, model, tok)
    if not pairs:
        raise InputError("no preference pairs: every question's samples tied; raise --n-samples or --temperature")
    mplan = memory_plan(cfg, run, pairs, sft_run, model, tok)
    log(describe(mplan).replace(" tokens):", " tokens, a pair = 2 sequences):", 1))
    trainer, meters = train(cfg, run, pairs, mplan, model, tok)
    measured = meters.peak.record(mplan["estimates"]["lora"]["total"])
    log(f"memory: planned {measured['planned_bytes'] / GiB:.2f} GiB, measured peak {measured['peak_bytes'] / GiB:.2f} "
        f"GiB ({measured['what']})")
    record = {"kind": "hybrid-generator-adapter", "stage": "dpo", "strategy": sft_run["strategy"],
              "base_model": sft_run["base_model"], "sft_adapter": str(sft_dir), "config": asdict(cfg),
              "precision": run.precision,
              "access": access.record(cfg.train.groups, sorted({g for p in pairs for g in p["groups"]})),
              "data": {"held_out_ids": sorted(held), "pairs": len(pairs), "skipped_restricted": len(dropped),
                       "by_source": {s: sum(p["source"] == s for p in pairs) for s in _sources(pairs)},
                       "questions": len({p["id"] for p in pairs}), "pairs_file": cfg.pairs_file},
              "train_log": [h for h in trainer.state.log_history if "loss" in h], "steps": trainer.state.global_step,
              "stopped_early": meters.budget.stopped_early, "memory_plan": mplan, "memory_measured": measured,
              "minutes": run.minutes()}
    state = launch.full_state_dict(trainer)  # every rank: a collective when the weights are sharded

    def write(tmp: Path) -> None:
        trainer.model.save_pretrained(str(tmp), selected_adapters=["default"], state_dict=state)
        tok.save_pretrained(str(tmp))
        write_jsonl(tmp / "dpo_pairs.jsonl", pairs)

    trainer_run.save(trainer, run, write, run_record.RUN_FILE, record, record["access"],
                     scratch=run.out.parent / f"{run.out.name}.checkpoints")
    return DPOTuneResult.from_record(run.out, record)


def load_policy(cfg: DPOTuneConfig, sft_dir: Path, sft_run: dict):
    """Load stage: the base model with the SFT adapter on it, trainable (TRL keeps that adapter frozen
    as the reference); refused when the base is not the one the adapter was trained on."""
    import torch
    from peft import PeftModel

    torch.manual_seed(cfg.train.seed)
    base, tok, info = load_generator(sft_run["base_model"]["name"])
    if info.fingerprint != sft_run["base_model"]["fingerprint"]:
        raise InputError(f"--adapter {sft_dir}: trained on another base model than {info.name}; retrain it")
    model = PeftModel.from_pretrained(base, str(sft_dir), is_trainable=True)
    model.eval()
    return model, tok


def memory_plan(cfg: DPOTuneConfig, run: trainer_run.Run, pairs: list[dict], sft_run: dict, model, tok) -> dict:
    """Plan stage: a pair is two sequences (chosen, rejected) in one batch; it is planned as one
    sequence of twice the length, since every per-token term scales with the token count. The base
    is in float (LoRA, no checkpointing), whatever the SFT run used.

    Raises:
        InputError: not even one pair fits.
    """
    longest = min(cfg.train.max_length, max(sequence_tokens(tok, p["prompt"], p[k][0]["content"])[1]
                                            for p in pairs for k in ("chosen", "rejected")))
    sft_cfg = sft_run["config"]
    targets = "all-linear" if sft_cfg["target_modules"] == "all-linear" else sft_cfg["target_modules"].split(",")
    mplan = plan(ModelShape.from_config(model.get_base_model().config), "lora", 2 * longest, cfg.train.batch_size, False,
                 sft_cfg["lora_r"], targets, run.device, precision=run.precision)
    if not mplan["fits"]:
        raise InputError(f"--max-length {cfg.train.max_length}: one pair of {longest}-token sequences needs "
                         f"~{mplan['estimates']['lora']['total'] / GiB:.1f} GiB but {mplan['budget'] / GiB:.1f} GiB "
                         f"is free; lower --max-length (longer pairs are truncated)")
    return mplan


def train(cfg: DPOTuneConfig, run: trainer_run.Run, pairs: list[dict], mplan: dict, model, tok):
    """Train stage: TRL's DPOTrainer on the pairs. Returns (trainer, its meters)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model.train()
    t = cfg.train
    args = DPOConfig(**trainer_run.arguments(
        t, run, output_dir=str(run.out.parent / f"{run.out.name}.checkpoints"), beta=cfg.beta,
        loss_type=[cfg.loss_type], max_length=t.max_length,
        # the plan may split the micro-batch; accumulation keeps the pairs per optimizer step
        per_device_train_batch_size=mplan["batch"], gradient_accumulation_steps=t.grad_accum * mplan["accum_factor"],
        activation_checkpointing=False, logging_steps=1))
    ds = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    meters = trainer_run.meters(t, run)
    with no_dataset_bars():
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=meters.callbacks)
        drop_step_printer(trainer, run.progress)
        trainer.train()
    return trainer, meters


if __name__ == "__main__":  # one process of a --distributed run (training/launch.py starts it)
    trainer_run.main(DPOTuneConfig, lambda cfg: tune_dpo(cfg, log=trainer_run.stderr))
