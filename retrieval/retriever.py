"""Search an index directory, with access control enforced inside the search.

    from retrieval import Retriever
    r = Retriever.load("runs/index")
    hits = r.search("how do I reset the buoy?", k=5, groups=["engineering"])

A chunk with groups is visible only to callers passing one of them; a chunk
without groups is public. The dense filter is a FAISS ID selector and the lexical
one a condition inside the SQL (retrieval/lexical.py), so the top k are drawn from
visible chunks only (k is filled whenever enough visible chunks exist) and
restricted text is never read from the store for other callers, in every mode
(`mode="dense" | "lexical" | "hybrid"`; the index's manifest names the default).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from core import access

from retrieval import lexical
from retrieval.embedder import Embedder, load_embedder
from core.errors import Arg, InputError
from training.precision import Precision, option
from retrieval.index_snapshot import INDEX_FILE, STORE_FILE, IndexMoved, IndexSnapshot

# A load that loses the race with a swap retries for this long. Builds swap once each, so only a storm
# of back-to-back swaps on a starved machine loses for seconds (CI saw 20 tries in ~1 s all lose).
_LOAD_PATIENCE_S = 15.0
MODES = ("dense", "lexical", "hybrid")


@dataclass
class SearchConfig:
    """Settings of `hybrid search` (YAML keys = field names)."""

    query: str = field(metadata={"argument": True, "help": "What to look for."})
    index: str = field(metadata={"help": "Index directory built by 'hybrid index'."})
    k: int = field(default=5, metadata={"flag": "-k", "help": "Number of hits."})
    groups: list[str] = access.option("Access group of the caller; repeat for several. Without it only public "
                                      "documents are searched.")
    mode: Literal["dense", "lexical", "hybrid"] | None = field(default=None, metadata={
        "help": "dense, lexical (BM25) or hybrid (both, fused).", "default_help": "the index's (its manifest's "
                                                                                  "'search.mode')"})
    rerank: str | None = field(default=None, metadata={
        "help": "Reranker dir (hybrid tune reranker): re-score the first stage's top N with it."})
    precision: Precision = option()

    def problems(self) -> list[str]:
        out = access.group_problems(self.groups)
        if self.k < 1:
            out.append(f"-k must be a positive integer, got {self.k}")
        if not self.query.strip():
            out.append("QUERY is empty; pass the words to search for")
        return out


@dataclass(frozen=True)
class Hit:
    """One search result: a chunk and its cosine score."""

    doc_id: str
    chunk_id: str
    score: float
    title: str
    text: str
    source: str = ""
    groups: tuple[str, ...] = ()  # access groups of the chunk; () = public

    def to_dict(self) -> dict:
        return {"doc_id": self.doc_id, "chunk_id": self.chunk_id, "score": round(self.score, 6),
                "title": self.title, "text": self.text}


def _stored_groups(raw: str) -> tuple[str, ...]:
    """A chunk's groups from the store; anything but a JSON list of names is refused (a string
    "hr" read as a sequence would grant the groups "h" and "r")."""
    groups = json.loads(raw)
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise ValueError(f"bad groups {raw[:40]!r}")
    return tuple(groups)


def _check_k(k) -> None:
    if type(k) is not int or k < 1:  # type(): True is not a k
        raise InputError(Arg("k", k), ": must be a positive integer")


class Retriever:
    """Access-controlled dense retriever over one index directory."""

    def __init__(self, index_dir: Path, manifest: dict, index: faiss.Index, con: sqlite3.Connection,
                 embedder: Embedder):
        self.index_dir, self.manifest, self.index, self.con, self.embedder = index_dir, manifest, index, con, embedder
        # row -> groups; public rows have none. Kept in memory: one small tuple per chunk.
        self._groups: list[tuple[str, ...]] = [()] * index.ntotal
        for row, groups in con.execute("SELECT row, groups FROM chunks"):
            self._groups[row] = _stored_groups(groups)
        self._allowed_cache: dict[frozenset, np.ndarray | None] = {}
        # How to search unless a call says otherwise; an index built before lexical search is dense only.
        self.search_settings = manifest.get("search") or {"mode": "dense"}
        self.lexical = "lexical" in manifest and lexical.present(con)
        self.reranker = None  # set by load(..., reranker=DIR)
        # A tuned embedder may hold text of restricted chunks (access.py): searching with it is
        # then only for callers holding its groups. Packaged and plain models are public.
        edir = Path(embedder.path)
        tuned = (edir / access.ACCESS_FILE).exists() or (edir / "hybrid_tuning.json").exists()
        self._embedder_scope = access.scope(edir) if tuned else []
        if self._embedder_scope is None:
            raise InputError(f"embedder {edir}: tuned without {access.ACCESS_FILE}, so what it learned from is "
                             f"unknown; retune it with this version of hybrid ('hybrid tune embedder')")

    @classmethod
    def load(cls, index_dir: str | Path, embedder: Embedder | str | None = None,
             reranker: str | Path | None = None, precision: str = "fp32") -> "Retriever":
        """Open and verify an index.

        Everything is read from one snapshot of the directory (IndexSnapshot), so a build that
        swaps in a new index meanwhile makes this see the old index or the new one, whole.

        Args:
            index_dir: directory written by `build_index`.
            embedder: a loaded Embedder or a spec; default: the one named in the manifest.
            reranker: a directory from `hybrid tune reranker`; searches then re-score the first
                stage's top N with it (retrieval/reranker.py).
            precision: auto, fp32 or bf16 for the query encoder and the reranker (training/precision.py).

        Raises:
            InputError: missing/corrupted index, an embedder whose fingerprint differs, or a
                reranker that is not one or was trained on another corpus's groups.
        """
        index_dir = Path(index_dir)
        deadline, attempt = time.monotonic() + _LOAD_PATIENCE_S, 0
        while True:
            try:
                with IndexSnapshot(index_dir) as snap:
                    r = cls._from_snapshot(snap, embedder, precision)
                break
            except IndexMoved:
                attempt += 1
                if time.monotonic() >= deadline:
                    raise InputError(Arg("index_dir", str(index_dir), field="index"), ": kept changing while being "
                                     "opened (a build is replacing it); try again") from None
                # Jitter, so a reader does not fall into step with a writer that swaps on a fixed beat.
                time.sleep(random.uniform(0, min(0.1, 0.002 * attempt)))
        if reranker is not None:
            from retrieval.reranker import Reranker

            try:
                r.reranker = Reranker.load(reranker, index_groups=r.index_groups(), precision=precision)
            except BaseException:
                r.con.close()
                raise
        return r

    @classmethod
    def _from_snapshot(cls, snap: IndexSnapshot, embedder: Embedder | str | None, precision: str) -> "Retriever":
        index_dir, manifest = snap.dir, snap.manifest
        if not isinstance(embedder, Embedder):
            embedder = load_embedder(embedder if embedder is not None else manifest["embedder"]["name"],
                                     precision=precision)
        want = manifest["embedder"]["fingerprint"]
        if embedder.fingerprint != want:
            raise InputError(f"--embedder {embedder.name}: fingerprint {embedder.fingerprint[:12]} differs from the one "
                             f"index {index_dir} was built with ({manifest['embedder']['name']}, {want[:12]}); "
                             f"query with that embedder or rebuild with 'hybrid index ... --embedder {embedder.name}'")
        # The store first: SQLite opens it by path, which a swap can take away; FAISS reads the
        # descriptor the snapshot pinned, which no swap can.
        con = snap.connect_store()
        try:
            fd, data = snap.verified(INDEX_FILE, keep_bytes=True)
            os.close(fd)
            try:
                import faiss  # imported on use: stages that read only JSONL need no FAISS

                # From the verified bytes, not the path: the checked file is the loaded file.
                index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
            except RuntimeError:
                raise InputError(f"{index_dir / INDEX_FILE}: FAISS cannot read it; rebuild the index with "
                                 f"'hybrid index'") from None
            del data
            n, lo, hi = con.execute("SELECT COUNT(*), MIN(row), MAX(row) FROM chunks").fetchone()
            # Every FAISS row needs its store row (with its groups), and the manifest must agree.
            consistent = (index.ntotal == n == manifest["counts"]["chunks"] and index.d == manifest["embedder"]["dim"]
                          and (n == 0 or (lo, hi) == (0, n - 1)))
            if not consistent:
                raise InputError(f"{index_dir}: index.faiss, chunks.sqlite and manifest.json disagree on the chunks; "
                                 f"rebuild the index with 'hybrid index'")
            return cls(index_dir, manifest, index, con, embedder)
        except (sqlite3.Error, ValueError, TypeError, IndexError):
            con.close()
            raise InputError(f"{index_dir / STORE_FILE}: not a hybrid chunk store; rebuild the index with 'hybrid index'") from None
        except BaseException:
            con.close()
            raise

    def __len__(self) -> int:
        return self.index.ntotal

    def index_groups(self) -> set[str]:
        """Every access group some chunk of the index is restricted to (for the owner's training jobs)."""
        return {g for gs in self._groups for g in gs}

    def _allowed(self, groups) -> np.ndarray | None:
        """Row ids visible to a caller with `groups`; None when every row is visible."""
        key = access.caller_groups(groups)
        if key not in self._allowed_cache:
            rows = [i for i, g in enumerate(self._groups) if not g or key.intersection(g)]
            self._allowed_cache[key] = None if len(rows) == len(self._groups) else np.asarray(rows, dtype=np.int64)
        return self._allowed_cache[key]

    def _params(self, allowed: np.ndarray | None):
        params = self.manifest["index"]
        import faiss

        sel = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        if params["type"] == "hnsw":
            p = faiss.SearchParametersHNSW(efSearch=params["ef_search"])
        elif params["type"] in ("ivf", "ivfpq"):
            p = faiss.SearchParametersIVF(nprobe=params["nprobe"])
        else:
            p = faiss.SearchParameters()
        if sel is not None:
            p.sel = sel
        return p, sel  # sel must outlive the search call (FAISS keeps a raw pointer)

    def search_vectors(self, queries: np.ndarray, k: int = 5, groups=None) -> list[list[Hit]]:
        """Dense search with precomputed query vectors.

        Args:
            queries: float32 array (n, dim), L2-normalised.
            k: hits per query (>= 1).
            groups: caller's access groups.

        Returns:
            n lists of at most k hits, best first.
        """
        return [self._hits(scored) for scored in self._dense_rows(queries, k, groups)]

    def _visible(self, row: int, key: frozenset) -> bool:
        return not self._groups[row] or bool(key.intersection(self._groups[row]))

    def _dense_rows(self, queries: np.ndarray, k: int, groups) -> list[list[tuple[float, int]]]:
        _check_k(k)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or (len(queries) and queries.shape[1] != self.index.d):
            raise ValueError(f"query vectors must have shape (n, {self.index.d}), got {queries.shape}")
        access.require(self._embedder_scope, groups, f"embedder {self.embedder.path} of index {self.index_dir}")
        allowed = self._allowed(groups)
        n_visible = len(self) if allowed is None else len(allowed)
        kk = min(k, n_visible)
        if kk == 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        params, _sel = self._params(allowed)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), kk, params=params)
        key = access.caller_groups(groups)
        return [[(float(s), int(r)) for s, r in zip(srow, rrow) if r >= 0 and self._visible(int(r), key)]  # defence in depth
                for srow, rrow in zip(scores, rows)]

    def _lexical_rows(self, query: str, n: int, groups) -> list[tuple[float, int]]:
        if not self.lexical:
            raise InputError(Arg("index_dir", str(self.index_dir), field="index"), ": built before lexical search "
                             f"existed; re-run 'hybrid index CORPUS_DIR --out {self.index_dir}' (it adds the lexical "
                             f"table without re-embedding)")
        key = access.caller_groups(groups)
        return [(s, r) for s, r in lexical.search(self.con, query, n, groups) if self._visible(r, key)]

    def _hits(self, scored: list[tuple[float, int]]) -> list[Hit]:
        if not scored:
            return []
        rows = [r for _, r in scored]
        marks = ",".join("?" * len(rows))
        found = {r[0]: r[1:] for r in self.con.execute(
            f"SELECT row, doc_id, chunk_id, title, text, source FROM chunks WHERE row IN ({marks})", rows)}
        return [Hit(doc_id=found[r][0], chunk_id=found[r][1], score=s, title=found[r][2] or "", text=found[r][3],
                    source=found[r][4] or "", groups=self._groups[r]) for s, r in scored]

    def search(self, query: str, k: int = 5, groups=None, mode: str | None = None, rerank: bool = True) -> list[Hit]:
        """Top-k visible chunks for one query (see `search_batch`)."""
        if not isinstance(query, str):
            raise InputError(f"the query must be a string, got {type(query).__name__}")
        return self.search_batch([query], k=k, groups=groups, mode=mode, rerank=rerank)[0]

    def search_batch(self, queries: list[str], k: int = 5, groups=None, batch_size: int = 64,
                     mode: str | None = None, rerank: bool = True) -> list[list[Hit]]:
        """Top-k visible chunks for many queries.

        Args:
            queries: n query strings.
            k: hits per query.
            groups: caller's access groups (None = public only).
            batch_size: embedding batch size.
            mode: "dense" (embeddings), "lexical" (BM25, FTS5) or "hybrid" (the two fused as the
                manifest's `search` section says); None = the index's default mode.
            rerank: with a reranker loaded (`Retriever.load(..., reranker=DIR)`), re-score the
                first stage's top `reranker.candidates` and keep the best k (beyond those, hits
                follow in the first stage's order with its scores); False = first stage only.

        Returns:
            n lists of Hit, best first.

        Raises:
            InputError: an empty or whitespace-only query (pass a non-empty query), a query that is
                not a string, `queries` given as one string, or a bad k.
        """
        _check_k(k)
        if isinstance(queries, (str, bytes)):
            raise InputError("search_batch takes a list of queries, not one string; use search() for one query")
        queries = list(queries)
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise InputError(f"query {i + 1}: must be a string, got {type(q).__name__}")
            if not q.strip():
                raise InputError(f"query {i + 1} is empty; pass a non-empty query")
        mode = self.search_settings["mode"] if mode is None else mode
        if mode not in MODES:
            raise InputError(Arg("mode", mode), f": expected one of {', '.join(MODES)}")
        if not queries:
            return []
        if self.reranker is None or not rerank:
            return self._first_stage(queries, k, groups, batch_size, mode)
        access.require(self.reranker.scope, groups, Arg("rerank", str(self.reranker.path)))  # before any text is read
        n = self.reranker.candidates
        hits = self._first_stage(queries, max(k, n), groups, batch_size, mode)
        top = self.reranker.rerank_batch(queries, [h[:n] for h in hits], k, groups=groups)
        # asked for more than the reranker re-scores: the rest follow in the first stage's order
        return [(t + h[n:])[:k] for t, h in zip(top, hits)]

    def _first_stage(self, queries: list[str], k: int, groups, batch_size: int, mode: str) -> list[list[Hit]]:
        if mode == "lexical":
            return [self._hits(self._lexical_rows(q, k, groups)[:k]) for q in queries]
        if mode == "dense":
            return self.search_vectors(self.embedder.encode(queries, batch_size=batch_size), k=k, groups=groups)
        st = self.search_settings
        n = max(k, st["fusion_candidates"])
        lex = [self._lexical_rows(q, n, groups) for q in queries]  # first: a wordless query fails before encoding
        dense = self._dense_rows(self.embedder.encode(queries, batch_size=batch_size), n, groups)
        return [self._hits(lexical.fuse(d, l, st["fusion"], st["fusion_weight"])[:k]) for d, l in zip(dense, lex)]

    def chunks(self, doc_id: str | None = None, groups=None, include_restricted: bool = False) -> list[Hit]:
        """Chunks in store order (all, or those of one document), score 0.

        Args:
            doc_id: only this document's chunks.
            groups: caller's access groups.
            include_restricted: every chunk regardless of groups; for the index
                owner's training jobs, never for serving answers.
        """
        allowed = None if include_restricted else self._allowed(groups)
        visible = None if allowed is None else set(allowed.tolist())
        sql = "SELECT row FROM chunks" + (" WHERE doc_id = ?" if doc_id else "") + " ORDER BY row"
        rows = [r for (r,) in self.con.execute(sql, (doc_id,) if doc_id else ()) if visible is None or r in visible]
        return self._hits([(0.0, r) for r in rows])

    def vectors(self) -> np.ndarray:
        """All stored chunk vectors, shape (n_chunks, dim), row order."""
        dim = self.manifest["embedder"]["dim"]
        out = np.zeros((len(self), dim), dtype=np.float32)
        for row, blob in self.con.execute("SELECT row, vector FROM chunks"):
            out[row] = np.frombuffer(blob, dtype=np.float32)
        return out
