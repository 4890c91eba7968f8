"""`hybrid synth`: training questions written from the user's own documents by a local teacher.

RAFT's own data step (gorilla's raft.py) asks a hosted model for questions and reasoned answers
per chunk; here a packaged local model does it, offline, and every row has to pass checks that
the documents themselves can make. One workflow, top to bottom:

    config -> load (index, teacher) -> plan (chunks sampled by document) -> per batch of chunks:
    offer questions -> filters -> append the rows that pass -> report

Methods (`--method`):
  answer-first    candidate answer spans are picked from the chunk (numbers with units, codes,
                  dates, names), then the teacher writes the question for each span
  question-first  the teacher writes "Question: ... / Answer: ..." pairs; the answer must then be
                  a span of the chunk

Filters (tuning/synth_filters.py), in order, each counted in the report: `unparsed` (no question
came back), `not_a_span` (the answer is not a short verbatim span of the chunk),
`answer_in_question`, `round_trip` (the question does not retrieve its source document in the top
`round_trip_k`), `inconsistent` (the teacher, shown the chunk alone in hybrid's answer template,
does not give the same answer), `closed_book` (optional: the teacher answers it right with no
passage, too generic to teach grounding), `duplicate` (embedding cosine >= `dedupe_cosine` to a
kept question).

Unanswerable rows (share `unanswerable` of the chunks): the teacher asks about a detail the chunk
does not state; the row is kept only if, shown the top `round_trip_k` chunks the index retrieves
for it, the teacher abstains or proposes an answer no retrieved chunk contains (`answered_by_index`
otherwise, and for a malformed reply, which shows neither).

Rows (hybrid's QA format, core/qa.py, plus provenance):

    {"id", "question", "answers": [span] | [], "gold_ids": [doc id] | [], "source_chunk",
     "groups": [the source chunk's access groups], "reason"?: "##Reason: ... ##begin_quote## ...",
     "synth": {"teacher", "method", "kind": "answerable" | "unanswerable"}}

Access: only chunks visible to `--group` (none = public) are read, and each row carries its chunk's
groups, so a trainer without them skips the row (core/access.py: may_learn).

Beside the output: `synth_report.json` (every count, the settings, the chunks done) and
`synth_dropped.jsonl` (each dropped offer with its filter and the teacher's checking reply; same
access scope as the output). Resume: rows are appended (fsync'd) as they pass; a rerun with the
same settings continues after the chunks the report lists.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from core import access
from core.atomic import check_writable, write_text_atomic
from core.errors import Arg, InputError
from training.precision import Precision, option
from retrieval.retriever import Hit, Retriever
from tuning.grading import classify
from tuning.prompting import build_messages, parse_answer
from tuning.synth_filters import Deduper, Offer, answered_by_index, consistent, is_span, leaks
from tuning.synth_prompts import (answer_first_prompt, parse_pairs, parse_question, pick_spans, question_first_prompt,
                                  unanswerable_prompt)

REPORT_FILE = "synth_report.json"
DROPPED_FILE = "synth_dropped.jsonl"  # every offer a filter dropped, with the filter: read it to see why
FILTERS = ("unparsed", "not_a_span", "answer_in_question", "round_trip", "inconsistent", "closed_book", "duplicate")
UNANSWERABLE_FILTERS = ("unparsed", "answered_by_index", "duplicate")
# Settings that change which rows a run writes: a resumed run must use the same ones.
_RUN_KEYS = ("teacher", "method", "seed", "per_chunk", "unanswerable", "groups", "round_trip_k", "dedupe_cosine",
             "consistency", "closed_book")


@dataclass
class SynthConfig:
    """Settings of `hybrid synth` (YAML keys = field names)."""

    index: str = field(metadata={"help": "Index built by 'hybrid index': its chunks are the source, its retriever "
                                         "runs the round-trip check."})
    out: str = field(metadata={"help": "QA JSONL to write (appended to and resumed when it is a synth file); "
                                       "synth_report.json is written beside it."})
    max_chunks: int = field(default=200, metadata={"help": "Chunks to write questions from, sampled by document "
                                                           "(every document contributes before any twice)."})
    per_chunk: int = field(default=1, metadata={"help": "Questions offered per chunk."})
    teacher: str = field(default="qwen2.5-coder-0.5b", metadata={
        "help": "Model writing and checking the questions: a packaged name (qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, "
                "smollm2) or a local model dir."})
    method: Literal["answer-first", "question-first"] = field(default="answer-first", metadata={
        "help": "answer-first: pick answer spans, then ask for the question; question-first: the teacher writes "
                "question and answer."})
    unanswerable: float = field(default=0.2, metadata={
        "help": "Share of chunks that also get a question the corpus does not answer (answers: [])."})
    round_trip_k: int = field(default=5, metadata={"help": "A question must retrieve its source document within "
                                                           "this many hits."})
    dedupe_cosine: float = field(default=0.95, metadata={"help": "Drop a question this close (embedding cosine) to "
                                                                 "a kept one."})
    consistency: bool = field(default=True, metadata={"help": "Keep a row only if the teacher, shown the chunk "
                                                              "alone, gives the same answer."})
    closed_book: bool = field(default=False, metadata={"help": "Drop a row the teacher answers right with no "
                                                               "passage (too generic to teach grounding)."})
    groups: list[str] = access.option("Access group whose chunks may be read (repeatable). Without it: public "
                                      "documents only.")
    seed: int = field(default=0, metadata={"help": "Seed of the chunk sample and span choice."})
    batch_size: int = field(default=4, metadata={"help": "Prompts the teacher generates at once."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest teacher reply, in tokens."})
    max_minutes: float | None = field(default=None, metadata={
        "help": "Stop before a batch that would end past this many minutes, judged by the slowest batch so far "
                "(the first always runs; rerun to continue).", "default_help": "no limit"})
    precision: Precision = option()

    def problems(self) -> list[str]:
        out = access.group_problems(self.groups)
        for name in ("max_chunks", "per_chunk", "round_trip_k", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.unanswerable <= 1:
            out.append("--unanswerable must be between 0 and 1")
        if not 0 < self.dedupe_cosine <= 1:
            out.append("--dedupe-cosine must be in (0, 1]")
        if self.max_minutes is not None and self.max_minutes <= 0:
            out.append("--max-minutes must be > 0")
        return out

    def run_settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in _RUN_KEYS}


class Teacher(Protocol):
    name: str

    def chat(self, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
        """One greedy reply per chat prompt."""


class LocalTeacher:
    """A causal LM loaded by tuning/generation.py, answering chat prompts greedily in batches."""

    def __init__(self, spec: str, batch_size: int, precision: str = "fp32"):
        from tuning.generation import load_generator  # imports transformers: only when a run starts

        self.model, self.tok, info = load_generator(spec, precision=precision)
        self.name, self.batch_size, self.precision = info.name, batch_size, info.precision

    def chat(self, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
        from tuning.generation import generate_batch

        out = []
        for i in range(0, len(prompts), self.batch_size):
            out += [t for t, _ in generate_batch(self.model, self.tok, prompts[i:i + self.batch_size], max_new_tokens)]
        return out


# --- plan ----------------------------------------------------------------------------------------

def sample_chunks(chunks: list[Hit], n: int, seed: int) -> list[Hit]:
    """n chunks, stratified by document: a seeded round over the documents, one chunk each, then
    another round, so every document contributes before any contributes twice."""
    rng = random.Random(seed)
    by_doc: dict[str, list[Hit]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc_id, []).append(c)
    docs = sorted(by_doc)
    rng.shuffle(docs)
    for d in docs:
        rng.shuffle(by_doc[d])
    out: list[Hit] = []
    for depth in range(max(len(v) for v in by_doc.values())):
        out += [by_doc[d][depth] for d in docs if depth < len(by_doc[d])]
    return out[:n]


def unanswerable_turn(chunk_id: str, share: float, seed: int) -> bool:
    """Whether this chunk also gets an unanswerable question (seeded per chunk, so a resumed run agrees)."""
    return random.Random(f"{seed}:{chunk_id}:u").random() < share


# --- the output file and its report --------------------------------------------------------------

def cut_torn_tail(path: Path) -> bytes:
    """A JSONL file's bytes without a torn last line (an append interrupted mid-line), cut from the file too."""
    raw = path.read_bytes() if path.exists() else b""
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        with open(path, "r+b") as fh:
            fh.truncate(len(raw))
    return raw


def read_output(out: Path) -> list[dict]:
    """Rows of an existing synth file; a torn last line (an interrupted append) is cut off.

    Raises:
        InputError: the file is not a synth file (a row without 'synth'), so it must not be appended to.
    """
    if not out.exists():
        return []
    raw = cut_torn_tail(out)
    rows = []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("synth"), dict) or "source_chunk" not in row:
            raise InputError(f"--out {out}:{n}: not a row written by hybrid synth; refusing to append to it, pass a "
                             f"new --out path")
        rows.append(row)
    return rows


def read_report(out: Path, cfg: SynthConfig) -> dict | None:
    """The report of the run that wrote `out`, when it belongs to it; settings must match to resume."""
    f = out.parent / REPORT_FILE
    if not f.exists():
        return None
    try:
        rep = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rep, dict) or rep.get("out") != out.name:
        owner = rep.get("out") if isinstance(rep, dict) else "unreadable"
        raise InputError(f"--out {out}: {f} belongs to another synth output ({owner}); write each synth file to its "
                         f"own directory")
    before, now = rep.get("settings", {}), cfg.run_settings()
    changed = [k for k in _RUN_KEYS if before.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise InputError(f"--{k.replace('_', '-')}: {out} was written with {k}={before.get(k)!r}; resume with the same "
                         f"settings or pass a new --out")
    return rep


def append_rows(out: Path, rows: list[dict]) -> None:
    """Append rows durably (one write, fsync'd): a crash loses at most a torn last line, cut on resume."""
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with open(out, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _new_counts() -> dict:
    return {"chunks": 0, "offered": 0, "kept": 0, "dropped": dict.fromkeys(FILTERS, 0),
            "unanswerable_offered": 0, "unanswerable_kept": 0,
            "unanswerable_dropped": dict.fromkeys(UNANSWERABLE_FILTERS, 0), "seconds": 0.0}


# --- the workflow --------------------------------------------------------------------------------

def _passage_dict(h: Hit) -> dict:
    return {"title": h.title, "text": h.text, "doc_id": h.doc_id, "chunk_id": h.chunk_id}


def _apply(offers: list[Offer], keep: list[bool], name: str, dropped: dict, rejects: list) -> list[Offer]:
    dropped[name] += sum(not k for k in keep)
    rejects += [(o, name) for o, k in zip(offers, keep) if not k]
    return [o for o, k in zip(offers, keep) if k]


def _answerable(batch: list[Hit], cfg: SynthConfig, teacher: Teacher, retriever: Retriever, dedupe: Deduper,
                counts: dict, rejects: list) -> list[Offer]:
    """Offer questions for a batch of chunks and keep those that pass every filter."""
    tokens, dropped = cfg.max_new_tokens, counts["dropped"]
    if cfg.method == "answer-first":
        items = [(c, s) for c in batch
                 for s in pick_spans(c.text, c.title, cfg.per_chunk, random.Random(f"{cfg.seed}:{c.chunk_id}"))]
        replies = teacher.chat([answer_first_prompt(c, s) for c, s in items], tokens) if items else []
        offers = [Offer(c, parse_question(r), s) for (c, s), r in zip(items, replies)]
        counts["chunks_without_spans"] = counts.get("chunks_without_spans", 0) + len({c.chunk_id for c in batch} -
                                                                                     {c.chunk_id for c, _ in items})
    else:
        offers = []
        for c, r in zip(batch, teacher.chat([question_first_prompt(c, cfg.per_chunk) for c in batch],
                                            tokens * cfg.per_chunk)):
            offers += [Offer(c, q, a) for q, a in parse_pairs(r)[: cfg.per_chunk]] or [Offer(c, "", "")]
    counts["offered"] += len(offers)
    alive = _apply(offers, [bool(o.question) for o in offers], "unparsed", dropped, rejects)
    alive = _apply(alive, [is_span(o.answer, o.chunk.text) for o in alive], "not_a_span", dropped, rejects)
    alive = _apply(alive, [not leaks(o.question, o.answer) for o in alive], "answer_in_question", dropped, rejects)
    if alive:
        counts["round_trip_tested"] = counts.get("round_trip_tested", 0) + len(alive)
        found = retriever.search_batch([o.question for o in alive], k=cfg.round_trip_k, groups=cfg.groups)
        alive = _apply(alive, [o.chunk.doc_id in {h.doc_id for h in hs} for o, hs in zip(alive, found)],
                       "round_trip", dropped, rejects)
    if cfg.consistency and alive:
        replies = teacher.chat([build_messages(o.question, [_passage_dict(o.chunk)]) for o in alive], tokens)
        verdicts = [consistent(r, o) for r, o in zip(replies, alive)]
        for o, (_, reason), r in zip(alive, verdicts, replies):
            o.reason, o.reply = reason, r
        alive = _apply(alive, [ok for ok, _ in verdicts], "inconsistent", dropped, rejects)
    if cfg.closed_book and alive:
        parsed = [parse_answer(r) for r in teacher.chat([build_messages(o.question, []) for o in alive], tokens)]
        alive = _apply(alive, [classify(p.answer, p.abstained, [o.answer]) != "correct" for p, o in zip(parsed, alive)],
                       "closed_book", dropped, rejects)
    return _apply(alive, dedupe.keep([o.question for o in alive]), "duplicate", dropped, rejects)


def _unanswerable(batch: list[Hit], cfg: SynthConfig, teacher: Teacher, retriever: Retriever, dedupe: Deduper,
                  counts: dict, rejects: list) -> list[Offer]:
    """Questions the corpus does not answer, verified against what the index retrieves for them."""
    chunks = [c for c in batch if unanswerable_turn(c.chunk_id, cfg.unanswerable, cfg.seed)]
    if not chunks:
        return []
    dropped = counts["unanswerable_dropped"]
    offers = [Offer(c, parse_question(r), "")
              for c, r in zip(chunks, teacher.chat([unanswerable_prompt(c) for c in chunks], cfg.max_new_tokens))]
    counts["unanswerable_offered"] += len(offers)
    alive = _apply(offers, [bool(o.question) for o in offers], "unparsed", dropped, rejects)
    if alive:
        found = retriever.search_batch([o.question for o in alive], k=cfg.round_trip_k, groups=cfg.groups)
        replies = teacher.chat([build_messages(o.question, [_passage_dict(h) for h in hs])
                                for o, hs in zip(alive, found)], cfg.max_new_tokens)
        for o, r in zip(alive, replies):
            o.reply = r
        alive = _apply(alive, [not answered_by_index(r, hs) for r, hs in zip(replies, found)], "answered_by_index",
                       dropped, rejects)
    return _apply(alive, dedupe.keep([o.question for o in alive]), "duplicate", dropped, rejects)


def _row(o: Offer, j: int | None, cfg: SynthConfig, teacher_name: str) -> dict:
    kind = "unanswerable" if j is None else "answerable"
    row = {"id": f"synth:{o.chunk.chunk_id}:{'u' if j is None else j}", "question": o.question,
           "answers": [o.answer] if o.answer else [], "gold_ids": [o.chunk.doc_id] if o.answer else [],
           "source_chunk": o.chunk.chunk_id, "groups": sorted(o.chunk.groups),
           "synth": {"teacher": teacher_name, "method": cfg.method, "kind": kind}}
    if o.reason:
        row["reason"] = o.reason
    return row


def _summary(counts: dict) -> dict:
    tested = counts.get("round_trip_tested", 0)
    return {"round_trip_rate": round(1 - counts["dropped"]["round_trip"] / tested, 4) if tested else None,
            "seconds_per_kept_row": round(counts["seconds"] / (counts["kept"] + counts["unanswerable_kept"]), 2)
            if counts["kept"] + counts["unanswerable_kept"] else None}


@dataclass
class SynthReport:
    """What a synth run did: synth_report.json beside the output (to_json: its keys, in its order).

    `counts` stays a mapping: filter name -> count, read and resumed as the file holds it.
    """

    out: str  # the output file's name (the report sits beside it)
    index: str
    teacher: str
    settings: dict  # SynthConfig.run_settings(): a resumed run must match these
    counts: dict  # chunks, offered, kept, dropped{filter}, unanswerable_*, seconds, ...
    round_trip_rate: float | None  # share of offers the round-trip check let through (None: none tested)
    seconds_per_kept_row: float | None
    planned_chunks: int
    stopped: str | None  # "max_minutes" when the time limit ended the run early; None when it finished
    access: dict  # core/access.py record: scope and groups seen
    chunks_done: list[str]
    precision: dict  # {"teacher", "embedder"}

    def to_json(self) -> dict:
        return asdict(self)


def synthesize(cfg: SynthConfig, teacher: Teacher | None = None, progress: bool = True, log=print) -> SynthReport:
    """Write (or continue) a synthetic QA file from the index's chunks; returns the report.

    Args:
        cfg: SynthConfig.
        teacher: anything with `name` and `chat(prompts, max_new_tokens)`; None loads `cfg.teacher`.
        progress: show a progress bar with ETA on stderr.
        log: where the summary line goes.
    """
    # --- config and the output (checked before any model loads) -----------------------------
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    out = Path(cfg.out)
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: directory {out.parent} does not exist; create it or choose another path")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; pass a JSONL file path")
    check_writable(out.parent, "--out")
    rows = read_output(out)
    rep = read_report(out, cfg)
    cut_torn_tail(out.parent / DROPPED_FILE)
    # --- load: the index, what this caller may read ------------------------------------------
    retriever = Retriever.load(cfg.index, precision=cfg.precision)
    groups = access.training_groups(cfg.groups)
    visible = retriever.chunks(groups=groups)
    if not visible:
        raise InputError(f"--index {cfg.index}: no chunk is visible to {'groups ' + ', '.join(groups) if groups else 'public callers'}"
                         f"; pass {Arg('groups')} for the access groups whose documents the questions may come from")
    done = set(rep["chunks_done"]) if rep else set()
    done |= {r["source_chunk"] for r in rows}  # rows appended after the last report was written
    counts = rep["counts"] if rep else _new_counts()
    planned = sample_chunks(visible, cfg.max_chunks, cfg.seed)
    todo = [c for c in planned if c.chunk_id not in done]
    if teacher is None and todo:
        teacher = LocalTeacher(cfg.teacher, cfg.batch_size, cfg.precision)
    name = teacher.name if teacher else (rep or {}).get("teacher", cfg.teacher)
    dedupe = Deduper(retriever.embedder.encode, cfg.dedupe_cosine, [r["question"] for r in rows])
    seen = {g for r in rows for g in r["groups"]}

    def report(stopped: str | None) -> SynthReport:
        rec = SynthReport(out=out.name, index=str(cfg.index), teacher=name, settings=cfg.run_settings(),
                          counts=counts, **_summary(counts), planned_chunks=len(planned), stopped=stopped,
                          access=access.record(groups, seen), chunks_done=sorted(done),
                          precision={"teacher": getattr(teacher, "precision", None),
                                     "embedder": retriever.embedder.precision})
        write_text_atomic(out.parent / REPORT_FILE, json.dumps(rec.to_json(), indent=2, ensure_ascii=False))
        return rec

    # --- run: batches of chunks, rows appended as they pass ---------------------------------
    from tqdm.auto import tqdm

    t0, stopped, slowest = time.perf_counter(), None, 0.0
    bar = tqdm(total=len(planned), initial=len(planned) - len(todo), desc="synth", unit="chunk", disable=not progress)
    for i in range(0, len(todo), cfg.batch_size):
        batch = todo[i:i + cfg.batch_size]
        t_batch = time.perf_counter()
        rejects: list[tuple[Offer, str]] = []
        kept = _answerable(batch, cfg, teacher, retriever, dedupe, counts, rejects)
        unanswerable = _unanswerable(batch, cfg, teacher, retriever, dedupe, counts, rejects)
        index_of: dict[str, int] = {}
        new = []
        for o in kept:
            j = index_of[o.chunk.chunk_id] = index_of.get(o.chunk.chunk_id, -1) + 1
            new.append(_row(o, j, cfg, name))
        new += [_row(o, None, cfg, name) for o in unanswerable]
        append_rows(out.parent / DROPPED_FILE, [{"filter": f, "question": o.question, "answer": o.answer,
                                                 "source_chunk": o.chunk.chunk_id, "groups": sorted(o.chunk.groups),
                                                 "teacher_reply": o.reply} for o, f in rejects])
        append_rows(out, new)
        seen |= {g for r in new for g in r["groups"]}
        done |= {c.chunk_id for c in batch}
        counts["chunks"] += len(batch)
        counts["kept"] += len(kept)
        counts["unanswerable_kept"] += len(unanswerable)
        counts["seconds"] = round(counts["seconds"] + time.perf_counter() - t_batch, 2)
        report(None)
        bar.update(len(batch))
        bar.set_postfix(kept=counts["kept"], unanswerable=counts["unanswerable_kept"])
        # Stop before a batch that would end past the limit, judged by the slowest batch so far, so
        # that --max-minutes bounds the run instead of being overrun by one batch.
        slowest = max(slowest, time.perf_counter() - t_batch)
        if cfg.max_minutes is not None and i + cfg.batch_size < len(todo) and \
                time.perf_counter() - t0 + slowest > cfg.max_minutes * 60:
            stopped = "max_minutes"
            break
    bar.close()
    rec = report(stopped)
    d = counts["dropped"]
    log(f"synth: {counts['kept']} answerable + {counts['unanswerable_kept']} unanswerable rows kept from "
        f"{counts['offered']} + {counts['unanswerable_offered']} offered over {counts['chunks']} chunks -> {out}; dropped: "
        + ", ".join(f"{k} {v}" for k, v in d.items()) + "; unanswerable dropped: "
        + ", ".join(f"{k} {v}" for k, v in counts["unanswerable_dropped"].items())
        + ("; stopped at --max-minutes, rerun to continue" if stopped else ""))
    return rec
