"""What `ask`, `eval`, `serve` and `tune calibrate` share to load a pipeline: one record, read from
each command's config by its `pipeline_settings()`, so `Pipeline.load`'s arguments are listed once.

The commands keep their own flat fields (their flags and YAML keys stay as users know them); the
record is built from them at the top of each command, and lower floors get its plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import Arg, InputError
from training import run_record
from tuning.generation import DEFAULT_GENERATOR

# How a --base-model flag's --help names its default (the generator itself: tuning/generation.py).
BASE_MODEL_DEFAULT_HELP = f"the adapters' base, else {DEFAULT_GENERATOR}"


@dataclass(frozen=True)
class PipelineSettings:
    """Everything `Pipeline.load` builds a pipeline from.

    Attributes:
        index: index dir to retrieve from (None: only `answer` with your own passages).
        adapters: {name: adapter dir}, loaded on one base model.
        base_model: generator spec; None: the adapters' base, else `DEFAULT_GENERATOR`.
        k: passages per question.
        max_new_tokens: generation budget.
        require_support: abstain when the answer has no verified quote and does not occur in the
            passages (a guard for serving; evaluation measures the raw model).
        judge: groundedness judge dir: abstain when it finds no passage answering the question.
        gate_threshold: answerability below which the judge gate abstains (None: tuning/judge.py's THRESHOLD).
        groups: the caller's access groups (empty = public).
        calibrated: abstain where a calibrated adapter's own score reaches its threshold.
        probe: answerability probe dir (hybrid tune probe): its rule decides, for the reader it was
            trained on (the base model or one adapter), whether to answer (tuning/probe.py).
        mode: retrieval mode, dense | lexical | hybrid (None: the index's).
        rerank: reranker dir applied to every retrieval.
        precision: auto, fp32 or bf16 for every model it runs (training/precision.py).
        device: "cuda" / "cpu" / None (the default device).
    """

    index: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None
    k: int = 5
    max_new_tokens: int = 96
    require_support: bool = False
    judge: str | None = None
    gate_threshold: float | None = None
    groups: list[str] = field(default_factory=list)
    calibrated: bool = True
    probe: str | None = None
    mode: str | None = None
    rerank: str | None = None
    precision: str = "auto"
    device: str | None = None


def parse_adapters(values: list[str]) -> dict[str, str]:
    """`--adapter` values (`NAME=DIR`, or `DIR` named after its last component) as {name: dir}."""
    adapters = {}
    for v in values:
        name, _, path = v.partition("=") if "=" in v else (Path(v).name, "", v)
        if not name or not path:
            raise InputError(f"--adapter {v}: use DIR or NAME=DIR")
        run_record.check_name(name, f"--adapter {v}")  # before any model loads
        adapters[name] = path
    return adapters


def check_select(select: list[str], adapters, judge) -> None:
    """`--select` needs a judge and two or more distinct adapter names among those given (one-line error)."""
    if select and (not judge or len(set(select)) < 2 or set(select) - set(adapters)):
        raise InputError(Arg("select", list(select)), ": needs ", Arg("judge"), " (it picks the best-supported "
                         "answer) and two or more distinct names of adapters given with ", Arg("adapters"))


def judge_problems(gate_threshold: float, select: list[str], adapters, judge) -> list[str]:
    """What is wrong with the judge's options that `ask` and `eval` share (--gate-threshold, --select)."""
    out = []
    if not 0 <= gate_threshold <= 1:
        out.append(f"--gate-threshold {gate_threshold}: must be in [0, 1]")
    try:
        check_select(select, adapters, judge)
    except InputError as exc:
        out.append(str(exc))
    return out
