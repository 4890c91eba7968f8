"""Build an index directory: FAISS index + SQLite chunk store + manifest.json.

Layout of INDEX_DIR:
    index.faiss    FAISS's own format (exact inner product, HNSW or IVF)
    chunks.sqlite  chunk text, metadata, groups and vectors; document content hashes
    manifest.json  embedder name + fingerprint, dimension, normalisation, chunking,
                   index parameters, counts, sha256 of the two files, format version

The build writes into a temporary sibling directory and renames it into
place, under an exclusive lock, so a reader never sees a half-written index and
an interrupted build leaves the previous one intact. Re-indexing reuses the
stored vectors of documents whose content hash, embedder and chunking are
unchanged, embeds only new or changed documents and drops deleted ones.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from retrieval.atomic import swap_dir_into_place
from retrieval.chunking import Chunk, chunk_document
from retrieval.corpus import load_corpus
from retrieval.embedder import Embedder, load_embedder
from retrieval.errors import InputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE, STORE_FILE, MANIFEST_FILE = "index.faiss", "chunks.sqlite", "manifest.json"


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
        ivf_nlist: IVF cells (0 = 4*sqrt(n)); ivf_nprobe: cells searched.
        batch_size: embedding batch size.
        on_bad_file: `skip` (warn, count) or `fail` on unreadable/non-UTF-8/empty files.
    """

    embedder: str | None = None
    chunk_tokens: int = 200
    overlap: int = 32
    index_type: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    ann_threshold: int = 50_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 64
    ivf_nlist: int = 0
    ivf_nprobe: int = 8
    batch_size: int = 64
    on_bad_file: Literal["skip", "fail"] = "skip"

    def problems(self) -> list[str]:
        """Every invalid setting, each naming its flag."""
        out = []
        if self.chunk_tokens < 8:
            out.append("--chunk-tokens must be at least 8")
        if not 0 <= self.overlap < max(self.chunk_tokens, 1):
            out.append("--overlap must be >= 0 and smaller than --chunk-tokens")
        if self.index_type not in ("auto", "flat", "hnsw", "ivf"):
            out.append("--index-type must be one of auto, flat, hnsw, ivf")
        for name in ("ann_threshold", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.ivf_nlist < 0:
            out.append("--ivf-nlist must be >= 0 (0 = automatic)")
        if self.on_bad_file not in ("skip", "fail"):
            out.append("--on-bad-file must be skip or fail")
        return out


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(index_dir: Path, verify: bool = True) -> dict:
    """Read and (by default) verify an index directory.

    Raises:
        InputError: missing directory or files, unknown format, checksum mismatch.
    """
    index_dir = Path(index_dir)
    mpath = index_dir / MANIFEST_FILE
    if not mpath.exists():
        raise InputError(f"--index {index_dir}: no {MANIFEST_FILE} there; build one with 'hybrid index CORPUS_DIR --out {index_dir}'")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{mpath}: corrupted manifest (not JSON); rebuild the index with 'hybrid index'") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{mpath}: index format {manifest.get('format_version')!r} is not {FORMAT_VERSION}; rebuild it with 'hybrid index'")
    if verify:
        for name, expected in manifest["files"].items():
            path = index_dir / name
            if not path.exists():
                raise InputError(f"{path}: missing index file; rebuild the index with 'hybrid index'")
            if sha256_file(path) != expected:
                raise InputError(f"{path}: checksum mismatch (corrupted or truncated); rebuild the index with 'hybrid index'")
    return manifest


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


def make_faiss_index(vectors: np.ndarray, cfg: IndexConfig) -> tuple["faiss.Index", dict]:
    """Build the FAISS index for (n, d) float32 unit vectors; row i gets id i.

    Returns:
        (index, parameters recorded in the manifest: type and search knobs).
    """
    import faiss  # imported on use: stages that read only JSONL need no FAISS

    n, dim = vectors.shape
    kind = cfg.index_type
    if kind == "auto":
        kind = "hnsw" if n >= cfg.ann_threshold else "flat"
    if kind == "ivf":
        nlist = cfg.ivf_nlist or max(1, int(4 * math.sqrt(n)))
        nlist = min(nlist, max(1, n // 39))  # FAISS wants ~39 training points per cell
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add(vectors)
        index.nprobe = cfg.ivf_nprobe  # stored in the file too, for readers that bypass Retriever
        return index, {"type": "ivf", "nlist": nlist, "nprobe": cfg.ivf_nprobe}
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


def _old_rows(out_dir: Path, manifest_expect: dict) -> tuple[dict[str, str], sqlite3.Connection | None]:
    """Content hashes of the previous index's documents, if its vectors can be reused."""
    try:
        old = read_manifest(out_dir, verify=True)
    except InputError as exc:
        if (out_dir / MANIFEST_FILE).exists():
            log.warning("previous index not reusable (%s); embedding everything", exc)
        return {}, None
    if old["embedder"]["fingerprint"] != manifest_expect["fingerprint"] or old["chunking"] != manifest_expect["chunking"]:
        return {}, None
    con = sqlite3.connect(f"file:{out_dir / STORE_FILE}?mode=ro&immutable=1", uri=True)
    return dict(con.execute("SELECT doc_id, content_hash FROM docs")), con


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
    corpus = load_corpus(corpus_dir, on_bad_file=cfg.on_bad_file)
    if out_dir.exists() and (not out_dir.is_dir() or (not (out_dir / MANIFEST_FILE).exists() and any(out_dir.iterdir()))):
        raise InputError(f"--out {out_dir}: exists and is not a hybrid index; choose an empty or new directory")
    emb = embedder or load_embedder(cfg.embedder)
    chunking = {"chunk_tokens": cfg.chunk_tokens, "overlap": cfg.overlap, "tokenizer": type(emb.tokenizer).__name__,
                "title_in_embedding": True}
    with build_lock(out_dir):
        old_hashes, old_con = _old_rows(out_dir, {"fingerprint": emb.fingerprint, "chunking": chunking})
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
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
            con.commit()
            con.close()
            index, params = make_faiss_index(matrix, cfg)
            import faiss

            faiss.write_index(index, str(tmp / INDEX_FILE))
            manifest = {
                "format_version": FORMAT_VERSION,
                "embedder": {"name": emb.name, "fingerprint": emb.fingerprint, "dim": emb.dim, "normalize": True,
                             "max_seq_length": emb.max_seq_length},
                "chunking": chunking,
                "index": params,
                "counts": {"documents": len(corpus.documents), "chunks": len(rows),
                           "restricted_documents": sum(bool(d.groups) for d in corpus.documents),
                           "skipped_files": len(corpus.skipped)},
                "files": {INDEX_FILE: sha256_file(tmp / INDEX_FILE), STORE_FILE: sha256_file(tmp / STORE_FILE)},
                "corpus": str(Path(corpus_dir).resolve()),
                "config": asdict(cfg),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
            swap_dir_into_place(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    deleted = len(set(old_hashes) - {d.id for d in corpus.documents})
    return BuildReport(index_dir=str(out_dir), documents=len(corpus.documents), chunks=len(rows),
                       embedded_documents=len(fresh), reused_documents=len(reused), deleted_documents=deleted,
                       skipped_files=corpus.skipped, index_type=params["type"], seconds=time.perf_counter() - t0)
