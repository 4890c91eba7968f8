"""Retrieval half of hybrid: corpus -> chunks -> embedder -> FAISS index -> retriever."""

from retrieval.errors import InputError
from retrieval.retriever import Hit, Retriever

__all__ = ["Hit", "InputError", "Retriever"]
