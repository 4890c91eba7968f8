"""The report stage of `hybrid eval`: metrics per configuration with 95 % intervals, paired tests,
report.md and chart.png, all from `Prediction` records (hybrid/prediction.py), so a report can be
redone from predictions.jsonl without generating.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid.eval_retrieval import fmt
from hybrid.statistics import mcnemar_exact, paired_diff_ci, proportion_ci
from core.errors import InputError
from core.jsonl import read_jsonl
from hybrid.prediction import Prediction
from retrieval.metrics import retrieval_metrics

RATES = ("accuracy", "abstention_rate", "hallucination_rate")
COLUMNS = ("n", "accuracy", "abstention_rate", "hallucination_rate", "unsupported_rate", "citation_verified_rate",
           "f1", "recall@5", "mrr@10", "latency_ms_p50", "latency_ms_p95", "tokens_per_s", "malformed")


@dataclass
class EvalReport:
    """What `hybrid eval` measured: report.json. to_json writes today's keys in today's order (the
    last three only when set); from_json reads today's files and older ones (no intervals, no precision)."""

    configs: dict[str, dict]  # configuration label -> summarize()'s metrics with their "ci" intervals
    comparisons: list[dict]  # compare()'s paired tests between configurations
    dataset: str  # the QA file
    seed: int
    n_questions: int
    n_unanswerable: int
    intervals: dict | None  # what the "ci" lists are; None: a report from before the key (bootstrap both)
    precision: str | None  # as run (None: a report from before the key)
    models: dict  # {"base", "adapters", "judge", "index"}
    gate_threshold: float | None = None  # with --gate
    abstain_thresholds: dict[str, float] | None = None  # calibrated adapters: label -> threshold
    select: dict | None = None  # with --select: {"adapters", "abstention_by"}
    probe: dict | None = None  # with --probe: {"dir", "scores" (the configuration it reads), "threshold", "before"}
    risk_coverage: dict[str, dict] | None = None  # label -> hybrid/eval_probe.py risk_coverage()

    def to_json(self) -> dict:
        out = {"configs": self.configs, "comparisons": self.comparisons, "dataset": self.dataset, "seed": self.seed,
               "n_questions": self.n_questions, "n_unanswerable": self.n_unanswerable, "intervals": self.intervals,
               "precision": self.precision, "models": self.models}
        for key in ("gate_threshold", "abstain_thresholds", "select", "probe", "risk_coverage"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, d: dict) -> EvalReport:
        return cls(configs=d["configs"], comparisons=d["comparisons"], dataset=d["dataset"], seed=d["seed"],
                   n_questions=d["n_questions"], n_unanswerable=d["n_unanswerable"], intervals=d.get("intervals"),
                   precision=d.get("precision"), models=d["models"], gate_threshold=d.get("gate_threshold"),
                   abstain_thresholds=d.get("abstain_thresholds"), select=d.get("select"), probe=d.get("probe"),
                   risk_coverage=d.get("risk_coverage"))


def read_predictions(path: Path, flag: str, fix: str, ids: set[str]) -> dict[tuple[str, str], Prediction]:
    """The one loader of predictions.jsonl (a resumed eval's own, and every --merge shard's).

    Args:
        path: the predictions.jsonl.
        flag: the option that named its directory, for the error ("--out", "--merge").
        fix: what the user should do about a bad line.
        ids: the run's question ids (a line about another question would reach the judge, who has
            no passages for it).

    Returns:
        {(config, question id): prediction}, a later line replacing an earlier one.

    Raises:
        InputError: a line that is not JSON or breaks the contract (`Prediction.from_json`), named
            as FILE:LINE and field.
    """
    done = {}
    for n, line in read_jsonl(path, flag, "predictions"):
        try:
            p = Prediction.from_json(line)
        except ValueError as exc:
            raise InputError(f"{flag} {path}:{n}: {exc}; {fix}") from None
        if p.id not in ids:
            raise InputError(f"{flag} {path}:{n}: field 'id' {json.dumps(p.id)[:40]} is none of this run's "
                             f"questions; {fix}")
        done[(p.config, p.id)] = p
    return done


def summarize(preds: list[Prediction], seed: int) -> dict:
    """Metrics of one configuration from its prediction lines (`seed` no longer changes them: the
    rates' intervals are Wilson's, not resampled; it stays so that callers keep working)."""
    n = len(preds)
    labels = [p.label for p in preds]
    out: dict = {"n": n}
    indicators = {"accuracy": [l == "correct" for l in labels], "abstention_rate": [l == "abstained" for l in labels],
                  "hallucination_rate": [l == "hallucinated" for l in labels]}
    for name, ind in indicators.items():
        out[name] = float(np.mean(ind)) if n else float("nan")
    judged = [p.unsupported for p in preds if p.unsupported is not None and p.label != "abstained"]
    out["unsupported_rate"] = float(np.mean(judged)) if judged else None
    cites = [c["verified"] for p in preds for c in p.citations]
    out["citation_verified_rate"] = float(np.mean(cites)) if cites else None
    out["f1"] = float(np.mean([p.f1 for p in preds])) if n else float("nan")
    answerable = [p for p in preds if p.answers]
    out["accuracy_answerable"] = float(np.mean([p.label == "correct" for p in answerable])) if answerable else None
    unans = [p for p in preds if not p.answers]
    out["abstention_unanswerable"] = float(np.mean([p.label == "abstained" for p in unans])) if unans else None
    ranked = [p for p in preds if p.retrieved_doc_ids is not None and p.gold_ids]
    if ranked:
        m = retrieval_metrics([p.retrieved_doc_ids for p in ranked], [set(p.gold_ids) for p in ranked])
        out["recall@5"], out["mrr@10"] = m["recall@5"], m["mrr@10"]
    else:
        out["recall@5"] = out["mrr@10"] = None
    lat = [p.latency_ms for p in preds]
    out["latency_ms_p50"] = float(np.percentile(lat, 50)) if lat else None
    out["latency_ms_p95"] = float(np.percentile(lat, 95)) if lat else None
    secs = sum(lat) / 1000
    out["tokens_per_s"] = sum(p.new_tokens for p in preds) / secs if secs else None
    # Completions that broke the template: already labelled abstained, counted apart so that it shows
    # (None: no line records it, predictions written before it was).
    marked = [p.malformed for p in preds if p.malformed is not None]
    out["malformed"], out["malformed_rate"] = (sum(marked), sum(marked) / len(marked)) if marked else (None, None)
    # Every interval here is of a share of 0/1 outcomes: Wilson (hybrid/statistics.py says why).
    out["ci"] = {name: list(proportion_ci(ind)) for name, ind in indicators.items()}
    if answerable:
        out["ci"]["accuracy_answerable"] = list(proportion_ci([p.label == "correct" for p in answerable]))
    return out


def compare(by_config: dict[str, list[Prediction]], seed: int) -> list[dict]:
    """Paired tests between every pair of configurations on their common questions."""
    names = list(by_config)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa = {p.id: p for p in by_config[a]}
            pb = {p.id: p for p in by_config[b]}
            ids = sorted(set(pa) & set(pb))
            row = {"a": a, "b": b, "n": len(ids)}
            for rate, label in (("hallucination_rate", "hallucinated"), ("accuracy", "correct"),
                                ("abstention_rate", "abstained")):
                xa = [pa[q].label == label for q in ids]
                xb = [pb[q].label == label for q in ids]
                diff, low, high = paired_diff_ci(xa, xb, seed=seed)
                test = mcnemar_exact(xa, xb)
                row[rate] = {"diff_b_minus_a": diff, "ci": [low, high], "mcnemar_p": test["p_value"],
                             "significant": test["p_value"] < 0.05}
            out.append(row)
    return out


def intervals_line(report: EvalReport) -> str:
    """What the report's intervals are. A report.json from before the key was written has none:
    its rates and differences both carry percentile bootstrap intervals."""
    kind = report.intervals or {"rate": "percentile bootstrap", "difference": "paired percentile bootstrap"}
    return f"Intervals (95 %): rates {kind['rate']}, differences {kind['difference']}."


def markdown(report: EvalReport) -> str:
    """report.md: one row per configuration, rates with their 95 % intervals, then the paired tests."""
    lines = [f"# hybrid eval: {report.dataset}", "",
             f"{report.n_questions} questions ({report.n_unanswerable} unanswerable), seed {report.seed}, "
             f"models: {json.dumps(report.models)}", "", intervals_line(report), "",
             "| config | n | accuracy | abstention | hallucination | unsupported | citations verified | F1 | "
             "recall@5 | MRR@10 | p50 ms | p95 ms | tok/s | malformed |", "|---|" + "---:|" * 13]
    for name, m in report.configs.items():
        ci = m.get("ci", {})

        def rate(key):
            lo, hi = ci.get(key, [None, None])
            return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else fmt(m[key])

        lines.append(f"| {name} | {m['n']} | {rate('accuracy')} | {rate('abstention_rate')} | {rate('hallucination_rate')} | "
                     + " | ".join(fmt(m.get(c)) for c in COLUMNS[4:]) + " |")
    if report.comparisons:
        lines += ["", "Paired comparisons (b − a on the same questions; McNemar exact p):", "",
                  "| a | b | Δ hallucination [95 % CI] | p | Δ accuracy [95 % CI] | p |", "|---|---|---:|---:|---:|---:|"]
        for c in report.comparisons:
            h, a = c["hallucination_rate"], c["accuracy"]
            lines.append(f"| {c['a']} | {c['b']} | {h['diff_b_minus_a']:+.3f} [{h['ci'][0]:+.3f}, {h['ci'][1]:+.3f}] | "
                         f"{h['mcnemar_p']:.3g}{' *' if h['significant'] else ''} | {a['diff_b_minus_a']:+.3f} "
                         f"[{a['ci'][0]:+.3f}, {a['ci'][1]:+.3f}] | {a['mcnemar_p']:.3g}{' *' if a['significant'] else ''} |")
    if report.risk_coverage:
        lines += ["", "Risk–coverage (risk_coverage.png): made-up answers against the share answered, answers ranked "
                  "by the probe's rule score; the area under the curve up to the share it answers (lower is better; "
                  "compare configurations that answer the same share), where they are scored:", "",
                  "| config | answered | hallucination | area |", "|---|---:|---:|---:|"]
        for name, c in report.risk_coverage.items():
            if c["coverage"]:
                lines.append(f"| {name} | {c['coverage'][-1]:.3f} | {c['hallucination'][-1]:.3f} | {fmt(c['area'])} |")
    return "\n".join(lines) + "\n"


def chart(report: EvalReport, path: Path) -> None:
    """PNG: accuracy, abstention and hallucination per configuration with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.configs)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 3.8))
    width = 0.26
    colors = {"accuracy": "#2a9d8f", "abstention_rate": "#8d99ae", "hallucination_rate": "#e63946"}
    for j, rate in enumerate(RATES):
        vals = [report.configs[n][rate] for n in names]
        cis = [report.configs[n]["ci"][rate] for n in names]
        err = np.array([[v - lo for v, (lo, _) in zip(vals, cis)], [hi - v for v, (_, hi) in zip(vals, cis)]])
        ax.bar(np.arange(len(names)) + (j - 1) * width, vals, width, yerr=err, capsize=3, color=colors[rate],
               label=rate.replace("_", " "))
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of questions")
    ax.set_title(f"hybrid eval: {Path(report.dataset).name} (n={report.n_questions}, 95 % CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
