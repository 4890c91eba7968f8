import json

import pytest

from retrieval.corpus import load_corpus, parse_front_matter
from retrieval.errors import InputError
from tests.conftest import write_doc


def test_reads_markdown_text_and_jsonl_with_ids_titles_groups(tmp_path):
    write_doc(tmp_path, "a/b.md", "Bee", "body b", ["hr", "finance"])
    (tmp_path / "plain.txt").write_text("# Heading Title\nplain body")
    (tmp_path / "more.jsonl").write_text(json.dumps({"id": "j1", "text": "json body", "groups": ["x"]}) + "\n\n"
                                         + json.dumps({"id": "j2", "title": "Jay", "text": "two"}) + "\n")
    corpus = load_corpus(tmp_path)
    docs = {d.id: d for d in corpus.documents}
    assert set(docs) == {"a/b", "plain", "j1", "j2"}
    assert docs["a/b"].title == "Bee" and docs["a/b"].groups == ("finance", "hr") and docs["a/b"].text == "body b"
    assert docs["plain"].title == "Heading Title"
    assert docs["j1"].groups == ("x",) and docs["j2"].title == "Jay"
    assert docs["j1"].source.endswith("more.jsonl:1")


def test_content_hash_changes_with_text_and_groups(tmp_path):
    write_doc(tmp_path, "a.md", "A", "one")
    h1 = load_corpus(tmp_path).documents[0].content_hash
    write_doc(tmp_path, "a.md", "A", "one", ["hr"])
    h2 = load_corpus(tmp_path).documents[0].content_hash
    write_doc(tmp_path, "a.md", "A", "two", ["hr"])
    assert len({h1, h2, load_corpus(tmp_path).documents[0].content_hash}) == 3


def test_non_utf8_and_empty_files_are_skipped_and_counted_or_fail(tmp_path):
    write_doc(tmp_path, "ok.md", "OK", "fine")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    write_doc(tmp_path, "empty.md", "Empty", "   \n")
    corpus = load_corpus(tmp_path)
    assert [d.id for d in corpus.documents] == ["ok"]
    reasons = sorted(r for _, r in corpus.skipped)
    assert reasons == ["empty document", "not UTF-8 text"]
    with pytest.raises(InputError, match="empty.md: empty document"):
        load_corpus(tmp_path, on_bad_file="fail")
    (tmp_path / "empty.md").unlink()
    with pytest.raises(InputError, match="latin1.txt: not UTF-8"):
        load_corpus(tmp_path, on_bad_file="fail")


@pytest.mark.parametrize("setup,pattern", [
    (lambda p: None, "holds no .md"),
    (lambda p: (p / "x.jsonl").write_text('{"id": "a", "text": "t"}\n{not json\n'), r"x.jsonl:2: not valid JSON"),
    (lambda p: (p / "x.jsonl").write_text('{"text": "t"}\n'), r"x.jsonl:1: field 'id'"),
    (lambda p: (p / "x.md").write_text("---\ntitle: [unclosed\n---\nbody"), r"x.md.*front matter is not valid YAML"),
    (lambda p: (p / "x.md").write_text("---\ngroups: 5\n---\nbody"), r"x.md: 'groups' must be a list"),
    (lambda p: ((p / "a.md").write_text("x"), (p / "a.jsonl").write_text('{"id": "a", "text": "t"}\n')),
     "duplicate document id 'a'"),
])
def test_bad_corpora_raise_one_clear_error(tmp_path, setup, pattern):
    setup(tmp_path)
    with pytest.raises(InputError, match=pattern):
        load_corpus(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_corpus(tmp_path / "nope")


def test_front_matter_optional():
    assert parse_front_matter("no front matter", "f") == ({}, "no front matter")
    meta, body = parse_front_matter("---\ntitle: T\n---\nbody\n", "f")
    assert meta == {"title": "T"} and body == "body\n"
