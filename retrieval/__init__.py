"""Retrieval: corpus -> chunks -> embedder -> FAISS index + BM25 -> hybrid search with access control;
contrastive embedder and reranker tuning."""

import core  # noqa: F401  (first: other libraries' notices quieted before torch is imported)
from core.errors import InputError  # noqa: E402
from retrieval.retriever import Hit, Retriever  # noqa: E402

__all__ = ["Hit", "InputError", "Retriever"]
