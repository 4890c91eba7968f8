"""Lexical search (FTS5, BM25) and rank fusion: scores, hostile queries, access control in every mode."""

from __future__ import annotations

import json
import math

import pytest

from core.errors import InputError
from retrieval.index import IndexConfig, build_index
from retrieval.index_snapshot import MANIFEST_FILE
from retrieval.lexical import fuse, match_expression
from retrieval.retriever import Retriever
from tests.conftest import write_doc
from tests.hybrid.test_cli import assert_clean_error, run

# Words porter stemming leaves alone, so the test's own BM25 tokenises as FTS5 does.
DOCS = {
    "a": ("red", "red fox and brown dog"),
    "b": ("blue", "blue bird red red sky"),
    "c": ("green", "green frog near the pond"),
    "d": ("dog", "dog dog dog bark"),
    "e": ("cat", "cat sat on red mat with dog"),
}


@pytest.fixture()
def lexical_index(tmp_path, tiny_embedder):
    for name, (title, body) in DOCS.items():
        write_doc(tmp_path / "corpus", f"{name}.md", title, body)
    write_doc(tmp_path / "corpus", "secret.md", "red", "SECRET-HR red dog salary", ["hr"])
    out = tmp_path / "index"
    build_index(tmp_path / "corpus", out, IndexConfig(chunk_tokens=64, overlap=0), embedder=tiny_embedder)
    return out


def bm25(query: list[str], docs: dict[str, list[str]], k1: float = 1.2, b: float = 0.75) -> dict[str, float]:
    """FTS5's bm25() (title and text columns of weight 1; document length = both columns)."""
    n, avgdl = len(docs), sum(len(d) for d in docs.values()) / len(docs)
    out = {}
    for doc_id, words in docs.items():
        score = 0.0
        for q in dict.fromkeys(query):
            n_q = sum(q in d for d in docs.values())
            idf = max(math.log((n - n_q + 0.5) / (n_q + 0.5)), 1e-6)
            f = words.count(q)
            score += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(words) / avgdl))
        out[doc_id] = score
    return out


def test_lexical_top_k_equals_a_brute_force_bm25(lexical_index):
    r = Retriever.load(lexical_index)
    docs = {h.doc_id: (h.title + " " + h.text).lower().replace("-", " ").split()
            for h in r.chunks(include_restricted=True)}
    for query in ["red dog", "dog", "pond frog", "red"]:
        expected = bm25(query.split(), docs)
        public = {d: s for d, s in expected.items() if d != "secret" and s > 0}
        hits = r.search(query, k=10, mode="lexical")
        assert [h.doc_id for h in hits] == sorted(public, key=lambda d: -public[d])
        assert [h.score for h in hits] == pytest.approx([public[h.doc_id] for h in hits], rel=1e-6)


@pytest.mark.parametrize("query", ['"red', "red*", "NEAR(red", "red AND", "-dog", "dog OR", "café ☃ red", "a'b \"c",
                                   "^red", "red:dog", "(((dog", "NOT dog", 'title:"red" NEAR/2'])
def test_any_user_text_is_a_valid_query(lexical_index, query):
    r = Retriever.load(lexical_index)
    for mode in ("lexical", "hybrid"):
        r.search(query, k=3, mode=mode)  # never an FTS syntax error


def test_wordless_queries_are_refused_clearly(lexical_index):
    r = Retriever.load(lexical_index)
    with pytest.raises(InputError, match="no words to search for"):
        r.search("?!", mode="lexical")
    for query in ['"', "*", "(((", "--"]:
        with pytest.raises(InputError, match="no words to search for"):
            r.search(query, mode="hybrid")
    assert match_expression('NEAR("x" y)') == '"NEAR" OR "x" OR "y"'
    # function words are dropped, unless nothing else is left
    assert match_expression("Which dog is the red one?") == '"dog" OR "red" OR "one"'
    assert r.search("what is it", k=1, mode="lexical") == []  # searched as is: no chunk holds these words
    assert r.search("Which is the red dog?", k=1, mode="lexical")[0].doc_id == r.search("red dog", k=1,
                                                                                        mode="lexical")[0].doc_id


@pytest.mark.parametrize("mode", ["lexical", "hybrid"])
def test_restricted_chunks_never_reach_an_outsider_in_any_mode_at_any_k(lexical_index, mode):
    r = Retriever.load(lexical_index)
    for k in range(1, 8):
        for query in ["SECRET-HR salary", "red dog"]:
            assert "secret" not in {h.doc_id for h in r.search(query, k=k, mode=mode)}
            assert "secret" not in {h.doc_id for h in r.search(query, k=k, mode=mode, groups=["finance"])}
    assert r.search("SECRET-HR salary", k=1, mode=mode, groups=["hr"])[0].doc_id == "secret"


def test_fusion_hand_computed():
    dense, lex = [(0.9, 1), (0.8, 2)], [(7.0, 2), (3.0, 3)]
    rrf = dict((r, s) for s, r in fuse(dense, lex, "rrf", 0.5))
    assert rrf[2] == pytest.approx(0.5 / 62 + 0.5 / 61) and rrf[1] == pytest.approx(0.5 / 61)
    assert rrf[3] == pytest.approx(0.5 / 62)
    assert [r for _, r in fuse(dense, lex, "rrf", 0.5)] == [2, 1, 3]
    assert [r for _, r in fuse(dense, lex, "rrf", 1.0)][:2] == [1, 2]  # all weight on the dense side
    convex = dict((r, s) for s, r in fuse(dense, lex, "convex", 0.25))
    # min-max: dense 1 -> 1, 2 -> 0; lexical 2 -> 1, 3 -> 0
    assert convex == pytest.approx({1: 0.25, 2: 0.75, 3: 0.0})


def test_hybrid_finds_what_either_side_finds(lexical_index):
    r = Retriever.load(lexical_index)
    hits = r.search("green frog pond", k=6, mode="hybrid")
    assert hits[0].doc_id == "c"  # lexical puts it first; the random dense side cannot outvote it alone
    assert len({h.chunk_id for h in hits}) == len(hits)  # de-duplicated by chunk


def test_incremental_rebuild_updates_the_lexical_table(lexical_index, tmp_path, tiny_embedder):
    write_doc(tmp_path / "corpus", "c.md", "green", "green toad under the bridge")
    build_index(tmp_path / "corpus", lexical_index, IndexConfig(chunk_tokens=64, overlap=0), embedder=tiny_embedder)
    r = Retriever.load(lexical_index)
    assert [h.doc_id for h in r.search("toad", k=3, mode="lexical")] == ["c"]
    assert r.search("frog", k=3, mode="lexical") == []


def test_an_index_without_the_lexical_table_says_to_reindex(lexical_index):
    m = json.loads((lexical_index / MANIFEST_FILE).read_text())
    del m["lexical"], m["search"]  # how an index built before lexical search looks
    (lexical_index / MANIFEST_FILE).write_text(json.dumps(m))
    r = Retriever.load(lexical_index)
    assert r.search("red dog", k=2)  # dense, the only mode such an index has, still works
    with pytest.raises(InputError, match="re-run 'hybrid index .* without re-embedding"):
        r.search("red dog", mode="lexical")


def test_search_cli_modes(lexical_index):
    res = run("search", "green frog", "--index", lexical_index, "--mode", "lexical", "--json", "-k", 2)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["hits"][0]["doc_id"] == "c"
    assert_clean_error(run("search", "frog", "--index", lexical_index, "--mode", "fuzzy"), "--mode", "dense")
    assert_clean_error(run("search", "?!", "--index", lexical_index, "--mode", "lexical"), "no words")


def test_the_group_filter_is_inside_the_sql(lexical_index):
    """Restricted rows never leave SQLite for an outsider (the retriever's own check is a second line)."""
    from retrieval import lexical

    r = Retriever.load(lexical_index)
    secret = {h.chunk_id for h in r.chunks(include_restricted=True) if h.groups}
    rows = {row: cid for row, cid in r.con.execute("SELECT row, chunk_id FROM chunks")}
    for groups in (None, ["finance"], ["hr"]):
        found = {rows[row] for _, row in lexical.search(r.con, "SECRET-HR red dog salary", 10, groups)}
        assert bool(found & secret) == (groups == ["hr"])


def test_eval_and_raft_mining_use_the_mode_they_are_given(lexical_index, tmp_path):
    from hybrid.eval_retrieval import evaluate_retrieval
    from hybrid.pipeline import passages_for
    from core.qa import load_qa
    from tuning.raft_data import RaftSettings, build_examples

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "q", "question": "Where is the green frog?", "answers": ["near the pond"],
                              "gold_ids": ["c"]}) + "\n")
    r = Retriever.load(lexical_index)
    rep = evaluate_retrieval(qa, lexical_index, mode="lexical")
    assert rep.mode == "lexical" and rep.metrics["recall@1"] == 1.0
    assert evaluate_retrieval(qa, lexical_index).mode == "hybrid"  # the index's default
    lex = r.search("Where is the green frog?", k=3, mode="lexical")
    assert [p["chunk_id"] for p in passages_for(r, ["Where is the green frog?"], 3, mode="lexical")[0]] == \
        [h.chunk_id for h in lex]
    calls = []
    real = Retriever.search_batch
    Retriever.search_batch = lambda self, *a, **kw: calls.append(kw.get("mode")) or real(self, *a, **kw)
    try:
        build_examples(load_qa(qa), r, RaftSettings(num_distractors=1, mode="lexical"))
    finally:
        Retriever.search_batch = real
    assert calls == ["lexical"]
