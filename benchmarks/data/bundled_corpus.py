"""The bundled corpus (corpora/brindle) as the benchmarks read it: where it lies and its groups.

    >>> from benchmarks.data.bundled_corpus import GROUPS, QA
    >>> GROUPS, QA.name
    (['hr', 'finance', 'security', 'engineering'], 'qa.jsonl')
"""

from pathlib import Path

DIR = Path(__file__).resolve().parents[2] / "corpora" / "brindle"
DOCS, QA = DIR / "docs", DIR / "qa.jsonl"
# Every group its documents name (tests/benchmarks/test_bundled_corpus.py checks them against the
# front matter): the benchmarks retrieve as the corpus's owner, who holds them all.
GROUPS = ["hr", "finance", "security", "engineering"]
