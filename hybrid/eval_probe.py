"""The probe in `hybrid eval` (`--probe DIR`): score the answers of the configuration whose reader the
probe was trained on, derive `CONFIG+probe` from them, and draw every configuration's risk–coverage
curve.

The probe reads one reader's states (the base model: `rag`; or one adapter: `rag+NAME`), so it
scores that configuration's answers and no other. Its scores are added to the prediction lines
after generation, like the judge's (redone when the probe changes, never generating again);
`CONFIG+probe` is the same answers with the probe's rule applied (tuning/probe.py `decide`).

Risk–coverage: answers ranked by the probe's rule score (most trusted first); answering the top
i of N questions gives coverage i / N and hallucination (made-up answers among them) / N. The area
under that curve over the coverage reached is the summary (lower is better). A configuration
without scores is one point (its share answered, its hallucination).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from core.atomic import sha256_file
from core.errors import InputError
from hybrid.eval_configuration import Configuration
from hybrid.eval_derived import as_abstention, with_decider
from hybrid.prediction import Prediction
from training import run_record
from tuning.probe import RECORD_FILE, Probe


def probe_target(probe_dir: str, adapters: dict[str, str], groups) -> tuple[Probe, Configuration, str]:
    """(the probe, the configuration whose answers it scores, its fingerprint); one-line errors for a
    probe out of the caller's scope or one reading an adapter not given."""
    label = f"--probe {probe_dir}"
    probe = Probe.load(probe_dir, groups, label)
    run = probe.record.get("adapter_run")
    if run is None:
        return probe, Configuration(), sha256_file(Path(probe_dir) / RECORD_FILE)
    name = next((n for n, d in adapters.items() if run_record.fingerprint(d) == run), None)
    if name is None:
        raise InputError(f"{label}: reads the states of adapter {probe.record.get('adapter')}; pass that adapter "
                         f"with --adapter")
    return probe, Configuration(adapters=(name,)), sha256_file(Path(probe_dir) / RECORD_FILE)


def score_all(pipe, probe_dir: str, config: Configuration, fingerprint: str,
              done: dict[tuple[str, str], Prediction], contexts: dict[str, list[dict]]) -> bool:
    """Add the probe's answerability and rule score to `config`'s lines it has not scored (in `done`).

    Returns:
        Whether any line changed.
    """
    stale = [p for p in done.values() if p.config == config.label and p.probe != fingerprint]
    if not stale:
        return False
    pipe.set_probe(probe_dir)  # checks that it reads this pipeline's reader
    states = pipe.probe_states([p.question for p in stale], [contexts[p.id] for p in stale],
                               [None if p.abstained else (p.raw or p.prediction) for p in stale])
    answerable, score = pipe.probe.score(states)
    for p, a, s in zip(stale, answerable, score):
        done[(p.config, p.id)] = replace(p, probe_answerable=float(a),
                                         probe_score=None if np.isnan(s) else float(s), probe=fingerprint)
    return True


def with_probe(p: Prediction, probe: Probe) -> Prediction:
    """A prediction as the probe's rule serves it: refused "before" generating where its
    answerability is below the cut, "after" where the rule scores the answer below it."""
    q = replace(p, config=with_decider(p.config, probe=True))
    if p.abstained or p.probe_answerable is None:
        return q
    decided = probe.decide(p.probe_answerable, p.probe_score)
    return as_abstention(q, probe_decided=decided) if decided else q


def risk_coverage(preds: list[Prediction]) -> dict:
    """{"coverage", "hallucination", "area"} of one configuration (module docstring); a configuration
    whose answers carry no rule score is its one point, area None."""
    n = len(preds)
    answered = [p for p in preds if not p.abstained]
    if not n:
        return {"coverage": [], "hallucination": [], "area": None}
    if not answered or any(p.probe_score is None for p in answered):
        made_up = sum(p.label == "hallucinated" for p in preds)
        return {"coverage": [len(answered) / n], "hallucination": [made_up / n], "area": None}
    ranked = sorted(answered, key=lambda p: -p.probe_score)
    made_up = np.cumsum([p.label == "hallucinated" for p in ranked])
    coverage = np.arange(len(ranked) + 1) / n
    hallucination = np.concatenate([[0.0], made_up / n])
    area = float(np.sum((coverage[1:] - coverage[:-1]) * (hallucination[1:] + hallucination[:-1]) / 2))
    return {"coverage": coverage.round(5).tolist(), "hallucination": hallucination.round(5).tolist(),
            "area": round(area, 5)}


def risk_chart(curves: dict[str, dict], path: Path, title: str) -> None:
    """PNG: hallucination (share of all questions) against the share answered, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for name, c in curves.items():
        if c["area"] is None:
            ax.plot(c["coverage"], c["hallucination"], "o", label=name)
        else:
            ax.plot(c["coverage"], c["hallucination"], "-", label=f"{name} (area {c['area']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, None)
    ax.set_xlabel("share of questions answered")
    ax.set_ylabel("made-up answers (share of all questions)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
