from benchmarks.data.bundled_corpus import DOCS, GROUPS, QA
from retrieval.corpus import load_corpus


def test_groups_are_exactly_those_the_bundled_documents_name():
    named = {g for d in load_corpus(DOCS).documents for g in d.groups}
    assert sorted(GROUPS) == sorted(named) and len(GROUPS) == len(set(GROUPS))
    assert QA.is_file()
