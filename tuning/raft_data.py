"""RAFT training examples mined from the index (Zhang et al. 2024, "RAFT").

Each example is a question, its oracle chunk(s) and `num_distractors` distractor
chunks, shuffled. Distractors are the index's top-ranked chunks that are not
from a gold document (hard distractors, unlike gorilla/raft's random ones).
With probability 1 - `p_oracle` the oracle is left out (replaced by one more
distractor); the model then learns to abstain (`no_oracle="abstain"`, the
default) or to answer anyway from memory (`"answer"`, the paper's setting).
`no_oracle="both"` ignores `p_oracle` and writes every answerable question twice, with its
oracle (target: the answer) and without it (target: the abstention), so that the only thing
telling the two targets apart is the evidence, not the question.
Unanswerable questions (`answers: []`) always get distractors and an abstention.

Access: only chunks visible to the trainer's `groups` are used (none named = public
only), questions whose gold documents are all out of view are dropped, and each
example's distractors come from what its oracle's readers may see: a public
example gets public distractors only, even when the trainer named groups. Every
example records the access groups of the chunks it holds.

Rows are written as JSONL in TRL's conversational prompt-completion form, so
the step reruns on its own:
    {"id", "prompt": [system, user], "completion": [assistant], "oracle": bool, "chunk_ids": [...],
     "groups": [access groups of those chunks; [] = public]}
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.access import may_learn, training_groups
from core.errors import InputError
from core.jsonl import read_jsonl
from core.qa import QARow
from retrieval.retriever import Hit, Retriever
from tuning.prompting import abstain_answer, build_messages, cot_answer, normalize, quote_in

# Sentence ends: punctuation + space, a newline, or punctuation glued to the next sentence's
# capital ("...Caremark.Longs Drugs is...": concatenated paragraphs, as in HaluEval's knowledge);
# two lower-case letters or digits before the stop and a capitalised word after it, so "U.S.A."
# and version strings like "rc.N" stay whole.
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+|(?<=[a-z0-9)]{2}[.!?])(?=[A-Z][a-z])")


@dataclass
class RaftSettings:
    """How examples are built (recorded with the adapter)."""

    p_oracle: float = 0.8
    num_distractors: int = 4
    no_oracle: Literal["abstain", "answer", "both"] = "abstain"
    answer_format: Literal["cot", "short"] = "cot"
    seed: int = 13
    mode: str | None = None  # retrieval mode mining the distractors (None = the index's default)


def quote_for(answer: str, question: str, text: str) -> str:
    """The oracle sentence that contains the answer, else the one sharing most words with Q + A."""
    sentences = [s.strip(" #*|-") for s in _SENTENCES.split(text) if s.strip(" #*|-")]
    if not sentences:
        return text.strip()
    hits = [s for s in sentences if answer.lower() in s.lower()]
    if hits:
        return min(hits, key=len)
    words = set(re.findall(r"\w+", (question + " " + answer).lower()))
    return max(sentences, key=lambda s: len(words & set(re.findall(r"\w+", s.lower()))))


def oracle_answer(row: QARow, oracle_text: str) -> tuple[str, str]:
    """(answer, quote) for an answerable row: the first gold answer the oracle contains (else the
    first gold answer) and the oracle sentence quoted for it."""
    answer = next((a for a in row.answers if a.lower() in oracle_text.lower()), row.answers[0])
    return answer, quote_for(answer, row.question, oracle_text)


def reasoned_answer(row: QARow, oracle_text: str, answer: str) -> str | None:
    """The chain-of-thought target from the row's teacher-written `reason`, when it quotes the
    oracle verbatim (every ##begin_quote## span found in it); None otherwise."""
    quotes = re.findall(r"##begin_quote##(.*?)##end_quote##", row.reason, re.DOTALL)
    if not quotes or not all(quote_in(q, oracle_text) for q in quotes):
        return None
    reason = row.reason if row.reason.startswith("##Reason:") else f"##Reason: {row.reason}"
    return f"{reason.strip()} ##Answer: {answer.strip()}"


def states_answer(text: str, answers) -> bool:
    """Whether `text` holds one of `answers` as whole words after normalisation (so "3" is not found in
    "2023", nor "Orange" in "orangery")."""
    padded = f" {normalize(text)} "
    return any((na := normalize(a)) and f" {na} " in padded for a in answers)


def _passage(h: Hit) -> dict:
    return {"title": h.title, "text": h.text, "doc_id": h.doc_id, "chunk_id": h.chunk_id}


def check_rows(rows: list[QARow], retriever: Retriever, qa_name: str) -> None:
    """RAFT needs gold doc ids for answerable rows, and they must be in the index."""
    no_gold = [r.id for r in rows if r.answers and not r.gold_ids]
    if no_gold:
        raise InputError(f"--qa {qa_name}: {len(no_gold)} answerable rows have no 'gold_ids' (e.g. {', '.join(no_gold[:3])}); "
                         f"RAFT needs the oracle document: add gold_ids")
    docs = {h.doc_id for h in retriever.chunks(include_restricted=True)}
    missing = sorted({g for r in rows for g in r.gold_ids if g not in docs})
    if missing:
        raise InputError(f"--qa {qa_name}: gold_ids not in index {retriever.index_dir}: {', '.join(missing[:5])}; "
                         f"rebuild the index from the matching corpus")


def visible_rows(rows: list[QARow], retriever: Retriever, groups=None) -> tuple[list[QARow], list[str]]:
    """Rows a trainer with `groups` may learn from: unanswerable ones, and those with a visible gold
    document; either way only when the trainer holds the row's own `groups` (a synthesised question
    is text of the chunk it was written from, even when it is unanswerable).

    Returns:
        (kept rows, ids of rows dropped because their text or every gold document is restricted to other groups).
    """
    docs = {h.doc_id for h in retriever.chunks(groups=training_groups(groups))}
    kept = [r for r in rows if may_learn(r.groups, groups)
            and (not r.answers or any(g in docs for g in r.gold_ids))]
    keep_ids = {r.id for r in kept}
    return kept, [r.id for r in rows if r.id not in keep_ids]


def build_examples(rows: list[QARow], retriever: Retriever, settings: RaftSettings, groups=None) -> list[dict]:
    """RAFT examples for QA rows (see module docstring).

    Args:
        rows: QA rows (answerable ones need a gold document visible to `groups`; see `visible_rows`).
        retriever: index to mine oracles and distractors from.
        settings: RaftSettings.
        groups: the trainer's access groups (None = public chunks only).

    Returns:
        One dict per row (two per answerable row with `no_oracle="both"`): id, prompt (messages),
        completion (messages), oracle, chunk_ids, groups.
    """
    rng = random.Random(settings.seed)
    train_groups = training_groups(groups)
    by_doc: dict[str, list[Hit]] = {}
    for c in retriever.chunks(groups=train_groups):
        by_doc.setdefault(c.doc_id, []).append(c)
    k = settings.num_distractors
    # The oracle decides the example's audience: its distractors are mined as that audience
    # (the oracle's groups the trainer holds; public when there is no oracle or it is public).
    oracles: list[Hit | None] = []
    for row in rows:
        candidates = [c for g in row.gold_ids for c in by_doc.get(g, [])] if row.answers else []
        if row.answers and not candidates:
            raise InputError(f"question {row.id}: no gold document visible to groups {train_groups or 'public'}; "
                             f"filter rows with visible_rows() first")
        with_answer = [c for c in candidates if any(a.lower() in c.text.lower() for a in row.answers)]
        if with_answer or len(candidates) <= 1:
            oracles.append((with_answer or candidates or [None])[0])
        else:  # no chunk holds the answer verbatim: the gold chunk closest to the question
            vecs = retriever.embedder.encode([row.question] + [c.text for c in candidates])
            oracles.append(candidates[int((vecs[1:] @ vecs[0]).argmax())])
    audience = [tuple(sorted(set(o.groups) & set(train_groups))) if o else () for o in oracles]
    mined: dict[int, list[Hit]] = {}
    for view in sorted(set(audience)):
        idx = [i for i, a in enumerate(audience) if a == view]
        hits = retriever.search_batch([rows[i].question for i in idx], k=min(k + 12, len(retriever)), groups=list(view),
                                      mode=settings.mode)
        mined.update(zip(idx, hits))
    examples = []
    for i, row in enumerate(rows):
        hits, best = mined[i], oracles[i]
        gold = set(row.gold_ids)
        # A distractor is a passage that does not answer: one from another document that states a gold
        # answer (a near-duplicate, a summary page) would teach abstaining, or quoting "the wrong" document,
        # with the answer in view.
        distractors = [h for h in hits if h.doc_id not in gold and not states_answer(h.text, row.answers)][: k + 1]
        oracle: list[Hit] = []
        quote = answer = ""
        if best is not None:
            oracle = [best]
            answer, quote = oracle_answer(row, best.text)
        if oracle and settings.no_oracle == "both":
            variants = [True, False]  # the same question with and without its evidence
        else:
            variants = [bool(oracle) and rng.random() < settings.p_oracle]
        for include in variants:
            context = oracle + distractors[:k] if include else distractors[: k + (1 if oracle else 0)]
            rng.shuffle(context)
            if include or (oracle and settings.no_oracle == "answer"):
                if settings.answer_format == "cot":
                    target = (row.reason and reasoned_answer(row, best.text, answer)) or cot_answer(quote, answer)
                else:
                    target = f"##Answer: {answer}"
            else:
                target = abstain_answer()
            passages = [_passage(h) for h in context]
            examples.append({"id": row.id, "prompt": build_messages(row.question, passages),
                             "completion": [{"role": "assistant", "content": target}],
                             "oracle": include, "chunk_ids": [p["chunk_id"] for p in passages],
                             "groups": sorted({g for h in context for g in h.groups})})
    return examples


def stats(examples: list[dict]) -> dict:
    """Counts recorded with the adapter."""
    n = len(examples)
    return {"examples": n, "with_oracle": sum(e["oracle"] for e in examples),
            "abstain_targets": sum("##Answer: I cannot answer" in e["completion"][0]["content"] for e in examples),
            "passages_per_example": (sum(len(e["chunk_ids"]) for e in examples) / n) if n else 0.0,
            "groups_seen": sorted({g for e in examples for g in e.get("groups", [])})}


def load_examples(path: str | Path) -> list[dict]:
    """Read RAFT examples written by `write_jsonl` (an adapter's raft_train.jsonl, or a benchmark's
    prepared file), so training reruns without the index that mined them.

    Args:
        path: JSONL of {"id", "prompt": [messages], "completion": [one assistant message], "oracle",
            "chunk_ids", "groups"}.

    Returns:
        The examples, in file order.

    Raises:
        InputError: unreadable file or a row that lacks a field (the first bad line is named).
    """
    out = []
    for n, ex in read_jsonl(path, "--examples", "RAFT examples"):
        ok = (isinstance(ex, dict) and isinstance(ex.get("id"), str) and isinstance(ex.get("prompt"), list)
              and isinstance(ex.get("completion"), list) and len(ex["completion"]) == 1
              and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in ex["prompt"] + ex["completion"]))
        if not ok:
            raise InputError(f"--examples {path}:{n}: needs 'id', 'prompt' (chat messages) and 'completion' (one "
                             f"assistant message), as hybrid tune generator writes raft_train.jsonl")
        out.append({"oracle": False, "chunk_ids": [], "groups": [], **ex})
    return out
