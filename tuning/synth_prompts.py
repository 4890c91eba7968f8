"""What `hybrid synth` asks its teacher, and how the replies are read (tuning/synth.py runs it).

Answer spans are picked from the chunk by pattern (numbers with units first, then codes and dates,
then names): the kinds of answer hybrid's QA files hold, short enough to check verbatim.
"""

from __future__ import annotations

import random
import re

from retrieval.retriever import Hit
from tuning.prompting import normalize

MAX_ANSWER_WORDS = 8

_WRITER = "You write exam questions about company documents. Reply with exactly what is asked, nothing else."
_STOP = {"and", "or", "the", "a", "an", "of", "to", "in", "on", "at", "for", "by", "is", "are", "was", "with", "per",
         "from", "as", "be", "it", "that", "this", "than", "after", "before", "each", "every", "if", "not", "no"}
_UNIT = r"(?:%|°C|[A-Za-z][A-Za-z/.-]{0,14})"
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_SPANS = [  # (pattern, priority), matched in this order: a span overlapping an earlier one is skipped
    # codes first: "MR-DEP-2025-0147" holds a year
    (re.compile(r"\b[A-Z][A-Za-z]*-\d[\w-]*\b|\b[A-Z]{2,}\d[\w-]*\b|\b[A-Z]{2,}-[\w-]+\b"), 1),
    # whole dates before bare numbers, so "March 30, 1983" is one answer rather than "30" (a day
    # the teacher then asks about as if it were a year)
    (re.compile(rf"\b{_MONTH} \d{{1,2}}, \d{{4}}\b|\b\d{{1,2}} {_MONTH}(?: \d{{4}})?\b|\b{_MONTH} \d{{4}}\b"
                rf"|\b(?:19|20)\d\d\b"), 1),
    (re.compile(r"(?<![-\w.])\d(?:[\d,.:]*\d)?(?:\s?" + _UNIT + r"(?:\s(?:per|a|an)\s[a-z]+)?)?"), 0),
    (re.compile(r"(?<=[a-z,] )(?:[A-Z][a-z]+ ){1,3}[A-Z][a-z]+\b"), 2),
]
# "the Channel 4 science desk": after a capitalised word inside a sentence, a number is part of a name
# (a channel, a version), not a quantity, so no unit is read after it
_NAME_BEFORE = re.compile(r"[\w,] [A-Z][\w-]* $")
# words that qualify a noun rather than name a unit: "5 working" is half of "5 working days", and a
# reader taught to answer "5 working" learns to stop mid-phrase
_MODIFIERS = {"working", "business", "calendar", "active", "consecutive", "full", "paid", "unpaid", "additional",
              "extra", "separate", "written", "minimum", "maximum", "free", "missed", "failed", "open", "new"}
_TOKEN_END = " \t\n.,;:)!?\"'*|"
_SIGNS = "€$£¥−"
_NEXT_WORD = re.compile(r" ([A-Za-z][\w-]*)")


def _inside_number(text: str, i: int) -> bool:
    """A '.', ',' or ':' between digits ("17:00", "3,600", "2.5") is inside the token, not its end."""
    return text[i] in ".,:" and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()


def whole_end(text: str, start: int, end: int) -> int:
    """Where the span text[start:end] ends once it is whole: never inside a token ("15 N" of "15 N·m",
    "30" of "30-day"), and a number's qualifier followed by its noun ("5 working days", "100 active alert
    rules", "14 Chandlers Row"), up to two more words, stopping at punctuation or a stop word.

    >>> t = "Allow 5 working days; bolts at 15 N·m and 100 active alert rules, 08:00–17:00 daily."
    >>> [t[s:whole_end(t, s, s + n)] for s, n in ((6, 9), (31, 4), (42, 10), (66, 6))]
    ['5 working days', '15 N·m', '100 active alert rules', '08:00–17:00']
    """
    while end < len(text) and (text[end] not in _TOKEN_END or _inside_number(text, end)):
        end += 1
    words = text[start:end].split()
    if len(words) != 2 or not re.match(r"\d", words[0]):
        return end
    capital = words[1][0].isupper()  # an address or a name: "14 Chandlers Row"
    if words[1].lower() not in _MODIFIERS and not capital:
        return end
    for _ in range(2):
        m = _NEXT_WORD.match(text, end)
        if not m or m.group(1).lower() in _STOP or m.group(1)[0].isupper() != capital:
            break
        end = m.end()
    return end


def candidate_spans(text: str, title: str = "") -> list[tuple[str, int]]:
    """Answer spans worth asking about, with their priority (0 best): best first, then in text order.

    >>> [s for s, _ in candidate_spans("The battery lasts 14 months and the Kestrel-7 weighs 38 kg.")]
    ['14 months', '38 kg', 'Kestrel-7']
    >>> [s for s, _ in candidate_spans("Rufai (born 24 August 1963) joined Channel 4 science desk on March 30, 1983.")]
    ['24 August 1963', 'March 30, 1983']
    """
    seen, taken, out = set(), [], []
    for pattern, prio in _SPANS:
        for m in pattern.finditer(text):
            if any(m.start() < end and start < m.end() for start, end in taken):
                continue
            span = m.group(0)
            # the number pattern is the only one with priority 0; the window bounds the look back
            if prio == 0 and _NAME_BEFORE.search(text, max(0, m.start() - 64), m.start()):
                span = re.match(r"[\d,.:]+", span).group(0)
            # whole: a currency or minus sign before the number (€450, −120 dBm), the token's and phrase's end
            begin = m.start() - (m.start() > 0 and text[m.start() - 1] in _SIGNS)
            stop = whole_end(text, m.start(), m.start() + len(span.rstrip()))
            span = text[begin:stop]
            if any(begin < end and start < stop for start, end in taken):
                continue
            span = span.strip(" .,;:")
            words = span.split()
            while words and words[-1].lower() in _STOP:  # "3 and" is a number, not a quantity
                words.pop()
            span = " ".join(words)
            key = normalize(span)
            if re.fullmatch(r"\d", key):  # a lone digit is a list number or a count too vague to ask for
                continue
            if not key or key in seen or len(words) > MAX_ANSWER_WORDS or key in normalize(title):
                continue
            seen.add(key)
            taken.append((begin, max(m.end(), stop)))
            out.append((prio, m.start(), span))
    return [(span, prio) for prio, _, span in sorted(out)]


def pick_spans(text: str, title: str, n: int, rng: random.Random) -> list[str]:
    """Up to n spans, best priority first, shuffled within a priority."""
    spans = candidate_spans(text, title)
    rng.shuffle(spans)
    return [s for s, _ in sorted(spans, key=lambda sp: sp[1])[:n]]


def _writer_prompt(chunk: Hit, ask: str) -> list[dict]:
    """The question writer's messages: the chunk (with its document title), then what to write."""
    passage = f"Document: {chunk.title}\n{chunk.text.strip()}" if chunk.title else chunk.text.strip()
    return [{"role": "system", "content": _WRITER}, {"role": "user", "content": f"{passage}\n\n{ask}"}]


def answer_first_prompt(chunk: Hit, span: str) -> list[dict]:
    return _writer_prompt(chunk, f"Write one question whose answer is exactly \"{span}\", answerable from this "
                                 f"passage. Name what it is about (a reader will not see the passage) and do not use "
                                 f"the words \"{span}\" in it. Reply with the question only.")


def question_first_prompt(chunk: Hit, n: int) -> list[dict]:
    return _writer_prompt(chunk, f"Write {n} question{'s' if n > 1 else ''} a reader of this passage can answer "
                                 f"with a short phrase copied from it (a number, name or date). Name what each is "
                                 f"about (the reader will not see the passage). Reply with lines \"Question: ...\" "
                                 f"and \"Answer: ...\" only.")


def unanswerable_prompt(chunk: Hit) -> list[dict]:
    return _writer_prompt(chunk, "Write one question about the subject of this passage that the passage does NOT "
                                 "answer: ask for a detail of the same kind that it never states. Name what it is "
                                 "about. Reply with the question only.")


def parse_question(text: str) -> str:
    """The first line that reads as a question ("Question:" prefix, quotes and numbering removed)."""
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:\d+[.)]\s*|[-*]\s*)?(?:\*\*)?(?:question\s*\d*:)?(?:\*\*)?\s*", "", line, flags=re.I)
        line = line.strip().strip('"“”').strip()
        if line.endswith("?") and 3 <= len(line.split()) <= 40:
            return line
    return ""


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """("Question: ...", "Answer: ...") line pairs from a question-first reply."""
    pairs, question = [], ""
    for line in text.splitlines():
        m = re.match(r"^\s*(?:\d+[.)]\s*)?(?:\*\*)?(question|answer)\s*\d*:(?:\*\*)?\s*(.*)$", line, flags=re.I)
        if not m:
            continue
        if m.group(1).lower() == "question":
            question = parse_question(m.group(2))
        elif question:
            pairs.append((question, m.group(2).strip().strip('"“”.').strip()))
            question = ""
    return pairs


