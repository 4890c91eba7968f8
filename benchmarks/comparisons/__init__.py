"""Comparisons side by side: the packaged embedders, generators and readers, the search modes and the reranker."""
