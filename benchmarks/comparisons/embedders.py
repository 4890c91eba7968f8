"""The packaged embedders side by side: retrieval quality and index throughput, MiniLM vs mpnet.

For each embedder: `hybrid index` of the corpus into a fresh directory (chunks/s of the whole
build, model load included), then `hybrid eval --only retrieval` with every group (the owner's
view): document-level recall@1/5/10 and MRR@10 over the questions with gold ids.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.comparisons.embedders                      # the bundled corpus
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.comparisons.embedders --corpus benchmarks/out/halueval/corpus \
        --qa benchmarks/out/halueval/qa_test.jsonl --out benchmarks/out/embedders_halueval   # HaluEval (slow)

Retrieval is scored in the index's default search mode (hybrid: dense + BM25); `--mode dense`
scores the embedder alone, and `--reuse` scores indexes already built in --out without rebuilding.
--out is a work directory: one index per embedder, and the result file results.json
(results_MODE.json with --mode) in benchmarks/harness.py's format.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.harness import ROOT, finish, parser  # first: sets the offline environment

from benchmarks.data.bundled_corpus import GROUPS


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out="benchmarks/out/embedders", out_aliases=("--work",),
               out_help="work directory: the indexes and results.json")
    p.add_argument("--embedders", default="minilm,mpnet")
    p.add_argument("--corpus", default=str(ROOT / "corpora/brindle/docs"))
    p.add_argument("--qa", default=str(ROOT / "corpora/brindle/qa.jsonl"))
    p.add_argument("--chunk-tokens", type=int, default=128)
    p.add_argument("--mode", choices=["dense", "lexical", "hybrid"], help="search mode [default: the index's]")
    p.add_argument("--reuse", action="store_true", help="score the indexes in --out as built; no rebuild")
    args = p.parse_args(argv)
    from hybrid.eval_retrieval import evaluate_retrieval
    from retrieval.index import IndexConfig, build_index

    work = Path(args.out)
    results = {}
    for name in args.embedders.split(","):
        index = work / name
        if args.reuse:
            if not (index / "manifest.json").is_file():
                print(f"error: --reuse: no index at {index}; build it first (run without --reuse)", file=sys.stderr)
                return 2
            chunks = json.loads((index / "manifest.json").read_text())["counts"]["chunks"]
            built = {"chunks": chunks, "index_s": float("nan"), "chunks_per_s": float("nan")}  # not built here
        else:
            shutil.rmtree(index, ignore_errors=True)
            t = time.perf_counter()
            rep = build_index(args.corpus, index, IndexConfig(embedder=name, chunk_tokens=args.chunk_tokens, overlap=16),
                              progress=False)
            seconds = time.perf_counter() - t
            built = {"chunks": rep.chunks, "index_s": seconds, "chunks_per_s": rep.chunks / seconds}
        m = evaluate_retrieval(args.qa, index, groups=GROUPS, mode=args.mode).metrics
        results[name] = {**built, "mode": args.mode or "index default", **m}
        print(json.dumps({name: results[name]}), flush=True)
    print("\n| embedder | chunks | index s | chunks/s | n | recall@1 | recall@5 | recall@10 | MRR@10 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['chunks']} | {r['index_s']:.0f} | {r['chunks_per_s']:.1f} | {r['n']} | {r['recall@1']:.3f} | "
              f"{r['recall@5']:.3f} | {r['recall@10']:.3f} | {r['mrr@10']:.3f} |")
    finish(args, "benchmarks.comparisons.embedders", {"corpus": args.corpus, "qa": args.qa, "results": results}, argv,
           path=work / ("results.json" if args.mode is None else f"results_{args.mode}.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
