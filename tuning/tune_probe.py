"""`hybrid tune probe`: train the answerability probe (tuning/probe.py) from the documents alone.

One workflow, top to bottom: config -> rows (a QA file such as `hybrid synth`'s, split by
question into fit rows and held-out rows) -> contexts -> the reader's own answers -> its hidden
states -> the two heads on the fit rows -> the rule and its cuts on the held-out rows -> save.

Contexts, so the heads see the near-miss kind of unanswerable question, not only the teacher's:

    answerable row, with its chunk     the top -k retrieved, the source chunk put in if missing   label 1
    answerable row, chunk withheld     the top -k of the rest: no gold document, no passage
                                       stating a gold answer                                       label 0
    unanswerable row                   the top -k retrieved                                        label 0

The reader answers every context greedily (graded by tuning/grading.py: an answer where the
passages hold none is made up); its answers are what the `right` head and the rule learn from.
Nothing here reads a test question: the cuts are chosen on the held-out share of these rows.
Completions are cached in OUT.answers.jsonl (owner-only: it holds text of the documents read) as they
are generated, so an interrupted run resumes; the cache is removed once the probe is saved.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core import access
from core.atomic import check_writable, sha256_file, staged_dir
from core.errors import Arg, InputError
from core.qa import QARow, load_qa, split_rows
from training import run_record
from training.precision import Precision, option
from tuning.grading import classify
from tuning.probe import Probe, fit_head, read_states, rule_features
from tuning.prompting import build_messages, parse_answer
from tuning.raft_data import states_answer, visible_rows


@dataclass
class ProbeTuneConfig:
    """Settings of `hybrid tune probe` (YAML keys = field names)."""

    out: str = field(metadata={"help": "Probe directory to write (atomically)."})
    index: str = field(metadata={"help": "Index the rows' passages are retrieved from."})
    qa: str = field(metadata={"help": "QA JSONL from the documents (e.g. 'hybrid synth' output); answerable rows "
                                      "need gold_ids; unanswerable rows have answers: []."})
    base_model: str = field(default="qwen2.5-coder-0.5b", metadata={
        "metavar": "MODEL", "help": "The reader whose states the probe reads (a packaged name or a local dir)."})
    adapter: str | None = field(default=None, metadata={
        "metavar": "DIR", "help": "A LoRA adapter on the reader: the probe reads the adapted reader's states."})
    k: int = field(default=3, metadata={"flag": "-k", "help": "Passages per question (as the pipeline retrieves)."})
    held_out_fraction: float = field(default=0.3, metadata={
        "metavar": "X", "help": "Questions kept from the heads, on which the rule and its cuts are chosen."})
    max_hallucination: float = field(default=0.0, metadata={
        "metavar": "X", "help": "Target share of made-up answers on the held-out rows; 0 = half the reader's own "
                                "there."})
    max_rows: int = field(default=0, metadata={"metavar": "N", "help": "Use a seeded sample of N questions; 0 = all."})
    max_new_tokens: int = field(default=96, metadata={"help": "Generation budget per answer."})
    batch_size: int = field(default=8, metadata={"help": "Answers generated together."})
    seed: int = field(default=13, metadata={"help": "Seed of the split, the sample and the folds."})
    groups: list[str] = access.option("Also learn from chunks restricted to this access group (repeatable); the "
                                      "probe is tagged with these groups. Without it: public chunks only.")
    precision: Precision = option()

    def problems(self) -> list[str]:
        out = access.group_problems(self.groups)
        if self.k < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            out.append("-k, --batch-size and --max-new-tokens must be >= 1")
        if not 0.05 <= self.held_out_fraction <= 0.8:
            out.append(f"--held-out-fraction {self.held_out_fraction}: expected a share in [0.05, 0.8]")
        if not 0 <= self.max_hallucination < 1:
            out.append(f"--max-hallucination {self.max_hallucination}: expected a share in [0, 1)")
        if self.max_rows < 0:
            out.append("--max-rows must be >= 0")
        return out


@dataclass
class ProbeRow:
    """One (question, context) the reader answered."""

    id: str  # question id + ":with" / ":without" / ":none"
    question: str
    passages: list[dict]
    answerable: bool  # the passages answer the question
    golds: list[str]  # the answers the passages hold ([] when none)
    held_out: bool
    completion: str = ""
    abstained: bool = True
    label: str = "abstained"  # correct | abstained | hallucinated


@dataclass
class ProbeTuneResult:
    """What `tune_probe` returns (hybrid_probe.json holds the same figures)."""

    out: str
    rows: int
    held_out: int
    answerable_auroc: float  # cross-validated on the fit rows
    right_auroc: float
    held_out_hallucination: float  # the reader's own, on the held-out rows
    held_out_hallucination_ruled: float  # served as the rule decides
    held_out_answered: float  # share of held-out rows the rule answers
    threshold: float
    minutes: float


def contexts(rows: list[QARow], retriever, k: int, groups: list[str], held: set[str]) -> list[ProbeRow]:
    """The probe's contexts for the rows (module docstring's table)."""
    hits = retriever.search_batch([r.question for r in rows], k=min(k + 12, len(retriever)), groups=groups)
    chunks = {c.chunk_id: c for c in retriever.chunks(groups=groups)}
    out = []
    for r, hs in zip(rows, hits):
        p = [passage(h) for h in hs]
        if not r.answers:
            out.append(ProbeRow(f"{r.id}:none", r.question, p[:k], False, [], r.id in held))
            continue
        gold = set(r.gold_ids)
        oracle = chunks.get(r.source_chunk or "") or next(
            (c for c in chunks.values() if c.doc_id in gold and states_answer(c.text, r.answers)), None)
        with_ = p[:k]
        if oracle is not None and oracle.chunk_id not in {x["chunk_id"] for x in with_}:
            with_ = with_[:k - 1] + [passage(oracle)]
        without = [x for x in p if x["doc_id"] not in gold and not states_answer(x["text"], r.answers)][:k]
        out.append(ProbeRow(f"{r.id}:with", r.question, with_, True, list(r.answers), r.id in held))
        out.append(ProbeRow(f"{r.id}:without", r.question, without, False, [], r.id in held))
    return out


def passage(h) -> dict:
    return {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "title": h.title, "text": h.text, "score": h.score,
            "groups": list(h.groups)}


def answer_rows(model, tok, rows: list[ProbeRow], cache: Path, batch_size: int, max_new_tokens: int, progress) -> None:
    """The reader's greedy answer to every context, graded; appended to `cache` as it goes and
    read back from it on a rerun (same ids only)."""
    from tuning.generation import generate_batch

    done = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            done[rec["id"]] = rec["completion"]
    todo = [r for r in rows if r.id not in done]
    cache.touch(mode=0o600)
    with open(cache, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            gens = generate_batch(model, tok, [build_messages(r.question, r.passages) for r in batch], max_new_tokens)
            for r, (text, _) in zip(batch, gens):
                done[r.id] = text
                f.write(json.dumps({"id": r.id, "completion": text}) + "\n")
            f.flush()
            progress(f"answered {len(rows) - len(todo) + start + len(batch)}/{len(rows)}")
    for r in rows:
        parsed = parse_answer(done[r.id])
        r.completion, r.abstained = done[r.id], parsed.abstained
        r.label = classify("" if parsed.abstained else parsed.answer, parsed.abstained, r.golds)


def choose_cut(scores: np.ndarray, answerable_p: np.ndarray, labels: list[str], target: float) -> tuple[float, float]:
    """(threshold, before): the lowest rule threshold whose made-up answers, over all the rows given,
    stay within `target` (the most answers), and the answerability below which no row it serves lies.

    Rows the reader abstained on (score NaN) stay abstentions. With no cut meeting the target, the
    threshold serves nothing (above every score).
    """
    n = len(labels)
    made_up = np.array([lab == "hallucinated" for lab in labels])
    live = ~np.isnan(scores)
    cuts = sorted(set(scores[live].tolist()) | {float("inf")})
    threshold = next(t for t in cuts if (made_up & live & (np.nan_to_num(scores, nan=-1) >= t)).sum() / n <= target)
    served = live & (np.nan_to_num(scores, nan=-1) >= threshold)
    before = float(answerable_p[served].min()) if served.any() else 1.0
    return float(threshold), before


def fit_rule(a_logit, r_logit, conf, labels: list[str], groups: np.ndarray, seed: int):
    """The rule (logistic over rule_features) on the answered rows, and its out-of-fold scores for
    every row (NaN where the reader abstained), for choosing the cut without scoring rows it was fit on."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    x = rule_features(a_logit, r_logit, conf)
    live = np.array([lab != "abstained" for lab in labels])
    y = np.array([lab == "correct" for lab in labels])
    if min((y & live).sum(), (~y & live).sum()) < 4:
        raise InputError(f"the rule needs at least 4 right and 4 made-up answers on the held-out rows; got "
                         f"{int((y & live).sum())} and {int((~y & live).sum())}: raise --held-out-fraction or give "
                         f"more rows")
    oof = np.full(len(labels), np.nan)
    idx = np.flatnonzero(live)
    n_splits = int(min(5, (y & live).sum(), (~y & live).sum()))
    for tr, te in StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(x[idx], y[idx], groups[idx]):
        m = LogisticRegression(max_iter=2000).fit(x[idx][tr], y[idx][tr])
        oof[idx[te]] = m.predict_proba(x[idx][te])[:, 1]
    m = LogisticRegression(max_iter=2000).fit(x[idx], y[idx])
    return m.coef_[0], float(m.intercept_[0]), oof


def tune_probe(cfg: ProbeTuneConfig, progress: bool = True, log=print) -> ProbeTuneResult:
    """Train and save a probe as the module docstring says; returns its figures. `log` takes the
    progress lines when `progress` is on."""
    from retrieval.retriever import Retriever
    from tuning.generation import load_generator

    # config
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    check_writable(Path(cfg.out), "--out")
    t0 = time.perf_counter()
    groups = access.training_groups(cfg.groups)
    adapter_rec = None
    if cfg.adapter:  # checked before any model loads
        adapter_rec = run_record.read(cfg.adapter, Arg("adapter", cfg.adapter))
        access.check(cfg.adapter, groups, Arg("adapter", cfg.adapter))

    # rows: the caller's view only, a seeded sample, split by question
    retriever = Retriever.load(cfg.index, precision=cfg.precision)
    rows, _ = visible_rows(load_qa(cfg.qa), retriever, groups)
    if cfg.max_rows and cfg.max_rows < len(rows):
        keep = set(np.random.default_rng(cfg.seed).choice(len(rows), cfg.max_rows, replace=False).tolist())
        rows = [r for i, r in enumerate(rows) if i in keep]
    _, held = split_rows(rows, cfg.held_out_fraction, cfg.seed)
    items = contexts(rows, retriever, cfg.k, groups, {r.id for r in held})

    # load the reader (and its adapter)
    model, tok, info = load_generator(cfg.base_model, precision=cfg.precision)
    if cfg.adapter:
        from peft import PeftModel

        run_record.check_base("probe", cfg.adapter, adapter_rec, info)  # another base model: one line
        model = PeftModel.from_pretrained(model, cfg.adapter)
    model.eval()

    # the reader's answers, then its states
    say = log if progress else (lambda m: None)
    cache = Path(f"{cfg.out}.answers.jsonl")
    answer_rows(model, tok, items, cache, cfg.batch_size, cfg.max_new_tokens, say)
    say(f"reading states of {len(items)} contexts")
    states = read_states(model, tok, [r.question for r in items], [r.passages for r in items],
                         [None if r.abstained else r.completion for r in items])
    qid = np.array([r.id.rsplit(":", 1)[0] for r in items])
    fit = np.array([not r.held_out for r in items])
    labels = [r.label for r in items]

    # heads on the fit rows
    ans = fit_head(states.prompt[fit], states.layers, np.array([r.answerable for r in items])[fit], qid[fit], cfg.seed)
    live = fit & np.array([not r.abstained for r in items])
    right = fit_head(states.answer[live], states.layers, np.array([lab == "correct" for lab in labels])[live],
                     qid[live], cfg.seed)

    # the rule and its cuts on the held-out rows
    ho = ~fit
    ho_labels = [lab for lab, h in zip(labels, ho) if h]
    a_logit = ans.logit(states.prompt[ho], states.layers)
    coef, bias, oof = fit_rule(a_logit, right.logit(states.answer[ho], states.layers), states.confidence[ho],
                               ho_labels, qid[ho], cfg.seed)
    own = sum(lab == "hallucinated" for lab in ho_labels) / len(ho_labels)
    target = cfg.max_hallucination or own / 2
    threshold, before = choose_cut(oof, 1 / (1 + np.exp(-a_logit)), ho_labels, target)
    served = ~np.isnan(oof) & (np.nan_to_num(oof, nan=-1) >= threshold)
    ruled = float(sum(s and lab == "hallucinated" for s, lab in zip(served, ho_labels)) / len(ho_labels))

    # save
    minutes = round((time.perf_counter() - t0) / 60, 2)
    record = {"workflow": "probe", "base_model": {"name": info.name, "fingerprint": info.fingerprint},
              "adapter": cfg.adapter, "adapter_run": run_record.fingerprint(cfg.adapter) if cfg.adapter else None,
              "qa": cfg.qa, "qa_sha256": sha256_file(Path(cfg.qa)), "index": cfg.index, "k": cfg.k,
              "rows": len(items), "held_out_rows": int(ho.sum()), "target_hallucination": round(target, 4),
              "held_out": {"hallucination": round(own, 4), "hallucination_ruled": round(ruled, 4),
                           "answered": round(float(served.mean()), 4)},
              "precision": info.precision, "seed": cfg.seed, "minutes": minutes}
    probe = Probe(ans, right, coef, bias, threshold, before, record)
    with staged_dir(cfg.out) as stage:
        probe.save(stage)
        access.write(stage, access.record(groups, sorted({g for r in items for p in r.passages
                                                          for g in p.get("groups", [])})))
    cache.unlink(missing_ok=True)  # the probe is saved: nothing left to resume
    return ProbeTuneResult(cfg.out, len(items), int(ho.sum()), ans.cv_auroc, right.cv_auroc, round(own, 4),
                           round(ruled, 4), round(float(served.mean()), 4), threshold, minutes)
