"""`hybrid eval`: the batch factuality benchmark, configurations side by side.

Configurations: `closed_book` (no passages), `rag` (base model + passages) and
`rag+NAME` per adapter, all with the prompt template and parser of training and
`ask`. Passages are the row's fixed `passages` when present (the distractor
setting), else retrieved from the index. With a judge, every answer gets its
`support` and every question its `answerable` score (added after generation, and
redone when the judge changes, without generating again). With `gate`, each passage
configuration also appears as `NAME+gate`: the same answers, except that where the
judge finds none of the passages answering the question (answerable < `gate_threshold`) the
answer counts as an abstention, as `ask --judge` serves it. The paired tests show
what the gate buys. Each adapter calibrated with `hybrid tune calibrate` also appears as
`rag+NAME+cal`: the adapter as a calibrated `ask` serves it: abstaining where its own
abstention score reaches its threshold, and, below it, answering even where its greedy
completion abstained (that question is answered again from the answer's opening; stored as
`rag+NAME+answered` lines, generated only for such questions). Scores are added after
generation, like the judge's. With `select`
(two or more adapter names, and a judge), `rag+A|B` answers each question with the candidate
the judge finds best supported by the passages among those adapters' non-abstaining answers
(ties: the first listed; all abstained: the abstention), and `rag+A|B+cal` abstains on top where
the best-calibrated of them (highest calibration AUROC) reaches its threshold. Both are derived
from answers already generated.

Each answer is classified exactly once, correct | abstained | hallucinated, by the rule
training uses too (tuning/grading.py), so accuracy + abstention_rate + hallucination_rate = 1.
A malformed completion (tuning/prompting.py `parse_answer`) is an abstention, counted apart too
(`malformed` per line, `malformed`/`malformed_rate` per configuration).

predictions.jsonl gets one line per (question, configuration) as soon as it is
known, so an interrupted eval resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from hybrid.report import chart, compare, markdown, read_predictions, summarize
from hybrid.pipeline import Pipeline, best_supported, check_select, deciding_adapter, parse_adapters, passages_for
from hybrid.statistics import INTERVALS
from core import access
from core.atomic import check_writable, write_text_atomic
from core.errors import InputError
from training.precision import Precision, choose, default_device, option
from core.atomic import sha256_file
from core.qa import QARow, load_qa
from retrieval.retriever import Retriever
from training import run_record
from tuning.abstention import calibration_abstains, load_calibration
from tuning.generation import BASE_MODEL_HELP
from tuning.grading import classify, token_f1
from tuning.judge import THRESHOLD, Judge, gate_abstains
from tuning.judge import fingerprint as judge_fingerprint
from tuning.prompting import ABSTAIN

@dataclass
class EvalConfig:
    """Settings of `hybrid eval` (YAML keys = field names)."""

    qa: str = field(metadata={"argument": True, "help": "QA JSONL (id, question, answers, gold_ids?, passages?); "
                                                        "answers [] = unanswerable."})
    index: str | None = field(default=None, metadata={"help": "Index to retrieve passages from (rows without 'passages')."})
    adapters: dict[str, str] = field(default_factory=dict, metadata={
        "flag": "--adapter", "parse": parse_adapters,
        "help": "NAME=DIR (or DIR): adds configuration rag+NAME; repeat for several."})
    only: Literal["retrieval"] | None = field(default=None, metadata={
        "help": "retrieval: only recall@1/5/10, MRR@10, nDCG@10 of --index on the rows with gold_ids (no generation).",
        "default_help": "everything"})
    closed_book: bool = field(default=True, metadata={"help": "Include the closed_book configuration (no passages)."})
    limit: int = field(default=0, metadata={"help": "Evaluate a seeded sample of N questions; 0 = all."})
    seed: int = field(default=0, metadata={"help": "Sampling and bootstrap seed."})
    k: int = field(default=5, metadata={"flag": "-k", "help": "Passages retrieved per question."})
    mode: Literal["dense", "lexical", "hybrid"] | None = field(default=None, metadata={
        "help": "Retrieval: dense, lexical (BM25) or hybrid (both, fused).", "default_help": "the index's"})
    rerank: str | None = field(default=None, metadata={
        "help": "Reranker dir (hybrid tune reranker): re-score the first stage's top N with it."})
    groups: list[str] = field(default_factory=list, metadata={
        "flag": "--group", "help": "Access group of the caller (repeatable). Without it: public documents only."})
    batch_size: int = field(default=4, metadata={"help": "Questions generated together (greedy, left-padded)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Generation budget per answer."})
    base_model: str | None = field(default=None, metadata={
        "help": f"Generator: {BASE_MODEL_HELP}.", "default_help": "the adapters' base, else smollm2"})
    judge: str | None = field(default=None, metadata={
        "help": "Groundedness judge dir (hybrid tune judge): support of every answer, answerability of every question."})
    gate: bool = field(default=False, metadata={
        "help": "With --judge: also report each passage configuration as NAME+gate, where answers to questions the "
                "judge finds none of the passages answering count as abstentions (what 'ask --judge' does)."})
    gate_threshold: float = field(default=THRESHOLD, metadata={
        "help": "With --gate: the answerability below which an answer counts as an abstention."})
    select: list[str] = field(default_factory=list, metadata={
        "help": "NAME (repeat, two or more; with --judge): also report rag+A|B, each question answered by the adapter "
                "whose answer the judge finds best supported (+cal: abstaining where the best-calibrated one would)."})
    out: str | None = field(default=None, metadata={
        "help": "Report dir: report.json, report.md, chart.png, predictions.jsonl (resumable)."})
    shard: str | None = field(default=None, metadata={
        "help": "I/N: answer only every N-th question from the I-th (0-based), e.g. one process of N; "
                "then --merge the N report dirs."})
    merge: list[str] = field(default_factory=list, metadata={
        "help": "Report dir of a --shard run (repeat, all N): one report over every question, no generation."})
    precision: Precision = option()

    def shard_of(self) -> tuple[int, int] | None:
        return None if self.shard is None else parse_shard(self.shard)

    def problems(self) -> list[str]:
        out = access.group_problems(self.groups)
        try:
            self.shard_of()
        except InputError as exc:
            out.append(str(exc))
        if self.shard is not None and self.merge:
            out.append("--shard and --merge: run the shards first, then merge them in a run of its own")
        if self.k < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            out.append("-k, --batch-size and --max-new-tokens must be >= 1")
        if self.limit < 0:
            out.append("--limit must be >= 0")
        if self.only == "retrieval" and not self.index:
            out.append("--only retrieval needs --index")
        if self.only == "retrieval" and (self.shard is not None or self.merge):  # they were silently ignored
            out.append("--only retrieval scores every question in one pass (nothing is generated); drop --shard "
                       "and --merge")
        if self.gate and not self.judge:
            out.append("--gate needs --judge DIR (the judge decides which questions its passages answer)")
        if not 0 <= self.gate_threshold <= 1:
            out.append(f"--gate-threshold {self.gate_threshold}: must be in [0, 1]")
        try:
            check_select(self.select, self.adapters, self.judge)
        except InputError as exc:
            out.append(str(exc))
        return out


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard I/N` as (I, N): the one parser of it. ASCII digits only: str.isdigit() also accepts
    '²' or '٣', which int() then refuses or reads as another number."""
    m = re.fullmatch(r"([0-9]+)/([0-9]+)", text)
    if not m or int(m[1]) >= int(m[2]):
        raise InputError(f"--shard {json.dumps(text, ensure_ascii=False)}: use I/N (digits 0-9) with 0 <= I < N, "
                         f"e.g. 0/2")
    return int(m[1]), int(m[2])


def with_gate(p: dict, threshold: float = THRESHOLD) -> dict:
    """A prediction as the judge gate serves it: when none of the passages answers the question
    (judge answerability < `threshold`), the answer becomes the abstention.

    The gate asks about the passages, not the answer's wording, so it does not punish a right
    answer written as a long sentence. Latency adds the judge's time, spent on every answer.
    """
    q = {**p, "config": f"{p['config']}+gate", "latency_ms": p["latency_ms"] + (p.get("judge_ms") or 0.0)}
    if not p["abstained"] and gate_abstains(p.get("answerable"), threshold):
        as_abstention(q, gated=True)
    return q


def as_abstention(q: dict, **flag) -> None:
    """Turn a derived prediction into the abstention (in place), marking what caused it."""
    q.update(prediction=ABSTAIN, abstained=True, label="abstained", f1=token_f1(ABSTAIN, q["answers"]),
             citations=[], unsupported=None, **flag)


def with_calibration(p: dict, threshold: float, answered: dict | None = None) -> dict:
    """A prediction as a calibrated adapter serves it: abstain when its own abstention score
    (tuning/abstention.py) reaches the adapter's threshold; below it, where the greedy answer
    abstained, the answer written again from the answer's opening (`answered`), if given."""
    q = {**p, "config": f"{p['config']}+cal"}
    if not p["abstained"] and calibration_abstains(p.get("abstain_score"), threshold):
        as_abstention(q, calibrated_abstain=True)
    elif p["abstained"] and answered is not None and needs_answer(p, threshold):
        q = {**answered, "config": q["config"], "abstain_score": p.get("abstain_score"), "calibrated_answer": True,
             # both completions were generated to serve this one
             "latency_ms": p["latency_ms"] + answered["latency_ms"], "new_tokens": p["new_tokens"] + answered["new_tokens"]}
    return q


def needs_answer(p: dict, threshold: float) -> bool:
    """The threshold overrules this greedy abstention: the score is below it."""
    return p["abstained"] and p.get("abstain_score") is not None and not calibration_abstains(p["abstain_score"], threshold)


def picked_by_judge(candidates: list[dict], name: str) -> dict:
    """One question's prediction chosen among several configurations' predictions of it.

    Args:
        candidates: the same question's predictions, one per configuration, in `--select` order.
        name: the derived configuration's name.

    Returns:
        The non-abstaining candidate with the highest judge `support` (ties: the first; all
        abstained: the first), renamed, with `selected_from` and the summed latency and tokens
        (every candidate had to be generated).
    """
    best = candidates[best_supported([p["abstained"] for p in candidates], [p["support"] for p in candidates])]
    return {**best, "config": name, "selected_from": best["config"],
            "latency_ms": sum(p["latency_ms"] + (p.get("judge_ms") or 0.0) for p in candidates),
            "new_tokens": sum(p["new_tokens"] for p in candidates)}


def sample_rows(rows: list[QARow], limit: int, seed: int) -> list[QARow]:
    """A seeded sample of `limit` rows (all rows when limit is 0), in file order."""
    if not limit or limit >= len(rows):
        return rows
    keep = set(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False).tolist())
    return [r for i, r in enumerate(rows) if i in keep]


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict:
    """Evaluate every configuration; see the module docstring.

    Stages, in order: plan and resume -> generate -> score (calibration, judge) -> derive
    (gate, cal, judge-picked) -> report.

    Returns:
        The report (also written to OUT/report.json with report.md, chart.png, predictions.jsonl).
    """
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    out = Path(cfg.out) if cfg.out else None
    if out:
        check_writable(out, "--out")  # before any work, not after an hour of generating
    rows = sample_rows(load_qa(cfg.qa), cfg.limit, cfg.seed)
    if (shard := cfg.shard_of()) is not None:  # after sampling: the N shards split the same questions
        rows = rows[shard[0]::shard[1]]
    needs_index = [r.id for r in rows if r.passages is None]
    if needs_index and not cfg.index:
        raise InputError(f"{cfg.qa}: {len(needs_index)} rows have no 'passages' (e.g. {needs_index[0]}); "
                         f"pass --index to retrieve them")
    configs = (["closed_book"] if cfg.closed_book else []) + ["rag"] + [f"rag+{n}" for n in cfg.adapters]
    done = merged(cfg, configs, rows) if cfg.merge else resume(cfg, configs, {r.id for r in rows})
    judge = Judge.load(cfg.judge, groups=cfg.groups, gate=cfg.gate, precision=cfg.precision) if cfg.judge else None
    calibrations = {n: c for n, d in cfg.adapters.items() if (c := load_calibration(d)) is not None}
    thresholds = {f"rag+{n}": float(c["threshold"]) for n, c in calibrations.items()}
    todo = [(c, r) for c in configs for r in rows if (c, r.id) not in done]
    unscored = [p for p in done.values() if p["config"] in thresholds and "abstain_score" not in p]
    judge_fp = judge_fingerprint(cfg.judge)
    rejudge = judge is not None and (bool(todo) or any(p.get("judge") != judge_fp for p in done.values()))
    def load_pipe():
        return Pipeline.load(cfg.index, adapters=cfg.adapters, base_model=cfg.base_model, k=cfg.k,
                             max_new_tokens=cfg.max_new_tokens, groups=cfg.groups, calibrated=False, mode=cfg.mode,
                             rerank=cfg.rerank, precision=cfg.precision)

    pipe = load_pipe() if todo or unscored or not done else None
    contexts = row_contexts(rows, cfg, pipe) if todo or rejudge or unscored else {}  # a finished run needs no retrieval

    generate(cfg, pipe, rows, configs, contexts, thresholds, done, progress)
    for p in unscored:  # calibrated after these answers were written
        p["abstain_score"] = float(pipe.abstain_scores([p["question"]], [contexts[p["id"]]],
                                                       adapter=p["config"].split("+", 1)[1])[0])
    again = [(c, r) for c, t in thresholds.items() for r in rows
             if needs_answer(done[(c, r.id)], t) and (f"{c}+answered", r.id) not in done]
    if again:  # a new threshold may overrule other abstentions: only those are generated
        pipe = pipe or load_pipe()
        contexts = contexts or row_contexts(rows, cfg, pipe)
        answer_again(cfg, pipe, again, contexts, done)
    rejudged = judge_all(judge, judge_fp, done, rows, contexts) if rejudge else False
    if (rejudged or unscored or cfg.merge) and out:  # every line (re)written: with its scores, or merged
        write_text_atomic(out / "predictions.jsonl", "".join(
            json.dumps(p, ensure_ascii=False) + "\n" for p in done.values()))
    answered = {c: [done.get((f"{c}+answered", r.id)) for r in rows] for c in thresholds}
    by_config, decider = derive(cfg, {c: [done[(c, r.id)] for r in rows] for c in configs}, calibrations, answered)

    report = {"configs": {c: summarize(ps, cfg.seed) for c, ps in by_config.items()},
              "comparisons": compare(by_config, cfg.seed), "dataset": cfg.qa, "seed": cfg.seed,
              "n_questions": len(rows), "n_unanswerable": sum(not r.answers for r in rows),
              "intervals": dict(INTERVALS),  # what the "ci" lists are: older reports (no key) used the bootstrap
              "precision": run_precision(cfg),
              "models": {"base": pipe.info.name if pipe else cfg.base_model or "smollm2", "adapters": cfg.adapters,
                         "judge": cfg.judge, "index": cfg.index},
              **({"gate_threshold": cfg.gate_threshold} if cfg.gate else {}),
              **({"abstain_thresholds": thresholds} if thresholds else {}),
              **({"select": {"adapters": cfg.select, "abstention_by": decider}} if cfg.select else {})}
    if out:
        write_text_atomic(out / "report.json", json.dumps(report, indent=2))
        write_text_atomic(out / "report.md", markdown(report))
        chart(report, out / "chart.png")
    return report


def merged(cfg: EvalConfig, configs: list[str], rows: list[QARow]) -> dict[tuple[str, str], dict]:
    """The predictions of `--merge` shard dirs, checked to be runs of these settings that together
    answer every (configuration, question) of this run."""
    sigs, done, ids, precision = config_signatures(cfg, configs), {}, {r.id for r in rows}, run_precision(cfg)
    for d in cfg.merge:
        try:
            meta = json.loads((Path(d) / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(f"--merge {d}: no run.json; pass the --out dir of a 'hybrid eval --shard I/N' run") from None
        if why := stored_run(meta, sigs, f"--merge {d}", precision):
            raise InputError(f"{why}; merge shards of one run, with its settings")
        shard = meta.get("shard") if isinstance(meta.get("shard"), str) and meta["shard"].isprintable() else "I/N"
        # the same loader as a resumed eval's: a merged report holds no line its own run would refuse
        done.update(read_predictions(Path(d) / "predictions.jsonl", "--merge",
                                     f"rerun that shard ('hybrid eval --shard {shard}') into an empty --out", ids))
    missing = [(c, r.id) for c in configs for r in rows if (c, r.id) not in done]
    if missing:
        raise InputError(f"--merge: {len(missing)} answers missing (e.g. {missing[0][1]} in {missing[0][0]}); "
                         f"pass every shard's dir, each run to the end")
    if cfg.out:
        claim_merge_out(cfg, sigs, precision)
    # this run's configurations only: other adapters' answers in a shard are not checked against this run
    return {k: p for k, p in done.items() if k[0].removesuffix("+answered") in configs}


def claim_merge_out(cfg: EvalConfig, sigs: dict[str, str], precision: str) -> None:
    """Make a merge's --out a single run's (run.json now, predictions.jsonl with the report), so it
    re-reports (another judge, --gate) without the shards. Refused where it would replace answers
    of another run, or a shard's own."""
    out = Path(cfg.out)
    if any(out.resolve() == Path(d).resolve() for d in cfg.merge):
        raise InputError(f"--out {out}: is one of the --merge dirs; write the merged report to a dir of its own")
    if (out / "predictions.jsonl").is_file() and (out / "predictions.jsonl").stat().st_size:
        try:
            meta = json.loads((out / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        if why := stored_run(meta, sigs, f"--out {out}", precision):
            raise InputError(f"{why}; use another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "run.json", json.dumps({"signature": sigs["rag"], "shard": None, "configs": sigs,
                                                    "precision": precision}))


def signature(cfg: EvalConfig) -> str:
    """What every configuration's answers depend on (the shard aside: every shard of a run has the
    run's signature); each adapter adds its own part (`config_signatures`). The judge is not part of
    it: its scores are added afterwards and redone when the judge changes."""
    return hashlib.sha256(json.dumps([
        sha256_file(Path(cfg.qa)), cfg.index, cfg.limit, cfg.seed, cfg.k, cfg.groups or None, cfg.max_new_tokens,
        cfg.base_model, cfg.mode, cfg.rerank]).encode()).hexdigest()


def config_signatures(cfg: EvalConfig, configs: list[str]) -> dict[str, str]:
    """Each configuration's signature: the run's (`rag`'s, always present), plus for `rag+NAME` the
    adapter's dir and training fingerprint, so an eval extended with another adapter keeps the
    answers it already has."""
    base = signature(cfg)
    out = {}
    for c in configs:
        name = c.split("+", 1)[1] if c.startswith("rag+") else None
        out[c] = base if name is None else hashlib.sha256(json.dumps(
            [base, name, cfg.adapters[name], run_record.fingerprint(cfg.adapters[name])]).encode()).hexdigest()
    return out


def run_precision(cfg: EvalConfig) -> str:
    """The precision this run's answers are made at: in run.json and the report; a resumed or merged
    run's answers must all have been made at it (bf16 may word an answer differently)."""
    return choose(cfg.precision, default_device())


def stored_run(meta, sigs: dict[str, str], where: str, precision: str) -> str | None:
    """Why a run.json's answers cannot be used by a run with these `config_signatures` at `precision`
    (None: they can)."""
    if not isinstance(meta, dict) or meta.get("signature") != sigs["rag"] or \
            not isinstance(meta.get("configs"), dict):
        return f"{where}: holds predictions of a run with other settings (qa, index, limit, seed, k, groups, mode, ...)"
    if changed := [c for c, sig in sigs.items() if c in meta["configs"] and meta["configs"][c] != sig]:
        return (f"{where}: holds {changed[0]} answers of a run with other settings (another adapter dir, or the "
                f"adapter retrained)")
    made = meta.get("precision", "fp32")  # run.json written before the precision policy: every model ran in fp32
    if made != precision:
        return f"{where}: holds answers made at --precision {made}, and this run computes at {precision} " \
               f"(pass --precision {made} to resume them)"
    return None


def resume(cfg: EvalConfig, configs: list[str], ids: set[str]) -> dict[tuple[str, str], dict]:
    """Plan stage: the predictions an earlier run with the same settings already wrote to --out. A
    run with more adapters than the earlier one keeps its answers and generates only the new
    configurations'.

    Raises:
        InputError: --out holds predictions of a run with other settings.
    """
    out = Path(cfg.out) if cfg.out else None
    sigs, precision = config_signatures(cfg, configs), run_precision(cfg)
    done: dict[tuple[str, str], dict] = {}
    stored: dict[str, str] = {}
    if out and (out / "predictions.jsonl").exists() and (out / "predictions.jsonl").stat().st_size:
        try:
            meta = json.loads((out / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        why = stored_run(meta, sigs, f"--out {out}", precision)
        if why or meta.get("shard") != cfg.shard:
            raise InputError(f"{why or f'--out {out}: holds predictions of another shard'}; use another --out or "
                             f"delete it")
        stored = meta["configs"]
        done = read_predictions(out / "predictions.jsonl", "--out", "delete the file to start over", ids)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "run.json", json.dumps({"signature": sigs["rag"], "shard": cfg.shard,
                                                        "configs": {**stored, **sigs}, "precision": precision}))
    return done


def generate(cfg: EvalConfig, pipe, rows: list[QARow], configs: list[str], contexts: dict[str, list[dict]],
             thresholds: dict[str, float], done: dict, progress: bool) -> None:
    """Generate stage: answer every (configuration, question) not done yet; each prediction line is
    appended to predictions.jsonl as soon as it is known, so an interrupted eval resumes there."""
    from tqdm.auto import tqdm

    total = len(configs) * len(rows)
    pending_all = sum((c, r.id) not in done for c in configs for r in rows)
    bar = tqdm(total=total, initial=total - pending_all, disable=not progress, desc="eval", unit="answer")
    sink = open(Path(cfg.out) / "predictions.jsonl", "a", encoding="utf-8") if cfg.out and pending_all else None
    try:
        for config in configs:
            pending = [r for r in rows if (config, r.id) not in done]
            adapter = config.split("+", 1)[1] if "+" in config else None
            for start in range(0, len(pending), cfg.batch_size):
                batch = pending[start:start + cfg.batch_size]
                ctxs = [[] if config == "closed_book" else contexts[r.id] for r in batch]
                answers = pipe.answer_batch([r.question for r in batch], ctxs, adapter=adapter)
                scores = pipe.abstain_scores([r.question for r in batch], ctxs, adapter=adapter) \
                    if config in thresholds else [None] * len(batch)
                for r, ctx, a, score in zip(batch, ctxs, answers, scores):
                    p = prediction(config, r, ctx, a)
                    if config in thresholds:
                        p["abstain_score"] = float(score)
                    done[(config, r.id)] = p
                    if sink:
                        sink.write(json.dumps(p, ensure_ascii=False) + "\n")
                        sink.flush()
                bar.update(len(batch))
    finally:
        bar.close()
        if sink:
            sink.close()


def answer_again(cfg: EvalConfig, pipe, again: list[tuple[str, QARow]], contexts: dict, done: dict) -> None:
    """The questions whose greedy abstention a calibrated threshold overrules, answered from the
    answer's opening; stored as `CONFIG+answered` lines (appended, so a resumed eval keeps them)."""
    sink = open(Path(cfg.out) / "predictions.jsonl", "a", encoding="utf-8") if cfg.out else None
    try:
        for config in dict.fromkeys(c for c, _ in again):
            batch_rows = [r for c, r in again if c == config]
            for start in range(0, len(batch_rows), cfg.batch_size):
                batch = batch_rows[start:start + cfg.batch_size]
                ctxs = [contexts[r.id] for r in batch]
                answers = pipe.answer_batch([r.question for r in batch], ctxs, adapter=config.split("+", 1)[1],
                                            opening=True)
                for r, ctx, a in zip(batch, ctxs, answers):
                    p = done[(f"{config}+answered", r.id)] = prediction(f"{config}+answered", r, ctx, a)
                    if sink:
                        sink.write(json.dumps(p, ensure_ascii=False) + "\n")
                        sink.flush()
    finally:
        if sink:
            sink.close()


def prediction(config: str, r: QARow, ctx: list[dict], a) -> dict:
    """One line of predictions.jsonl: the answer as served, graded once."""
    return {"id": r.id, "config": config, "question": r.question, "answers": list(r.answers),
            "gold_ids": list(r.gold_ids), "prediction": a.answer, "raw": a.raw, "abstained": a.abstained,
            "label": classify(a.answer, a.abstained, r.answers), "f1": token_f1(a.answer, r.answers),
            "citations": a.citations, "support": None, "unsupported": None,
            "retrieved_doc_ids": [c["doc_id"] for c in ctx] if (r.passages is None and ctx) else None,
            "latency_ms": a.latency_ms, "new_tokens": a.new_tokens,
            "malformed": getattr(a, "malformed", False)}  # an answer written by hand may not say


def derive(cfg: EvalConfig, by_config: dict[str, list[dict]], calibrations: dict[str, dict],
           answered: dict[str, list] | None = None):
    """Derive stage: NAME+gate, rag+NAME+cal and the judge-picked rag+A|B(+cal) from the answers as
    generated (no generation). Returns (every configuration's predictions, the deciding adapter)."""
    thresholds = {f"rag+{n}": float(c["threshold"]) for n, c in calibrations.items()}
    if cfg.gate:
        for c in [c for c in list(by_config) if c != "closed_book"]:
            by_config[f"{c}+gate"] = [with_gate(p, cfg.gate_threshold) for p in by_config[c]]
    for c, t in thresholds.items():
        again = (answered or {}).get(c) or [None] * len(by_config[c])
        by_config[f"{c}+cal"] = [with_calibration(p, t, a) for p, a in zip(by_config[c], again)]
    decider = None
    if cfg.select:
        name = "rag+" + "|".join(cfg.select)
        by_config[name] = [picked_by_judge(list(ps), name) for ps in zip(*(by_config[f"rag+{n}"] for n in cfg.select))]
        if decider := deciding_adapter(cfg.select, {n: c.get("auroc") or 0.0 for n, c in calibrations.items()}):
            by_config[f"{name}+cal"] = [with_calibration({**q, "abstain_score": d["abstain_score"]},
                                                         thresholds[f"rag+{decider}"])
                                        for q, d in zip(by_config[name], by_config[f"rag+{decider}"])]
    return by_config, decider


def row_contexts(rows: list[QARow], cfg: EvalConfig, pipe) -> dict[str, list[dict]]:
    """Each row's passages: its fixed `passages`, else the top -k retrieved for the caller's groups
    (retrieval is deterministic, so a resumed or re-judged run sees the same passages)."""
    out = {r.id: [{"doc_id": str(p.get("id", "")), **p} for p in r.passages] for r in rows if r.passages is not None}
    need = [r for r in rows if r.passages is None]
    if need:
        retriever = pipe.retriever if pipe is not None else Retriever.load(cfg.index, reranker=cfg.rerank,
                                                                                      precision=cfg.precision)
        out.update(zip([r.id for r in need], passages_for(retriever, [r.question for r in need], cfg.k, cfg.groups,
                                                                 cfg.mode)))
    return out


def judge_all(judge, fingerprint: str, done: dict, rows: list[QARow], contexts: dict[str, list[dict]]) -> bool:
    """Add the judge's scores to every prediction it has not scored yet (in place).

    Each prediction gets `support` (best-passage probability that the passages support its
    answer; None when it abstained or had no passages), `unsupported`, and `answerable` (does any
    of its passages answer the question; the gate's signal; None for a judge trained without
    answerability pairs), plus `judge_ms` per answer.

    Returns:
        Whether any prediction changed.
    """
    stale = [p for p in done.values() if p.get("judge") != fingerprint]
    if not stale:
        return False
    by_id = {r.id: r for r in rows}
    t0 = time.perf_counter()
    rag = [p for p in stale if p["config"] != "closed_book"]
    ask = sorted({p["id"] for p in rag}) if judge.answerability else []
    answerable = dict(zip(ask, judge.answerable([by_id[i].question for i in ask], [contexts[i] for i in ask]))) \
        if ask else {}
    live = [p for p in rag if not p["abstained"]]
    support = judge.support([p["question"] for p in live], [p["prediction"] for p in live],
                            [contexts[p["id"]] for p in live]) if live else []
    per = (time.perf_counter() - t0) * 1000 / len(stale)
    for p in stale:
        p.update(support=None, unsupported=None, answerable=None, judge=fingerprint, judge_ms=per)
        if p["id"] in answerable and p["config"] != "closed_book":
            p["answerable"] = float(answerable[p["id"]])
    for p, sup in zip(live, support):
        p["support"], p["unsupported"] = float(sup), bool(sup < THRESHOLD)
    return True
