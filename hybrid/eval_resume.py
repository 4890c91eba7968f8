"""Where `hybrid eval` keeps its answers between runs: run.json's signatures, resuming an --out,
merging --shard dirs. Answers are reused only by a run of the same settings at the same precision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from core.atomic import sha256_file, write_text_atomic
from core.errors import InputError
from core.qa import QARow
from hybrid.eval_config import EvalConfig
from hybrid.eval_configuration import Configuration
from hybrid.prediction import Prediction
from hybrid.report import read_predictions
from training import run_record
from training.precision import choose, default_device


def merged(cfg: EvalConfig, configs: list[Configuration], rows: list[QARow]) -> dict[tuple[str, str], Prediction]:
    """The predictions of `--merge` shard dirs, checked to be runs of these settings that together
    answer every (configuration, question) of this run."""
    sigs, done, ids, precision = config_signatures(cfg, configs), {}, {r.id for r in rows}, run_precision(cfg)
    for d in cfg.merge:
        try:
            meta = json.loads((Path(d) / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(f"--merge {d}: no run.json; pass the --out dir of a 'hybrid eval --shard I/N' run") from None
        if why := stored_run(meta, sigs, f"--merge {d}", precision):
            raise InputError(f"{why}; merge shards of one run, with its settings")
        shard = meta.get("shard") if isinstance(meta.get("shard"), str) and meta["shard"].isprintable() else "I/N"
        # the same loader as a resumed eval's: a merged report holds no line its own run would refuse
        done.update(read_predictions(Path(d) / "predictions.jsonl", "--merge",
                                     f"rerun that shard ('hybrid eval --shard {shard}') into an empty --out", ids))
    missing = [(c, r.id) for c in configs for r in rows if (c.label, r.id) not in done]
    if missing:
        raise InputError(f"--merge: {len(missing)} answers missing (e.g. {missing[0][1]} in {missing[0][0]}); "
                         f"pass every shard's dir, each run to the end")
    if cfg.out:
        claim_merge_out(cfg, sigs, precision)
    # this run's configurations only: other adapters' answers in a shard are not checked against this run
    labels = {c.label for c in configs}
    return {k: p for k, p in done.items() if replace(Configuration.parse(k[0]), answered=False).label in labels}


def claim_merge_out(cfg: EvalConfig, sigs: dict[str, str], precision: str) -> None:
    """Make a merge's --out a single run's (run.json now, predictions.jsonl with the report), so it
    re-reports (another judge, --gate) without the shards. Refused where it would replace answers
    of another run, or a shard's own."""
    out = Path(cfg.out)
    if any(out.resolve() == Path(d).resolve() for d in cfg.merge):
        raise InputError(f"--out {out}: is one of the --merge dirs; write the merged report to a dir of its own")
    if (out / "predictions.jsonl").is_file() and (out / "predictions.jsonl").stat().st_size:
        try:
            meta = json.loads((out / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        if why := stored_run(meta, sigs, f"--out {out}", precision):
            raise InputError(f"{why}; use another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "run.json", json.dumps({"signature": sigs["rag"], "shard": None, "configs": sigs,
                                                    "precision": precision}))


def signature(cfg: EvalConfig) -> str:
    """What every configuration's answers depend on (the shard aside: every shard of a run has the
    run's signature); each adapter adds its own part (`config_signatures`). The judge is not part of
    it: its scores are added afterwards and redone when the judge changes."""
    return hashlib.sha256(json.dumps([
        sha256_file(Path(cfg.qa)), cfg.index, cfg.limit, cfg.seed, cfg.k, cfg.groups or None, cfg.max_new_tokens,
        cfg.base_model, cfg.mode, cfg.rerank]).encode()).hexdigest()


def config_signatures(cfg: EvalConfig, configs: list[Configuration]) -> dict[str, str]:
    """Each configuration's signature: the run's (`rag`'s, always present), plus for `rag+NAME` the
    adapter's dir and training fingerprint, so an eval extended with another adapter keeps the
    answers it already has."""
    base = signature(cfg)
    out = {}
    for c in map(Configuration.parse, map(str, configs)):  # labels (a test's) or configurations alike
        name = c.adapter
        out[c.label] = base if name is None else hashlib.sha256(json.dumps(
            [base, name, cfg.adapters[name], run_record.fingerprint(cfg.adapters[name])]).encode()).hexdigest()
    return out


def run_precision(cfg: EvalConfig) -> str:
    """The precision this run's answers are made at: in run.json and the report; a resumed or merged
    run's answers must all have been made at it (bf16 may word an answer differently)."""
    return choose(cfg.precision, default_device())


def stored_run(meta, sigs: dict[str, str], where: str, precision: str) -> str | None:
    """Why a run.json's answers cannot be used by a run with these `config_signatures` at `precision`
    (None: they can)."""
    if not isinstance(meta, dict) or meta.get("signature") != sigs["rag"] or \
            not isinstance(meta.get("configs"), dict):
        return f"{where}: holds predictions of a run with other settings (qa, index, limit, seed, k, groups, mode, ...)"
    if changed := [c for c, sig in sigs.items() if c in meta["configs"] and meta["configs"][c] != sig]:
        return (f"{where}: holds {changed[0]} answers of a run with other settings (another adapter dir, or the "
                f"adapter retrained)")
    made = meta.get("precision", "fp32")  # run.json written before the precision policy: every model ran in fp32
    if made != precision:
        return f"{where}: holds answers made at --precision {made}, and this run computes at {precision} " \
               f"(pass --precision {made} to resume them)"
    return None


def resume(cfg: EvalConfig, configs: list[Configuration], ids: set[str]) -> dict[tuple[str, str], Prediction]:
    """Plan stage: the predictions an earlier run with the same settings already wrote to --out. A
    run with more adapters than the earlier one keeps its answers and generates only the new
    configurations'.

    Raises:
        InputError: --out holds predictions of a run with other settings.
    """
    out = Path(cfg.out) if cfg.out else None
    sigs, precision = config_signatures(cfg, configs), run_precision(cfg)
    done: dict[tuple[str, str], Prediction] = {}
    stored: dict[str, str] = {}
    if out and (out / "predictions.jsonl").exists() and (out / "predictions.jsonl").stat().st_size:
        try:
            meta = json.loads((out / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        why = stored_run(meta, sigs, f"--out {out}", precision)
        if why or meta.get("shard") != cfg.shard:
            raise InputError(f"{why or f'--out {out}: holds predictions of another shard'}; use another --out or "
                             f"delete it")
        stored = meta["configs"]
        done = read_predictions(out / "predictions.jsonl", "--out", "delete the file to start over", ids)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "run.json", json.dumps({"signature": sigs["rag"], "shard": cfg.shard,
                                                        "configs": {**stored, **sigs}, "precision": precision}))
    return done
