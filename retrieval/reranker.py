"""A cross-encoder that re-scores the first stage's top N: `--rerank DIR` on search, ask, eval.

    from retrieval import Retriever
    r = Retriever.load("runs/index", reranker="runs/reranker")
    hits = r.search("how do I reset the buoy?", k=5)   # fused top 20, re-scored, best 5

The first stage (dense, lexical or hybrid) proposes `candidates` chunks; the cross-encoder reads
each (question, chunk) pair whole and orders them by its logit, which becomes the hit's score.
The model is a sentence-transformers CrossEncoder trained on the user's own index by
`hybrid tune reranker` (retrieval/tune_reranker.py): no reranker weights ship on PyPI.

Access: a reranker trained on restricted chunks may hold their text, so it carries
`hybrid_access.json` like every trained artifact and serves only callers holding its groups.
It also records the groups of the index it was trained on; one whose groups the index lacks was
trained on another corpus and is refused.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from core import access
from retrieval.chunking import embed_text
from core.errors import Arg, InputError
from training.precision import autocast, choose, default_device, device_of

RERANKER_FILE = "hybrid_reranker.json"


class Reranker:
    """A loaded cross-encoder with its settings and access scope."""

    def __init__(self, path: Path, model, info: dict, scope: list[str], precision: str = "fp32"):
        self.path, self.model, self.info, self.scope, self.precision = path, model, info, scope, precision
        self.candidates: int = int(info["candidates"])

    @classmethod
    def load(cls, path: str | Path, index_groups: set[str] | None = None, device: str | None = None,
             precision: str = "fp32") -> "Reranker":
        """Open a reranker directory written by `hybrid tune reranker`.

        Args:
            path: the directory.
            index_groups: groups of the index it will rerank; a reranker trained on groups the
                index has no documents of belongs to another corpus and is refused.
            device: torch device (default: CUDA when available, else CPU).
            precision: auto, fp32 or bf16: scoring under bf16 autocast (training/precision.py).

        Raises:
            InputError: not a reranker directory, no access record, or another corpus's groups.
        """
        path = Path(path)
        label = f"--rerank {path}"
        if not (path / RERANKER_FILE).is_file():
            raise InputError(f"{label}: not a reranker (no {RERANKER_FILE}); train one with 'hybrid tune reranker "
                             f"--index INDEX_DIR --out {path}'")
        try:
            info = json.loads((path / RERANKER_FILE).read_text(encoding="utf-8"))
            int(info["candidates"])
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{label}/{RERANKER_FILE}: damaged; retrain the reranker") from None
        scope = access.scope(path)
        if scope is None:
            raise InputError(f"{label}: no {access.ACCESS_FILE}, so what it learned from is unknown; retrain it")
        if index_groups is not None and not set(scope) <= index_groups:
            raise InputError(f"{label}: trained on access group(s) {', '.join(sorted(set(scope) - index_groups))} "
                             f"that this index has no documents of: it was trained on another corpus; train one on "
                             f"this index with 'hybrid tune reranker --index INDEX_DIR'")
        from sentence_transformers.cross_encoder import CrossEncoder

        device = device or default_device()
        model = CrossEncoder(str(path), device=device, local_files_only=True)
        return cls(path, model, info, scope, choose(precision, device))

    def rerank_batch(self, queries: list[str], hit_lists: list[list], k: int, groups=None,
                     batch_size: int = 64) -> list[list]:
        """Each query's hits re-ordered by the cross-encoder, best k kept (scores = its logits).

        One predict call for every pair of the batch: the model sees full batches even when
        each query has few candidates.
        """
        access.require(self.scope, groups, Arg("rerank", str(self.path)))
        pairs = [(q, embed_text(h.title, h.text)) for q, hits in zip(queries, hit_lists) for h in hits]
        if not pairs:
            return [[] for _ in queries]
        with autocast(self.precision, device_of(self.model)):
            scores = self.model.predict(pairs, batch_size=batch_size, show_progress_bar=False,
                                        convert_to_numpy=True, activation_fn=_identity())
        out, i = [], 0
        for hits in hit_lists:
            scored = [(float(scores[i + j]), j) for j in range(len(hits))]
            i += len(hits)
            # ties keep the first stage's order (sort is stable on the negated score)
            ranked = sorted(scored, key=lambda t: -t[0])[:k]
            out.append([replace(hits[j], score=s) for s, j in ranked])
        return out


def _identity():
    import torch

    return torch.nn.Identity()
