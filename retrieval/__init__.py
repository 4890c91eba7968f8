"""Retrieval half of hybrid: corpus -> chunks -> embedder -> FAISS index -> retriever."""

from retrieval import quiet_libraries

# Before anything imports torch, transformers or mlflow: their notices that tell a user nothing (the list
# and why each is one: retrieval/quiet_libraries.py). Every command and library entry point passes here.
quiet_libraries.install()

from retrieval.errors import InputError  # noqa: E402
from retrieval.retriever import Hit, Retriever  # noqa: E402

__all__ = ["Hit", "InputError", "Retriever"]
