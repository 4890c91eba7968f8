"""Token-aware chunking with stable ids.

Chunks are windows of at most `chunk_tokens` tokens of the embedder's own
tokenizer, consecutive windows sharing `overlap` tokens. A window's end is
pulled back to a sentence or line break when one lies in its second half, so
chunks (and the quotes a generator copies from them) rarely cut a sentence.
Each chunk keeps its character span in the document, so the chunks of a
document reassemble it exactly.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass

import numpy as np

from retrieval.corpus import Document

log = logging.getLogger(__name__)

_BREAK_AFTER = ".!?;:\n"
_BREAK_RUN = re.compile(f"[{re.escape(_BREAK_AFTER)}][ \t]*")


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


# Documents are tokenised in pieces of about this many characters, cut after a newline: the
# tokenizer's offset lists cost ~100 bytes a token, so a 50 MB document in one call needs GBs.
_SEGMENT_CHARS = 250_000
_PROGRESS_EVERY = 5_000_000  # characters between progress lines for a long document


def _segments(text: str, size: int) -> list[tuple[int, int]]:
    """[start, end) pieces of about `size` characters, each but the last ending right after a newline.

    Tokenizers split words at whitespace (WordPiece and SentencePiece embedders alike), so pieces
    cut at a newline tokenise exactly as the whole text does; a piece with no newline in reach
    runs on to the next one."""
    out, a = [], 0
    while len(text) - a > size:
        cut = text.rfind("\n", a + size // 2, a + size)
        if cut < 0:
            cut = text.find("\n", a + size)
            if cut < 0:
                break
        out.append((a, cut + 1))
        a = cut + 1
    out.append((a, len(text)))
    return out


def token_starts(text: str, tokenizer, where: str = "") -> np.ndarray:
    """Character offset of every non-empty token of `text`, in order (int64 array)."""
    parts, done = [], 0
    for a, b in _segments(text, _SEGMENT_CHARS):
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        parts.append(np.fromiter((a + s for s, e in enc["offset_mapping"] if e > s), dtype=np.int64))
        if len(text) > _PROGRESS_EVERY and b // _PROGRESS_EVERY > done:
            done = b // _PROGRESS_EVERY
            log.info("chunking %s: %.0f of %.0f MB tokenised", where or "a document", b / 1e6, len(text) / 1e6)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _last_break_at_or_before(text: str, starts: np.ndarray) -> np.ndarray:
    """For each token i, the largest j <= i before whose token a chunk may end (-1 if none).

    A chunk may end before a token when the text before it, trailing spaces/tabs dropped, ends
    in one of `_BREAK_AFTER` (a newline included): the token starts inside a run "break char,
    then spaces/tabs". One regex pass and a sorted lookup: linear in the document's length (the
    former per-candidate `text[:start].rstrip()` copied the text each time: quadratic)."""
    flat = itertools.chain.from_iterable(m.span() for m in _BREAK_RUN.finditer(text))  # no list of tuples
    spans = np.fromiter(flat, dtype=np.int64).reshape(-1, 2)
    lo, hi = spans[:, 0] + 1, spans[:, 1]  # positions just after the break char .. end of its blanks
    run = np.searchsorted(lo, starts, side="right") - 1
    ok = (run >= 0) & (starts <= hi[np.maximum(run, 0)]) if len(lo) else np.zeros(len(starts), dtype=bool)
    idx = np.where(ok, np.arange(len(starts)), -1)
    return np.maximum.accumulate(idx) if len(idx) else idx


def chunk_document(doc: Document, tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Split one document into token windows.

    Time and memory are linear in the document's length.

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
    starts = token_starts(text, tokenizer, doc.source)
    breaks = _last_break_at_or_before(text, starts)
    n = len(starts)
    # Token windows as [first, last) token indexes.
    windows: list[tuple[int, int]] = []
    first = 0
    while True:
        last = min(first + chunk_tokens, n)
        if last < n:
            # The latest allowed cut in (first + chunk_tokens // 2, last], if any.
            cut = int(breaks[last])
            if cut > first + max(chunk_tokens // 2, 1):
                last = cut
        windows.append((first, last))
        if last >= n:
            break
        first = max(last - overlap, first + 1)
    chunks = []
    for pos, (a, b) in enumerate(windows):
        # Character spans run from a window's first token to the next window's
        # territory, so whitespace between tokens is never lost.
        start = 0 if a == 0 else int(starts[a])
        end = len(text) if b >= n else int(starts[b])
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
