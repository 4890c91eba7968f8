"""The one prompt template and the one answer parser, shared by training, `ask` and `eval`.

Answers follow the RAFT chain-of-thought layout (Zhang et al. 2024):

    ##Reason: ... ##begin_quote## <sentence copied from a document> ##end_quote## ... ##Answer: <answer>

and an abstention is the fixed sentence `ABSTAIN` after `##Answer:`. A completion that breaks
this layout where the answer should be is malformed (`parse_answer`): it parses as an abstention.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

ABSTAIN = "I cannot answer this from the provided documents."
SYSTEM = ("Answer the question using only the documents. Copy the sentence that supports the answer between "
          "##begin_quote## and ##end_quote##, then write ##Answer: and a short answer. If the documents do not "
          f"contain the answer, write ##Answer: {ABSTAIN}")

_QUOTE = re.compile(r"##begin_quote##(.*?)##end_quote##", re.DOTALL)
# The template's markers; none belongs in an answer.
MARKERS = ("##Answer:", "##Reason:", "##begin_quote##", "##end_quote##")
# A marker the token budget cut off ("##begin", "##An", "##") at the end of a completion.
_CUT_MARKER = re.compile(r"##[A-Za-z_:#]*$")
# Refusals an untuned model writes instead of the exact sentence still count as abstaining.
_REFUSAL = re.compile(
    r"\b(cannot|can't|can not|unable to|not able to) (answer|find|determine|provide|tell)|"
    r"\b(do|does) not (contain|mention|provide|say|specify|include)|\bno (information|mention)\b|"
    r"\bnot (mentioned|provided|specified|stated|available)\b|\bi don't know\b|\bunknown\b", re.IGNORECASE)


def format_passages(passages: list[dict]) -> str:
    """`[1] Title\\ntext` blocks; passages are dicts with `text` and optional `title`."""
    blocks = []
    for i, p in enumerate(passages, 1):
        title = (p.get("title") or "").strip()
        blocks.append(f"[{i}] {title}\n{p['text'].strip()}" if title else f"[{i}] {p['text'].strip()}")
    return "\n\n".join(blocks)


def build_messages(question: str, passages: list[dict], history: list[dict] | None = None) -> list[dict]:
    """Chat messages (system + user) for a question and its passages (none = closed book).

    `history`: earlier user/assistant turns of a conversation (the server's chat requests), kept
    between the system prompt and the question; the documents go with the last question only.
    """
    docs = format_passages(passages) if passages else "(no documents)"
    turns = [{"role": m["role"], "content": m["content"]} for m in history or ()]
    return [{"role": "system", "content": SYSTEM}, *turns,
            {"role": "user", "content": f"Documents:\n{docs}\n\nQuestion: {question.strip()}"}]


def sequence_tokens(tok, prompt: list[dict], completion: str) -> tuple[int, int]:
    """Tokens of the chat-templated prompt and of prompt + completion as training sees them.

    Args:
        tok: the generator's tokenizer (with its chat template); prompt: chat messages;
        completion: the assistant's text.

    Returns:
        (prompt tokens, prompt + completion tokens; the 2 are the end-of-turn markers).
    """
    text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok(text, add_special_tokens=False)["input_ids"])
    return n_prompt, n_prompt + len(tok(completion, add_special_tokens=False)["input_ids"]) + 2


def cot_answer(quote: str, answer: str) -> str:
    """The extractive RAFT target: quote the supporting sentence, then answer."""
    return f"##Reason: The documents say ##begin_quote## {quote.strip()} ##end_quote## ##Answer: {answer.strip()}"


def abstain_answer() -> str:
    return f"##Reason: None of the documents contains the answer. ##Answer: {ABSTAIN}"


# How an answer (not an abstention) begins in each training format: a calibrated adapter whose
# score says "answer" but whose greedy completion abstained answers again from this opening.
ANSWER_OPENING = {"cot": "##Reason: The documents say ##begin_quote##", "short": "##Answer:"}


def chat_text(tok, messages: list[dict]) -> str:
    """The prompt text for generation: a new assistant turn, or, when the last message is the
    assistant's, that turn continued (its content is the opening the completion goes on from)."""
    if messages and messages[-1]["role"] == "assistant":
        return tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass
class Parsed:
    """A parsed completion: the final answer, the quotes, whether it abstains, and whether it was
    malformed (then it abstains too, with no answer and no quotes)."""

    answer: str
    quotes: list[str] = field(default_factory=list)
    abstained: bool = False
    malformed: bool = False


def repeats_template(text: str) -> bool:
    """The completion has reached `##Answer:` and then writes a template marker again (a second
    `##Answer:`, a quote, a reason): nothing after it can make it well-formed, so generation stops."""
    _, sep, section = text.partition("##Answer:")
    return bool(sep) and any(m in section for m in MARKERS)


def _bare(text: str) -> str:
    return " ".join(text.replace("<|im_end|>", " ").split()).strip()


def _marked(text: str) -> bool:
    """A template marker in `text`, or one cut off at its end."""
    text = _bare(text)
    cut = _CUT_MARKER.search(text)
    return any(m in text for m in MARKERS) or (cut is not None and any(m.startswith(cut.group()) for m in MARKERS))


def _malformed(text: str, quotes: list[str]) -> bool:
    """The completion breaks the template where its answer should be (the rule: `parse_answer`)."""
    _, sep, section = text.partition("##Answer:")
    if sep:
        return not _bare(section) or _marked(section)
    return text.count("##Reason:") > 1 or not (_bare(_QUOTE.sub(" ", text).replace("##Reason:", " ")) or quotes)


def parse_answer(text: str) -> Parsed:
    """Parse a completion in the RAFT layout, tolerating free-form answers.

    The final answer is what follows the last `##Answer:`; without one, the whole
    text minus quote markup, and when that leaves nothing, the last quote (a reader
    that only copies the supporting sentence has answered with it: scoring it as an
    abstention would hide a wrong quote as well as a right one). It abstains when
    the answer is the abstention sentence or a recognised refusal, and when the
    completion is malformed.

    Malformed (an abstention with no answer and no quotes, `malformed=True`; never graded as
    an answer): the answer section, i.e. everything after the first `##Answer:`, is empty or
    holds a template marker (`##Answer:` again, `##Reason:`, `##begin_quote##`, `##end_quote##`)
    or ends in the beginning of one (`##begin`, `##`: the budget ran out while the template
    repeated). Without `##Answer:`, it is malformed when it repeats `##Reason:` or is empty (no
    text, no quote); otherwise it is graded on its text as before, even when the budget cut it
    inside a quote (what it quoted stays visible, right or wrong). Other `##` text (a markdown
    heading) is not a marker.

        >>> parse_answer("##begin_quote## The office is in Tarrow. ##end_quote##").answer
        'The office is in Tarrow.'
        >>> parse_answer("##Answer: ##begin_quote## ##end_quote## ##Answer: ##begin").malformed
        True
    """
    quotes = [q.strip() for q in _QUOTE.findall(text) if q.strip()]
    if _malformed(text, quotes):
        return Parsed(answer="", abstained=True, malformed=True)
    tail = text.rsplit("##Answer:", 1)
    if len(tail) == 2:
        answer = tail[1]
    else:
        answer = _QUOTE.sub(" ", text).replace("##Reason:", " ")
        if not answer.replace("<|im_end|>", " ").strip() and quotes:
            answer = quotes[-1]
    answer = " ".join(answer.replace("<|im_end|>", " ").split()).strip()
    abstained = not answer or normalize(ABSTAIN) in normalize(answer) or bool(_REFUSAL.search(answer))
    return Parsed(answer=answer, quotes=quotes, abstained=abstained)


def normalize(text: str) -> str:
    """SQuAD/HotpotQA answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def quote_in(quote: str, passage_text: str) -> bool:
    """A quote counts as verbatim when, whitespace and case aside, it occurs in the passage."""
    q = " ".join(quote.lower().split())
    return bool(q) and q in " ".join(passage_text.lower().split())
