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


# --- structure: the windowing rule, checked against the tokenizer directly --------------------------

def _naive_break_ok(text, char_start):
    """The rule as first written (O(n) a call): the text before the token, trailing blanks dropped,
    ends in a sentence/line break."""
    before = text[:char_start].rstrip(" \t")
    return bool(before) and before[-1] in ".!?;:\n"


DOCS = [TEXT, "no breaks at all " * 200, "Short.", "",
        "\n\n".join(f"Line {i}; item: {'word ' * (i % 17)}end!" for i in range(120)),
        "Tabs\t\tand  spaces.  \t Next sentence?  " * 80]


@pytest.mark.parametrize("size,overlap", [(16, 0), (32, 8), (40, 30), (64, 63)])
@pytest.mark.parametrize("text", DOCS, ids=range(len(DOCS)))
def test_windows_follow_the_rule(tokenizer, text, size, overlap):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, e in enc["offset_mapping"] if e > s]
    n = len(starts)
    chunks = chunk_document(Document(id="d", title="", text=text, source="d"), tokenizer, size, overlap)
    assert reassemble(chunks) == text and chunks[0].start == 0 and chunks[-1].end == len(text)
    first = 0
    for i, c in enumerate(chunks):
        # A chunk starts at its first token and ends where the next window's territory begins.
        last = n if c.end == len(text) else starts.index(c.end)
        assert c.start == (0 if first == 0 else starts[first])
        assert 0 < last - first <= size or n == 0
        if last < n:
            # The end is the latest break in the window's second half, else the full window.
            cands = [j for j in range(first + max(size // 2, 1) + 1, min(first + size, n) + 1)
                     if j < n and _naive_break_ok(text, starts[j])]
            assert last == (cands[-1] if cands else first + size)
            first = max(last - overlap, first + 1)  # consecutive windows share `overlap` tokens
        else:
            assert i == len(chunks) - 1


def test_long_documents_are_tokenised_in_pieces_with_identical_chunks(tokenizer, monkeypatch, caplog):
    import retrieval.chunking as chunking

    text = "\n".join([TEXT] * 12)
    doc = Document(id="d", title="T", text=text, source="big.md")
    whole = chunk_document(doc, tokenizer, 48, 8)
    monkeypatch.setattr(chunking, "_SEGMENT_CHARS", 700)  # many pieces, cut at newlines
    monkeypatch.setattr(chunking, "_PROGRESS_EVERY", 2_000)
    assert len(chunking._segments(text, 700)) > 10
    with caplog.at_level("INFO", logger="retrieval.chunking"):
        pieces = chunk_document(doc, tokenizer, 48, 8)
    assert pieces == whole
    progress = [r.getMessage() for r in caplog.records if "tokenised" in r.getMessage()]
    assert progress and all(m.startswith("chunking big.md: ") for m in progress)


class _CountingText(str):
    """A str that counts the characters its slices copy."""

    copied = 0

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if isinstance(key, slice):
            _CountingText.copied += len(out)
        return out


def test_chunking_copies_the_text_a_bounded_number_of_times(tokenizer):
    # The quadratic version copied text[:start] for every candidate cut: ~n^2/chunk characters.
    text = _CountingText(" ".join(f"Fact {i} says the valve opens at {i % 97} bar" for i in range(4000)))
    _CountingText.copied = 0
    chunks = chunk_document(Document(id="d", title="", text=text, source="d"), tokenizer, 64, 16)
    assert len(chunks) > 100
    assert _CountingText.copied <= 3 * len(text)
