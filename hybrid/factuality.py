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
`rag+NAME+cal`: the same answers, abstaining where the adapter's own abstention score
reaches its threshold (scores added after generation, like the judge's). With `select`
(two or more adapter names, and a judge), `rag+A|B` answers each question with the candidate
the judge finds best supported by the passages among those adapters' non-abstaining answers
(ties: the first listed; all abstained: the abstention), and `rag+A|B+cal` abstains on top where
the best-calibrated of them (highest calibration AUROC) reaches its threshold. Both are derived
from answers already generated.

Each answer is classified exactly once:
  correct       the normalised gold answer (SQuAD/HotpotQA normalisation) equals or
                is contained in the normalised final answer; a yes/no gold must equal
                the answer's first word
  abstained     the abstention sentence or a recognised refusal
  hallucinated  anything else: a wrong answer, or any answer to an unanswerable question
so accuracy + abstention_rate + hallucination_rate = 1.

predictions.jsonl gets one line per (question, configuration) as soon as it is
known, so an interrupted eval resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hybrid.evaluation import fmt
from hybrid.judge import THRESHOLD
from hybrid.pipeline import best_supported, check_select, deciding_adapter
from hybrid.statistics import bootstrap_ci, mcnemar_exact, paired_diff_ci
from retrieval.atomic import write_text_atomic
from retrieval.errors import InputError
from retrieval.index import sha256_file
from retrieval.metrics import retrieval_metrics
from retrieval.qa import QARow, load_qa
from retrieval.retriever import Retriever
from tuning.prompting import ABSTAIN, normalize

RATES = ("accuracy", "abstention_rate", "hallucination_rate")
COLUMNS = ("n", "accuracy", "abstention_rate", "hallucination_rate", "unsupported_rate", "citation_verified_rate",
           "f1", "recall@5", "mrr@10", "latency_ms_p50", "latency_ms_p95", "tokens_per_s")


def classify(answer: str, abstained: bool, golds: list[str] | tuple[str, ...]) -> str:
    """correct | abstained | hallucinated (see module docstring)."""
    if abstained:
        return "abstained"
    if not golds:
        return "hallucinated"
    pred = normalize(answer)
    for g in golds:
        ng = normalize(g)
        if ng in ("yes", "no"):
            if pred.split()[:1] == [ng]:
                return "correct"
        elif ng and ng in pred:
            return "correct"
    return "hallucinated"


def token_f1(answer: str, golds) -> float:
    """SQuAD token F1 against the best gold (0 for unanswerable questions)."""
    best = 0.0
    pred = normalize(answer).split()
    for g in golds:
        gold = normalize(g).split()
        common = Counter(pred) & Counter(gold)
        same = sum(common.values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


@dataclass
class EvalConfig:
    """Settings of `hybrid eval` (generation)."""

    qa: str
    index: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    closed_book: bool = True
    limit: int = 0
    seed: int = 0
    k: int = 5
    groups: list[str] | None = None
    batch_size: int = 4
    max_new_tokens: int = 96
    base_model: str | None = None
    judge: str | None = None
    gate: bool = False
    gate_threshold: float = THRESHOLD
    select: list[str] = field(default_factory=list)
    out: str | None = None


def judge_fingerprint(path: str | None) -> str | None:
    """Identity of a judge dir (its report holds the training config and time), for the resume signature."""
    return sha256_file(Path(path) / "hybrid_judge.json") if path and (Path(path) / "hybrid_judge.json").exists() else None


def adapter_fingerprints(adapters: dict[str, str]) -> dict[str, str | None]:
    """Identity of each adapter's training run, so a retrained adapter at the same path is not mixed up."""
    from tuning.abstention import run_fingerprint

    return {n: run_fingerprint(d) for n, d in sorted(adapters.items())}


def gated(p: dict, threshold: float = THRESHOLD) -> dict:
    """A prediction as the judge gate serves it: when none of the passages answers the question
    (judge answerability < `threshold`), the answer becomes the abstention.

    The gate asks about the passages, not the answer's wording, so it does not punish a right
    answer written as a long sentence. Latency adds the judge's time, spent on every answer.
    """
    q = {**p, "config": f"{p['config']}+gate", "latency_ms": p["latency_ms"] + (p.get("judge_ms") or 0.0)}
    if not p["abstained"] and p.get("answerable") is not None and p["answerable"] < threshold:
        as_abstention(q, gated=True)
    return q


def as_abstention(q: dict, **flag) -> None:
    """Turn a derived prediction into the abstention (in place), marking what caused it."""
    q.update(prediction=ABSTAIN, abstained=True, label="abstained", f1=token_f1(ABSTAIN, q["answers"]),
             citations=[], unsupported=None, **flag)


def calibrated(p: dict, threshold: float) -> dict:
    """A prediction as a calibrated adapter serves it: abstain when its own abstention score
    (tuning/abstention.py) reaches the adapter's threshold."""
    q = {**p, "config": f"{p['config']}+cal"}
    if not p["abstained"] and p.get("abstain_score") is not None and p["abstain_score"] >= threshold:
        as_abstention(q, calibrated_abstain=True)
    return q


def selected(candidates: list[dict], name: str) -> dict:
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


def select_rows(rows: list[QARow], limit: int, seed: int) -> list[QARow]:
    """A seeded sample of `limit` rows (all rows when limit is 0), in file order."""
    if not limit or limit >= len(rows):
        return rows
    keep = set(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False).tolist())
    return [r for i, r in enumerate(rows) if i in keep]


def summarize(preds: list[dict], seed: int) -> dict:
    """Metrics of one configuration from its prediction lines."""
    n = len(preds)
    labels = [p["label"] for p in preds]
    out: dict = {"n": n}
    indicators = {"accuracy": [l == "correct" for l in labels], "abstention_rate": [l == "abstained" for l in labels],
                  "hallucination_rate": [l == "hallucinated" for l in labels]}
    for name, ind in indicators.items():
        out[name] = float(np.mean(ind)) if n else float("nan")
    judged = [p["unsupported"] for p in preds if p.get("unsupported") is not None and p["label"] != "abstained"]
    out["unsupported_rate"] = float(np.mean(judged)) if judged else None
    cites = [c["verified"] for p in preds for c in p["citations"]]
    out["citation_verified_rate"] = float(np.mean(cites)) if cites else None
    out["f1"] = float(np.mean([p["f1"] for p in preds])) if n else float("nan")
    answerable = [p for p in preds if p["answers"]]
    out["accuracy_answerable"] = float(np.mean([p["label"] == "correct" for p in answerable])) if answerable else None
    unans = [p for p in preds if not p["answers"]]
    out["abstention_unanswerable"] = float(np.mean([p["label"] == "abstained" for p in unans])) if unans else None
    ranked = [p for p in preds if p.get("retrieved_doc_ids") is not None and p.get("gold_ids")]
    if ranked:
        m = retrieval_metrics([p["retrieved_doc_ids"] for p in ranked], [set(p["gold_ids"]) for p in ranked])
        out["recall@5"], out["mrr@10"] = m["recall@5"], m["mrr@10"]
    else:
        out["recall@5"] = out["mrr@10"] = None
    lat = [p["latency_ms"] for p in preds]
    out["latency_ms_p50"] = float(np.percentile(lat, 50)) if lat else None
    out["latency_ms_p95"] = float(np.percentile(lat, 95)) if lat else None
    secs = sum(lat) / 1000
    out["tokens_per_s"] = sum(p["new_tokens"] for p in preds) / secs if secs else None
    out["ci"] = {name: list(bootstrap_ci(ind, seed=seed)) for name, ind in indicators.items()}
    if answerable:
        out["ci"]["accuracy_answerable"] = list(bootstrap_ci([p["label"] == "correct" for p in answerable], seed=seed))
    return out


def compare(by_config: dict[str, list[dict]], seed: int) -> list[dict]:
    """Paired tests between every pair of configurations on their common questions."""
    names = list(by_config)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa = {p["id"]: p for p in by_config[a]}
            pb = {p["id"]: p for p in by_config[b]}
            ids = sorted(set(pa) & set(pb))
            row = {"a": a, "b": b, "n": len(ids)}
            for rate, label in (("hallucination_rate", "hallucinated"), ("accuracy", "correct"),
                                ("abstention_rate", "abstained")):
                xa = [pa[q]["label"] == label for q in ids]
                xb = [pb[q]["label"] == label for q in ids]
                diff, low, high = paired_diff_ci(xa, xb, seed=seed)
                test = mcnemar_exact(xa, xb)
                row[rate] = {"diff_b_minus_a": diff, "ci": [low, high], "mcnemar_p": test["p_value"],
                             "significant": test["p_value"] < 0.05}
            out.append(row)
    return out


def markdown(report: dict) -> str:
    """report.md: one row per configuration, rates with their 95 % intervals, then the paired tests."""
    lines = [f"# hybrid eval: {report['dataset']}", "",
             f"{report['n_questions']} questions ({report['n_unanswerable']} unanswerable), seed {report['seed']}, "
             f"models: {json.dumps(report['models'])}", "",
             "| config | n | accuracy | abstention | hallucination | unsupported | citations verified | F1 | "
             "recall@5 | MRR@10 | p50 ms | p95 ms | tok/s |", "|---|" + "---:|" * 12]
    for name, m in report["configs"].items():
        ci = m.get("ci", {})

        def rate(key):
            lo, hi = ci.get(key, [None, None])
            return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else fmt(m[key])

        lines.append(f"| {name} | {m['n']} | {rate('accuracy')} | {rate('abstention_rate')} | {rate('hallucination_rate')} | "
                     + " | ".join(fmt(m.get(c)) for c in COLUMNS[4:]) + " |")
    if report["comparisons"]:
        lines += ["", "Paired comparisons (b − a on the same questions; McNemar exact p):", "",
                  "| a | b | Δ hallucination [95 % CI] | p | Δ accuracy [95 % CI] | p |", "|---|---|---:|---:|---:|---:|"]
        for c in report["comparisons"]:
            h, a = c["hallucination_rate"], c["accuracy"]
            lines.append(f"| {c['a']} | {c['b']} | {h['diff_b_minus_a']:+.3f} [{h['ci'][0]:+.3f}, {h['ci'][1]:+.3f}] | "
                         f"{h['mcnemar_p']:.3g}{' *' if h['significant'] else ''} | {a['diff_b_minus_a']:+.3f} "
                         f"[{a['ci'][0]:+.3f}, {a['ci'][1]:+.3f}] | {a['mcnemar_p']:.3g}{' *' if a['significant'] else ''} |")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    """PNG: accuracy, abstention and hallucination per configuration with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["configs"])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 3.8))
    width = 0.26
    colors = {"accuracy": "#2a9d8f", "abstention_rate": "#8d99ae", "hallucination_rate": "#e63946"}
    for j, rate in enumerate(RATES):
        vals = [report["configs"][n][rate] for n in names]
        cis = [report["configs"][n]["ci"][rate] for n in names]
        err = np.array([[v - lo for v, (lo, _) in zip(vals, cis)], [hi - v for v, (_, hi) in zip(vals, cis)]])
        ax.bar(np.arange(len(names)) + (j - 1) * width, vals, width, yerr=err, capsize=3, color=colors[rate],
               label=rate.replace("_", " "))
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of questions")
    ax.set_title(f"hybrid eval: {Path(report['dataset']).name} (n={report['n_questions']}, 95 % CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict:
    """Evaluate every configuration; see the module docstring.

    Returns:
        The report (also written to OUT/report.json with report.md, chart.png, predictions.jsonl).
    """
    from hybrid.pipeline import Pipeline

    if cfg.gate and not cfg.judge:
        raise InputError("--gate needs --judge DIR (the judge decides which questions its passages answer)")
    if not 0 <= cfg.gate_threshold <= 1:
        raise InputError(f"--gate-threshold {cfg.gate_threshold}: must be in [0, 1]")
    check_select(cfg.select, cfg.adapters, cfg.judge)
    rows = select_rows(load_qa(cfg.qa), cfg.limit, cfg.seed)
    needs_index = [r.id for r in rows if r.passages is None]
    if needs_index and not cfg.index:
        raise InputError(f"{cfg.qa}: {len(needs_index)} rows have no 'passages' (e.g. {needs_index[0]}); pass --index to retrieve them")
    configs = (["closed_book"] if cfg.closed_book else []) + ["rag"] + [f"rag+{n}" for n in cfg.adapters]
    out = Path(cfg.out) if cfg.out else None
    # What the answers depend on. The judge is not part of it: its scores are added afterwards
    # and redone when the judge changes, without generating again.
    signature = hashlib.sha256(json.dumps([sha256_file(Path(cfg.qa)), cfg.index,
                                           sorted(cfg.adapters.items()), adapter_fingerprints(cfg.adapters),
                                           cfg.limit, cfg.seed, cfg.k, cfg.groups,
                                           cfg.max_new_tokens, cfg.base_model]).encode()).hexdigest()
    done: dict[tuple[str, str], dict] = {}
    if out and (out / "predictions.jsonl").exists():
        meta = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        if meta.get("signature") != signature:
            raise InputError(f"--out {out}: holds predictions of a run with other settings; use another --out or delete it")
        for line in (out / "predictions.jsonl").read_text().splitlines():
            if line.strip():
                p = json.loads(line)
                done[(p["config"], p["id"])] = p
    if out:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "run.json", json.dumps({"signature": signature, "configs": configs}))
    judge = None
    if cfg.judge:
        from hybrid.judge import Judge

        judge = Judge.load(cfg.judge, groups=cfg.groups, gate=cfg.gate)  # a judge that cannot gate: refused now

    from tuning.abstention import load_calibration

    calibrations = {n: c for n, d in cfg.adapters.items() if (c := load_calibration(d)) is not None}
    thresholds = {f"rag+{n}": float(c["threshold"]) for n, c in calibrations.items()}
    todo = [(c, r) for c in configs for r in rows if (c, r.id) not in done]
    unscored = [p for p in done.values() if p["config"] in thresholds and "abstain_score" not in p]
    pipe = Pipeline.load(cfg.index, adapters=cfg.adapters, base_model=cfg.base_model, k=cfg.k,
                         max_new_tokens=cfg.max_new_tokens, groups=cfg.groups, calibrated=False) \
        if todo or unscored or not done else None
    judge_fp = judge_fingerprint(cfg.judge)
    rejudge = judge is not None and (bool(todo) or any(p.get("judge") != judge_fp for p in done.values()))
    # a finished run needs no retrieval
    contexts = row_contexts(rows, cfg, pipe) if todo or rejudge or unscored else {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(configs) * len(rows), initial=len(configs) * len(rows) - len(todo), disable=not progress,
               desc="eval", unit="answer")
    sink = open(out / "predictions.jsonl", "a", encoding="utf-8") if out else None
    try:
        for config in configs:
            pending = [r for r in rows if (config, r.id) not in done]
            for start in range(0, len(pending), cfg.batch_size):
                batch = pending[start:start + cfg.batch_size]
                ctxs = [[] if config == "closed_book" else contexts[r.id] for r in batch]
                adapter = config.split("+", 1)[1] if "+" in config else None
                answers = pipe.answer_batch([r.question for r in batch], ctxs, adapter=adapter)
                if config in thresholds:
                    scores = pipe.abstain_scores([r.question for r in batch], ctxs, adapter=adapter)
                    for a, s in zip(answers, scores):
                        a.abstain_score = float(s)
                for r, ctx, a in zip(batch, ctxs, answers):
                    p = {"id": r.id, "config": config, "question": r.question, "answers": list(r.answers),
                         "gold_ids": list(r.gold_ids), "prediction": a.answer, "raw": a.raw, "abstained": a.abstained,
                         "label": classify(a.answer, a.abstained, r.answers), "f1": token_f1(a.answer, r.answers),
                         "citations": a.citations, "support": None, "unsupported": None,
                         "retrieved_doc_ids": [c["doc_id"] for c in ctx] if (r.passages is None and ctx) else None,
                         "latency_ms": a.latency_ms, "new_tokens": a.new_tokens,
                         **({"abstain_score": a.abstain_score} if config in thresholds else {})}
                    done[(config, r.id)] = p
                    if sink:
                        sink.write(json.dumps(p, ensure_ascii=False) + "\n")
                        sink.flush()
                bar.update(len(batch))
    finally:
        bar.close()
        if sink:
            sink.close()

    for p in unscored:  # calibrated after these answers were written
        p["abstain_score"] = float(pipe.abstain_scores([p["question"]], [contexts[p["id"]]],
                                                       adapter=p["config"].split("+", 1)[1])[0])
    rejudged = judge_all(judge, judge_fp, done, rows, contexts) if rejudge else False
    if (rejudged or unscored) and out:
        write_text_atomic(out / "predictions.jsonl", "".join(
            json.dumps(done[(c, r.id)], ensure_ascii=False) + "\n" for c in configs for r in rows))
    by_config = {c: [done[(c, r.id)] for r in rows] for c in configs}
    if cfg.gate:
        for c in [c for c in configs if c != "closed_book"]:
            by_config[f"{c}+gate"] = [gated(p, cfg.gate_threshold) for p in by_config[c]]
    for c, t in thresholds.items():
        by_config[f"{c}+cal"] = [calibrated(p, t) for p in by_config[c]]
    decider = None
    if cfg.select:
        name = "rag+" + "|".join(cfg.select)
        by_config[name] = [selected(list(ps), name) for ps in zip(*(by_config[f"rag+{n}"] for n in cfg.select))]
        if decider := deciding_adapter(cfg.select, {n: c.get("auroc") or 0.0 for n, c in calibrations.items()}):
            by_config[f"{name}+cal"] = [calibrated({**q, "abstain_score": d["abstain_score"]}, thresholds[f"rag+{decider}"])
                                        for q, d in zip(by_config[name], by_config[f"rag+{decider}"])]
    report = {"configs": {c: summarize(ps, cfg.seed) for c, ps in by_config.items()},
              "comparisons": compare(by_config, cfg.seed), "dataset": cfg.qa, "seed": cfg.seed,
              "n_questions": len(rows), "n_unanswerable": sum(not r.answers for r in rows),
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


def row_contexts(rows: list[QARow], cfg: EvalConfig, pipe) -> dict[str, list[dict]]:
    """Each row's passages: its fixed `passages`, else the top -k retrieved for the caller's groups
    (retrieval is deterministic, so a resumed or re-judged run sees the same passages)."""
    out = {r.id: [{"doc_id": str(p.get("id", "")), **p} for p in r.passages] for r in rows if r.passages is not None}
    need = [r for r in rows if r.passages is None]
    if need:
        from hybrid.pipeline import passages_for

        retriever = pipe.retriever if pipe is not None else Retriever.load(cfg.index)
        out.update(zip([r.id for r in need], passages_for(retriever, [r.question for r in need], cfg.k, cfg.groups)))
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
