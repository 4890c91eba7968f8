"""What the probe decided on an eval, and how far its cut is from the target: read from a `hybrid eval
--probe` report directory, nothing generated.

For the configuration the probe scored (`report.json` `probe.scores`), prints how many answers the
rule refused before generating and after, and, along the risk–coverage curve (answers ranked by the
rule's score), the operating points a cut *could* reach on these very questions: the most right
answers kept at hallucination at or below --target, and the hallucination at which no right
answer is lost. These points are read off the test questions, so they are bounds that show how
far the cut chosen on synthesised rows is from the target; nothing here chooses a cut.

    .venv/bin/python -m benchmarks.analyses.probe_operating_points runs/b33/eval --target 0.18 \\
        --out docs/benchmarks/results/probe_points_2026-12-07.json
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from benchmarks.harness import finish, parser  # first: sets the offline environment

from core.jsonl import read_jsonl
from hybrid.prediction import Prediction


def operating_points(preds: list[Prediction], target: float) -> dict:
    """Best cuts on the rule's score for these predictions (see the module docstring)."""
    n = len(preds)
    answered = sorted([p for p in preds if not p.abstained], key=lambda p: -p.probe_score)
    right = made_up = 0
    best = {"right": 0, "hallucination": 0.0, "answered": 0.0}
    all_right = sum(p.label == "correct" for p in preds)
    no_loss = None
    for i, p in enumerate(answered, 1):
        right += p.label == "correct"
        made_up += p.label == "hallucinated"
        if made_up / n <= target and right >= best["right"]:
            best = {"right": right, "hallucination": round(made_up / n, 4), "answered": round(i / n, 4)}
        if no_loss is None and right == all_right:
            no_loss = {"hallucination": round(made_up / n, 4), "answered": round(i / n, 4)}
    n_answerable = sum(bool(p.answers) for p in preds)
    best["accuracy_answerable"] = round(best["right"] / n_answerable, 4) if n_answerable else None
    return {"n": n, "target": target, "best_within_target": best, "no_right_answer_lost": no_loss}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("report_dir")
    p.add_argument("--target", type=float, default=0.18, help="hallucination (share of all questions)")
    args = p.parse_args(argv)
    d = Path(args.report_dir)
    report = json.loads((d / "report.json").read_text())
    scored = report["probe"]["scores"]
    preds = [Prediction.from_json(line) for _, line in read_jsonl(d / "predictions.jsonl", "REPORT_DIR", "predictions")]
    preds = [p for p in preds if p.config == scored]
    served = report["configs"][f"{scored}+probe"]
    decided = Counter()
    for p in preds:
        if not p.abstained and p.probe_answerable is not None:
            if p.probe_answerable < report["probe"]["before"]:
                decided["before"] += 1
            elif p.probe_score is not None and p.probe_score < report["probe"]["threshold"]:
                decided["after"] += 1
    results = {"config": scored, "refused": dict(decided), "served": {k: served[k] for k in (
        "accuracy", "accuracy_answerable", "abstention_rate", "hallucination_rate")},
        "curve_area": report["risk_coverage"][scored]["area"], **operating_points(preds, args.target)}
    print(json.dumps(results, indent=2))
    finish(args, "benchmarks.analyses.probe_operating_points", results, argv)


if __name__ == "__main__":
    main()
