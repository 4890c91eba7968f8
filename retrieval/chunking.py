"""Token-aware chunking with stable ids.

Chunks are windows of at most `chunk_tokens` tokens of the embedder's own
tokenizer, consecutive windows sharing `overlap` tokens. A window's end is
pulled back to a sentence or line break when one lies in its second half, so
chunks (and the quotes a generator copies from them) rarely cut a sentence.
Each chunk keeps its character span in the document, so the chunks of a
document reassemble it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrieval.corpus import Document

_BREAK_AFTER = ".!?;:\n"


@dataclass(frozen=True)
class Chunk:
    """A piece of one document.

    Attributes:
        chunk_id: `"{doc_id}#{position}"`, stable while the document is unchanged.
        doc_id, title, source, groups: copied from the document.
        position: 0-based index of the chunk within its document.
        start, end: character span of `text` in the document body.
        text: the chunk's text (`document.text[start:end]`).
    """

    chunk_id: str
    doc_id: str
    position: int
    title: str
    text: str
    source: str
    groups: tuple[str, ...]
    start: int
    end: int

    @property
    def embed_text(self) -> str:
        """What the embedder sees: the title counts, so it leads the chunk."""
        return embed_text(self.title, self.text)


def embed_text(title: str, text: str) -> str:
    """The string embedded for a chunk: its document title, a newline, its text."""
    return f"{title}\n{text}" if title else text


def _break_ok(text: str, char_start: int) -> bool:
    """True when a chunk may end right before the token starting at `char_start`."""
    before = text[:char_start].rstrip(" \t")
    return bool(before) and (before[-1] in _BREAK_AFTER or text[len(before):char_start].count("\n") > 0)


def chunk_document(doc: Document, tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Split one document into token windows.

    Args:
        doc: the document.
        tokenizer: a Hugging Face *fast* tokenizer (for character offsets).
        chunk_tokens: maximum tokens per chunk (> 0).
        overlap: tokens shared by consecutive chunks (0 <= overlap < chunk_tokens).

    Returns:
        Chunks in document order; their spans cover the whole text.
    """
    if chunk_tokens <= 0 or not 0 <= overlap < chunk_tokens:
        raise ValueError("need chunk_tokens > 0 and 0 <= overlap < chunk_tokens")
    text = doc.text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    starts = [s for s, e in enc["offset_mapping"] if e > s]
    n = len(starts)
    # Token windows as [first, last) token indexes.
    windows: list[tuple[int, int]] = []
    first = 0
    while True:
        last = min(first + chunk_tokens, n)
        if last < n:
            for cut in range(last, first + max(chunk_tokens // 2, 1), -1):
                if _break_ok(text, starts[cut]):
                    last = cut
                    break
        windows.append((first, last))
        if last >= n:
            break
        first = max(last - overlap, first + 1)
    chunks = []
    for pos, (a, b) in enumerate(windows):
        # Character spans run from a window's first token to the next window's
        # territory, so whitespace between tokens is never lost.
        start = 0 if a == 0 else starts[a]
        end = len(text) if b >= n else starts[b]
        piece = text[start:end]
        chunks.append(Chunk(chunk_id=f"{doc.id}#{pos}", doc_id=doc.id, position=pos, title=doc.title,
                            text=piece, source=doc.source, groups=doc.groups, start=start, end=end))
    return chunks


def reassemble(chunks: list[Chunk]) -> str:
    """Rebuild a document body from its chunks (overlaps removed via the spans)."""
    out, covered = [], 0
    for ch in sorted(chunks, key=lambda c: c.position):
        if ch.end > covered:
            out.append(ch.text[max(covered - ch.start, 0):])
            covered = ch.end
    return "".join(out)
