"""`hybrid tune calibrate`: choose an adapter's abstention threshold on labelled rows no training used.

One workflow, top to bottom: config -> rows and their passages (as `hybrid eval` builds them)
-> the adapter's abstention scores (tuning/abstention.py) -> Youden's threshold -> write
ADAPTER/hybrid_abstain.json. It runs the pipeline and the eval's contexts, so it lives here, above
tuning/.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hybrid.eval import row_contexts
from hybrid.pipeline import Pipeline
from hybrid.pipeline_settings import PipelineSettings
from core import access
from core.atomic import sha256_file, write_text_atomic
from core.errors import InputError
from training.precision import Precision, option
from core.qa import load_qa
from training import run_record
from tuning.abstention import CAL_FILE, youden_threshold
from tuning.judge import auroc


@dataclass
class CalibrateConfig:
    """Settings of `hybrid tune calibrate` (YAML keys = field names)."""

    adapter: str = field(metadata={"help": "Adapter dir from 'hybrid tune generator' or 'hybrid tune dpo'; the "
                                           "threshold is written into it."})
    qa: str = field(metadata={"help": "Labelled QA JSONL that no training used, with answerable and unanswerable "
                                      "(answers: []) rows."})
    index: str | None = field(default=None, metadata={"help": "Index to retrieve passages from, for rows without "
                                                               "'passages'."})
    k: int = field(default=5, metadata={"flag": "-k", "help": "Passages per question when retrieving."})
    groups: list[str] = field(default_factory=list, metadata={
        "flag": "--group", "help": "Access group of the caller (repeatable). Without it: public documents only."})
    precision: Precision = option()

    def problems(self) -> list[str]:
        out = access.group_problems(self.groups)
        if self.k < 1:
            out.append("-k must be >= 1")
        return out

    def pipeline_settings(self, needs_index: bool) -> PipelineSettings:
        """The adapter alone on its base; the index only where rows lack passages. calibrated=False:
        a stale threshold beside the adapter must not block the recalibration."""
        return PipelineSettings(index=self.index if needs_index else None, adapters={"adapter": self.adapter},
                                k=self.k, groups=self.groups, calibrated=False, precision=self.precision)


@dataclass
class Calibration:
    """The chosen threshold and how well the score separates the rows: ADAPTER/hybrid_abstain.json
    (to_json: its keys, in its order; tuning/abstention.py's load_calibration reads it back)."""

    threshold: float  # abstain at or above this score, answer below it (Youden's J on the rows)
    tpr: float  # answerable rows kept (answered) at the threshold
    fpr: float  # unanswerable rows answered at the threshold
    auroc: float
    n: int
    n_unanswerable: int
    qa: str
    qa_sha256: str
    adapter_run: str  # run_record fingerprint: a threshold is refused for another training run
    score: str  # what the threshold is on, in words
    minutes: float

    def to_json(self) -> dict:
        return asdict(self)


def calibrate(cfg: CalibrateConfig, log=print) -> Calibration:
    """Score labelled rows with the adapter, choose the threshold, write ADAPTER/hybrid_abstain.json.

    Rows with `answers: []` are the unanswerable ones; rows use their fixed `passages`, else
    the top -k retrieved from `index` for the caller's groups. Returns the Calibration it wrote.
    """
    if problems := cfg.problems():
        raise InputError("; ".join(problems))
    run_record.read(cfg.adapter, f"--adapter {cfg.adapter}")  # checked before any model loads
    t0 = time.perf_counter()
    rows = load_qa(cfg.qa)
    labels = np.array([bool(r.answers) for r in rows])
    if labels.all() or not labels.any():
        raise InputError(f"--qa {cfg.qa}: needs answerable rows and unanswerable rows (answers: []) to set a "
                         f"threshold between them; it has {int(labels.sum())} and {int((~labels).sum())}")
    needs_index = any(r.passages is None for r in rows)
    if needs_index and not cfg.index:  # checked before any model loads
        raise InputError(f"--qa {cfg.qa}: rows without 'passages' need --index to retrieve them")
    settings = cfg.pipeline_settings(needs_index)
    pipe = Pipeline.load(settings)
    contexts = row_contexts(rows, settings, pipe)
    scores = pipe.abstain_scores([r.question for r in rows], [contexts[r.id] for r in rows], adapter="adapter")
    record = Calibration(**youden_threshold(scores, labels), auroc=auroc(-scores, labels), n=len(rows),
                         n_unanswerable=int((~labels).sum()), qa=cfg.qa, qa_sha256=sha256_file(Path(cfg.qa)),
                         adapter_run=run_record.fingerprint(cfg.adapter),
                         score="mean log-prob per token of the abstention",
                         minutes=round((time.perf_counter() - t0) / 60, 2))
    write_text_atomic(Path(cfg.adapter) / CAL_FILE, json.dumps(record.to_json(), indent=2))
    log(f"calibrated {cfg.adapter}: threshold {record.threshold:.4f}, AUROC {record.auroc:.3f}, "
        f"answerable kept {record.tpr:.2f}, unanswerable answered {record.fpr:.2f} ({len(rows)} rows)")
    return record
