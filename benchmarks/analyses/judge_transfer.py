"""Does the groundedness judge read the passage? Scores trained judges on four test sets.

  halueval_test  HaluEval test split: right vs HaluEval's hallucinated answer (what it was trained for)
  swapped        HaluEval test split (first --swapped-questions lines): right answer vs *another test
                 question's* right answer over this question's knowledge (same style, wrong only given
                 the passage)
  grounding      HaluEval test split: right answer over its knowledge vs the same right answer, and
                 the neighbour's own right answer, over the most similar *other* knowledge (the
                 evidence was not retrieved; hybrid.halueval.nearest_other with the packaged embedder)
  bundled        bundled corpus: gold answer vs another question's answer, over the 600 characters of
                 the gold document around the answer

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.analyses.judge_transfer benchmarks/out/factuality/judge

`--out FILE` writes every judge's numbers as a result file (benchmarks/harness.py's format); `--json`
prints them as one JSON object last.
"""

from __future__ import annotations

from benchmarks.harness import ROOT, finish, parser  # first: sets the offline environment


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out_help="result file (JSON); none unless given")
    p.add_argument("judges", nargs="+", help="judge directories from 'hybrid tune judge'")
    p.add_argument("--swapped-questions", type=int, default=300)
    args = p.parse_args(argv)
    from benchmarks.data import halueval
    from tuning.judge import Judge, evaluate
    from tuning.tune_judge import qa_pairs

    lines = halueval.load_lines()
    _, test = halueval.split(len(lines))
    hallucinated = {lines[i]["hallucinated_answer"] for i in test}
    subset = test[: args.swapped_questions]
    swapped = [t for t in halueval.judge_pairs(lines, subset, swapped=True, seed=1)
               if t[3] == 1 or t[2] not in hallucinated]
    from retrieval.embedder import load_embedder

    near = halueval.nearest_other(lines, test, load_embedder(None, device="cpu"))
    sets = {"halueval_test": halueval.judge_pairs(lines, test), "swapped": swapped,
            "grounding": halueval.judge_pairs(lines, test, hallucinated=False, neighbours=near),
            "bundled": qa_pairs(ROOT / "corpora/brindle/qa.jsonl", ROOT / "corpora/brindle/docs")}
    print("| judge | test set | n | accuracy | AUROC |\n|---|---|---:|---:|---:|")
    out = {}
    for d in args.judges:
        judge = Judge.load(d)
        for name, pairs in sets.items():
            m = evaluate(judge, pairs)
            out[f"{d}:{name}"] = m
            print(f"| {d} | {name} | {m['n']} | {m['accuracy']:.3f} | {m['auroc']:.3f} |", flush=True)
    finish(args, "benchmarks.analyses.judge_transfer", out, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
