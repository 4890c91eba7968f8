"""Train and score the groundedness judge on HaluEval (the pairs `hybrid tune judge --pairs` reads).

    .venv/bin/python -m benchmarks.experiments.judge_halueval --out benchmarks/out/judge [--train-questions 3000]

Writes OUT.pairs/{train,halueval_test,grounding_test,answerability_test,bundled}.jsonl, then runs
`hybrid tune judge --pairs OUT.pairs/train.jsonl --test-pairs ...` in-process. Training pairs come
from HaluEval's train split only (benchmarks/data/halueval.py: fixed seeded split, first 1000 shuffled
lines = test): right answer = supported; HaluEval's hallucinated answer and (with swapped
negatives) another question's right answer over this question's passage = unsupported; with
grounding negatives, the right answer or the neighbour's answer over the most similar *other*
passage = unsupported; with answerability pairs, the question with an empty answer over its
own passage (1) vs that neighbour's (0). Test pairs are built the same way from the test split,
plus the bundled corpus (gold answer vs another question's answer over the gold passage).
The test scores are printed and written to OUT/judge_halueval.json (benchmarks/harness.py's format);
`--json` prints them as one JSON object instead of the indented block.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from benchmarks.harness import finish, parser  # first: sets the offline environment

from benchmarks.data import halueval
from benchmarks.data.bundled_corpus import DOCS, GROUPS, QA
from core.errors import InputError
from tuning.tune_judge import JudgeTuneConfig, qa_pairs, tune_judge, write_pairs
from training.train_settings import TrainSettings


def build_pairs(args, pairs_dir: Path) -> dict[str, Path]:
    """Write every pairs file; returns {name: path}."""
    from retrieval.embedder import load_embedder

    lines = halueval.load_lines(args.halueval)
    train_idx, test_idx = halueval.split(len(lines), args.n_test, args.seed)
    train_idx = sorted(random.Random(args.seed).sample(train_idx, min(args.train_questions, len(train_idx))))
    embedder = load_embedder(None, device="cpu") if args.grounding_negatives else None
    near = halueval.nearest_other(lines, train_idx, embedder) if embedder else None
    test_near = halueval.nearest_other(lines, test_idx, embedder) if embedder else None
    files = {"train": halueval.judge_pairs(lines, train_idx, swapped=args.swapped_negatives, seed=args.seed,
                                           neighbours=near, answerability=args.answerability_pairs),
             "halueval_test": halueval.judge_pairs(lines, test_idx),
             "bundled": qa_pairs(QA, DOCS)}
    if embedder:
        # the right answer vs the same answer, or the neighbour's, over the neighbour's passage
        files["grounding_test"] = halueval.judge_pairs(lines, test_idx, hallucinated=False, neighbours=test_near)
        if args.answerability_pairs:  # the question alone (empty answer) over its own vs the neighbour's passage
            files["answerability_test"] = [t for t in halueval.judge_pairs(
                lines, test_idx, hallucinated=False, neighbours=test_near, answerability=True) if not t[2]]
    out = {}
    for name, pairs in files.items():
        out[name] = pairs_dir / f"{name}.jsonl"
        write_pairs(out[name], pairs, groups=GROUPS if name == "bundled" else [])
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out_required=True, out_help="judge directory to write (replaced whole); its test scores "
               "go in it as judge_halueval.json")
    p.add_argument("--halueval", default=None, help=f"HaluEval QA JSONL [default: {halueval.DEFAULT_PATH}]")
    p.add_argument("--train-questions", type=int, default=3000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-swapped-negatives", dest="swapped_negatives", action="store_false")
    p.add_argument("--no-grounding-negatives", dest="grounding_negatives", action="store_false")
    p.add_argument("--no-answerability-pairs", dest="answerability_pairs", action="store_false")
    args = p.parse_args(argv)
    if args.answerability_pairs and not args.grounding_negatives:
        sys.exit("error: --answerability-pairs needs --grounding-negatives (its unanswerable side is the neighbour's "
                 "passage); add --no-answerability-pairs")
    try:
        files = build_pairs(args, Path(f"{args.out}.pairs"))
        # The bundled corpus's pairs hold restricted text: the judge is tested on them, never trained,
        # but reading them needs the groups.
        cfg = JudgeTuneConfig(out=args.out, pairs=str(files.pop("train")), test_pairs=[str(f) for f in files.values()],
                              train=TrainSettings(learning_rate=3e-5, batch_size=args.batch_size, epochs=args.epochs,
                                                  max_length=256, seed=args.seed,
                                                  groups=GROUPS))
        report = tune_judge(cfg, progress=False)
    except InputError as exc:
        sys.exit(f"error: {exc}")
    if not args.json:
        print(json.dumps(report.tests, indent=2))
    # after training: tune_judge replaces the judge directory whole
    finish(args, "benchmarks.experiments.judge_halueval", report.tests, argv,
           path=Path(args.out) / "judge_halueval.json")


if __name__ == "__main__":
    main()
