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

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from core.atomic import check_writable, write_text_atomic
from core.errors import InputError
from core.qa import QARow, load_qa
from hybrid.answer import passages_for
from hybrid.eval_configuration import Configuration, planned
from hybrid.eval_derived import derive, needs_answer
from hybrid.eval_probe import probe_target, risk_chart, risk_coverage, score_all, with_probe
from hybrid.eval_resume import merged, resume, run_precision
from hybrid.pipeline import Pipeline
from hybrid.prediction import Prediction
from hybrid.eval_config import EvalConfig
from hybrid.pipeline_settings import PipelineSettings
from hybrid.report import EvalReport, chart, compare, markdown, summarize
from hybrid.statistics import INTERVALS
from retrieval.retriever import Retriever
from tuning.abstention import load_calibration
from tuning.generation import DEFAULT_GENERATOR
from tuning.grading import classify, token_f1
from tuning.judge import THRESHOLD, Judge
from tuning.judge import fingerprint as judge_fingerprint

def sample_rows(rows: list[QARow], limit: int, seed: int) -> list[QARow]:
    """A seeded sample of `limit` rows (all rows when limit is 0), in file order."""
    if not limit or limit >= len(rows):
        return rows
    keep = set(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False).tolist())
    return [r for i, r in enumerate(rows) if i in keep]


def run_eval(cfg: EvalConfig, progress: bool = True) -> EvalReport:
    """Evaluate every configuration; see the module docstring.

    Stages, in order: plan and resume -> generate -> score (calibration, judge) -> derive
    (gate, cal, judge-picked) -> report.

    Returns:
        The report (also written to OUT/report.json with report.md, chart.png, predictions.jsonl).
    """
    # config: read once into typed values; the stages below get these, not `cfg`
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    settings, out = cfg.pipeline_settings(), Path(cfg.out) if cfg.out else None
    if out:
        check_writable(out, "--out")  # before any work, not after an hour of generating
    rows = eval_rows(cfg)
    configs = planned(cfg.closed_book, cfg.adapters)
    # plan: what earlier runs (or the --merge shards) answered already, and what is left
    done = merged(cfg, configs, rows) if cfg.merge else resume(cfg, configs, {r.id for r in rows})
    judge = Judge.load(cfg.judge, groups=cfg.groups, gate=cfg.gate, precision=cfg.precision) if cfg.judge else None
    calibrations = {n: c for n, d in cfg.adapters.items() if (c := load_calibration(d)) is not None}
    thresholds = {c: float(calibrations[c.adapter]["threshold"]) for c in configs if c.adapter in calibrations}
    todo = [(c, r) for c in configs for r in rows if (c.label, r.id) not in done]
    unscored = [(c, p) for c in thresholds for p in done.values() if p.config == c.label and p.abstain_score is None]
    judge_fp = judge_fingerprint(cfg.judge)
    rejudge = judge is not None and (bool(todo) or any(p.judge != judge_fp for p in done.values()))
    probe, probed, probe_fp = probe_target(cfg.probe, cfg.adapters, cfg.groups) if cfg.probe else (None, None, None)
    reprobe = probe is not None and (any(c == probed for c, _ in todo) or any(
        p.config == probed.label and p.probe != probe_fp for p in done.values()))
    pipe = Pipeline.load(settings) if todo or unscored or reprobe or not done else None
    # a finished run: no retrieval
    contexts = row_contexts(rows, settings, pipe) if todo or rejudge or unscored or reprobe else {}
    sink = out / "predictions.jsonl" if out else None

    # generate: every configuration's greedy answers, then those a calibrated threshold overrules
    generate(pipe, rows, configs, contexts, thresholds, done, cfg.batch_size, sink, progress)
    for c, p in unscored:  # calibrated after these answers were written
        done[(p.config, p.id)] = replace(p, abstain_score=float(
            pipe.abstain_scores([p.question], [contexts[p.id]], adapter=c.adapter)[0]))
    again = [(c, r) for c, t in thresholds.items() for r in rows
             if needs_answer(done[(c.label, r.id)], t) and (answered_label(c), r.id) not in done]
    if again:  # a new threshold may overrule other abstentions: only those are generated
        pipe = pipe or Pipeline.load(settings)
        contexts = contexts or row_contexts(rows, settings, pipe)
        answer_again(pipe, again, contexts, done, cfg.batch_size, sink)

    # score: the judge's support and answerability, added to the lines without generating
    rejudged = judge_all(judge, judge_fp, done, rows, contexts) if rejudge else False
    reprobed = score_all(pipe, cfg.probe, probed, probe_fp, done, contexts) if reprobe else False
    if (rejudged or reprobed or unscored or cfg.merge) and out:  # every line (re)written: with its scores, or merged
        write_text_atomic(out / "predictions.jsonl", "".join(
            json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in done.values()))

    # derive and report
    answered = {c.label: [done.get((answered_label(c), r.id)) for r in rows] for c in thresholds}
    by_config, decider = derive({c.label: [done[(c.label, r.id)] for r in rows] for c in configs}, calibrations,
                                cfg.gate_threshold if cfg.gate else None, cfg.select, answered)
    if probe is not None:
        by_config[replace(probed, probe=True).label] = [with_probe(p, probe) for p in by_config[probed.label]]
    report = EvalReport(
        configs={c: summarize(ps, cfg.seed) for c, ps in by_config.items()},
        comparisons=compare(by_config, cfg.seed), dataset=cfg.qa, seed=cfg.seed,
        n_questions=len(rows), n_unanswerable=sum(not r.answers for r in rows),
        intervals=dict(INTERVALS),  # what the "ci" lists are: older reports (no key) used the bootstrap
        precision=run_precision(cfg),
        models={"base": pipe.info.name if pipe else cfg.base_model or DEFAULT_GENERATOR,
                "adapters": cfg.adapters, "judge": cfg.judge, "index": cfg.index},
        gate_threshold=cfg.gate_threshold if cfg.gate else None,
        abstain_thresholds={c.label: t for c, t in thresholds.items()} if thresholds else None,
        select={"adapters": cfg.select, "abstention_by": decider} if cfg.select else None,
        probe={"dir": cfg.probe, "scores": probed.label, "threshold": probe.threshold, "before": probe.before}
        if probe is not None else None,
        risk_coverage={c: risk_coverage(ps) for c, ps in by_config.items()})
    if out:
        write_text_atomic(out / "report.json", json.dumps(report.to_json(), indent=2))
        write_text_atomic(out / "report.md", markdown(report))
        chart(report, out / "chart.png")
        risk_chart(report.risk_coverage, out / "risk_coverage.png",
                   f"hybrid eval: {Path(cfg.qa).name} (n={len(rows)}), ranked by the probe's rule score")
    return report


def eval_rows(cfg: EvalConfig) -> list[QARow]:
    """The questions this run answers: the seeded sample, then this shard's share of it."""
    rows = sample_rows(load_qa(cfg.qa), cfg.limit, cfg.seed)
    if (shard := cfg.shard_of()) is not None:  # after sampling: the N shards split the same questions
        rows = rows[shard[0]::shard[1]]
    needs_index = [r.id for r in rows if r.passages is None]
    if needs_index and not cfg.index:
        raise InputError(f"{cfg.qa}: {len(needs_index)} rows have no 'passages' (e.g. {needs_index[0]}); "
                         f"pass --index to retrieve them")
    return rows


def answered_label(c: Configuration) -> str:
    """The label of `c`'s stored `+answered` lines."""
    return replace(c, answered=True).label


def generate(pipe, rows: list[QARow], configs: list[Configuration], contexts: dict[str, list[dict]],
             thresholds: dict[Configuration, float], done: dict[tuple[str, str], Prediction], batch_size: int,
             sink: Path | None, progress: bool) -> None:
    """Generate stage: answer every (configuration, question) not done yet; each prediction line is
    appended to `sink` (predictions.jsonl) as soon as it is known, so an interrupted eval resumes there."""
    from tqdm.auto import tqdm

    total = len(configs) * len(rows)
    pending_all = sum((c.label, r.id) not in done for c in configs for r in rows)
    bar = tqdm(total=total, initial=total - pending_all, disable=not progress, desc="eval", unit="answer")
    lines = open(sink, "a", encoding="utf-8") if sink and pending_all else None
    try:
        for config in configs:
            pending = [r for r in rows if (config.label, r.id) not in done]
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                ctxs = [[] if config.closed_book else contexts[r.id] for r in batch]
                answers = pipe.answer_batch([r.question for r in batch], ctxs, adapter=config.adapter)
                scores = pipe.abstain_scores([r.question for r in batch], ctxs, adapter=config.adapter) \
                    if config in thresholds else [None] * len(batch)
                for r, ctx, a, score in zip(batch, ctxs, answers, scores):
                    p = prediction(config.label, r, ctx, a)
                    if config in thresholds:
                        p = replace(p, abstain_score=float(score))
                    done[(config.label, r.id)] = p
                    if lines:
                        lines.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
                        lines.flush()
                bar.update(len(batch))
    finally:
        bar.close()
        if lines:
            lines.close()


def answer_again(pipe, again: list[tuple[Configuration, QARow]], contexts: dict,
                 done: dict[tuple[str, str], Prediction], batch_size: int, sink: Path | None) -> None:
    """The questions whose greedy abstention a calibrated threshold overrules, answered from the
    answer's opening; stored as `CONFIG+answered` lines (appended, so a resumed eval keeps them)."""
    lines = open(sink, "a", encoding="utf-8") if sink else None
    try:
        for config in dict.fromkeys(c for c, _ in again):
            label, batch_rows = answered_label(config), [r for c, r in again if c == config]
            for start in range(0, len(batch_rows), batch_size):
                batch = batch_rows[start:start + batch_size]
                ctxs = [contexts[r.id] for r in batch]
                answers = pipe.answer_batch([r.question for r in batch], ctxs, adapter=config.adapter, opening=True)
                for r, ctx, a in zip(batch, ctxs, answers):
                    p = done[(label, r.id)] = prediction(label, r, ctx, a)
                    if lines:
                        lines.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
                        lines.flush()
    finally:
        if lines:
            lines.close()


def prediction(config: str, r: QARow, ctx: list[dict], a) -> Prediction:
    """One line of predictions.jsonl: the answer as served, graded once."""
    return Prediction(id=r.id, config=config, question=r.question, answers=list(r.answers),
                      gold_ids=list(r.gold_ids), prediction=a.answer, raw=a.raw, abstained=a.abstained,
                      label=classify(a.answer, a.abstained, r.answers), f1=token_f1(a.answer, r.answers),
                      citations=a.citations,
                      retrieved_doc_ids=[c["doc_id"] for c in ctx] if (r.passages is None and ctx) else None,
                      latency_ms=a.latency_ms, new_tokens=a.new_tokens,
                      malformed=getattr(a, "malformed", False))  # an answer written by hand may not say


def row_contexts(rows: list[QARow], settings: PipelineSettings, pipe=None) -> dict[str, list[dict]]:
    """Each row's passages: its fixed `passages`, else the top `settings.k` retrieved from
    `settings.index` for the caller's groups (the pipeline's retriever when one is loaded).
    Retrieval is deterministic, so a resumed or re-judged run sees the same passages."""
    out = {r.id: [{"doc_id": str(p.get("id", "")), **p} for p in r.passages] for r in rows if r.passages is not None}
    need = [r for r in rows if r.passages is None]
    if need:
        retriever = pipe.retriever if pipe is not None else Retriever.load(settings.index, reranker=settings.rerank,
                                                                           precision=settings.precision)
        out.update(zip([r.id for r in need], passages_for(retriever, [r.question for r in need], settings.k,
                                                          settings.groups, settings.mode)))
    return out


def judge_all(judge, fingerprint: str, done: dict[tuple[str, str], Prediction], rows: list[QARow],
              contexts: dict[str, list[dict]]) -> bool:
    """Add the judge's scores to every prediction it has not scored yet (`done`'s records replaced
    by scored ones).

    Each prediction gets `support` (best-passage probability that the passages support its
    answer; None when it abstained or had no passages), `unsupported`, and `answerable` (does any
    of its passages answer the question; the gate's signal; None for a judge trained without
    answerability pairs), plus `judge_ms` per answer.

    Returns:
        Whether any prediction changed.
    """
    stale = [p for p in done.values() if p.judge != fingerprint]
    if not stale:
        return False
    by_id = {r.id: r for r in rows}
    t0 = time.perf_counter()
    rag = [p for p in stale if p.config != "closed_book"]
    ask = sorted({p.id for p in rag}) if judge.answerability else []
    answerable = dict(zip(ask, judge.answerable([by_id[i].question for i in ask], [contexts[i] for i in ask]))) \
        if ask else {}
    live = [p for p in rag if not p.abstained]
    support = judge.support([p.question for p in live], [p.prediction for p in live],
                            [contexts[p.id] for p in live]) if live else []
    supported = {(p.config, p.id): float(sup) for p, sup in zip(live, support)}
    per = (time.perf_counter() - t0) * 1000 / len(stale)
    for p in stale:
        sup = supported.get((p.config, p.id))
        done[(p.config, p.id)] = replace(
            p, support=sup, unsupported=None if sup is None else bool(sup < THRESHOLD), judge=fingerprint,
            judge_ms=per, answerable=float(answerable[p.id]) if p.id in answerable and p.config != "closed_book" else None)
    return True
