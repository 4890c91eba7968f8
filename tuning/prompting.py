"""The one prompt template and the one answer parser, shared by training, `ask` and `eval`.

Answers follow the RAFT chain-of-thought layout (Zhang et al. 2024):

    ##Reason: ... ##begin_quote## <sentence copied from a document> ##end_quote## ... ##Answer: <answer>

and an abstention is the fixed sentence `ABSTAIN` after `##Answer:`.
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
_ANSWER = re.compile(r"##Answer:\s*(.*)", re.DOTALL)
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
    """A parsed completion: the final answer, the quotes and whether it abstains."""

    answer: str
    quotes: list[str] = field(default_factory=list)
    abstained: bool = False


def parse_answer(text: str) -> Parsed:
    """Parse a completion in the RAFT layout, tolerating free-form answers.

    The final answer is what follows the last `##Answer:`; without one, the whole
    text minus quote markup, and when that leaves nothing, the last quote (a reader
    that only copies the supporting sentence has answered with it: scoring it as an
    abstention would hide a wrong quote as well as a right one). It abstains when
    the answer is the abstention sentence, a recognised refusal, or empty.

        >>> parse_answer("##begin_quote## The office is in Tarrow. ##end_quote##").answer
        'The office is in Tarrow.'
    """
    quotes = [q.strip() for q in _QUOTE.findall(text) if q.strip()]
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
