"""`hybrid eval`'s settings (YAML keys = field names) and the one parser of `--shard I/N`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from core import access
from core.errors import InputError
from hybrid.pipeline_settings import BASE_MODEL_DEFAULT_HELP, PipelineSettings, judge_problems, parse_adapters
from training.precision import Precision, option
from tuning.generation import BASE_MODEL_HELP
from tuning.judge import THRESHOLD


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
        "help": f"Generator: {BASE_MODEL_HELP}.", "default_help": BASE_MODEL_DEFAULT_HELP})
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
    probe: str | None = field(default=None, metadata={
        "metavar": "DIR", "help": "Answerability probe (hybrid tune probe): score the answers of the configuration "
                                  "whose reader it was trained on, report it as CONFIG+probe (its rule applied), "
                                  "and draw risk-coverage curves."})
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
        return out + judge_problems(self.gate_threshold, self.select, self.adapters, self.judge)

    def pipeline_settings(self) -> PipelineSettings:
        """The pipeline the eval answers with: no judge (its scores are added after generating) and
        calibration off (the greedy answers are stored; rag+NAME+cal is derived from them)."""
        return PipelineSettings(index=self.index, adapters=self.adapters, base_model=self.base_model, k=self.k,
                                max_new_tokens=self.max_new_tokens, groups=self.groups, calibrated=False,
                                mode=self.mode, rerank=self.rerank, precision=self.precision)


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard I/N` as (I, N): the one parser of it. ASCII digits only: str.isdigit() also accepts
    '²' or '٣', which int() then refuses or reads as another number."""
    m = re.fullmatch(r"([0-9]+)/([0-9]+)", text)
    if not m or int(m[1]) >= int(m[2]):
        raise InputError(f"--shard {json.dumps(text, ensure_ascii=False)}: use I/N (digits 0-9) with 0 <= I < N, "
                         f"e.g. 0/2")
    return int(m[1]), int(m[2])
