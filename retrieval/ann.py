"""Build the FAISS index over an index build's chunk vectors: exact, HNSW, IVF or IVF-PQ.

The index is always built from the full matrix of unit vectors in row order (row i gets id i);
incremental re-indexing saves the embedding, not the index, so the quantizers of IVF and IVF-PQ
are re-trained on every build from the stored vectors, and a deleted document simply has no row.

IVF-PQ keeps only `m * nbits / 8` bytes of code (plus FAISS's 8-byte id) per vector instead of
`4 * dim`: the layout for corpora whose float vectors do not fit in memory
(docs/benchmarks/index-scale.md measures its recall and sizes on HaluEval).

    >>> import numpy as np
    >>> from retrieval.index import IndexConfig
    >>> vecs = np.random.default_rng(0).normal(size=(2000, 32)).astype(np.float32)
    >>> index, params = make_faiss_index(vecs, IndexConfig(index_type="ivfpq", ivf_nlist=16))
    >>> params
    {'type': 'ivfpq', 'nlist': 16, 'nprobe': 32, 'm': 4, 'nbits': 8}
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np

from core.errors import InputError

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)
# `cfg` below is a retrieval.index.IndexConfig, not imported: that module imports this one

# FAISS's k-means wants ~39 training points per centroid (it warns below that); IVF cells are
# capped to honour it, PQ codebooks (2^nbits centroids each) get a warning from us instead.
POINTS_PER_CENTROID = 39
# Default sub-quantizers: dim / PQ_DIM_PER_SUBQUANTIZER (48 for MiniLM's 384), chosen on
# HaluEval (docs/benchmarks/index-scale.md): dim/16 lost too much recall to be worth its bytes.
PQ_DIM_PER_SUBQUANTIZER = 8


def default_pq_m(dim: int) -> int:
    """Sub-quantizers for `--ivfpq-m 0`: the largest divisor of dim not above dim / 8.

    >>> default_pq_m(384), default_pq_m(768), default_pq_m(100)
    (48, 96, 10)
    """
    target = max(1, dim // PQ_DIM_PER_SUBQUANTIZER)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def ivf_nlist(cfg, n: int) -> int:
    """IVF cells for n vectors: --ivf-nlist (0 = 4 x sqrt(n)), capped at n / 39."""
    want = cfg.ivf_nlist or max(1, int(4 * math.sqrt(n)))
    nlist = min(want, max(1, n // POINTS_PER_CENTROID))
    if cfg.ivf_nlist and nlist < want:
        log.warning("--ivf-nlist %d lowered to %d: %d chunks train at most n/%d cells", want, nlist, n,
                    POINTS_PER_CENTROID)
    return nlist


def ivfpq_problems(cfg, n: int, dim: int) -> list[str]:
    """What keeps an IVF-PQ index of n vectors of dim from being built (checked before embedding)."""
    if cfg.index_type != "ivfpq":
        return []
    m = cfg.ivfpq_m or default_pq_m(dim)
    out = []
    if dim % m:
        out.append(f"--ivfpq-m {m} does not divide the embedder's dimension {dim}; pick a divisor of {dim} "
                   f"(e.g. {default_pq_m(dim)}) or 0 for the default")
    if n < 2 ** cfg.ivfpq_nbits:
        out.append(f"--index-type ivfpq: {n} chunks are too few to train --ivfpq-nbits {cfg.ivfpq_nbits} "
                   f"(needs at least 2^{cfg.ivfpq_nbits} = {2 ** cfg.ivfpq_nbits}); lower --ivfpq-nbits "
                   f"or use --index-type flat")
    return out


def _ivfpq(vectors: np.ndarray, cfg) -> tuple["faiss.Index", dict]:
    import faiss

    n, dim = vectors.shape
    if problems := ivfpq_problems(cfg, n, dim):
        raise InputError("; ".join(problems))
    m, nlist = cfg.ivfpq_m or default_pq_m(dim), ivf_nlist(cfg, n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, cfg.ivfpq_nbits, faiss.METRIC_INNER_PRODUCT)
    ksub = 2 ** cfg.ivfpq_nbits
    if n < POINTS_PER_CENTROID * ksub:
        enough = int(math.log2(max(n, 2 * POINTS_PER_CENTROID) / POINTS_PER_CENTROID))  # >= 1
        log.warning("IVF-PQ codebooks of %d centroids trained on %d chunks (FAISS suggests %d); recall may "
                    "suffer; --ivfpq-nbits %d would have enough", ksub, n, POINTS_PER_CENTROID * ksub, enough)
        index.pq.cp.min_points_per_centroid = 1  # only silences FAISS's own stderr copy of that warning
    index.train(vectors)
    index.add(vectors)
    nprobe = cfg.ivf_nprobe or NPROBE["ivfpq"]
    index.nprobe = nprobe  # stored in the file too, for readers that bypass Retriever
    return index, {"type": "ivfpq", "nlist": nlist, "nprobe": nprobe, "m": m, "nbits": cfg.ivfpq_nbits}


# --ivf-nprobe 0: cells searched per query by index type. IVF-PQ's compressed distances need more
# cells for the same recall: on HaluEval's 9,981 chunks (m 48) dense hit@10 is 0.824 at 8 cells and
# 0.909 at 32 (flat 0.933; docs/benchmarks/index-scale.md).
NPROBE = {"ivf": 8, "ivfpq": 32}


def make_faiss_index(vectors: np.ndarray, cfg) -> tuple["faiss.Index", dict]:
    """Build the FAISS index for (n, d) float32 unit vectors; row i gets id i.

    Returns:
        (index, parameters recorded in the manifest: type and search knobs).

    Raises:
        InputError: IVF-PQ settings that cannot be trained on these vectors (see `ivfpq_problems`).
    """
    import faiss  # imported on use: stages that read only JSONL need no FAISS

    n, dim = vectors.shape
    kind = cfg.index_type
    if kind == "auto":
        kind = "hnsw" if n >= cfg.ann_threshold else "flat"
    if kind == "ivfpq":
        return _ivfpq(vectors, cfg)
    if kind == "ivf":
        nlist = ivf_nlist(cfg, n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add(vectors)
        nprobe = cfg.ivf_nprobe or NPROBE["ivf"]
        index.nprobe = nprobe  # stored in the file too, for readers that bypass Retriever
        return index, {"type": "ivf", "nlist": nlist, "nprobe": nprobe}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.add(vectors)
        index.hnsw.efSearch = cfg.hnsw_ef_search
        return index, {"type": "hnsw", "m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction,
                       "ef_search": cfg.hnsw_ef_search}
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    return index, {"type": "flat"}
