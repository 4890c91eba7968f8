"""What `hybrid serve` sends back for an answer: the `content` a person reads, the citations as
OpenAI `url_citation` annotations, and the response bodies of /v1/chat/completions and
/v1/completions (whole or as stream chunks).

LangChain's and LlamaIndex's OpenAI classes keep `content` and drop everything else, so `content`
carries the answer in plain words with its verified quotes as numbered sources naming the
document; the structure stays in the `hybrid` extension object, and the citations also go into
the message's `annotations`, which OpenAI's own schema (and its client) keeps:

    >>> from types import SimpleNamespace
    >>> a = SimpleNamespace(answer="14 months", abstained=False, raw="", citations=[
    ...     {"doc_id": "buoys/kestrel.md", "chunk_id": "buoys/kestrel.md#0", "quote": "It lasts 14 months.",
    ...      "verified": True}])
    >>> print(plain_content(a))
    14 months [1]
    <BLANKLINE>
    Sources:
    [1] buoys/kestrel.md: "It lasts 14 months."
    >>> chunk_url("buoys/kestrel.md", "buoys/kestrel.md#0")
    'hybrid://documents/buoys/kestrel.md?chunk=buoys%2Fkestrel.md%230'
"""

from __future__ import annotations

import json
from urllib.parse import quote

from tuning.prompting import ABSTAIN, parse_answer

# An answer no quote backs is still served (--require-support refuses those); the reader is told.
UNSUPPORTED = "(No quote from the documents was found to support this answer.)"
FORMATS = ("plain", "raw")


def chunk_url(doc_id: str, chunk_id: str) -> str:
    """A stable URI naming a chunk: the document id as the path, the chunk id as `?chunk=`."""
    return f"hybrid://documents/{quote(doc_id, safe='/')}?chunk={quote(chunk_id, safe='')}"


def sources(a) -> list[dict]:
    """The answer's verified citations, each quote once, in the order the model wrote them."""
    if a is None or a.abstained:
        return []
    seen, out = set(), []
    for c in a.citations:
        key = (c["doc_id"], c["chunk_id"], c["quote"])
        if c.get("verified") and key not in seen:
            seen.add(key)
            out.append(c)
    return out


def plain_content(a) -> str:
    """What a person should read: the answer with `[n]` markers and a numbered source list, or the
    abstention sentence (also for a None answer: nothing visible to the caller)."""
    if a is None or a.abstained:
        return ABSTAIN
    cited = sources(a)
    if not cited:
        return f"{a.answer}\n\n{UNSUPPORTED}"
    markers = "".join(f"[{i}]" for i in range(1, len(cited) + 1))
    lines = [f"[{i}] {c['doc_id']}: \"{c['quote']}\"" for i, c in enumerate(cited, 1)]
    return f"{a.answer} {markers}\n\nSources:\n" + "\n".join(lines)


def raw_content(a) -> str:
    """The model's own completion when it is served as written, else the abstention sentence (the gate,
    calibration, --require-support or a malformed completion replaced it; nothing visible)."""
    if a is None:
        return ABSTAIN
    return a.raw if a.raw and (not a.abstained or parse_answer(a.raw).abstained) else ABSTAIN


def served_content(a, content_format: str = "plain") -> str:
    """The completion's `content` in `content_format` ("plain" or "raw")."""
    return raw_content(a) if content_format == "raw" else plain_content(a)


def annotations(a, content_format: str, titles: dict[str, str]) -> list[dict]:
    """One `url_citation` per source of the plain content: its span is the `[n]` marker after the
    answer (character offsets, as in OpenAI's schema), its title the document's title (else its id),
    its url `chunk_url`. Raw content has no markers, so none."""
    if content_format != "plain":
        return []
    out, start = [], len(a.answer) + 1 if a is not None else 0
    for i, c in enumerate(sources(a), 1):
        end = start + len(f"[{i}]")
        out.append({"type": "url_citation", "url_citation": {
            "start_index": start, "end_index": end, "title": titles.get(c["doc_id"]) or c["doc_id"],
            "url": chunk_url(c["doc_id"], c["chunk_id"])}})
        start = end
    return out


class Shape:
    """The body of one completion request, chat or text, whole or streamed; `finished` sets what the
    answer decides (content, finish reason, usage, extension object, annotations)."""

    def __init__(self, kind: str, cid: str, created: int, model: str):
        self.kind, self.cid, self.created, self.model = kind, cid, created, model

    def _envelope(self, choice: dict, chunk: bool, **extra) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.kind == "chat" else "text_completion"
        return {"id": self.cid, "object": obj, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice}], **extra}

    def whole(self, content: str, reason: str, usage: dict, ext: dict, notes: list[dict]) -> dict:
        if self.kind == "chat":
            choice = {"message": {"role": "assistant", "content": content, "annotations": notes},
                      "finish_reason": reason}
        else:
            choice = {"text": content, "logprobs": None, "finish_reason": reason}
        return self._envelope(choice, chunk=False, usage=usage, hybrid=ext)

    def piece(self, text: str | None, notes: list[dict] | None = None, first: bool = False) -> str:
        """An SSE chunk carrying `text` (the chat stream opens with the role, `first`)."""
        if self.kind == "chat":
            delta = {"role": "assistant"} if first else {"content": text}
            if notes:
                delta["annotations"] = notes
            choice = {"delta": delta, "finish_reason": None}
        else:
            choice = {"text": text or "", "logprobs": None, "finish_reason": None}
        return sse(self._envelope(choice, chunk=True))

    def last(self, reason: str, usage: dict, ext: dict) -> str:
        choice = {"delta": {}, "finish_reason": reason} if self.kind == "chat" else \
            {"text": "", "logprobs": None, "finish_reason": reason}
        return sse(self._envelope(choice, chunk=True, usage=usage, hybrid=ext))


def sse(payload: dict) -> str:
    return "data: " + json.dumps(payload, ensure_ascii=False) + "\n\n"
