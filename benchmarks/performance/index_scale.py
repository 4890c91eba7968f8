"""IVF-PQ against exact search on HaluEval's ~10k passages, and the numbers a 10M-100M plan needs.

Reads the flat index that benchmarks/experiments/retrieval_halueval.py builds (WORK/index: 9,981 MiniLM chunks of
9,936 passages) and its test questions (WORK/qa_test.jsonl); writes nothing but temporary index files
and, with `--out FILE`, the result file (benchmarks/harness.py's format).

Sections (each printed as a Markdown table; `--json` prints one JSON object of everything last):
  grid     for every (nlist, m, nbits): build time (train + add) with `make_faiss_index` on the flat
           index's stored vectors, bytes per vector (written index file / n), and for every nprobe:
           recall@10 against flat's top-10 chunk rows, gold-passage hit@1/hit@10 (flat's alongside),
           ms/query for one batched call over all test questions and one query at a time, and
           recall@10 after re-scoring the top --rerank candidates with the exact stored vectors.
           nprobe = nlist scans every cell: what is left is the loss of the PQ codes alone.
  memory   RSS growth of a fresh process when it reads the flat and an IVF-PQ index file.
  embed    chunks/s of the packaged MiniLM (batch 64) on --embed-chunks real chunk texts.
  e2e      `build_index(..., IndexConfig(index_type="ivfpq"))` (default m and nlist) on a copy of the flat
           index, which reuses its stored vectors, then gold hit@1/hit@10 through Retriever in dense
           and hybrid mode against the flat index, for each --e2e-nprobe.
  scale    (--scale N, 0 = skip) N synthetic vectors, each a real chunk vector plus Gaussian noise,
           renormalised: training time on a --train-per-list x nlist sample (coarse k-means timed
           apart), add rate, bytes/vector, ms/query. Timings and sizes only; recall on such vectors
           says nothing about real text.

Run from the repository root (about 14 minutes on one core of a loaded 2-core box, 1.5 GiB peak
for the 1M scale section):
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.performance.index_scale --scale 1000000
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import OUT, finish, parser  # first: sets the offline environment

import faiss
import numpy as np

from benchmarks.experiments.retrieval_halueval import out, table  # noqa: E402  (the same Markdown tables)
from core import jsonl

WORK = OUT / "halueval"
BUILD_HINT = ("build it first (about 5 minutes of embedding on 2 cores): HF_HUB_OFFLINE=1 .venv/bin/python "
              "benchmarks/experiments/retrieval_halueval.py --threads 1 --skip-throughput --skip-tuning")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def file_bytes(index) -> int:
    """Size of the index as `faiss.write_index` stores it (what index.faiss would be)."""
    with tempfile.NamedTemporaryFile(suffix=".faiss") as fh:
        faiss.write_index(index, fh.name)
        return os.path.getsize(fh.name)


def trained_bytes(index) -> int:
    """Bytes of an IVF-PQ's trained tables (coarse centroids + PQ codebooks): fixed, whatever n is."""
    return 4 * index.d * (index.nlist + index.pq.ksub)


def overlap_at(rows: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean share of exact's top-k rows found in rows' top-k (recall@k against flat)."""
    return float(np.mean([len(set(a[:k].tolist()) & set(e[:k].tolist())) / k for a, e in zip(rows, exact)]))


def hit_at(rows: np.ndarray, row_doc: list[str], golds: list[set[str]], k: int) -> float:
    """Share of questions whose gold passage is among the documents of the top-k rows."""
    return float(np.mean([bool(g & {row_doc[r] for r in a[:k] if r >= 0}) for a, g in zip(rows, golds)]))


def timed_search(index, qvecs: np.ndarray, k: int, n_single: int) -> tuple[np.ndarray, float, float]:
    """(rows, ms/query of one batched call, ms/query one at a time over the first n_single)."""
    t0 = time.perf_counter()
    _, rows = index.search(qvecs, k)
    batch_ms = (time.perf_counter() - t0) * 1000 / len(qvecs)
    t0 = time.perf_counter()
    for q in qvecs[:n_single]:
        index.search(q[None, :], k)
    return rows, batch_ms, (time.perf_counter() - t0) * 1000 / min(n_single, len(qvecs))


def rerank_exact(index, vecs: np.ndarray, qvecs: np.ndarray, depth: int, k: int = 10) -> tuple[np.ndarray, float]:
    """Top-k after re-scoring the PQ top-`depth` with exact vectors; (rows, extra ms/query for re-scoring)."""
    _, cand = index.search(qvecs, depth)
    t0 = time.perf_counter()
    scores = np.einsum("qd,qkd->qk", qvecs, vecs[np.maximum(cand, 0)])
    scores[cand < 0] = -np.inf
    order = np.argsort(-scores, axis=1)[:, :k]
    rows = np.take_along_axis(cand, order, 1)
    return rows, (time.perf_counter() - t0) * 1000 / len(qvecs)


# --- sections -----------------------------------------------------------------------------------

def grid(vecs, qvecs, row_doc, golds, args) -> dict:
    from retrieval.index import IndexConfig, make_faiss_index

    flat, _ = make_faiss_index(vecs, IndexConfig(index_type="flat"))
    exact, f_batch, f_single = timed_search(flat, qvecs, 10, args.single)
    res = {"flat": {"bytes_per_vector": file_bytes(flat) / len(vecs), "hit@1": hit_at(exact, row_doc, golds, 1),
                    "hit@10": hit_at(exact, row_doc, golds, 10), "ms_batch": f_batch, "ms_single": f_single},
           "runs": []}
    rows_out = [["flat", "", "", "", "", res["flat"]["bytes_per_vector"], res["flat"]["bytes_per_vector"], 1.0, "", "",
                 res["flat"]["hit@1"], res["flat"]["hit@10"], "", f_batch, f_single]]
    for nlist in args.nlist:
        for m in args.m:
            for nbits in args.nbits:
                cfg = IndexConfig(index_type="ivfpq", ivf_nlist=nlist, ivfpq_m=m, ivfpq_nbits=nbits)
                t0 = time.perf_counter()
                index, params = make_faiss_index(vecs, cfg)
                build_s = time.perf_counter() - t0
                size = file_bytes(index) / len(vecs)
                marginal = size - trained_bytes(index) / len(vecs)
                for nprobe in sorted(set(args.nprobe + [params["nlist"]])):
                    if nprobe > params["nlist"]:
                        continue
                    index.nprobe = nprobe
                    rows, b_ms, s_ms = timed_search(index, qvecs, 10, args.single)
                    rr_rows, rr_ms = rerank_exact(index, vecs, qvecs, args.rerank)
                    run = {**params, "nprobe": nprobe, "build_s": build_s, "bytes_per_vector": size,
                           "bytes_per_vector_without_tables": marginal,
                           "recall@10": overlap_at(rows, exact), f"recall@10_rerank{args.rerank}": overlap_at(rr_rows, exact),
                           f"hit@10_rerank{args.rerank}": hit_at(rr_rows, row_doc, golds, 10),
                           "hit@1": hit_at(rows, row_doc, golds, 1), "hit@10": hit_at(rows, row_doc, golds, 10),
                           "ms_batch": b_ms, "ms_single": s_ms, "ms_rerank": rr_ms}
                    res["runs"].append(run)
                    rows_out.append([params["nlist"], m, nbits, nprobe, round(build_s, 2), size, marginal,
                                     run["recall@10"], run[f"recall@10_rerank{args.rerank}"], round(rr_ms, 3),
                                     run["hit@1"], run["hit@10"], run[f"hit@10_rerank{args.rerank}"], b_ms, s_ms])
    table(f"IVF-PQ vs flat ({len(vecs)} chunks, {len(qvecs)} test questions, k=10, "
          f"{faiss.omp_get_max_threads()} FAISS thread(s))",
          ["nlist", "m", "nbits", "nprobe", "build s", "bytes/vector", "bytes/vector less tables", "recall@10 vs flat",
           f"recall@10 re-ranked (top {args.rerank})", "re-rank ms/q", "hit@1", "hit@10", "hit@10 re-ranked", "ms/q batch",
           "ms/q single"],
          rows_out)
    return res


_RSS_PROBE = """
import sys, faiss
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
before = rss(); index = faiss.read_index(sys.argv[1]); print(rss() - before, index.ntotal)
"""


def rss_of(path: str) -> int:
    """Bytes a fresh process's RSS grows by when it reads the index file at path."""
    done = subprocess.run([sys.executable, "-c", _RSS_PROBE, path], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


def memory(vecs, args, extra: dict | None = None) -> dict:
    from retrieval.index import IndexConfig, make_faiss_index

    cfgs = {"flat": IndexConfig(index_type="flat"),
            "ivfpq": IndexConfig(index_type="ivfpq", ivf_nlist=args.pick[0], ivfpq_m=args.pick[1],
                                 ivfpq_nbits=args.pick[2])}
    res, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in cfgs.items():
            index, params = make_faiss_index(vecs, cfg)
            path = f"{tmp}/{name}.faiss"
            faiss.write_index(index, path)
            res[name] = {"params": params, "n": len(vecs), "file_bytes": os.path.getsize(path), "rss_bytes": rss_of(path)}
        for name, r in {**res, **(extra or {})}.items():
            rows.append([name, r["n"], r["file_bytes"] / 2**20, r["rss_bytes"] / 2**20, r["rss_bytes"] / r["n"]])
    table("Memory of a loaded index (fresh process, RSS growth on faiss.read_index)",
          ["index", "vectors", "file MiB", "RSS growth MiB", "RSS bytes/vector"], rows)
    return res


def embed(retriever, args) -> dict:
    """Chunks/s of the index's embedder on a seeded sample of real chunk texts, per torch thread count."""
    import torch

    texts = [h.text for h in retriever.chunks(include_restricted=True)]
    pick = np.random.default_rng(0).choice(len(texts), size=min(args.embed_chunks, len(texts)), replace=False)
    sample = [texts[i] for i in sorted(pick)]
    tokens = [len(retriever.embedder.tokenizer(t, truncation=True, max_length=retriever.embedder.max_seq_length)
                  ["input_ids"]) for t in sample]
    res, rows = {"chunks": len(sample), "mean_tokens": float(np.mean(tokens)), "runs": []}, []
    for threads in args.embed_threads:
        torch.set_num_threads(threads)
        retriever.embedder.encode(sample[:64])  # warm-up
        t0 = time.perf_counter()
        retriever.embedder.encode(sample, batch_size=64)
        secs = time.perf_counter() - t0
        res["runs"].append({"torch_threads": threads, "seconds": secs, "chunks_per_s": len(sample) / secs,
                            "tokens_per_s": sum(tokens) / secs, "loadavg": os.getloadavg()[0]})
        rows.append([threads, len(sample), res["mean_tokens"], secs, len(sample) / secs, sum(tokens) / secs,
                     os.getloadavg()[0]])
    torch.set_num_threads(args.threads)
    table(f"Embedding throughput, {retriever.manifest['embedder']['name']} on this CPU (batch 64, real chunk texts)",
          ["torch threads", "chunks", "mean tokens/chunk", "seconds", "chunks/s", "tokens/s", "load average"], rows)
    return res


def e2e(flat_r, qvecs, questions, golds, args) -> dict:
    """`build_index(..., index_type="ivfpq")` with default m/nlist on a copy of the flat index, searched
    through Retriever (dense and hybrid) against the flat index: the path `hybrid index --index-type ivfpq`
    takes. The copy's stored vectors are reused (same corpus, embedder and chunking): nothing is re-embedded."""
    from retrieval.index import IndexConfig, build_index
    from retrieval.retriever import Retriever

    def hits(retriever, mode):
        t0 = time.perf_counter()
        if mode == "dense":
            found = retriever.search_vectors(qvecs, k=10)
        else:
            found = retriever.search_batch(questions, k=10, mode=mode)
        ms = (time.perf_counter() - t0) * 1000 / len(questions)
        docs = [[h.doc_id for h in hs] for hs in found]
        return {f"hit@{k}": float(np.mean([bool(g & set(d[:k])) for d, g in zip(docs, golds)])) for k in (1, 10)} | \
            {"ms_per_query": ms}

    res, rows = {"runs": []}, []
    for mode in ("dense", "hybrid"):
        r = {"index": "flat", "mode": mode, **hits(flat_r, mode)}
        res["runs"].append(r)
        rows.append(["flat", "", mode, r["hit@1"], r["hit@10"], r["ms_per_query"]])
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "index"
        shutil.copytree(args.work / "index", copy)
        known = {f.name for f in dataclasses.fields(IndexConfig)}
        cfg = IndexConfig(**{k: v for k, v in flat_r.manifest["config"].items() if k in known})
        cfg.index_type, cfg.ivf_nlist, cfg.ivfpq_m, cfg.ivfpq_nbits = "ivfpq", 0, 0, 8
        rep = build_index(args.work / "corpus", copy, cfg, embedder=flat_r.embedder)
        res.update(build_s=rep.seconds, embedded_documents=rep.embedded_documents, index_bytes=(copy / "index.faiss").stat().st_size)
        pq = Retriever.load(copy, embedder=flat_r.embedder)
        res["params"] = dict(pq.manifest["index"])
        for nprobe in args.e2e_nprobe:
            # The one search knob the manifest carries; building with --ivf-nprobe N changes only it.
            pq.manifest["index"]["nprobe"] = nprobe
            for mode in ("dense", "hybrid"):
                r = {"index": "ivfpq", "nprobe": nprobe, "mode": mode, **hits(pq, mode)}
                res["runs"].append(r)
                rows.append(["ivfpq", nprobe, mode, r["hit@1"], r["hit@10"], r["ms_per_query"]])
        pq.con.close()
    p = res["params"]
    table(f"`build_index(index_type=\"ivfpq\")` through Retriever: nlist {p['nlist']}, m {p['m']}, nbits {p['nbits']}; "
          f"built in {res['build_s']:.1f} s with {res['embedded_documents']} documents re-embedded, "
          f"index.faiss {res['index_bytes'] / 2**20:.2f} MiB",
          ["index", "nprobe", "mode", "gold hit@1", "gold hit@10", "ms/query (batch of 1000; hybrid embeds the queries)"],
          rows)
    return res


def scale(vecs, qvecs, args) -> dict:
    """Timings and sizes of IVF-PQ at args.scale synthetic vectors made from the real ones."""
    rng = np.random.default_rng(0)
    n, dim = args.scale, vecs.shape[1]
    nlist, m, nbits = args.scale_nlist, args.pick[1], args.pick[2]
    t0 = time.perf_counter()
    syn = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):  # in blocks: the noise for 1M rows at once would double the peak
        hi = min(n, lo + 100_000)
        block = vecs[rng.integers(0, len(vecs), hi - lo)] + args.noise * rng.standard_normal((hi - lo, dim), np.float32)
        syn[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    gen_s = time.perf_counter() - t0
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    sample = syn[rng.choice(n, size=min(n, args.train_per_list * nlist), replace=False)]
    index.cp.max_points_per_centroid = args.train_per_list  # train on exactly this sample
    # The coarse k-means first, on its own (IndexIVF skips a quantizer that holds nlist centroids),
    # so the two costs that scale differently are timed apart: it grows with sample x nlist, PQ's does not.
    t0 = time.perf_counter()
    faiss.Clustering(dim, nlist, index.cp).train(sample, quantizer)
    coarse_s = time.perf_counter() - t0
    index.train(sample)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.add(syn)
    add_s = time.perf_counter() - t0
    res = {"n": n, "nlist": nlist, "m": m, "nbits": nbits, "noise": args.noise, "train_points": len(sample),
           "generate_s": gen_s, "train_s": train_s, "coarse_train_s": coarse_s, "add_s": add_s, "add_per_s": n / add_s, "runs": []}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/scale.faiss"
        faiss.write_index(index, path)
        res["file_bytes"], res["rss_bytes"] = os.path.getsize(path), rss_of(path)
    for nprobe in args.scale_nprobe:
        index.nprobe = nprobe
        _, b_ms, s_ms = timed_search(index, qvecs, 10, args.single)
        res["runs"].append({"nprobe": nprobe, "ms_batch": b_ms, "ms_single": s_ms})
        rows.append([n, nlist, m, nbits, len(sample), round(train_s, 1), round(coarse_s, 1), round(n / add_s),
                     res["file_bytes"] / n,
                     nprobe, b_ms, s_ms])
    table(f"IVF-PQ at {n:,} synthetic vectors (real chunk vectors + N(0, {args.noise}^2) noise; timings and sizes only)",
          ["vectors", "nlist", "m", "nbits", "training points", "train s", "of which coarse k-means s", "add vectors/s", "bytes/vector", "nprobe",
           "ms/q batch", "ms/q single"], rows)
    return res


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, defaults_in_help=True, out_help="result file (JSON); none unless given",
               json_help="print every number as one JSON object last")
    p.add_argument("--work", type=Path, default=WORK, help="retrieval_halueval.py's work dir (index, qa_test.jsonl)")
    p.add_argument("--nlist", type=ints, default=[64, 255], help="IVF cells (255 = make_faiss_index's cap at 9,981 chunks)")
    p.add_argument("--m", type=ints, default=[24, 48, 96], help="PQ sub-quantizers (divisors of 384)")
    p.add_argument("--nbits", type=ints, default=[4, 8], help="bits per PQ code")
    p.add_argument("--nprobe", type=ints, default=[8, 16, 32, 64], help="cells searched (plus nprobe = nlist)")
    p.add_argument("--rerank", type=int, default=50, help="PQ candidates re-scored with exact vectors")
    p.add_argument("--pick", type=ints, default=[255, 48, 8], help="nlist,m,nbits of the memory and scale sections")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--embed-chunks", type=int, default=400)
    p.add_argument("--embed-threads", type=ints, default=[1, 2], help="torch thread counts timed for embedding")
    p.add_argument("--e2e-nprobe", type=ints, default=[8, 32], help="nprobe values of the end-to-end section")
    p.add_argument("--sections", default="grid,e2e,embed,scale,memory", help="which sections to run")
    p.add_argument("--scale", type=int, default=0, help="synthetic vectors for the scale section (0 = skip)")
    p.add_argument("--scale-nlist", type=int, default=1024)
    p.add_argument("--scale-nprobe", type=ints, default=[16, 64])
    p.add_argument("--train-per-list", type=int, default=64, help="scale: training sample = this x nlist")
    p.add_argument("--noise", type=float, default=0.02, help="scale: per-dimension noise std")
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    args = p.parse_args(argv)
    index_dir, qa = args.work / "index", args.work / "qa_test.jsonl"
    if not (index_dir / "manifest.json").is_file() or not qa.is_file():
        out(f"no HaluEval index at {index_dir} (or no {qa}); {BUILD_HINT}")
        return 2
    logging.basicConfig(level=logging.ERROR)  # make_faiss_index's small-sample warnings are expected here
    import torch

    from retrieval.retriever import Retriever

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out(f"cpus {os.cpu_count()}, torch/FAISS threads {args.threads}, load average {os.getloadavg()[0]:.2f}")
    retriever = Retriever.load(index_dir)
    if retriever.manifest["index"]["type"] != "flat":
        out(f"{index_dir} is a {retriever.manifest['index']['type']} index; this compares against flat: {BUILD_HINT}")
        return 2
    vecs = retriever.vectors()  # the exact vectors (the store's copy; identical to index.faiss reconstruct_n)
    row_doc = [h.doc_id for h in retriever.chunks(include_restricted=True)]
    test = [obj for _, obj in jsonl.read_jsonl(qa, "--work", "rows")]
    qvecs = retriever.embedder.encode([r["question"] for r in test])
    golds = [set(r["gold_ids"]) for r in test]
    res = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": {"cpus": os.cpu_count(), "threads": args.threads, "loadavg_start": os.getloadavg()[0]},
           "chunks": len(vecs), "dim": int(vecs.shape[1]), "questions": len(test)}
    t0 = time.perf_counter()
    sections = set(args.sections.split(","))
    if "grid" in sections:
        res["grid"] = grid(vecs, qvecs, row_doc, golds, args)
    if "e2e" in sections:
        res["e2e"] = e2e(retriever, qvecs, [r["question"] for r in test], golds, args)
    if "embed" in sections:
        res["embed"] = embed(retriever, args)
    extra = {}
    if args.scale and "scale" in sections:
        res["scale"] = scale(vecs, qvecs, args)
        extra = {f"ivfpq, {args.scale:,} synthetic": {"n": args.scale, "file_bytes": res["scale"]["file_bytes"],
                                                       "rss_bytes": res["scale"]["rss_bytes"]}}
    if "memory" in sections:
        res["memory"] = memory(vecs, args, extra)
    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    res["minutes"] = (time.perf_counter() - t0) / 60
    out(f"\n{res['minutes']:.1f} min; load average at the end {res['machine']['loadavg_end']:.2f}")
    finish(args, "benchmarks.performance.index_scale", res, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
