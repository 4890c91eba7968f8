"""How far can an abstention rule take one configuration's answers? A bound read off an eval.

Given a `hybrid eval` predictions.jsonl whose configuration carries the adapter's abstention score
(`abstain_score`, a calibrated adapter) and, with `--judge`, the judge's answerability
(`answerable`), and with `--confidence` the answers' own confidence
(`benchmarks/analyses/answer_confidence.py`), this sweeps every cut of each signal — and of their sum
after z-scoring — and prints, per signal:

- its AUROC for answerable vs unanswerable questions, and for right vs wrong answers among the
  answerable questions the configuration answered (the misreadings an abstention rule must catch);
- the best accuracy on answerable questions with hallucination at most `--max-hallucination`
  (default: half of the baseline's);
- the lowest hallucination with accuracy on answerable questions at least the baseline's.

The cuts are chosen on the very rows they are scored on, so this is an upper bound on what any
threshold on these signals could reach with these answers, not a result to report as one: a
real threshold is chosen on other rows (`hybrid tune calibrate`). If the bound misses a target,
no threshold will meet it; the answers themselves must change.

    .venv/bin/python -m benchmarks.analyses.abstention_bound benchmarks/out/factuality_gpu/judged/predictions.jsonl \
        --config rag+raft_dpo --baseline rag

`--out FILE` writes the numbers as a result file (benchmarks/harness.py's format); `--json` prints them.
"""
from __future__ import annotations

import json

import numpy as np

from benchmarks.harness import fail, finish, parser  # first: sets the offline environment
from tuning.judge import auroc


def load(path: str, config: str, baseline: str) -> tuple[dict, dict]:
    """Predictions of `config` and `baseline`, by question id, on the questions both answered."""
    by: dict[str, dict[str, dict]] = {config: {}, baseline: {}}
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror}); pass the predictions.jsonl of a `hybrid eval --out` dir")
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                p = json.loads(line)
                if p["config"] in by:
                    by[p["config"]][p["id"]] = p
            except (ValueError, KeyError, TypeError):
                fail(f"{path}:{n}: not a hybrid eval prediction (JSON with config and id)")
    ids = sorted(set(by[config]) & set(by[baseline]))
    if not ids:
        fail(f"{path}: no question answered by both --config {config} and --baseline {baseline}; "
             "pick configurations the eval ran")
    return {i: by[config][i] for i in ids}, {i: by[baseline][i] for i in ids}


def rates(keep: np.ndarray, correct: np.ndarray, abstained: np.ndarray, answerable: np.ndarray) -> tuple[float, float]:
    """(accuracy on answerable, hallucination over all) when only `keep` answers are served.

    Args:
        keep: shape (N,) bool; False = the rule turns the answer into the abstention.
        correct, abstained, answerable: shape (N,) bool, the answers as generated.
    """
    served_correct = correct & keep
    hallucinated = ~correct & ~abstained & keep
    return float(served_correct[answerable].mean()), float(hallucinated.mean())


def bound(signal: np.ndarray, correct, abstained, answerable, base_acc: float, max_hall: float) -> dict:
    """Sweep `signal` (higher = more answerable; keep answers at or above the cut)."""
    best_acc, best_hall = None, None
    for t in np.concatenate([np.unique(signal), [-np.inf]]):
        acc, hall = rates(signal >= t, correct, abstained, answerable)
        if hall <= max_hall + 1e-12 and (best_acc is None or acc > best_acc[0]):
            best_acc = (acc, hall)
        if acc >= base_acc - 1e-12 and (best_hall is None or hall < best_hall[1]):
            best_hall = (acc, hall)
    return {"auroc": auroc(signal, answerable), "best_acc": best_acc, "best_hall": best_hall}


def read_confidence(path: str, config: str, ids) -> np.ndarray:
    """`confidence` per question from an answer_confidence.py file written for `config`, in `ids` order."""
    try:
        lines = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        conf = {c["id"]: float(c["confidence"]) for c in lines if c["config"] == config}
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"--confidence {path}: not an answer_confidence.py output ({e.__class__.__name__})")
    if missing := [i for i in ids if i not in conf]:
        fail(f"--confidence {path}: no {config} answer for {len(missing)} questions (e.g. {missing[0]}); "
             f"run benchmarks/analyses/answer_confidence.py --config {config} on these predictions")
    return np.array([conf[i] for i in ids])


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out_help="result file (JSON); none unless given")
    p.add_argument("predictions")
    p.add_argument("--config", default="rag+raft_dpo", help="the configuration whose answers are cut")
    p.add_argument("--baseline", default="rag")
    p.add_argument("--max-hallucination", type=float, default=None, help="default: half of the baseline's")
    p.add_argument("--confidence", help="answer_confidence.py output for --config: adds the answers' own confidence")
    args = p.parse_args(argv)
    preds, base = load(args.predictions, args.config, args.baseline)
    col = lambda key: np.array([preds[i][key] for i in preds])  # noqa: E731
    answerable = np.array([bool(preds[i]["answers"]) for i in preds])
    correct = col("label") == "correct"
    abstained = col("abstained").astype(bool)
    base_acc, base_hall = rates(np.ones(len(base), bool), np.array([base[i]["label"] == "correct" for i in base]),
                                np.array([base[i]["abstained"] for i in base]), answerable)
    max_hall = base_hall / 2 if args.max_hallucination is None else args.max_hallucination
    signals = {}
    if all(preds[i].get("abstain_score") is not None for i in preds):
        signals["adapter score"] = -col("abstain_score").astype(float)  # higher score = abstain
    if all(preds[i].get("answerable") is not None for i in preds):
        signals["judge answerability"] = col("answerable").astype(float)
    if args.confidence:
        signals["answer confidence"] = read_confidence(args.confidence, args.config, list(preds))
    if len(signals) >= 2:
        z = [(s - s.mean()) / s.std() for s in signals.values()]
        signals["sum of both (z-scored)" if len(z) == 2 else "sum of all (z-scored)"] = np.sum(z, axis=0)
    if not signals:
        fail(f"{args.predictions}: {args.config} has neither abstain_score (calibrate the adapter) "
             "nor answerable (eval --judge), and no --confidence; nothing to sweep")
    n = len(preds)
    acc0, hall0 = rates(np.ones(n, bool), correct, abstained, answerable)
    print(f"{n} questions ({int(answerable.sum())} answerable). {args.baseline}: accuracy on answerable {base_acc:.3f}, "
          f"hallucination {base_hall:.3f}; {args.config} as generated: {acc0:.3f}, {hall0:.3f}\n")
    answered = answerable & ~abstained  # right vs wrong: the answers a cut could still save or drop
    print(f"| signal | AUROC answerable vs not | AUROC right vs wrong "
          f"| best accuracy on answerable with hallucination ≤ {max_hall:.3f} "
          f"| lowest hallucination with accuracy on answerable ≥ {base_acc:.3f} |")
    print("|---|---:|---:|---:|---:|")
    fmt = lambda r: "none" if r is None else f"{r[0]:.3f} (hallucination {r[1]:.3f})"  # noqa: E731
    results = {"predictions": args.predictions, "config": args.config, "baseline": args.baseline, "n": n,
               "n_answerable": int(answerable.sum()), "baseline_rates": {"accuracy": base_acc, "hallucination": base_hall},
               "as_generated": {"accuracy": acc0, "hallucination": hall0}, "max_hallucination": max_hall, "signals": {}}
    for name, s in signals.items():
        b = bound(s, correct, abstained, answerable, base_acc, max_hall)
        right_wrong = auroc(s[answered], correct[answered])
        print(f"| {name} | {b['auroc']:.3f} | {right_wrong:.3f} | {fmt(b['best_acc'])} | {fmt(b['best_hall'])} |")
        # best_* are (accuracy on answerable, hallucination) at the best cut, or None when no cut meets the target
        results["signals"][name] = {"auroc_answerable": b["auroc"], "auroc_right_wrong": right_wrong,
                                    "best_accuracy": b["best_acc"], "lowest_hallucination": b["best_hall"]}
    finish(args, "benchmarks.analyses.abstention_bound", results, argv)


if __name__ == "__main__":
    main()
