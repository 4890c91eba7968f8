"""Experiment drivers: train and evaluate end to end (HaluEval factuality, retrieval, judge, documents only)."""
