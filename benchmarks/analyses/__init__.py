"""Analyses of eval output already written: bounds, pairings, re-grades; nothing is trained."""
