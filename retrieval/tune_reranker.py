"""Train a cross-encoder reranker on the user's own index: `hybrid tune reranker`.

One workflow, top to bottom: config -> load the index -> (question, positive chunk) pairs from a
QA file (hand-written or `hybrid synth`'s) or, without one, inverse-cloze pairs from the chunks ->
hard negatives: the index's own first-stage hits for the question that are not its gold
documents (what the reranker will be shown at search time) -> train a sentence-transformers
CrossEncoder (the packaged MiniLM body plus a fresh one-logit head; binary cross-entropy, the
positive weighted by the negatives per question) -> score the first stage alone and the first
stage reranked on the held-out questions -> save a plain CrossEncoder folder.

No reranker weights ship on PyPI, so hybrid trains one, as it trains the judge. The steps every
trainer shares (validation, callbacks, arguments, the atomic save) are training/trainer_run.py's.

Access: pairs, negatives and the held-out score use public chunks unless `--group` names more;
the reranker carries `hybrid_access.json` with those groups and the index's groups
(retrieval/reranker.py refuses it on an index without them).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from core import access
from core.errors import Arg, InputError
from core.jsonl import write_jsonl
from core.qa import load_qa
from retrieval.chunking import embed_text
from retrieval.embedder import resolve_embedder
from retrieval.metrics import retrieval_metrics
from retrieval.reranker import RERANKER_FILE, Reranker
from retrieval.retriever import Retriever
from retrieval.tune_embedder import ict_pairs, pair_problems, qa_pairs
from training import launch, trainer_run
from training.train_settings import TrainSettings, literal_problems
from training.trainer_output import drop_step_printer


@dataclass
class RerankerTuneConfig:
    """Settings of `hybrid tune reranker` (YAML keys = field names; `train:` nests TrainSettings)."""

    index: str = field(metadata={"help": "Index whose chunks the reranker learns to order."})
    out: str = field(metadata={"help": "Directory for the CrossEncoder (written atomically)."})
    qa: str | None = field(default=None, metadata={
        "help": "QA JSONL with gold_ids (hand-written or 'hybrid synth' output); without it, inverse-cloze pairs "
                "are made from the corpus.", "default_help": "inverse-cloze pairs"})
    eval_qa: str | None = field(default=None, metadata={
        "help": "Separate held-out QA file: train on all of --qa, score on this (for a fixed benchmark split)."})
    test_fraction: float = field(default=0.2, metadata={
        "help": "Share of questions (or, without --qa, documents) held out when no --eval-qa is given."})
    base: str = field(default="minilm", metadata={
        "help": "Body of the cross-encoder: minilm | mpnet | a local transformers/sentence-transformers dir."})
    mode: Literal["dense", "lexical", "hybrid"] | None = field(default=None, metadata={
        "help": "First stage that proposes candidates (and the negatives): dense | lexical | hybrid.",
        "default_help": "the index's"})
    candidates: int = field(default=20, metadata={
        "help": "First-stage hits the reranker re-scores at search time (recorded in the reranker)."})
    num_negatives: int = field(default=3, metadata={
        "help": "Hard negatives per question: the best first-stage hits outside its gold documents."})
    ict_queries_per_chunk: int = field(default=1, metadata={
        "help": "Inverse-cloze queries per chunk when no --qa is given."})
    train: TrainSettings = field(default_factory=lambda: TrainSettings(
        learning_rate=3e-5, batch_size=16, epochs=1, max_length=256), metadata={"help": "training settings"})

    def problems(self) -> list[str]:
        out = self.train.problems() + pair_problems(self) + literal_problems(self)
        out += launch.problems(self.train, allowed=("none",))  # one process: small models, minutes
        for name in ("candidates", "num_negatives"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.candidates <= self.num_negatives:
            out.append("--candidates must be larger than --num-negatives")
        return out


def mine_rows(retriever: Retriever, pairs, golds: list[set[str]], cfg: RerankerTuneConfig) -> list[dict]:
    """Training rows {query, passage, label, chunk_id, groups}: each pair's positive (1) and its
    hardest first-stage hits outside the question's gold documents (0)."""
    queries = [q for q, _, _ in pairs]
    hits = retriever.search_batch(queries, k=cfg.candidates, groups=cfg.train.groups, mode=cfg.mode, rerank=False)
    rows = []
    for (q, positive, chunk), gold, found in zip(pairs, golds, hits):
        rows.append({"query": q, "passage": positive, "label": 1.0, "chunk_id": chunk.chunk_id,
                     "groups": list(chunk.groups)})
        for h in [h for h in found if h.doc_id not in gold][:cfg.num_negatives]:
            rows.append({"query": q, "passage": embed_text(h.title, h.text), "label": 0.0, "chunk_id": h.chunk_id,
                         "groups": list(h.groups)})
    return rows


def _pair_golds(pairs, cfg: RerankerTuneConfig) -> list[set[str]]:
    """Each training pair's gold documents: the QA row's gold_ids (all of them: another gold document
    is no negative), or the chunk's own document for an inverse-cloze pair."""
    if not cfg.qa:
        return [{c.doc_id} for _, _, c in pairs]
    by_question: dict[str, set[str]] = {}
    for r in load_qa(cfg.qa):
        by_question.setdefault(r.question, set()).update(r.gold_ids)
    return [by_question.get(q, set()) | {c.doc_id} for q, _, c in pairs]


@dataclass(frozen=True)
class RerankerTuneResult:
    """What `hybrid tune reranker` measured and made; saved as the reranker's hybrid_reranker.json (`asdict`),
    whose first four fields retrieval/reranker.py reads back."""

    candidates: int
    mode: str
    base: str
    index_groups: list[str]
    first_stage: dict  # retrieval metrics of the first stage alone on the held-out questions
    reranked: dict  # the same, reranked
    # a reranker that orders held-out questions worse than the first stage should not be used
    worse_than_first_stage: bool
    pairs_source: str  # "qa" | "inverse_cloze"
    train_queries: int
    train_rows: int
    train_negatives: int
    train_steps: int
    test_queries: int
    stopped_early: bool
    seconds: float
    stage_seconds: dict[str, float]
    out: str
    config: dict
    precision: str
    access: dict


def tune_reranker(cfg: RerankerTuneConfig, progress: bool = True) -> RerankerTuneResult:
    """Run the whole workflow; see the module docstring.

    Stages, in order: config -> load -> data (pairs, hard negatives) -> train -> evaluate -> save.
    """
    run = trainer_run.begin(cfg, progress, RERANKER_FILE, "exists and is not a reranker; choose a new directory")
    retriever, base_name, base_path = load(cfg, run)
    pairs, test_q, test_g = qa_pairs(retriever, cfg) if cfg.qa else ict_pairs(retriever, cfg)
    if not pairs:
        raise InputError("no training pairs: the index shows this trainer no chunks with questions; add questions "
                         f"or pass {Arg('groups')}")
    if not test_q:
        raise InputError("the held-out split is empty; raise --test-fraction or add questions")
    t_mine = time.perf_counter()
    rows = mine_rows(retriever, pairs, _pair_golds(pairs, cfg), cfg)
    t_train = time.perf_counter()
    negatives = sum(1 for r in rows if r["label"] == 0.0)
    if negatives == 0:
        raise InputError(f"--index {cfg.index}: no hard negatives found (every hit is a gold document); the index "
                         f"needs more documents than the questions' gold ones")
    scope = access.record(cfg.train.groups, {g for r in rows for g in r["groups"]})
    trainer, model, meters = train(cfg, run, base_path, rows, negatives / len(pairs))
    t_eval = time.perf_counter()
    # evaluate: first stage alone vs reranked, held-out questions
    t = cfg.train
    info = {"candidates": cfg.candidates, "mode": cfg.mode or retriever.search_settings["mode"],
            "base": base_name, "index_groups": sorted(retriever.index_groups())}
    first = retriever.search_batch(test_q, k=cfg.candidates, groups=t.groups, mode=cfg.mode, rerank=False)
    reranker = Reranker(run.out, model, info, access.training_groups(t.groups), run.precision)
    reranked = reranker.rerank_batch(test_q, first, k=cfg.candidates, groups=t.groups)
    result = RerankerTuneResult(
        **info,
        first_stage=retrieval_metrics([[h.doc_id for h in hs] for hs in first], test_g),
        reranked=retrieval_metrics([[h.doc_id for h in hs] for hs in reranked], test_g),
        worse_than_first_stage=_mrr(reranked, test_g) < _mrr(first, test_g),
        pairs_source="qa" if cfg.qa else "inverse_cloze", train_queries=len(pairs), train_rows=len(rows),
        train_negatives=negatives, train_steps=trainer.state.global_step, test_queries=len(test_q),
        stopped_early=meters.budget.stopped_early, seconds=run.seconds(),
        stage_seconds={"load_and_pairs": round(t_mine - run.started, 1), "mine": round(t_train - t_mine, 1),
                       "train": round(t_eval - t_train, 1), "evaluate": round(time.perf_counter() - t_eval, 1)},
        out=str(run.out), config=asdict(cfg), precision=run.precision, access=scope)

    def write(stage: Path) -> None:
        model.save(str(stage))
        # the training rows beside the model, each with its chunk's groups (as RAFT and the embedder do)
        write_jsonl(stage / "train_rows.jsonl", rows)

    trainer_run.save(trainer, run, write, RERANKER_FILE, asdict(result), scope)
    return result


def load(cfg: RerankerTuneConfig, run: trainer_run.Run) -> tuple[Retriever, str, Path]:
    """Load stage: the index, and the cross-encoder body (its name and directory).

    Raises:
        InputError: a --group the index has no documents of, an unknown --base, or a tuned body whose
            access scope the trainer does not hold.
    """
    retriever = Retriever.load(cfg.index, precision=run.precision)
    if unknown := sorted(set(cfg.train.groups) - retriever.index_groups()):
        raise InputError(f"{Arg('groups', unknown)}: index {cfg.index} has no documents of it; name only "
                         f"groups of this corpus")
    try:
        base_name, base_path = resolve_embedder(cfg.base)
    except InputError as exc:  # its message names --embedder; here the flag is --base
        raise InputError(str(exc).replace("--embedder", "--base", 1)) from None
    if (base_path / access.ACCESS_FILE).exists():  # a tuned embedder as the body brings its scope along
        access.check(base_path, cfg.train.groups, f"--base {cfg.base}")
    return retriever, base_name, base_path


def train(cfg: RerankerTuneConfig, run: trainer_run.Run, base_path: Path, rows: list[dict], pos_weight: float):
    """Train stage: a CrossEncoder (the body plus a fresh one-logit head), binary cross-entropy with the
    positive weighted by `pos_weight` (negatives per question). Returns (trainer, model, meters)."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    dataset = Dataset.from_dict({k: [r[k] for r in rows] for k in ("query", "passage", "label")})
    model = CrossEncoder(str(base_path), num_labels=1, max_length=cfg.train.max_length, device=run.device,
                         local_files_only=True)
    meters = trainer_run.meters(cfg.train, run)
    with tempfile.TemporaryDirectory(prefix="hybrid-reranker-") as scratch:  # the trainer's output dir; nothing kept
        args = CrossEncoderTrainingArguments(**trainer_run.arguments(cfg.train, run, output_dir=scratch,
                                                                     logging_steps=10))
        # one positive among num_negatives negatives per question: weight it back to balance
        loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(float(pos_weight)))
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                      callbacks=meters.callbacks)
        drop_step_printer(trainer, run.progress)
        trainer.train()
    return trainer, model, meters


def _mrr(hits, golds) -> float:
    return retrieval_metrics([[h.doc_id for h in hs] for hs in hits], golds)["mrr@10"]
