"""The derive stage of `hybrid eval`: configurations made from answers already generated, with no
generation: NAME+gate (the judge gate), rag+NAME+cal (the adapter's calibrated threshold) and
rag+A|B(+cal) (the judge picks among adapters' answers). Predictions are `Prediction` records
(the lines of predictions.jsonl); a derived one is a new record (`dataclasses.replace`), the
generated one is left as it was.
"""

from __future__ import annotations

from dataclasses import replace

from hybrid.answer import best_supported, deciding_adapter
from hybrid.eval_configuration import Configuration
from hybrid.prediction import Prediction
from tuning.abstention import calibration_abstains
from tuning.grading import token_f1
from tuning.judge import THRESHOLD, gate_abstains
from tuning.prompting import ABSTAIN


def with_gate(p: Prediction, threshold: float = THRESHOLD) -> Prediction:
    """A prediction as the judge gate serves it: when none of the passages answers the question
    (judge answerability < `threshold`), the answer becomes the abstention.

    The gate asks about the passages, not the answer's wording, so it does not punish a right
    answer written as a long sentence. Latency adds the judge's time, spent on every answer.
    """
    q = replace(p, config=with_decider(p.config, gate=True), latency_ms=p.latency_ms + (p.judge_ms or 0.0))
    if not p.abstained and gate_abstains(p.answerable, threshold):
        q = as_abstention(q, gated=True)
    return q


def as_abstention(q: Prediction, **flag: bool) -> Prediction:
    """A derived prediction turned into the abstention, marking what caused it."""
    return replace(q, prediction=ABSTAIN, abstained=True, label="abstained", f1=token_f1(ABSTAIN, q.answers),
                   citations=[], unsupported=None, **flag)


def with_calibration(p: Prediction, threshold: float, answered: Prediction | None = None) -> Prediction:
    """A prediction as a calibrated adapter serves it: abstain when its own abstention score
    (tuning/abstention.py) reaches the adapter's threshold; below it, where the greedy answer
    abstained, the answer written again from the answer's opening (`answered`), if given."""
    label = with_decider(p.config, calibrated=True)
    if not p.abstained and calibration_abstains(p.abstain_score, threshold):
        return as_abstention(replace(p, config=label), calibrated_abstain=True)
    if p.abstained and answered is not None and needs_answer(p, threshold):
        return replace(answered, config=label, abstain_score=p.abstain_score, calibrated_answer=True,
                       # both completions were generated to serve this one
                       latency_ms=p.latency_ms + answered.latency_ms, new_tokens=p.new_tokens + answered.new_tokens)
    return replace(p, config=label)


def needs_answer(p: Prediction, threshold: float) -> bool:
    """The threshold overrules this greedy abstention: the score is below it."""
    return p.abstained and p.abstain_score is not None and not calibration_abstains(p.abstain_score, threshold)


def picked_by_judge(candidates: list[Prediction], name: str) -> Prediction:
    """One question's prediction chosen among several configurations' predictions of it.

    Args:
        candidates: the same question's predictions, one per configuration, in `--select` order.
        name: the derived configuration's name.

    Returns:
        The non-abstaining candidate with the highest judge `support` (ties: the first; all
        abstained: the first), renamed, with `selected_from` and the summed latency and tokens
        (every candidate had to be generated).
    """
    best = candidates[best_supported([p.abstained for p in candidates], [p.support for p in candidates])]
    return replace(best, config=name, selected_from=best.config,
                   latency_ms=sum(p.latency_ms + (p.judge_ms or 0.0) for p in candidates),
                   new_tokens=sum(p.new_tokens for p in candidates))


def derive(by_config: dict[str, list[Prediction]], calibrations: dict[str, dict], gate_threshold: float | None,
           select: list[str], answered: dict[str, list[Prediction | None]] | None = None):
    """Derive stage: NAME+gate (with a `gate_threshold`), rag+NAME+cal and the judge-picked
    rag+A|B(+cal) from the answers as generated (no generation).

    Args:
        by_config: {label: predictions, one per question in the same order} as generated.
        calibrations: {adapter name: its calibration record}.
        gate_threshold: the judge gate's answerability cut; None: no gated configurations.
        select: adapter names the judge picks among (empty: none).
        answered: {label of rag+NAME: the question's `+answered` line or None}.

    Returns:
        (every configuration's predictions, the deciding adapter under `select` or None).
    """
    thresholds = {Configuration(adapters=(n,)).label: float(c["threshold"]) for n, c in calibrations.items()}
    if gate_threshold is not None:
        for c in [c for c in list(by_config) if not Configuration.parse(c).closed_book]:
            by_config[with_decider(c, gate=True)] = [with_gate(p, gate_threshold) for p in by_config[c]]
    for c, t in thresholds.items():
        again = (answered or {}).get(c) or [None] * len(by_config[c])
        by_config[with_decider(c, calibrated=True)] = [with_calibration(p, t, a) for p, a in zip(by_config[c], again)]
    decider = None
    if select:
        picked = Configuration(adapters=tuple(select))
        singles = [by_config[Configuration(adapters=(n,)).label] for n in select]
        by_config[picked.label] = [picked_by_judge(list(ps), picked.label) for ps in zip(*singles)]
        if decider := deciding_adapter(select, {n: c.get("auroc") or 0.0 for n, c in calibrations.items()}):
            own = Configuration(adapters=(decider,)).label
            by_config[with_decider(picked.label, calibrated=True)] = [
                with_calibration(replace(q, abstain_score=d.abstain_score), thresholds[own])
                for q, d in zip(by_config[picked.label], by_config[own])]
    return by_config, decider


def with_decider(label: str, **decider: bool) -> str:
    """The label of a configuration with a decider on top, e.g. rag+NAME -> rag+NAME+cal."""
    return replace(Configuration.parse(label), **decider).label
