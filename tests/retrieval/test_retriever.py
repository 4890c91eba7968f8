import itertools

import pytest

from core.errors import InputError
from retrieval.retriever import Retriever

QUERIES = ["salary band", "budget 2027", "battery", "SECRET", "office", "anything at all"]


@pytest.fixture()
def retriever(small_index, tiny_embedder):
    return Retriever.load(small_index, embedder=tiny_embedder)


def visible(groups, doc_groups):
    return not doc_groups or bool(set(groups or ()) & set(doc_groups))


DOC_GROUPS = {"salaries": ("hr",), "budget": ("finance", "security")}


@pytest.mark.parametrize("groups", [None, [], ["hr"], ["finance"], ["security"], ["hr", "security"], ["other"]])
def test_acl_never_leaks_whatever_k(retriever, groups):
    n = len(retriever)
    for q, k in itertools.product(QUERIES, [1, 3, n, n + 50]):
        hits = retriever.search(q, k=k, groups=groups)
        for h in hits:
            assert visible(groups, DOC_GROUPS.get(h.doc_id, ())), (q, k, groups, h.doc_id)
            if not visible(groups, ("hr",)):
                assert "SECRET-HR" not in h.text
            if not visible(groups, ("finance", "security")):
                assert "SECRET-FIN" not in h.text
        n_visible = sum(visible(groups, DOC_GROUPS.get(c.doc_id, ())) for c in retriever.chunks(include_restricted=True))
        assert len(hits) == min(k, n_visible)  # k is filled from visible chunks only
        assert len({h.chunk_id for h in hits}) == len(hits)


def test_group_members_see_their_documents(retriever):
    all_hr = retriever.search("x", k=len(retriever), groups=["hr"])
    assert "salaries" in {h.doc_id for h in all_hr}
    assert "budget" not in {h.doc_id for h in all_hr}
    assert "budget" in {h.doc_id for h in retriever.search("x", k=len(retriever), groups=["security"])}
    assert not [c for c in retriever.chunks() if c.doc_id in DOC_GROUPS]


def test_batched_equals_single(retriever):
    batched = retriever.search_batch(QUERIES, k=4, groups=["hr"])
    for q, hits in zip(QUERIES, batched):
        single = retriever.search(q, k=4, groups=["hr"])
        assert [h.chunk_id for h in hits] == [h.chunk_id for h in single]
        assert [h.score for h in hits] == pytest.approx([h.score for h in single], abs=1e-5)


@pytest.mark.parametrize("k", [0, -3])
def test_k_must_be_positive(retriever, k):
    with pytest.raises(InputError, match="k=(0|-3|True): must be a positive integer"):
        retriever.search("x", k=k)


def test_hits_are_sorted_and_carry_metadata(retriever):
    hits = retriever.search("Kestrel buoy battery", k=5, groups=["hr"])
    assert [h.score for h in hits] == sorted([h.score for h in hits], reverse=True)
    for h in hits:
        assert h.chunk_id.startswith(h.doc_id + "#") and h.title and h.text
        assert set(h.to_dict()) == {"doc_id", "chunk_id", "score", "title", "text"}


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query_is_an_input_error(retriever, query):
    with pytest.raises(InputError, match="pass a non-empty query"):
        retriever.search(query)
    with pytest.raises(InputError, match="query 2 is empty; pass a non-empty query"):
        retriever.search_batch(["battery", query])


def test_queries_must_be_strings_in_a_list(retriever):
    with pytest.raises(InputError, match="not one string"):
        retriever.search_batch("battery")
    with pytest.raises(InputError, match="query 1: must be a string"):
        retriever.search_batch([None])
    with pytest.raises(InputError, match="must be a string"):
        retriever.search(b"battery")
    with pytest.raises(InputError, match="k=(0|-3|True): must be a positive integer"):
        retriever.search("x", k=True)
    assert retriever.search_batch([]) == []


def test_groups_given_as_one_string_mean_that_group(retriever):
    # Iterated, "hr" would be the groups "h" and "r": a chunk of group "h" would become visible.
    retriever._groups = [("h",) if g == ("hr",) else g for g in retriever._groups]
    retriever._allowed_cache.clear()
    assert not {h.doc_id for h in retriever.search("x", k=len(retriever), groups="hr")} & {"salaries"}
    assert "salaries" in {h.doc_id for h in retriever.search("x", k=len(retriever), groups=["h"])}
