"""`hybrid ask`'s settings: one question, retrieved and answered by the pipeline (hybrid/pipeline.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core import access
from hybrid.pipeline_settings import BASE_MODEL_DEFAULT_HELP, PipelineSettings, judge_problems, parse_adapters
from training.precision import Precision, option
from tuning.generation import BASE_MODEL_HELP
from tuning.judge import THRESHOLD


@dataclass
class AskConfig:
    """Settings of `hybrid ask` (YAML keys = field names)."""

    question: str = field(metadata={"argument": True, "help": "The question."})
    index: str = field(metadata={"help": "Index directory to retrieve from."})
    adapters: dict[str, str] = field(default_factory=dict, metadata={
        "flag": "--adapter", "parse": lambda values: parse_adapters(values),
        "help": "Adapter DIR or NAME=DIR; repeat to load several on one base model."})
    use: str | None = field(default=None, metadata={
        "help": "Which loaded adapter answers; 'base' = none.", "default_help": "the last --adapter"})
    base_model: str | None = field(default=None, metadata={
        "help": f"Generator: {BASE_MODEL_HELP}.", "default_help": BASE_MODEL_DEFAULT_HELP})
    groups: list[str] = field(default_factory=list, metadata={
        "flag": "--group", "help": "Access group of the caller (repeatable). Without it: public documents only."})
    k: int = field(default=5, metadata={"flag": "-k", "help": "Passages to retrieve."})
    mode: Literal["dense", "lexical", "hybrid"] | None = field(default=None, metadata={
        "help": "Retrieval: dense, lexical (BM25) or hybrid (both, fused).", "default_help": "the index's"})
    rerank: str | None = field(default=None, metadata={
        "help": "Reranker dir (hybrid tune reranker): re-score the first stage's top N with it."})
    max_new_tokens: int = field(default=96, metadata={"help": "Generation budget."})
    require_support: bool = field(default=False, metadata={
        "help": "Abstain when no quote verifies and the answer is not in the passages (nothing is streamed: the "
                "decision needs the whole answer)."})
    judge: str | None = field(default=None, metadata={
        "help": "Groundedness judge dir (hybrid tune judge): abstain when it finds no passage that answers the question."})
    gate_threshold: float = field(default=THRESHOLD, metadata={
        "help": "With --judge: abstain when the best passage's answerability is below this."})
    select: list[str] = field(default_factory=list, metadata={
        "help": "NAME (repeat, two or more loaded adapters; with --judge): each answers, the judge picks the "
                "best-supported answer and the best-calibrated adapter decides whether to abstain (eval's "
                "rag+A|B+cal); the judge picks instead of gating."})
    probe: str | None = field(default=None, metadata={
        "metavar": "DIR", "help": "Answerability probe (hybrid tune probe) of the reader that answers: refuse before "
                                  "generating where the passages do not answer, and after where its rule finds the "
                                  "answer likely made up (nothing is streamed)."})
    precision: Precision = option()

    def problems(self) -> list[str]:
        out = access.group_problems(self.groups)
        if not self.question.strip():
            out.append("QUESTION is empty; pass the question to answer")
        if self.k < 1 or self.max_new_tokens < 1:
            out.append("-k and --max-new-tokens must be >= 1")
        if self.use not in (None, "base") and self.use not in self.adapters:
            out.append(f"--use {self.use}: not among the --adapter names ({', '.join(self.adapters) or 'none'}) or 'base'")
        return out + judge_problems(self.gate_threshold, self.select, self.adapters, self.judge)

    def pipeline_settings(self) -> PipelineSettings:
        """The pipeline `ask` loads: the judge gates, calibrated adapters abstain."""
        return PipelineSettings(index=self.index, adapters=self.adapters, base_model=self.base_model, k=self.k,
                                max_new_tokens=self.max_new_tokens, require_support=self.require_support,
                                judge=self.judge, gate_threshold=self.gate_threshold, groups=self.groups,
                                mode=self.mode, rerank=self.rerank, precision=self.precision, probe=self.probe)

    @property
    def answering_adapter(self) -> str | None:
        """The adapter `--use` names (None: the base model); the last `--adapter` by default."""
        if self.use == "base":
            return None
        return self.use or (list(self.adapters)[-1] if self.adapters else None)
