"""The generator's own abstention score, the threshold chosen for it, and the rule that applies it.

The score of a prompt is the mean per-token log-probability the generator gives the
abstention completion (`abstain_answer()`) after it: one forward pass, no sampling. A RAFT
adapter trained with every question shown with and without its oracle (`--no-oracle both`)
ranks prompts whose passages do not answer the question higher (HaluEval dev rows: AUROC
0.88 on CPU after 200 steps, 0.89 at full size on a GPU; an adapter trained with the oracle
sampled per question, 0.42), yet its greedy decision can lean one way: DPO pushed one such
adapter to answer almost every question. Like a classifier's cut, the threshold is chosen on
labelled rows that no training step used (`hybrid tune calibrate`, hybrid/tune_calibrate.py): the
score that maximises TPR - FPR (Youden's J). It is written beside the adapter as
`hybrid_abstain.json`; `ask` abstains when a prompt scores at or above it and answers below it
(a greedy abstention there is answered again from the answer's opening), and `eval` reports the
adapter both ways (`rag+NAME` greedy, `rag+NAME+cal` as served).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.errors import InputError
from training import run_record
from tuning.prompting import abstain_answer, build_messages

CAL_FILE = "hybrid_abstain.json"


def calibration_abstains(score: float | None, threshold: float | None) -> bool:
    """The calibrated-abstention rule, for `ask` and `eval` alike: abstain when the adapter's own
    abstention score reaches its threshold (no score or no threshold: no verdict)."""
    return score is not None and threshold is not None and bool(score >= threshold)


def completion_logprobs(model, tok, messages: list[dict], completion: str) -> np.ndarray:
    """Log-probability of each token of `completion` (then EOS) after the chat prompt of `messages`.

    One forward pass with the completion teacher-forced; nothing is generated. Shape (T,).
    """
    import torch

    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids], device=model.device)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float(), -1)
    return logp.gather(1, torch.tensor(c_ids, device=logp.device)[:, None])[:, 0].cpu().numpy()


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
    return np.array([float(completion_logprobs(model, tok, build_messages(q, ps), abstain_answer()).mean())
                     for q, ps in zip(questions, passages_batch)])


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
    """The validated calibration record beside an adapter, or None when it was never calibrated.

    Raises:
        InputError: unreadable, lacking a numeric `threshold`, or chosen for another training run
            of this adapter.
    """
    path = Path(adapter_dir) / CAL_FILE
    if not path.exists():
        return None
    fix = f"rerun 'hybrid tune calibrate --adapter {adapter_dir} --qa QA.jsonl' or delete it"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--adapter {adapter_dir}: {CAL_FILE} is unreadable ({exc.__class__.__name__}); {fix}") from None
    if not isinstance(record, dict) or isinstance(record.get("threshold"), bool) or \
            not isinstance(record.get("threshold"), (int, float)):
        raise InputError(f"--adapter {adapter_dir}: {CAL_FILE} lacks a numeric threshold; {fix}")
    auroc = record.get("auroc")  # decides which adapter calibrates under --select: a number or absent
    if auroc is not None and (isinstance(auroc, bool) or not isinstance(auroc, (int, float)) or not 0 <= auroc <= 1):
        raise InputError(f"--adapter {adapter_dir}: {CAL_FILE} field 'auroc' must be a number in [0, 1]; {fix}")
    if record.get("adapter_run") != run_record.fingerprint(adapter_dir):
        raise InputError(f"--adapter {adapter_dir}: {CAL_FILE} was calibrated for another training run; {fix}")
    return record
