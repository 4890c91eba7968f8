"""Build an index directory: FAISS index + SQLite chunk store + manifest.json.

Layout of INDEX_DIR:
    index.faiss    FAISS's own format (exact inner product, HNSW, IVF or IVF-PQ; retrieval/ann.py)
    chunks.sqlite  chunk text, metadata, groups and vectors; document content hashes; the FTS5
                   table of lexical search (retrieval/lexical.py)
    manifest.json  embedder name + fingerprint, dimension, normalisation, chunking,
                   index parameters, counts, sha256 of the two files, format version

The build writes into a temporary sibling directory and renames it into
place, under an exclusive lock, so a reader never sees a half-written index and
an interrupted build leaves the previous one intact. Re-indexing reuses the
stored vectors of documents whose content hash, embedder and chunking are
unchanged, embeds only new or changed documents and drops deleted ones. Reading a built index
(manifest schema, checksums, a consistent snapshot) is retrieval/index_snapshot.py.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from retrieval import lexical
from retrieval.ann import ivfpq_problems, make_faiss_index
from core.atomic import check_writable, not_its_own, staged_dir, sha256_file
from retrieval.chunking import Chunk, chunk_document
from retrieval.corpus import DEFAULT_MAX_DOCUMENT_MB, load_corpus
from retrieval.embedder import Embedder, load_embedder
from retrieval.index_snapshot import (FORMAT_VERSION, INDEX_FILE, MANIFEST_FILE, STORE_FILE, IndexMoved,
                                      IndexSnapshot)
from core.errors import InputError
from training.precision import Precision, option

log = logging.getLogger(__name__)


@dataclass
class IndexConfig:
    """Everything `hybrid index` takes; the one source of truth for an index build.

    Attributes:
        embedder: None for the packaged all-MiniLM-L6-v2, else a local model dir.
        chunk_tokens: max embedder tokens per chunk (the title is added on top).
        overlap: tokens shared by consecutive chunks.
        index_type: `auto` = `flat` below `ann_threshold` chunks, `hnsw` above.
        ann_threshold: chunk count from which `auto` picks HNSW.
        hnsw_m, hnsw_ef_construction, hnsw_ef_search: HNSW graph parameters.
        ivf_nlist: IVF cells (0 = 4*sqrt(n)); ivf_nprobe: cells searched (IVF and IVF-PQ).
        ivfpq_m, ivfpq_nbits: IVF-PQ sub-quantizers (0 = dim/8) and bits per code (m*nbits/8 bytes a vector).
        batch_size: embedding batch size.
        on_bad_file: `skip` (warn, count, never index) or `fail` on a file that cannot be read
            safely: unreadable, non-UTF-8, malformed front matter/JSONL/groups, too big, empty.
        max_document_mb: largest document read, in MB (flag --max-document-mb); a bigger one is a
            bad file (chunking is linear, but a 1 GB file is more likely a mistake than a document).
    """

    embedder: str | None = field(default=None, metadata={
        "help": "minilm | mpnet (make models-mpnet) | a local sentence-transformers model dir.",
        "default_help": "minilm (packaged all-MiniLM-L6-v2)"})
    chunk_tokens: int = field(default=200, metadata={"help": "Max embedder tokens per chunk (the title is added on top)."})
    overlap: int = field(default=32, metadata={"help": "Tokens shared by consecutive chunks."})
    index_type: Literal["auto", "flat", "hnsw", "ivf", "ivfpq"] = field(default="auto", metadata={
        "help": "auto = exact (flat) below --ann-threshold chunks, HNSW above; ivfpq = IVF with product-quantized "
                "codes, for corpora whose float vectors do not fit in memory."})
    ann_threshold: int = field(default=50_000, metadata={"help": "Chunk count from which auto picks HNSW."})
    hnsw_m: int = field(default=32, metadata={"help": "HNSW graph degree."})
    hnsw_ef_construction: int = field(default=200, metadata={"help": "HNSW candidate list while building."})
    hnsw_ef_search: int = field(default=64, metadata={"help": "HNSW candidate list while searching."})
    ivf_nlist: int = field(default=0, metadata={"help": "IVF cells; 0 = 4 x sqrt(chunks)."})
    ivf_nprobe: int = field(default=0, metadata={
        "help": "IVF / IVF-PQ cells searched per query; 0 = 8 for ivf, 32 for ivfpq (measured)."})
    ivfpq_m: int = field(default=0, metadata={"help": "IVF-PQ sub-quantizers, a divisor of the embedding dimension; "
                                                      "0 = dim/8 (48 for MiniLM)."})
    ivfpq_nbits: int = field(default=8, metadata={"help": "IVF-PQ bits per sub-quantizer code (needs >= 2^nbits "
                                                          "chunks to train)."})
    batch_size: int = field(default=64, metadata={"help": "Embedding batch size."})
    on_bad_file: Literal["skip", "fail"] = field(default="skip", metadata={
        "help": "skip (warn and count) or fail on unreadable, non-UTF-8, empty or malformed files."})
    max_document_mb: float = field(default=DEFAULT_MAX_DOCUMENT_MB, metadata={
        "help": "Largest document read, in MB; a bigger file is refused (or skipped with --on-bad-file skip)."})
    # hybrid / convex / 0.4: chosen on HaluEval's train split and the bundled corpus's questions
    # (docs/benchmarks/search.md), never on a test question.
    mode: Literal["dense", "lexical", "hybrid"] = field(default="hybrid", metadata={
        "help": "The index's default search mode (recorded in the manifest; --mode on search, ask and eval "
                "overrides it): dense (embeddings), lexical (BM25 over FTS5) or hybrid (both, fused)."})
    fusion: Literal["rrf", "convex"] = field(default="convex", metadata={
        "help": "hybrid mode: weighted reciprocal rank fusion, or a convex combination of normalised scores."})
    precision: Precision = option()
    fusion_weight: float = field(default=0.4, metadata={"help": "hybrid mode: the dense side's weight in [0, 1]."})
    fusion_candidates: int = field(default=50, metadata={"help": "hybrid mode: hits taken from each side before "
                                                                 "fusing."})

    def problems(self) -> list[str]:
        """Every invalid setting, each naming its flag."""
        out = []
        if self.chunk_tokens < 8:
            out.append("--chunk-tokens must be at least 8")
        if not 0 <= self.overlap < max(self.chunk_tokens, 1):
            out.append("--overlap must be >= 0 and smaller than --chunk-tokens")
        if self.index_type not in ("auto", "flat", "hnsw", "ivf", "ivfpq"):
            out.append("--index-type must be one of auto, flat, hnsw, ivf, ivfpq")
        for name in ("ann_threshold", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.ivf_nlist < 0 or self.ivf_nprobe < 0:
            out.append("--ivf-nlist and --ivf-nprobe must be >= 0 (0 = automatic)")
        if self.ivfpq_m < 0:
            out.append("--ivfpq-m must be >= 0 (0 = automatic)")
        if not 1 <= self.ivfpq_nbits <= 16:
            out.append("--ivfpq-nbits must be between 1 and 16 (8 is usual)")
        if self.on_bad_file not in ("skip", "fail"):
            out.append("--on-bad-file must be skip or fail")
        if not (isinstance(self.max_document_mb, (int, float)) and self.max_document_mb > 0):
            out.append("--max-document-mb must be a number of MB above 0")
        if not 0 <= self.fusion_weight <= 1:
            out.append("--fusion-weight must be in [0, 1]")
        if self.fusion_candidates < 1:
            out.append("--fusion-candidates must be >= 1")
        return out

    def search_defaults(self) -> dict:
        """The manifest's `search` section: how the index is searched unless a call says otherwise."""
        return {"mode": self.mode, "fusion": self.fusion, "fusion_weight": self.fusion_weight,
                "fusion_candidates": self.fusion_candidates}


@dataclass
class BuildReport:
    """What a build did."""

    index_dir: str
    documents: int
    chunks: int
    embedded_documents: int
    reused_documents: int
    deleted_documents: int
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    index_type: str = "flat"
    seconds: float = 0.0
    precision: str = "fp32"  # what the embedder encoded at (training/precision.py)


@contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """Exclusive, non-blocking lock on an index path; the OS drops it if the process dies."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    fh = open(lock_path, "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise InputError(f"--out {out_dir}: another build is writing this index (lock {lock_path}); wait for it to finish") from None
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _old_rows(out_dir: Path, manifest_expect: dict) -> tuple[dict[str, str], sqlite3.Connection | None]:
    """Content hashes of the previous index's documents, if its vectors can be reused."""
    try:
        with IndexSnapshot(out_dir) as snap:
            old = snap.manifest
            if old["embedder"]["fingerprint"] != manifest_expect["fingerprint"] or old["chunking"] != manifest_expect["chunking"]:
                return {}, None
            os.close(snap.verified(INDEX_FILE)[0])
            con = snap.connect_store()
        return dict(con.execute("SELECT doc_id, content_hash FROM docs")), con
    except (InputError, IndexMoved, sqlite3.Error) as exc:  # the build holds the lock: nothing moves it
        if (out_dir / MANIFEST_FILE).exists():
            log.warning("previous index not reusable (%s); embedding everything", exc)
        return {}, None


_SCHEMA = """
CREATE TABLE chunks (row INTEGER PRIMARY KEY, chunk_id TEXT UNIQUE NOT NULL, doc_id TEXT NOT NULL,
  position INTEGER NOT NULL, title TEXT, text TEXT NOT NULL, source TEXT, groups TEXT NOT NULL,
  start INTEGER, end_ INTEGER, vector BLOB NOT NULL);
CREATE INDEX chunks_doc ON chunks(doc_id);
CREATE TABLE docs (doc_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, title TEXT, source TEXT,
  groups TEXT NOT NULL, n_chunks INTEGER NOT NULL);
"""


def build_index(corpus_dir: str | Path, out_dir: str | Path, cfg: IndexConfig | None = None,
                embedder: Embedder | None = None, progress: bool = False) -> BuildReport:
    """Index a corpus directory into `out_dir` atomically and incrementally.

    Args:
        corpus_dir: directory of documents (see retrieval.corpus).
        out_dir: index directory to create or update.
        cfg: build settings; defaults to IndexConfig().
        embedder: an already loaded embedder (else loaded from `cfg.embedder`).
        progress: show progress bars.

    Returns:
        BuildReport with counts.
    """
    cfg = cfg or IndexConfig()
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    check_writable(out_dir.parent, "--out")  # before reading the corpus, not after embedding it
    corpus = load_corpus(corpus_dir, on_bad_file=cfg.on_bad_file, max_document_mb=cfg.max_document_mb)
    if not_its_own(out_dir, MANIFEST_FILE):
        raise InputError(f"--out {out_dir}: exists and is not a hybrid index; choose an empty or new directory")
    emb = embedder or load_embedder(cfg.embedder, precision=cfg.precision)
    chunking = {"chunk_tokens": cfg.chunk_tokens, "overlap": cfg.overlap, "tokenizer": type(emb.tokenizer).__name__,
                "title_in_embedding": True}
    with build_lock(out_dir):
        old_hashes, old_con = _old_rows(out_dir, {"fingerprint": emb.fingerprint, "chunking": chunking})
        # staged_dir: build beside out_dir, swap on success; removes stages of killed builds.
        with staged_dir(out_dir) as tmp:
            con = sqlite3.connect(tmp / STORE_FILE)
            con.executescript(_SCHEMA)
            reused = [d for d in corpus.documents if old_hashes.get(d.id) == d.content_hash]
            fresh = [d for d in corpus.documents if old_hashes.get(d.id) != d.content_hash]
            rows: list[tuple] = []
            vectors: list[np.ndarray] = []
            # Reused documents: copy chunks and vectors from the previous store.
            for doc in reused:
                for r in old_con.execute("SELECT chunk_id, doc_id, position, title, text, source, groups, start, end_, vector "
                                         "FROM chunks WHERE doc_id = ? ORDER BY position", (doc.id,)):
                    rows.append(r[:9])
                    vectors.append(np.frombuffer(r[9], dtype=np.float32))
            new_chunks: list[Chunk] = []
            for doc in fresh:
                new_chunks.extend(chunk_document(doc, emb.tokenizer, cfg.chunk_tokens, cfg.overlap))
            # IVF-PQ settings these chunks cannot train fail now, not after the (long) embedding.
            if problems := ivfpq_problems(cfg, len(rows) + len(new_chunks), emb.dim):
                if old_con is not None:
                    old_con.close()
                raise InputError("; ".join(problems))
            new_vecs = emb.encode([c.embed_text for c in new_chunks], batch_size=cfg.batch_size, progress=progress)
            for c, v in zip(new_chunks, new_vecs):
                rows.append((c.chunk_id, c.doc_id, c.position, c.title, c.text, c.source, json.dumps(list(c.groups)),
                             c.start, c.end))
                vectors.append(v)
            if old_con is not None:
                old_con.close()
            matrix = np.vstack(vectors).astype(np.float32) if vectors else np.zeros((0, emb.dim), np.float32)
            con.executemany("INSERT INTO chunks (row, chunk_id, doc_id, position, title, text, source, groups, start, end_, vector) "
                            "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            [(i, *r, matrix[i].tobytes()) for i, r in enumerate(rows)])
            per_doc: dict[str, int] = {}
            for r in rows:
                per_doc[r[1]] = per_doc.get(r[1], 0) + 1
            con.executemany("INSERT INTO docs VALUES (?,?,?,?,?,?)",
                            [(d.id, d.content_hash, d.title, d.source, json.dumps(list(d.groups)), per_doc.get(d.id, 0))
                             for d in corpus.documents])
            lexical.create(con)
            con.commit()
            con.close()
            index, params = make_faiss_index(matrix, cfg)
            import faiss

            faiss.write_index(index, str(tmp / INDEX_FILE))
            manifest = {
                "format_version": FORMAT_VERSION,
                "embedder": {"name": emb.name, "fingerprint": emb.fingerprint, "dim": emb.dim, "normalize": True,
                             "max_seq_length": emb.max_seq_length, "precision": emb.precision},
                "chunking": chunking,
                "index": params,
                "counts": {"documents": len(corpus.documents), "chunks": len(rows),
                           "restricted_documents": sum(bool(d.groups) for d in corpus.documents),
                           "skipped_files": len(corpus.skipped)},
                "files": {INDEX_FILE: sha256_file(tmp / INDEX_FILE), STORE_FILE: sha256_file(tmp / STORE_FILE)},
                "lexical": {"table": lexical.TABLE, "tokenize": lexical.TOKENIZE},
                "search": cfg.search_defaults(),
                "corpus": str(Path(corpus_dir).resolve()),
                "config": asdict(cfg),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    deleted = len(set(old_hashes) - {d.id for d in corpus.documents})
    return BuildReport(index_dir=str(out_dir), documents=len(corpus.documents), chunks=len(rows),
                       embedded_documents=len(fresh), reused_documents=len(reused), deleted_documents=deleted,
                       skipped_files=corpus.skipped, index_type=params["type"], seconds=time.perf_counter() - t0,
                       precision=emb.precision)
