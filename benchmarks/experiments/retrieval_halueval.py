"""Retrieval benchmark on HaluEval QA: index throughput, query latency, ANN recall, embedder tuning.

Data: `../shared/data/halueval_qa/dataset_halueval_qa.jsonl` beside the checkout (10,000 lines of
{"knowledge", "question", "right_answer", "hallucinated_answer"}); never copied into the repo.
Everything generated goes under --out (a work directory, default benchmarks/out/halueval, git-ignored;
`--work` is its older name); the numbers go to WORK/results.json, a result file in benchmarks/harness.py's
format, rewritten after each section. `--json` prints them as one JSON object last.

Line numbers below are 0-based positions in that file.

Sections (each printed as a Markdown table when it finishes; all numbers in WORK/results.json):
  prep        corpus = the distinct `knowledge` strings (9,936), doc id `h{line:05d}` of the first line
              holding it, title ""; QA rows {"id": "h{line:05d}", "question", "answers": [right_answer],
              "gold_ids": [doc id of its knowledge]} in WORK/qa_train.jsonl and WORK/qa_test.jsonl.
  throughput  passages/s of `build_index(..., IndexConfig(index_type="flat"))` vs a plain loop
              (SentenceTransformer.encode(batch_size=64, normalize_embeddings=True) + IndexFlatIP.add),
              on the first --throughput-docs passages, alternating plain, hybrid for --throughput-rounds
              rounds after one warm-up encode. Both embed the same strings (hybrid's chunk text with an
              empty title is the stripped passage; passages over 200 tokens become 2 chunks). Each hybrid
              round starts from an empty index dir (no incremental reuse). Target ratio >= 0.95.
  latency     on the full flat index: p50/p95 ms of `Retriever.search` (one query at a time) and of
              `search_batch` (batches of 64, ms per query), k=10; peak RSS of the process so far.
  ann         HNSW (M=32, efConstruction 200, efSearch 64) and IVF (nlist 4*sqrt(n) as capped by
              make_faiss_index, nprobe 8) built from the flat index's stored vectors; recall@10 against
              the exact flat top-10 chunk rows on the test questions, ms/query, gold-doc recall@10.
  tuning      tune_embedder on a deterministic subsample (--train-pairs) of qa_train only (train lines
              whose question text equals a test question are dropped too), with --eval-qa qa_test: it
              scores base (the flat index) and tuned (exact search over the corpus re-embedded by the
              tuned model) on qa_test; recall@1/5/10, MRR@10, nDCG@10 over doc ids of the top-50 chunks.
              Target: recall@5 gain >= +5 points.

Split rule (fixed, documented; no test line is ever trained on):
    order = list(range(10000)); random.Random(seed).shuffle(order)   # seed 0
    test = order[:n_test] (n_test 1000); train = the other 9,000 lines.
WORK/split.json holds the seed, the sizes and the sorted test line numbers. Questions are disjoint
between train and test; the passage corpus is shared (a fixed-corpus retrieval setting), so the few
passages that serve as gold for both a train and a test question (duplicate knowledge) appear in training
as positives.

Full run (from the repository root; roughly 30-60 min on the 2-core CPU box, mostly MiniLM encoding:
the 10k corpus is embedded three times - base index, hard-negative mining, tuned evaluation):
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiments.retrieval_halueval
Add `--threads 1` when other jobs load the CPU (the script warns); the thread count and load average
are recorded in results.json.
Smoke run (a minute or two):
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiments.retrieval_halueval --out benchmarks/out/halueval-smoke \
        --limit-docs 300 --throughput-docs 100 --train-pairs 96 --batch-size 16 --max-steps 3
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # tune_embedder's mining bars; TQDM_DISABLE=0 shows them
from benchmarks.harness import OUT, finish, parser, write_result  # first: sets the offline environment

import faiss
import numpy as np

from core import jsonl
from core.jsonl import write_jsonl

DATA = Path(__file__).resolve().parents[3] / "shared/data/halueval_qa/dataset_halueval_qa.jsonl"
SPLIT_RULE = "order = list(range(n_lines)); random.Random(seed).shuffle(order); test = order[:n_test]; train = rest"


def out(text: str = "") -> None:
    print(text, flush=True)


def table(title: str, headers: list[str], rows: list[list]) -> None:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    out(f"\n### {title}\n")
    out("| " + " | ".join(headers) + " |")
    out("|" + "---|" * len(headers))
    for r in rows:
        out("| " + " | ".join(cell(v) for v in r) + " |")
    out()


def read_jsonl(path: Path) -> list[dict]:
    return [obj for _, obj in jsonl.read_jsonl(path, "--out", "rows")]


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- 1. data prep -------------------------------------------------------------------------------

def prepare(work: Path, n_test: int = 1000, seed: int = 0, limit_docs: int | None = None) -> dict:
    """Write WORK/corpus/halueval.jsonl, WORK/qa_train.jsonl, WORK/qa_test.jsonl and WORK/split.json.

    `limit_docs` (smoke runs) keeps the first N distinct passages and only the questions whose passage
    is among them; the split rule is unchanged.
    """
    lines = read_jsonl(DATA)
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    test_lines = set(order[:n_test])
    doc_of: dict[str, str] = {}
    corpus = []
    for i, row in enumerate(lines):
        k = row["knowledge"]
        if k not in doc_of and (limit_docs is None or len(corpus) < limit_docs):
            doc_of[k] = f"h{i:05d}"
            corpus.append({"id": doc_of[k], "title": "", "text": k})
    train, test = [], []
    for i, row in enumerate(lines):
        if row["knowledge"] not in doc_of:
            continue
        qa = {"id": f"h{i:05d}", "question": row["question"], "answers": [row["right_answer"]],
              "gold_ids": [doc_of[row["knowledge"]]]}
        (test if i in test_lines else train).append(qa)
    write_jsonl(work / "corpus" / "halueval.jsonl", corpus)
    write_jsonl(work / "qa_train.jsonl", train)
    write_jsonl(work / "qa_test.jsonl", test)
    train_gold = {g for r in train for g in r["gold_ids"]}
    split = {"seed": seed, "rule": SPLIT_RULE, "n_lines": len(lines), "n_test_requested": n_test,
             "limit_docs": limit_docs, "corpus_passages": len(corpus), "train": len(train), "test": len(test),
             "test_gold_also_train_gold": sum(r["gold_ids"][0] in train_gold for r in test),
             "test_lines": sorted(int(r["id"][1:]) for r in test)}
    (work / "split.json").write_text(json.dumps(split, indent=1))
    return {k: v for k, v in split.items() if k != "test_lines"}


# --- 2. index build throughput ------------------------------------------------------------------

def plain_build(corpus_file: Path, model_dir: Path) -> tuple[float, int]:
    """The hand-written baseline: load, encode, IndexFlatIP.add. Returns (seconds, passages)."""
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    texts = [r["text"].strip() for r in read_jsonl(corpus_file)]  # hybrid's corpus loader strips too
    model = SentenceTransformer(str(model_dir), local_files_only=True)
    vecs = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    return time.perf_counter() - t0, index.ntotal


def throughput(work: Path, n_docs: int, rounds: int) -> dict:
    from retrieval.embedder import load_embedder, resolve_embedder
    from retrieval.index import IndexConfig, build_index

    passages = read_jsonl(work / "corpus" / "halueval.jsonl")[:n_docs]
    cdir, idir = work / "throughput" / "corpus", work / "throughput" / "index"
    write_jsonl(cdir / "halueval.jsonl", passages)
    model_dir = resolve_embedder(None)[1]
    warm = load_embedder(None)  # warms torch and the fingerprint cache for both sides alike
    warm.encode([p["text"] for p in passages[:64]])
    del warm
    runs = []
    for rnd in range(1, rounds + 1):
        plain_s, n_plain = plain_build(cdir / "halueval.jsonl", model_dir)
        shutil.rmtree(idir, ignore_errors=True)  # otherwise build_index reuses every stored vector
        t0 = time.perf_counter()
        rep = build_index(cdir, idir, IndexConfig(index_type="flat"))
        hybrid_s = time.perf_counter() - t0
        runs.append({"round": rnd, "passages": len(passages), "hybrid_chunks": rep.chunks, "plain_vectors": n_plain,
                     "plain_s": round(plain_s, 2), "hybrid_s": round(hybrid_s, 2),
                     "plain_pps": len(passages) / plain_s, "hybrid_pps": len(passages) / hybrid_s,
                     "ratio": plain_s / hybrid_s})
    total = {"plain_pps": len(passages) * rounds / sum(r["plain_s"] for r in runs),
             "hybrid_pps": len(passages) * rounds / sum(r["hybrid_s"] for r in runs)}
    total["ratio"] = total["hybrid_pps"] / total["plain_pps"]
    table(f"Index build throughput ({len(passages)} passages, flat, MiniLM, batch 64)",
          ["round", "chunks (hybrid)", "plain passages/s", "hybrid passages/s", "hybrid/plain"],
          [[r["round"], r["hybrid_chunks"], r["plain_pps"], r["hybrid_pps"], r["ratio"]] for r in runs]
          + [["all", "", total["plain_pps"], total["hybrid_pps"], total["ratio"]]])
    out(f"target hybrid/plain >= 0.95: {'PASS' if total['ratio'] >= 0.95 else 'MISS'}")
    return {"rounds": runs, "overall": total, "target_ratio": 0.95}


# --- 3. query latency ---------------------------------------------------------------------------

def latency(retriever, questions: list[str], n_single: int, batch: int = 64) -> dict:
    retriever.search(questions[0], k=10)  # warm-up
    single = []
    for q in questions[:n_single]:
        t0 = time.perf_counter()
        retriever.search(q, k=10)
        single.append((time.perf_counter() - t0) * 1000)
    batched = []
    for i in range(0, len(questions), batch):
        b = questions[i:i + batch]
        t0 = time.perf_counter()
        retriever.search_batch(b, k=10, batch_size=batch)
        batched.append((time.perf_counter() - t0) * 1000 / len(b))
    res = {"chunks": len(retriever), "single": {"n": len(single), "p50_ms": pct(single, 50), "p95_ms": pct(single, 95)},
           "batched": {"n": len(questions), "batch": batch, "p50_ms_per_query": pct(batched, 50),
                       "p95_ms_per_query": pct(batched, 95)},
           "peak_rss_mib": peak_rss_mib()}
    table(f"Query latency, flat index of {len(retriever)} chunks, k=10 (query embedding included)",
          ["mode", "queries", "p50 ms/query", "p95 ms/query"],
          [["single (search)", len(single), res["single"]["p50_ms"], res["single"]["p95_ms"]],
           [f"batched (search_batch, {batch})", len(questions), res["batched"]["p50_ms_per_query"],
            res["batched"]["p95_ms_per_query"]]])
    out(f"peak RSS of this process so far: {res['peak_rss_mib']:.0f} MiB")
    return res


# --- 4. ANN vs exact ----------------------------------------------------------------------------

def ann(retriever, qvecs: np.ndarray, golds: list[set[str]], n_single: int = 200) -> dict:
    from retrieval.index import IndexConfig, make_faiss_index

    vecs = retriever.vectors()
    row_doc = [h.doc_id for h in retriever.chunks(include_restricted=True)]
    k = min(10, len(vecs))
    specs = {"flat": (IndexConfig(index_type="flat"), faiss.SearchParameters()),
             "hnsw": (IndexConfig(index_type="hnsw", hnsw_m=32, hnsw_ef_construction=200, hnsw_ef_search=64),
                      faiss.SearchParametersHNSW(efSearch=64)),
             "ivf": (IndexConfig(index_type="ivf", ivf_nlist=0, ivf_nprobe=8), faiss.SearchParametersIVF(nprobe=8))}
    res, exact = {}, None
    for name, (cfg, params) in specs.items():
        t0 = time.perf_counter()
        index, info = make_faiss_index(vecs, cfg)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, rows = index.search(qvecs, k, params=params)
        batch_ms = (time.perf_counter() - t0) * 1000 / len(qvecs)
        t0 = time.perf_counter()
        for q in qvecs[:n_single]:
            index.search(q[None, :], k, params=params)
        single_ms = (time.perf_counter() - t0) * 1000 / min(n_single, len(qvecs))
        if exact is None:
            exact = rows
        recall = float(np.mean([len(set(a[a >= 0].tolist()) & set(e.tolist())) / k for a, e in zip(rows, exact)]))
        gold = float(np.mean([len(g & {row_doc[r] for r in a if r >= 0}) / len(g) for a, g in zip(rows, golds)]))
        res[name] = {"params": info, "build_s": build_s, "recall@10_vs_exact": recall, "gold_doc_recall@10": gold,
                     "ms_per_query_batched": batch_ms, "ms_per_query_single": single_ms}
    if "nlist" in res["ivf"]["params"]:
        res["ivf"]["nlist_requested"] = int(4 * math.sqrt(len(vecs)))
    table(f"ANN vs exact ({len(vecs)} chunks, {len(qvecs)} test queries, k={k})",
          ["index", "params", "build s", "recall@10 vs exact", "gold-doc recall@10", "ms/query (batch)",
           "ms/query (single)"],
          [[n, ", ".join(f"{a}={b}" for a, b in r["params"].items() if a != "type"), r["build_s"],
            r["recall@10_vs_exact"], r["gold_doc_recall@10"], r["ms_per_query_batched"], r["ms_per_query_single"]]
           for n, r in res.items()])
    return res


# --- 5. embedder tuning -------------------------------------------------------------------------

def tuning(args, work: Path, base_retriever, qvecs: np.ndarray, test: list[dict]) -> dict:
    """Tune on a subsample of qa_train; tune_embedder scores base and tuned on qa_test (--eval-qa)."""
    from hybrid.config import build_config
    from retrieval.tune_embedder import EmbedderTuneConfig, tune_embedder

    test_questions = {r["question"] for r in test}
    # HaluEval repeats a few questions; a train line whose text is a test question is dropped too.
    train = [r for r in read_jsonl(work / "qa_train.jsonl") if r["question"] not in test_questions]
    if args.train_pairs and len(train) > args.train_pairs:
        keep = sorted(random.Random(args.seed).sample(range(len(train)), args.train_pairs))
        train = [train[i] for i in keep]
    assert not {r["id"] for r in test} & {r["id"] for r in train}, "a test question leaked into the tuning data"
    sub = work / "qa_train_sub.jsonl"
    write_jsonl(sub, train)
    cfg = build_config(EmbedderTuneConfig, overrides=dict(
        index=str(work / "index"), qa=str(sub), eval_qa=str(work / "qa_test.jsonl"), out=str(work / "embedder"),
        train=dict(seed=args.seed, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                   max_length=args.max_seq_length)))
    t0 = time.perf_counter()
    res = tune_embedder(cfg, progress=False)
    tune_s = time.perf_counter() - t0
    m = {"base": res.base, "tuned": res.tuned}
    keys = ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]
    gain = {k: 100 * (m["tuned"][k] - m["base"][k]) for k in keys}
    table(f"Embedder tuning: base vs tuned on qa_test ({res.test_queries} questions; trained on "
          f"{res.train_pairs} pairs of qa_train, {res.train_rows_with_hard_negatives} with hard negatives)",
          ["embedder", *keys],
          [["base", *(m["base"][k] for k in keys)], ["tuned", *(m["tuned"][k] for k in keys)],
           ["gain (points)", *(f"{gain[k]:+.1f}" for k in keys)]])
    out(f"target recall@5 gain >= +5 points: {'PASS' if round(gain['recall@5'], 6) >= 5 else 'MISS'} ({gain['recall@5']:+.1f}); "
        f"tune_embedder (mining + training + evaluation) {tune_s / 60:.1f} min; peak RSS {peak_rss_mib():.0f} MiB")
    return {"test": m, "gain_points": gain, "target_recall@5_gain_points": 5.0, "tune_embedder_report": dataclasses.asdict(res),
            "tune_s": tune_s, "train_pairs_file": str(sub)}


# --- driver -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out=str(OUT / "halueval"), out_aliases=("--work",), defaults_in_help=True,
               out_help="work directory: corpus, questions, index, tuned embedder and the result file results.json",
               json_help="print results.json's results as one JSON object last")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-docs", type=int, default=None, help="cap the corpus (smoke runs); default all")
    p.add_argument("--throughput-docs", type=int, default=2000)
    p.add_argument("--throughput-rounds", type=int, default=2, help="alternating (plain, hybrid) rounds")
    p.add_argument("--latency-queries", type=int, default=200)
    p.add_argument("--train-pairs", type=int, default=2000, help="0 = all of qa_train")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="cap training steps (0 = no cap)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=0,
                   help="torch and FAISS threads (0 = library default). On a CPU box loaded by other jobs, 1 "
                        "thread was ~1.4x faster for batch encoding and ~30x for single queries than 2")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-tuning", action="store_true")
    args = p.parse_args(argv)
    if not DATA.is_file():
        out(f"HaluEval QA not found: expected {DATA} (../shared/data/halueval_qa/ beside the checkout); "
            f"nothing to benchmark.")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from retrieval.index import IndexConfig, build_index
    from retrieval.retriever import Retriever

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    load = os.getloadavg()[0]
    out(f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}, "
        f"load average {load:.2f}")
    if load > 0.5 * (os.cpu_count() or 1):
        out("WARNING: other jobs are using the CPU: absolute timings (and with >1 thread, single-query latency) "
            "suffer; compare ratios measured within this run, or rerun with --threads 1")
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": {**vars(args), "work": str(work)},
                     "data": str(DATA), "sections": {},
                     "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                 "faiss_threads": faiss.omp_get_max_threads(), "loadavg_start": load}}
    t_all = time.perf_counter()

    def done(name: str, t0: float, value) -> None:
        results[name] = value
        results["sections"][name] = {"minutes": round((time.perf_counter() - t0) / 60, 2),
                                     "loadavg_1min_at_end": round(os.getloadavg()[0], 2)}
        results["peak_rss_mib"] = peak_rss_mib()
        results["total_minutes"] = round((time.perf_counter() - t_all) / 60, 2)
        write_result(work / "results.json", "benchmarks.experiments.retrieval_halueval", results, argv)  # after each section: a crash keeps the rest

    t0 = time.perf_counter()
    prep = prepare(work, args.n_test, args.seed, args.limit_docs)
    out(f"split: {SPLIT_RULE} (seed {args.seed}, n_test {args.n_test}); test line numbers in {work / 'split.json'}")
    table("Data", ["passages", "train questions", "test questions", "test golds also a train gold"],
          [[prep["corpus_passages"], prep["train"], prep["test"], prep["test_gold_also_train_gold"]]])
    done("prep", t0, prep)

    if not args.skip_throughput:
        t0 = time.perf_counter()
        done("throughput", t0, throughput(work, args.throughput_docs, args.throughput_rounds))

    t0 = time.perf_counter()
    rep = build_index(work / "corpus", work / "index", IndexConfig(index_type="flat"))
    out(f"full index: {rep.documents} passages -> {rep.chunks} chunks in {rep.seconds:.1f} s "
        f"(embedded {rep.embedded_documents}, reused {rep.reused_documents} from a previous run)")
    done("full_index", t0, {"documents": rep.documents, "chunks": rep.chunks, "seconds": rep.seconds,
                            "embedded_documents": rep.embedded_documents, "reused_documents": rep.reused_documents})

    retriever = Retriever.load(work / "index")
    test = read_jsonl(work / "qa_test.jsonl")
    questions, golds = [r["question"] for r in test], [set(r["gold_ids"]) for r in test]
    t0 = time.perf_counter()
    done("latency", t0, latency(retriever, questions, args.latency_queries))

    t0 = time.perf_counter()
    qvecs = retriever.embedder.encode(questions)
    done("ann", t0, ann(retriever, qvecs, golds))

    if not args.skip_tuning:
        t0 = time.perf_counter()
        done("tuning", t0, tuning(args, work, retriever, qvecs, test))

    out(f"results: {work / 'results.json'} (total {results['total_minutes']:.1f} min, "
        f"peak RSS {results['peak_rss_mib']:.0f} MiB)")
    finish(args, "benchmarks.experiments.retrieval_halueval", results, argv, path=work / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
