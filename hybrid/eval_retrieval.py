"""`hybrid eval --only retrieval`: document-level recall@1/5/10, MRR@10 and nDCG@10 of an index
over the questions with gold document ids; report.json / report.md (the factuality eval is
hybrid/eval.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from core import access
from core.atomic import write_text_atomic
from core.errors import Arg, InputError
from retrieval.metrics import retrieval_metrics
from core.qa import load_qa
from retrieval.retriever import Retriever

# a module logger: the root one printed the warning as `WARNING:root:...` in a library user's process
log = logging.getLogger(__name__)
RETRIEVAL_COLUMNS = ("n", "recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


@dataclass
class RetrievalReport:
    """What `hybrid eval --only retrieval` measured: report.json (to_json: today's keys, in today's order)."""

    metrics: dict[str, float]  # n, recall@1/5/10, mrr@10, ndcg@10: report.json's configs.retrieval
    dataset: str  # the QA file
    index: str
    mode: str  # dense | lexical | hybrid, as searched (the index's default when none was given)
    rerank: str | None  # the reranker dir, when one re-scored the first stage
    embedder: str
    groups: list[str]  # the caller's access groups, sorted
    precision: str  # of the query encoder, as run

    def to_json(self) -> dict:
        # "configs" keeps the factuality report's shape ({config: metrics}), so report readers
        # (hybrid/tracking.py, the tables) read either report.json alike
        return {"configs": {"retrieval": self.metrics}, "dataset": self.dataset, "index": self.index,
                "mode": self.mode, "rerank": self.rerank, "embedder": self.embedder, "groups": self.groups,
                "precision": self.precision}


def evaluate_retrieval(qa_path: str | Path, index_dir: str | Path, groups=None, depth: int = 50,
                       mode: str | None = None, rerank: str | Path | None = None,
                       precision: str = "fp32") -> RetrievalReport:
    """Retrieval metrics of one index on a QA file.

    Args:
        qa_path: QA JSONL; rows without gold_ids are not scored.
        index_dir: index to query.
        groups: caller's access groups (a gold document the caller cannot see counts as a miss).
        depth: chunks fetched per question before collapsing to distinct documents.
        mode: dense | lexical | hybrid (None = the index's default).
        rerank: reranker dir re-scoring the first stage's top N.
        precision: auto, fp32 or bf16 for the query encoder and the reranker (training/precision.py).

    Returns:
        RetrievalReport: the metrics and what was measured (index, mode, reranker, embedder, groups, precision).
    """
    rows = [r for r in load_qa(qa_path) if r.gold_ids]
    if not rows:
        raise InputError(f"{qa_path}: no row has 'gold_ids', so there is nothing to score retrieval against; add "
                         f"the ids of each question's gold documents")
    retriever = Retriever.load(index_dir, reranker=rerank, precision=precision)
    # Absent and restricted look the same here: the caller learns nothing about documents it cannot see.
    visible = {c.doc_id for c in retriever.chunks(groups=access.training_groups(groups))}
    unseen = sorted({g for r in rows for g in r.gold_ids} - visible)
    if len(unseen) == len({g for r in rows for g in r.gold_ids}):
        raise InputError(f"{qa_path}: none of its gold_ids is among the documents index {index_dir} shows this caller "
                         f"(e.g. {', '.join(unseen[:3])}); is it the index of this corpus, or do the questions need {Arg('groups')}?")
    if unseen:
        log.warning(f"{len(unseen)} gold documents are not among those the index shows this caller (absent, or "
                    f"restricted to groups not given with {Arg('groups')}); questions about them count as misses")
    hits = retriever.search_batch([r.question for r in rows], k=depth, groups=groups, mode=mode)
    metrics = retrieval_metrics([[h.doc_id for h in hs] for hs in hits], [set(r.gold_ids) for r in rows])
    return RetrievalReport(metrics=metrics, dataset=str(qa_path), index=str(index_dir),
                           mode=mode or retriever.search_settings["mode"], rerank=str(rerank) if rerank else None,
                           embedder=retriever.manifest["embedder"]["name"], groups=sorted(groups or []),
                           precision=retriever.embedder.precision)


def markdown_table(configs: dict[str, dict], columns=RETRIEVAL_COLUMNS) -> str:
    """A Markdown table, one row per configuration."""
    head = "| config | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    body = "".join(f"| {name} | " + " | ".join(fmt(m.get(c)) for c in columns) + " |\n" for name, m in configs.items())
    return head + body


def fmt(v) -> str:
    """A table cell: – for absent, integers as is, small reals to 3 decimals, large ones rounded."""
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"


def write_report(report: RetrievalReport, out_dir: str | Path) -> None:
    """report.json and report.md in `out_dir` (atomic writes)."""
    out = Path(out_dir)
    write_text_atomic(out / "report.json", json.dumps(report.to_json(), indent=2))
    write_text_atomic(out / "report.md",
                      f"# hybrid eval: {report.dataset}\n\n" + markdown_table({"retrieval": report.metrics}))
