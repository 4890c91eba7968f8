import pytest

from retrieval.chunking import chunk_document, reassemble
from retrieval.corpus import Document


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from retrieval.embedder import resolve_embedder

    return AutoTokenizer.from_pretrained(str(resolve_embedder(None)[1]))


TEXT = ("# Heading\n\n" + " ".join(f"Fact number {i} says the valve opens at {i * 3} bar." for i in range(60))
        + "\n\nA last line without a full stop")


@pytest.mark.parametrize("size,overlap", [(32, 0), (32, 8), (50, 10), (500, 0)])
def test_chunks_reassemble_document_and_respect_token_limit(tokenizer, size, overlap):
    doc = Document(id="d", title="T", text=TEXT, source="d.md", groups=("hr",))
    chunks = chunk_document(doc, tokenizer, size, overlap)
    assert reassemble(chunks) == TEXT
    for c in chunks:
        assert c.text == TEXT[c.start:c.end]
        assert len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= size
        assert (c.doc_id, c.title, c.source, c.groups) == ("d", "T", "d.md", ("hr",))
    assert [c.chunk_id for c in chunks] == [f"d#{i}" for i in range(len(chunks))]
    if size == 500:
        assert len(chunks) == 2
    if overlap:
        assert all(chunks[i].end > chunks[i + 1].start for i in range(len(chunks) - 1))


def test_chunks_prefer_sentence_ends(tokenizer):
    doc = Document(id="d", title="", text=TEXT, source="d.md")
    chunks = chunk_document(doc, tokenizer, 40, 0)
    assert all(c.text.rstrip().endswith((".", "Heading")) for c in chunks[:-1])


def test_chunk_ids_stable_and_title_embedded(tokenizer):
    doc = Document(id="x/y", title="Valve manual", text=TEXT, source="x/y.md")
    a = chunk_document(doc, tokenizer, 64, 8)
    b = chunk_document(doc, tokenizer, 64, 8)
    assert a == b
    assert a[0].embed_text.startswith("Valve manual\n")


def test_bad_parameters(tokenizer):
    doc = Document(id="d", title="", text="x", source="d")
    with pytest.raises(ValueError):
        chunk_document(doc, tokenizer, 10, 10)
