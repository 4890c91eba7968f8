"""Contrastive fine-tuning of the embedder on the user's own corpus.

One workflow, top to bottom: config -> load index and base embedder -> build
(query, positive) pairs -> mine hard negatives from the index's chunks ->
train with MultipleNegativesRankingLoss (in-batch + hard negatives) and a
no-duplicates batch sampler -> save a plain sentence-transformers folder ->
score base and tuned embedder on a held-out split.

Pairs come from a QA file (question -> the gold document's chunk that holds
the answer) or, without one, from the corpus itself by inverse cloze: a
sentence is the query and its chunk, with the sentence cut out, the positive.

Access: pairs, negatives and the held-out score use public chunks only unless
`groups` names more; the saved model is tagged with those groups (access.py).

The steps every trainer shares (validation, the launcher, callbacks, arguments, the rank-0 save)
are training/trainer_run.py's; with `--distributed`, `python -m retrieval.tune_embedder --config
FILE` is what each launched process runs (the end of this file).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core import access
from core.errors import InputError
from core.jsonl import write_jsonl
from core.qa import load_qa, split_rows
from retrieval.chunking import embed_text
from retrieval.metrics import retrieval_metrics
from retrieval.retriever import Hit, Retriever
from training import launch, trainer_run
from training.precision import autocast, device_of
from training.train_settings import TrainSettings
from training.trainer_output import drop_step_printer

log = logging.getLogger(__name__)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class EmbedderTuneConfig:
    """Settings of `hybrid tune embedder` (YAML keys = field names; `train:` nests TrainSettings)."""

    index: str = field(metadata={"help": "Index built with the base embedder (its chunks are the corpus)."})
    out: str = field(metadata={"help": "Directory for the tuned sentence-transformers model (written atomically)."})
    qa: str | None = field(default=None, metadata={
        "help": "QA JSONL with gold_ids for (question, gold chunk) pairs; without it, inverse-cloze pairs are made "
                "from the corpus.", "default_help": "inverse-cloze pairs"})
    eval_qa: str | None = field(default=None, metadata={
        "help": "Separate held-out QA file: train on all of --qa, score on this (for a fixed benchmark split)."})
    test_fraction: float = field(default=0.2, metadata={
        "help": "Share of questions (or, without --qa, documents) held out when no --eval-qa is given."})
    num_negatives: int = field(default=1, metadata={"help": "Hard negatives mined per pair."})
    mine_range: int = field(default=20, metadata={"help": "Negatives are drawn from the top N chunks of the index."})
    relative_margin: float = field(default=0.05, metadata={
        "help": "A negative must score below (1 - margin) x the positive's score, so near-duplicates of the "
                "positive are not taught as wrong."})
    ict_queries_per_chunk: int = field(default=1, metadata={
        "help": "Inverse-cloze queries per chunk when no --qa is given."})
    train: TrainSettings = field(default_factory=lambda: TrainSettings(
        learning_rate=5e-5, batch_size=32, epochs=2, max_length=256), metadata={"help": "training settings"})

    def problems(self) -> list[str]:
        out = self.train.problems() + pair_problems(self)
        for name in ("num_negatives", "mine_range"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.train.batch_size < 2:
            out.append("--batch-size must be >= 2 (in-batch negatives need company)")
        if not 0 <= self.relative_margin < 1:
            out.append("--relative-margin must be in [0, 1)")
        if self.mine_range <= self.num_negatives:
            out.append("--mine-range must be larger than --num-negatives")
        return out + launch.problems(self.train, allowed=("ddp",))  # 22M-109M parameters: a copy fits any device


def pair_problems(cfg) -> list[str]:
    """Checks of the fields `qa_pairs` and `ict_pairs` read (qa, eval_qa, test_fraction,
    ict_queries_per_chunk), for every config that takes its pairs from them."""
    out = []
    if cfg.eval_qa and not cfg.qa:
        out.append("--eval-qa needs --qa (inverse-cloze pairs are split by document)")
    if not 0 < cfg.test_fraction < 1:
        out.append("--test-fraction must be between 0 and 1")
    if cfg.ict_queries_per_chunk < 1:
        out.append("--ict-queries-per-chunk must be >= 1")
    return out


def qa_pairs(retriever: Retriever, cfg: EmbedderTuneConfig):
    """(train pairs (query, positive text, positive chunk), test queries, test golds) from the QA file."""
    # a question written from restricted text (hybrid synth's `groups`) is that text: skipped outside them
    rows = [r for r in load_qa(cfg.qa) if r.gold_ids and r.answers and access.may_learn(r.groups, cfg.train.groups)]
    if not rows:
        raise InputError(f"--qa {cfg.qa}: no answerable rows with 'gold_ids'; add gold document ids to the questions")
    in_index = {c.doc_id for c in retriever.chunks(include_restricted=True)}
    by_doc: dict[str, list[Hit]] = {}
    for c in retriever.chunks(groups=access.training_groups(cfg.train.groups)):
        by_doc.setdefault(c.doc_id, []).append(c)
    missing = sorted({g for r in rows for g in r.gold_ids if g not in in_index})
    if missing:
        raise InputError(f"--qa {cfg.qa}: gold_ids not in index {cfg.index}: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}; rebuild the index from the matching corpus")
    if cfg.eval_qa:
        train, test = rows, [r for r in load_qa(cfg.eval_qa) if r.gold_ids and r.answers]
        leaked = {r.question for r in train} & {r.question for r in test}
        if leaked:
            raise InputError(f"--eval-qa {cfg.eval_qa}: {len(leaked)} questions also appear in --qa {cfg.qa}; "
                             f"held-out questions must not be trained on")
        missing = sorted({g for r in test for g in r.gold_ids if g not in in_index})
        if missing:
            raise InputError(f"--eval-qa {cfg.eval_qa}: gold_ids not in index {cfg.index}: {', '.join(missing[:5])}")
    else:
        train, test = split_rows(rows, cfg.test_fraction, cfg.train.seed)
    # Questions whose gold documents are restricted to groups the trainer did not name are left out.
    train = [r for r in train if any(g in by_doc for g in r.gold_ids)]
    test = [r for r in test if any(g in by_doc for g in r.gold_ids)]
    pairs = []
    for row in train:
        candidates = [c for g in row.gold_ids for c in by_doc.get(g, [])]
        # The chunk quoting the answer is the positive; failing that, the first chunk.
        with_answer = [c for c in candidates if any(a.lower() in c.text.lower() for a in row.answers)]
        best = (with_answer or candidates)[0]
        pairs.append((row.question, embed_text(best.title, best.text), best))
    return pairs, [r.question for r in test], [set(r.gold_ids) for r in test]


def ict_pairs(retriever: Retriever, cfg: EmbedderTuneConfig):
    """Inverse-cloze pairs (sentence, its chunk without that sentence, chunk); documents split train/test."""
    rng = random.Random(cfg.train.seed)
    chunks = retriever.chunks(groups=access.training_groups(cfg.train.groups))
    docs = sorted({c.doc_id for c in chunks})
    rng.shuffle(docs)
    n_test = max(1, int(len(docs) * cfg.test_fraction))
    test_docs = set(docs[:n_test])
    pairs, test_q, test_g = [], [], []
    for c in chunks:
        sentences = [s.strip() for s in _SENTENCE.split(c.text) if len(s.split()) >= 6]
        for s in rng.sample(sentences, min(cfg.ict_queries_per_chunk, len(sentences))):
            if c.doc_id in test_docs:
                test_q.append(s)
                test_g.append({c.doc_id})
            else:
                # Cutting the sentence out 90% of the time (as in ICT) teaches topic, not string match.
                rest = c.text.replace(s, " ") if rng.random() < 0.9 else c.text
                pairs.append((s, embed_text(c.title, rest), c))
    return pairs, test_q, test_g


def rank_docs(model, chunks: list[Hit], queries: list[str], depth: int = 50,
              precision: str = "fp32") -> list[list[str]]:
    """Rank chunk doc ids for queries by exact inner product under a SentenceTransformer (owner-side eval),
    encoding at `precision` (fp32, or bf16 autocast)."""
    def encode(texts: list[str]) -> np.ndarray:
        with autocast(precision, device_of(model)):
            vecs = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vecs, dtype=np.float32)

    import faiss  # imported on use, as in retrieval.index

    corpus = encode([embed_text(c.title, c.text) for c in chunks])
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    _, rows = index.search(encode(queries), min(depth, len(chunks)))
    return [[chunks[r].doc_id for r in row if r >= 0] for row in rows]


@contextlib.contextmanager
def _bars(progress: bool, model):
    """Under -q, sentence-transformers' own progress bars off: the miner's (encoding, the FAISS search) and
    the model card's widget examples are drawn whatever they are asked, so during the call those modules'
    tqdm names are disabled ones and `model`'s encoders ignore `show_progress_bar=True`. With progress on,
    nothing changes."""
    if progress:
        yield
        return
    from unittest import mock

    from sentence_transformers.base import model_card
    from sentence_transformers.util import hard_negatives
    from tqdm import tqdm, trange

    def silent(encode):
        return lambda *args, **kwargs: encode(*args, **{**kwargs, "show_progress_bar": False})

    off = functools.partial(tqdm, disable=True)
    with mock.patch.multiple(hard_negatives, trange=functools.partial(trange, disable=True), tqdm=off), \
            mock.patch.object(model_card, "tqdm", off), \
            mock.patch.multiple(model, encode_query=silent(model.encode_query),
                                encode_document=silent(model.encode_document)):
        yield


TUNING_FILE = "hybrid_tuning.json"


@dataclass(frozen=True)
class EmbedderTuneResult:
    """What `hybrid tune embedder` measured and made; saved beside the model as hybrid_tuning.json (`asdict`)."""

    base: dict  # retrieval metrics of the base embedder on the held-out queries (metric name -> value)
    tuned: dict  # the same for the tuned one
    pairs_source: str  # "qa" | "inverse_cloze"
    train_pairs: int
    train_rows_with_hard_negatives: int  # 0: trained on in-batch negatives only
    train_steps: int
    hard_negative_columns: list[str]
    test_queries: int
    stopped_early: bool
    seconds: float
    out: str
    config: dict
    precision: str
    access: dict


def tune_embedder(cfg: EmbedderTuneConfig, progress: bool = True) -> EmbedderTuneResult:
    """Run the whole workflow; see the module docstring.

    Stages, in order: config -> load -> data (pairs, hard negatives) -> train -> evaluate -> save.
    """
    run = trainer_run.begin(cfg, progress, "modules.json",
                            "exists and is not a sentence-transformers model; choose a new directory")
    if trainer_run.relaunch("retrieval.tune_embedder", cfg, run, log=log.info):  # rank 0 of the N processes wrote OUT
        return EmbedderTuneResult(**json.loads((run.out / TUNING_FILE).read_text()))
    retriever = Retriever.load(cfg.index, precision=run.precision)
    pairs, test_q, test_g = qa_pairs(retriever, cfg) if cfg.qa else ict_pairs(retriever, cfg)
    if len(pairs) < cfg.train.batch_size:
        raise InputError(f"only {len(pairs)} training pairs, fewer than --batch-size {cfg.train.batch_size}; "
                         f"lower --batch-size or add questions")
    if not test_q:
        raise InputError("the held-out split is empty; raise --test-fraction or add questions")
    all_chunks = retriever.chunks(groups=access.training_groups(cfg.train.groups))  # negatives come from these only
    scope = access.record(cfg.train.groups, {g for c in all_chunks for g in c.groups})
    dataset, mined = hard_negatives(cfg, run, retriever.embedder, pairs, all_chunks)
    trainer, model, meters = train(cfg, run, retriever.embedder, mined)
    # evaluate base vs tuned on the held-out split
    base_rank = [[h.doc_id for h in hits] for hits in retriever.search_vectors(retriever.embedder.encode(test_q), k=50,
                                                                               groups=cfg.train.groups)]
    tuned_rank = rank_docs(model, all_chunks, test_q, precision=run.precision)
    result = EmbedderTuneResult(
        base=retrieval_metrics(base_rank, test_g), tuned=retrieval_metrics(tuned_rank, test_g),
        pairs_source="qa" if cfg.qa else "inverse_cloze", train_pairs=len(pairs),
        train_rows_with_hard_negatives=len(mined) if mined is not dataset else 0,
        train_steps=trainer.state.global_step,
        hard_negative_columns=[c for c in mined.column_names if c.startswith("negative")],
        test_queries=len(test_q), stopped_early=meters.budget.stopped_early, seconds=run.seconds(),
        out=str(run.out), config=asdict(cfg), precision=run.precision, access=scope)

    def write(stage: Path) -> None:
        model.save(str(stage))
        # The training pairs beside the model, each with its positive chunk's groups (as RAFT does).
        write_jsonl(stage / "train_pairs.jsonl", [{"query": q, "positive": p, "chunk_id": c.chunk_id,
                                                    "groups": list(c.groups)} for q, p, c in pairs])

    trainer_run.save(trainer, run, write, TUNING_FILE, asdict(result), scope)
    return result


def hard_negatives(cfg: EmbedderTuneConfig, run: trainer_run.Run, base, pairs, chunks: list[Hit]):
    """Data stage: hard negatives for each (query, positive) pair from the index's own chunks, scored by
    the base embedder.

    Returns:
        (the pairs as a dataset, the rows to train on: with their negatives, or the pairs alone when too
        few found one).
    """
    from datasets import Dataset
    from sentence_transformers import util

    dataset = Dataset.from_dict({"anchor": [q for q, _, _ in pairs], "positive": [p for _, p, _ in pairs]})
    # verbose=False: its report is a score-statistics table printed to stdout amid hybrid's summary
    # (nan/inf, and torch's "std(): degrees of freedom is <= 0" warnings, when none are found) in its
    # own parameter names, not hybrid's flags; the one fact in it a user can act on, pairs that found
    # no negative, is said below in hybrid's words.
    with autocast(run.precision, device_of(base.model)), _bars(run.progress, base.model):
        mined = util.mine_hard_negatives(
            dataset, base.model, corpus=[embed_text(c.title, c.text) for c in chunks], range_max=cfg.mine_range,
            relative_margin=cfg.relative_margin, num_negatives=cfg.num_negatives, sampling_strategy="top",
            output_format="n-tuple", use_faiss=True, batch_size=64, verbose=False)
    missing = len(dataset) - len(mined)  # pairs that found fewer than --num-negatives: left out of `mined`
    where = f"within the top --mine-range {cfg.mine_range} chunks at --relative-margin {cfg.relative_margin}"
    more = "(a larger --mine-range or a smaller --relative-margin finds more)"
    if len(mined) < cfg.train.batch_size:  # too few survived the margin: fall back to in-batch negatives only
        log.warning(f"hard negatives: {len(mined)} of {len(dataset)} training pairs found {cfg.num_negatives} {where}, "
                    f"fewer than --batch-size {cfg.train.batch_size}: training on in-batch negatives only {more}")
        mined = dataset
    elif missing:
        log.warning(f"hard negatives: {missing} of {len(dataset)} training pairs found fewer than {cfg.num_negatives} "
                    f"{where} and are left out of training {more}")
    return dataset, mined


def train(cfg: EmbedderTuneConfig, run: trainer_run.Run, base, mined):
    """Train stage: MultipleNegativesRankingLoss (in-batch + hard negatives), no-duplicates batches.

    Returns:
        (trainer, the tuned SentenceTransformer, the trainer's meters).

    Raises:
        InputError: no full batch without duplicate texts, so no step ran (nothing is saved).
    """
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.training_args import BatchSamplers

    model = SentenceTransformer(str(base.path), device="cpu" if run.device == "cpu" else None, local_files_only=True)
    full_length = model.max_seq_length
    model.max_seq_length = min(cfg.train.max_length, full_length)  # shorter while training: speed
    t = cfg.train
    scratch = tempfile.TemporaryDirectory(prefix="hybrid-embedder-")  # the trainer's output dir; nothing kept
    args = SentenceTransformerTrainingArguments(**trainer_run.arguments(
        t, run, output_dir=scratch.name, batch_sampler=BatchSamplers.NO_DUPLICATES, logging_steps=10,
        dataloader_drop_last=True))
    meters = trainer_run.meters(t, run)
    # Under DDP each process embeds its own micro-batch; gathering the embeddings across processes
    # keeps the in-batch negatives those of the global batch, as in one process.
    loss = losses.MultipleNegativesRankingLoss(model, gather_across_devices=launch.under_launcher())
    with _bars(run.progress, model):
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=mined, loss=loss,
                                             callbacks=meters.callbacks)
        drop_step_printer(trainer, run.progress)
        with scratch:
            trainer.train()
    if trainer.state.global_step == 0:  # the no-duplicates sampler found no full batch: nothing was learnt
        raise InputError(f"no training step ran: {len(mined)} training rows gave no full batch of --batch-size "
                         f"{t.batch_size} without duplicate texts; lower --batch-size or add questions (nothing was saved)")
    model.max_seq_length = full_length  # the saved model reads as far as the base did
    return trainer, model, meters


if __name__ == "__main__":  # one process of a --distributed run (training/launch.py starts it)
    trainer_run.main(EmbedderTuneConfig, tune_embedder)
