"""`hybrid tune calibrate`: the generator's own abstention score and a threshold chosen for it.

The score of a prompt is the mean per-token log-probability the generator gives the
abstention completion (`abstain_answer()`) after it: one forward pass, no sampling. A RAFT
adapter trained with every question shown with and without its oracle (`--no-oracle both`)
ranks prompts whose passages do not answer the question higher (HaluEval dev rows: AUROC
0.88 on CPU after 200 steps, 0.89 at full size on a GPU; an adapter trained with the oracle
sampled per question, 0.42), yet its greedy decision
can lean one way: DPO pushed one such adapter to answer almost every question. Like a classifier's
cut, the threshold is chosen on labelled rows that no training step used: the score that
maximises TPR - FPR (Youden's J) between answerable and unanswerable rows. It is written
beside the adapter as `hybrid_abstain.json`; `ask` abstains when a prompt scores at or
above it, and `eval` reports the adapter both ways (`rag+NAME`, `rag+NAME+cal`).

One workflow, top to bottom: config -> rows and passages -> scores -> threshold -> write.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval import access
from retrieval.atomic import write_text_atomic
from retrieval.errors import InputError
from retrieval.index import sha256_file
from tuning.prompting import abstain_answer, build_messages

CAL_FILE = "hybrid_abstain.json"


@dataclass
class CalibrateConfig:
    """Settings of `hybrid tune calibrate`."""

    adapter: str
    qa: str
    index: str | None = None
    k: int = 5
    groups: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = access.group_problems(self.groups)
        if self.k < 1:
            out.append("-k must be >= 1")
        return out


def abstain_scores(model, tok, questions: list[str], passages_batch: list[list[dict]]) -> np.ndarray:
    """Mean log-probability per token of the abstention completion after each prompt.

    Args:
        model: causal LM (with the wanted adapter active).
        tok: its tokenizer (chat template set).
        questions: N questions.
        passages_batch: N lists of passage dicts (text, title?).

    Returns:
        float array, shape (N,); higher = the model leans to abstaining.
    """
    import torch

    completion = abstain_answer() + tok.eos_token
    out = np.zeros(len(questions))
    for i, (q, ps) in enumerate(zip(questions, passages_batch)):
        prompt = tok.apply_chat_template(build_messages(q, ps), add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids], device=model.device)
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float(), -1)
        out[i] = float(logp.gather(1, torch.tensor(c_ids, device=logp.device)[:, None]).mean())
    return out


def youden_threshold(scores: np.ndarray, answerable: np.ndarray) -> dict:
    """The abstain-at-or-above cut that maximises TPR - FPR.

    Args:
        scores: shape (N,), higher = abstain.
        answerable: shape (N,) bool; True = the passages answer the question.

    Returns:
        {"threshold", "tpr" (answerable rows kept), "fpr" (unanswerable rows answered)}.
    """
    scores, answerable = np.asarray(scores, float), np.asarray(answerable, bool)
    cuts = np.unique(np.concatenate([scores, [np.inf]]))

    def j(t):
        return (scores[answerable] < t).mean() - (scores[~answerable] < t).mean()

    best = float(max(cuts, key=j))
    return {"threshold": best, "tpr": float((scores[answerable] < best).mean()),
            "fpr": float((scores[~answerable] < best).mean())}


def load_calibration(adapter_dir: str | Path) -> dict | None:
    """The calibration record beside an adapter (threshold, AUROC, ...), or None when it was never calibrated.

    Raises:
        InputError: the threshold was chosen for another training run of this adapter.
    """
    path = Path(adapter_dir) / CAL_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("adapter_run") != run_fingerprint(adapter_dir):
        raise InputError(f"--adapter {adapter_dir}: {CAL_FILE} was calibrated for another training run; "
                         f"rerun 'hybrid tune calibrate --adapter {adapter_dir} --qa QA.jsonl' or delete it")
    return record


def load_threshold(adapter_dir: str | Path) -> float | None:
    """The calibrated threshold beside an adapter, or None when it was never calibrated (see load_calibration)."""
    record = load_calibration(adapter_dir)
    return None if record is None else float(record["threshold"])


def calibrate(cfg: CalibrateConfig, log=print) -> dict:
    """Score labelled rows with the adapter, choose the threshold, write ADAPTER/hybrid_abstain.json.

    Rows with `answers: []` are the unanswerable ones; rows use their fixed `passages`, else
    the top -k retrieved from `index` for the caller's groups.
    """
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    from hybrid.factuality import EvalConfig, row_contexts
    from hybrid.judge import auroc
    from hybrid.pipeline import Pipeline
    from retrieval.qa import load_qa

    if run_fingerprint(cfg.adapter) is None:
        raise InputError(f"--adapter {cfg.adapter}: not an adapter made by 'hybrid tune generator' or "
                         f"'hybrid tune dpo' (no hybrid_run.json); pass such a directory")
    t0 = time.perf_counter()
    rows = load_qa(cfg.qa)
    labels = np.array([bool(r.answers) for r in rows])
    if labels.all() or not labels.any():
        raise InputError(f"--qa {cfg.qa}: needs answerable rows and unanswerable rows (answers: []) to set a "
                         f"threshold between them; it has {int(labels.sum())} and {int((~labels).sum())}")
    needs_index = any(r.passages is None for r in rows)
    if needs_index and not cfg.index:  # checked before any model loads
        raise InputError(f"--qa {cfg.qa}: rows without 'passages' need --index to retrieve them")
    # calibrated=False: a stale threshold beside the adapter must not block the recalibration
    pipe = Pipeline.load(cfg.index if needs_index else None, {"adapter": cfg.adapter}, k=cfg.k, groups=cfg.groups,
                         calibrated=False)
    contexts = row_contexts(rows, EvalConfig(qa=cfg.qa, index=cfg.index, k=cfg.k, groups=cfg.groups), pipe)
    scores = pipe.abstain_scores([r.question for r in rows], [contexts[r.id] for r in rows], adapter="adapter")
    record = {**youden_threshold(scores, labels), "auroc": auroc(-scores, labels), "n": len(rows),
              "n_unanswerable": int((~labels).sum()), "qa": cfg.qa, "qa_sha256": sha256_file(Path(cfg.qa)),
              "adapter_run": run_fingerprint(cfg.adapter), "score": "mean log-prob per token of the abstention",
              "minutes": round((time.perf_counter() - t0) / 60, 2)}
    write_text_atomic(Path(cfg.adapter) / CAL_FILE, json.dumps(record, indent=2))
    log(f"calibrated {cfg.adapter}: threshold {record['threshold']:.4f}, AUROC {record['auroc']:.3f}, "
        f"answerable kept {record['tpr']:.2f}, unanswerable answered {record['fpr']:.2f} ({len(rows)} rows)")
    return record


def run_fingerprint(adapter_dir: str | Path) -> str | None:
    """Identity of an adapter's training run (sha256 of its hybrid_run.json), None without one."""
    run = Path(adapter_dir) / "hybrid_run.json"
    return sha256_file(run) if run.exists() else None
