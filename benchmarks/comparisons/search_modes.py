"""Dense, lexical (BM25) and hybrid search side by side; the fusion chosen on training questions only.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.comparisons.search_modes \
        --set halueval=benchmarks/out/halueval/index:benchmarks/out/halueval/qa_train.jsonl:benchmarks/out/halueval/qa_test.jsonl \
        --set bundled=benchmarks/out/embedders/minilm:corpora/brindle/qa.jsonl: --out docs/benchmarks/results/search_modes.json

Each `--set NAME=INDEX:TRAIN_QA:TEST_QA` (TEST_QA empty: the train questions are the whole set).
Per question the dense and the lexical top 50 are fetched once; every fusion variant (weighted RRF
and the convex combination of min-max normalised scores, dense weight 0.0 ... 1.0) is scored from
them with the retriever's own `lexical.fuse`. The variant with the best MRR@10 summed over every
set's training questions is chosen; every variant is reported on every set's test questions.
Latency: single-query p50 / p95 per mode on the first set's test questions.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from benchmarks.harness import finish, parser  # first: sets the offline environment

from benchmarks.data.bundled_corpus import GROUPS
from retrieval import lexical
from retrieval.metrics import retrieval_metrics
from core.qa import load_qa
from retrieval.retriever import Retriever

N = 50
WEIGHTS = [round(w, 1) for w in np.linspace(0, 1, 11)]


def candidates(r: Retriever, questions: list[str]) -> tuple[list, list]:
    """Dense and lexical (score, row) lists per question, N deep, every group visible."""
    dense = r._dense_rows(r.embedder.encode(questions, batch_size=64), N, GROUPS)
    lex = [r._lexical_rows(q, N, GROUPS) for q in questions]
    return dense, lex


def score(r: Retriever, ranked_rows: list[list[int]], golds: list[set[str]]) -> dict:
    doc_of = dict(r.con.execute("SELECT row, doc_id FROM chunks"))
    return retrieval_metrics([[doc_of[x] for x in rows] for rows in ranked_rows], golds)


def variants(dense, lex) -> dict[str, list[list[int]]]:
    out = {"dense": [[x for _, x in d] for d in dense], "lexical": [[x for _, x in l] for l in lex]}
    for method in ("rrf", "convex"):
        for w in WEIGHTS:
            out[f"{method} w={w}"] = [[x for _, x in lexical.fuse(d, l, method, w)] for d, l in zip(dense, lex)]
    return out


def latency(r: Retriever, questions: list[str], mode: str) -> dict:
    times = []
    for q in questions:
        t = time.perf_counter()
        r.search(q, k=5, groups=GROUPS, mode=mode)
        times.append(time.perf_counter() - t)
    return {"p50_ms": round(1000 * float(np.percentile(times, 50)), 2),
            "p95_ms": round(1000 * float(np.percentile(times, 95)), 2), "n": len(times)}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, out_help="result file (benchmarks/harness.py's format); none unless given")
    ap.add_argument("--set", action="append", required=True, help="NAME=INDEX:TRAIN_QA:TEST_QA")
    ap.add_argument("--train-limit", type=int, default=2000, help="Training questions used per set (seeded).")
    ap.add_argument("--latency-queries", type=int, default=100)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    sets, train_mrr, report = {}, {}, {"candidates": N, "sets": {}}
    for spec in args.set:
        name, rest = spec.split("=", 1)
        index, train_qa, test_qa = rest.split(":")
        r = Retriever.load(index)
        train = [x for x in load_qa(train_qa) if x.gold_ids]
        if len(train) > args.train_limit:
            train = [train[i] for i in sorted(rng.choice(len(train), args.train_limit, replace=False))]
        test = [x for x in load_qa(test_qa) if x.gold_ids] if test_qa else train
        sets[name] = (r, test)
        t0 = time.perf_counter()
        for v, rows in variants(*candidates(r, [x.question for x in train])).items():
            m = score(r, rows, [set(x.gold_ids) for x in train])
            train_mrr[v] = train_mrr.get(v, 0.0) + m["mrr@10"]
        print(f"{name}: {len(train)} training questions scored in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    fused = {v: s for v, s in train_mrr.items() if v not in ("dense", "lexical")}
    chosen = max(fused, key=lambda v: (fused[v], v))
    report["chosen"] = {"variant": chosen, "train_mrr@10_sum": round(fused[chosen], 4),
                        "by_variant_train_mrr@10_sum": {v: round(s, 4) for v, s in train_mrr.items()}}
    for name, (r, test) in sets.items():
        results = {v: score(r, rows, [set(x.gold_ids) for x in test])
                   for v, rows in variants(*candidates(r, [x.question for x in test])).items()}
        report["sets"][name] = {"n": len(test), "results": results}
        print(f"\n{name} (test, n={len(test)})\n| variant | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 |\n"
              f"|---|---:|---:|---:|---:|---:|")
        for v in ["dense", "lexical", chosen] + [v for v in results if v not in ("dense", "lexical", chosen)]:
            m = results[v]
            print(f"| {v}{' (chosen)' if v == chosen else ''} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | "
                  f"{m['recall@10']:.3f} | {m['mrr@10']:.3f} | {m['ndcg@10']:.3f} |")
    name, (r, test) = next(iter(sets.items()))
    method, w = chosen.split(" w=")
    r.search_settings = {"mode": "dense", "fusion": method, "fusion_weight": float(w), "fusion_candidates": N}
    qs = [x.question for x in test[: args.latency_queries]]
    report["latency"] = {"set": name, **{mode: latency(r, qs, mode) for mode in ("dense", "lexical", "hybrid")}}
    print(json.dumps(report["latency"]))
    finish(args, "benchmarks.comparisons.search_modes", report, argv)


if __name__ == "__main__":
    main()
