"""Every search mode and the trained reranker as rows of one table, with latency per mode.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.comparisons.rerank \
        --set halueval=benchmarks/out/halueval/index:benchmarks/out/halueval/qa_test.jsonl:benchmarks/out/rerank/halueval4000 \
        --set bundled=benchmarks/out/embedders/minilm:corpora/brindle/qa.jsonl:benchmarks/out/rerank/bundled_synth \
        --out docs/benchmarks/results/rerank.json

Each `--set NAME=INDEX:TEST_QA:RERANKER_DIR` is scored on TEST_QA's questions with gold ids:
recall@1/5/10, MRR@10, nDCG@10 for `dense`, `lexical`, `hybrid` (the index's fusion) and
`hybrid + rerank` (the reranker re-scores hybrid's top N, N recorded in the reranker). Latency:
single query p50 / p95 and batched (32 questions a call) mean per question, on the first
`--latency-queries` test questions. The caller holds every group (the owner's view).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks.harness import finish, parser  # first: sets the offline environment

from benchmarks.data.bundled_corpus import GROUPS
from retrieval.metrics import retrieval_metrics
from core.qa import load_qa
from retrieval.retriever import Retriever

ROWS = {"dense": ("dense", False), "lexical": ("lexical", False), "hybrid": ("hybrid", False),
        "hybrid + rerank": ("hybrid", True)}


def timings(r: Retriever, questions: list[str], mode: str, rerank: bool, batch: int = 32) -> dict:
    single = []
    for q in questions:
        t = time.perf_counter()
        r.search(q, k=5, groups=GROUPS, mode=mode, rerank=rerank)
        single.append(time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(0, len(questions), batch):
        r.search_batch(questions[i:i + batch], k=5, groups=GROUPS, mode=mode, rerank=rerank)
    per_q = (time.perf_counter() - t) / len(questions)
    return {"p50_ms": round(1000 * float(np.percentile(single, 50)), 1),
            "p95_ms": round(1000 * float(np.percentile(single, 95)), 1),
            "batched_ms_per_query": round(1000 * per_q, 1), "n": len(questions)}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, out_help="result file (benchmarks/harness.py's format); none unless given")
    ap.add_argument("--set", action="append", required=True, help="NAME=INDEX:TEST_QA:RERANKER_DIR")
    ap.add_argument("--latency-queries", type=int, default=100)
    ap.add_argument("--quality-limit", type=int, default=0, help="Score only the first N test questions (0 = all); "
                    "a reranker's own held-out table (hybrid_reranker.json) may already hold the full set.")
    args = ap.parse_args(argv)
    report = {"sets": {}}
    for spec in args.set:
        name, rest = spec.split("=", 1)
        index, test_qa, reranker = rest.split(":")
        r = Retriever.load(index, reranker=reranker)
        test = [x for x in load_qa(test_qa) if x.gold_ids]
        test = test[: args.quality_limit] if args.quality_limit else test
        qs, golds = [x.question for x in test], [set(x.gold_ids) for x in test]
        results, latency = {}, {}
        for row, (mode, rerank) in ROWS.items():
            t = time.perf_counter()
            hits = r.search_batch(qs, k=10, groups=GROUPS, mode=mode, rerank=rerank)
            results[row] = retrieval_metrics([[h.doc_id for h in hs] for hs in hits], golds)
            print(f"{name} {row}: scored in {time.perf_counter() - t:.0f}s", file=sys.stderr)
            latency[row] = timings(r, qs[: args.latency_queries], mode, rerank)
        report["sets"][name] = {"n": len(test), "index": index, "reranker": reranker,
                                "candidates": r.reranker.candidates, "reranker_training": {
                                    k: r.reranker.info.get(k) for k in ("train_queries", "train_rows", "pairs_source",
                                                                        "train_steps", "seconds", "stage_seconds")},
                                "results": results, "latency": latency}
        print(f"\n{name} (n={len(test)}, reranker top {r.reranker.candidates})\n"
              f"| mode | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 | p50 ms | p95 ms | batched ms/q |\n"
              f"|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row, m in results.items():
            lt = latency[row]
            print(f"| {row} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | {m['mrr@10']:.3f} | "
                  f"{m['ndcg@10']:.3f} | {lt['p50_ms']} | {lt['p95_ms']} | {lt['batched_ms_per_query']} |")
    finish(args, "benchmarks.comparisons.rerank", report, argv)


if __name__ == "__main__":
    main()
