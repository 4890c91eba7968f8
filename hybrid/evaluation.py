"""`hybrid eval`: score configurations on a QA file and write report.json / report.md.

Today it scores retrieval (`--only retrieval`): document-level recall@1/5/10,
MRR@10 and nDCG@10 over questions with gold document ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from retrieval.atomic import write_text_atomic
from retrieval.metrics import retrieval_metrics
from retrieval.qa import load_qa
from retrieval.retriever import Retriever

RETRIEVAL_COLUMNS = ("n", "recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


def evaluate_retrieval(qa_path: str | Path, index_dir: str | Path, groups=None, depth: int = 50) -> dict:
    """Retrieval metrics of one index on a QA file.

    Args:
        qa_path: QA JSONL; rows without gold_ids are not scored.
        index_dir: index to query.
        groups: caller's access groups (a gold document the caller cannot see counts as a miss).
        depth: chunks fetched per question before collapsing to distinct documents.

    Returns:
        {"configs": {"retrieval": metrics}, "dataset": path, "index": path, "embedder": name}.
    """
    rows = [r for r in load_qa(qa_path) if r.gold_ids]
    retriever = Retriever.load(index_dir)
    hits = retriever.search_batch([r.question for r in rows], k=depth, groups=groups) if rows else []
    metrics = retrieval_metrics([[h.doc_id for h in hs] for hs in hits], [set(r.gold_ids) for r in rows])
    return {"configs": {"retrieval": metrics}, "dataset": str(qa_path), "index": str(index_dir),
            "embedder": retriever.manifest["embedder"]["name"], "groups": sorted(groups or [])}


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


def write_report(report: dict, out_dir: str | Path) -> None:
    """report.json and report.md in `out_dir` (atomic writes)."""
    out = Path(out_dir)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out / "report.md", f"# hybrid eval: {report['dataset']}\n\n" + markdown_table(report["configs"]))
