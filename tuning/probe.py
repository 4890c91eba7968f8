"""The answerability probe: linear heads over the reader's hidden states, and the one rule that decides.

A reader's hidden state at the last prompt token already says whether the passages answer the
question (Slobodkin et al. 2023: answerability is linearly decodable there); its state at the last
token of its own answer says something about whether that answer is right. A probe is

    answerable  P(the passages answer the question)     from the state at the last prompt token
    right       P(this answer is right)                 from the state at the answer's last token
    rule        P(serving this answer is not a made-up answer), a logistic model over
                [logit answerable, logit right, the answer's mean token log-probability]

and two cuts chosen on held-out rows that no head was fitted on (`hybrid tune probe`,
tuning/tune_probe.py): `threshold` on the rule (the most answers whose hallucination on those
rows stays within the target) and `before`, the answerability below which the rule never served an
answer there, so such a question is refused before anything is generated.

    >>> probe = Probe.load("runs/probe", groups=["hr"])                       # doctest: +SKIP
    >>> probe.decide(answerable=0.02)                                         # doctest: +SKIP
    'before'

Files (no pickle): `probe.safetensors` (the heads' arrays) and `hybrid_probe.json` (its record:
layers, cuts, the base model and adapter it reads, how it was trained and measured), plus the
access record of the documents its rows came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core import access
from core.errors import Arg, InputError
from tuning.prompting import build_messages

WEIGHTS_FILE = "probe.safetensors"
RECORD_FILE = "hybrid_probe.json"
# Depths (share of the layers) whose states are read; the head's layer is chosen among them by
# cross-validation on the training rows.
DEPTHS = (1 / 3, 1 / 2, 2 / 3, 5 / 6, 1.0)


def probe_layers(n_layers: int) -> list[int]:
    """hidden_states indices read for a model with `n_layers` blocks (0 is the embeddings)."""
    return sorted({max(1, round(d * n_layers)) for d in DEPTHS})


@dataclass
class States:
    """What one forward pass of (prompt, answer) gives the probe, for N rows."""

    prompt: np.ndarray  # (N, n_layers_read, H): the state at the last prompt token
    answer: np.ndarray  # (N, n_layers_read, H): the state at the answer's last token (zeros: no answer)
    confidence: np.ndarray  # (N,): mean log-probability of the answer's tokens (0: no answer)
    layers: list[int]
    answered: np.ndarray  # (N,) bool: a completion was read


def read_states(model, tok, questions: list[str], passages_batch: list[list[dict]],
                completions: list[str | None]) -> States:
    """One forward pass per row over the chat prompt and, where given, the completion after it.

    The prompt state is the same with or without the completion (causal attention), so one pass
    serves both heads. `completions[i]` None: the prompt alone (the answer fields stay zero).
    """
    import torch

    n_blocks = model.config.num_hidden_layers
    layers = probe_layers(n_blocks)
    prompts, answers, conf = [], [], []
    for q, ps, c in zip(questions, passages_batch, completions):
        text = tok.apply_chat_template(build_messages(q, ps), add_generation_prompt=True, tokenize=False)
        p_ids = tok(text, add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"] if c else []
        ids = torch.tensor([p_ids + c_ids], device=model.device)
        with torch.inference_mode():
            out = model(input_ids=ids, output_hidden_states=True)
        hs = torch.stack([out.hidden_states[i][0] for i in layers]).float()  # (L, T, H)
        prompts.append(hs[:, len(p_ids) - 1].cpu().numpy())
        if c_ids:
            answers.append(hs[:, -1].cpu().numpy())
            logp = torch.log_softmax(out.logits[0, len(p_ids) - 1:-1].float(), -1)
            conf.append(float(logp.gather(1, torch.tensor(c_ids, device=logp.device)[:, None]).mean()))
        else:
            answers.append(np.zeros_like(prompts[-1]))
            conf.append(0.0)
    return States(np.stack(prompts), np.stack(answers), np.array(conf), layers,
                  np.array([bool(c) for c in completions]))


@dataclass
class Head:
    """A standardised logistic regression on one layer's state: P = sigmoid(((x - mean) / scale) . coef + bias)."""

    layer: int  # hidden_states index
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    bias: float
    cv_auroc: float  # cross-validated on the training rows (how the layer and C were chosen)
    c: float  # inverse regularisation strength chosen

    def logit(self, states: np.ndarray, layers: list[int]) -> np.ndarray:
        """Logits for states (N, n_layers_read, H) read at `layers`."""
        x = states[:, layers.index(self.layer)]
        return ((x - self.mean) / self.scale) @ self.coef + self.bias

    def probability(self, states: np.ndarray, layers: list[int]) -> np.ndarray:
        return 1 / (1 + np.exp(-self.logit(states, layers)))


def fit_head(states: np.ndarray, layers: list[int], labels: np.ndarray, groups: np.ndarray, seed: int) -> Head:
    """The layer and regularisation with the best cross-validated AUROC (folds keep a question's rows
    together), refitted on every row.

    Raises:
        InputError: fewer than 4 rows of either label (no fold could be scored).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels, bool)
    if min(labels.sum(), (~labels).sum()) < 4:
        raise InputError(f"a probe head needs at least 4 rows of each label; got {int(labels.sum())} positive and "
                         f"{int((~labels).sum())} negative: give more rows (--qa, --max-rows)")
    folds = list(StratifiedGroupKFold(n_splits=min(5, int(min(labels.sum(), (~labels).sum()))), shuffle=True,
                                      random_state=seed).split(states[:, 0], labels, groups))
    best = (-1.0, layers[0], 1.0)
    for li, layer in enumerate(layers):
        x = states[:, li]
        for c in (0.01, 0.1, 1.0):
            oof = np.zeros(len(x))
            for tr, te in folds:
                mean, scale = x[tr].mean(0), x[tr].std(0) + 1e-6
                m = LogisticRegression(C=c, max_iter=2000).fit((x[tr] - mean) / scale, labels[tr])
                oof[te] = m.decision_function((x[te] - mean) / scale)
            score = roc_auc_score(labels, oof)
            if score > best[0]:
                best = (float(score), layer, c)
    score, layer, c = best
    x = states[:, layers.index(layer)]
    mean, scale = x.mean(0), x.std(0) + 1e-6
    m = LogisticRegression(C=c, max_iter=2000).fit((x - mean) / scale, labels)
    return Head(layer, mean, scale, m.coef_[0], float(m.intercept_[0]), round(score, 4), c)


def rule_features(answerable_logit, right_logit, confidence) -> np.ndarray:
    """The rule's inputs, one row per answer: (N, 3)."""
    return np.stack([np.asarray(answerable_logit, float), np.asarray(right_logit, float),
                     np.asarray(confidence, float)], axis=1)


@dataclass
class Probe:
    """A trained probe: two heads, the rule over them and its cuts (see the module docstring)."""

    answerable: Head
    right: Head
    rule_coef: np.ndarray  # (3,) over rule_features
    rule_bias: float
    threshold: float  # serve an answer whose rule score is at or above this
    before: float  # refuse before generating below this answerability
    record: dict = field(default_factory=dict)  # hybrid_probe.json: base model, adapter, training and held-out figures

    def score(self, states: States) -> tuple[np.ndarray, np.ndarray]:
        """(P answerable, rule score) per row; the rule score is NaN where there is no answer."""
        a_logit = self.answerable.logit(states.prompt, states.layers)
        r_logit = self.right.logit(states.answer, states.layers)
        z = rule_features(a_logit, r_logit, states.confidence) @ self.rule_coef + self.rule_bias
        return 1 / (1 + np.exp(-a_logit)), np.where(states.answered, 1 / (1 + np.exp(-z)), np.nan)

    def decide(self, answerable: float | None, score: float | None = None) -> str | None:
        """Who refuses this answer: "before" (answerability, nothing generated), "after" (the rule
        on the answer) or None (it is served). `score` None: only the first question is asked;
        `answerable` None: only the second (it was asked before generating)."""
        if answerable is not None and answerable < self.before:
            return "before"
        if score is not None and not math.isnan(score) and score < self.threshold:
            return "after"
        return None

    # --- files -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the weights and the record into `directory` (a staged dir: the caller swaps it in)."""
        from safetensors.numpy import save_file

        d = Path(directory)
        tensors = {}
        for name, h in (("answerable", self.answerable), ("right", self.right)):
            for part in ("mean", "scale", "coef"):
                tensors[f"{name}.{part}"] = np.asarray(getattr(h, part), np.float32)
        tensors["rule.coef"] = np.asarray(self.rule_coef, np.float32)
        save_file(tensors, str(d / WEIGHTS_FILE))
        heads = {n: {k: v for k, v in asdict(h).items() if k in ("layer", "bias", "cv_auroc", "c")}
                 for n, h in (("answerable", self.answerable), ("right", self.right))}
        rec = {**self.record, "heads": heads, "rule": {"bias": self.rule_bias, "threshold": self.threshold,
                                                       "before": self.before}}
        (d / RECORD_FILE).write_text(json.dumps(rec, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path, groups=None, label: str | Arg | None = None) -> "Probe":
        """A probe the caller (`groups`) may use; one-line InputError for a missing, broken or
        out-of-scope one."""
        from safetensors.numpy import load_file

        d = Path(directory)
        label = label or Arg("probe", str(directory))
        fix = "retrain it with 'hybrid tune probe'"
        if not (d / RECORD_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
            raise InputError(label, f": not a probe made by 'hybrid tune probe' (no {RECORD_FILE} / {WEIGHTS_FILE})")
        try:
            rec = json.loads((d / RECORD_FILE).read_text(encoding="utf-8"))
            t = load_file(str(d / WEIGHTS_FILE))
            heads = {n: Head(rec["heads"][n]["layer"], t[f"{n}.mean"], t[f"{n}.scale"], t[f"{n}.coef"],
                             float(rec["heads"][n]["bias"]), rec["heads"][n]["cv_auroc"], rec["heads"][n]["c"])
                     for n in ("answerable", "right")}
            rule = rec["rule"]
            probe = cls(heads["answerable"], heads["right"], t["rule.coef"], float(rule["bias"]),
                        float(rule["threshold"]), float(rule["before"]), rec)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(label, f": the probe's files are unreadable ({exc.__class__.__name__}); {fix}") from None
        access.check(d, groups, label)
        return probe

    def check_reader(self, info, adapter_fingerprint: str | None, label: str | Arg) -> None:
        """Refuse a probe trained on another reader's states: another base model, or another adapter
        (None: the base model alone)."""
        base = self.record.get("base_model", {})
        if base.get("fingerprint") != info.fingerprint:
            raise InputError(label, f": trained on the states of {base.get('name')} "
                             f"({str(base.get('fingerprint'))[:12]}), not of {info.name} ({info.fingerprint[:12]}); "
                             f"retrain it with 'hybrid tune probe --base-model {info.name}'")
        if self.record.get("adapter_run") != adapter_fingerprint:
            which = "the base model alone" if self.record.get("adapter_run") is None else \
                f"adapter {self.record.get('adapter')}"
            raise InputError(label, f": trained on the states of {which}, not of the reader it is used with; "
                             f"use it with that reader or retrain it with 'hybrid tune probe'")
