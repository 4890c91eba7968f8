"""Options that cannot take effect, refused rather than ignored.

A command that quietly drops a setting leaves its user believing it was used (`--gate-threshold`
without `--gate`, `--p-oracle` with `--no-oracle both`, `--hnsw-m` on a flat index): each such
combination is one problem naming the flag and what to do. A value equal to the field's default is
let through: it changes nothing either way, and after YAML and flags are merged it cannot be told
from "not given".

    problems(cfg) -> ["--gate-threshold 0.3 takes effect only with --gate; add --gate or drop it", ...]
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from hybrid.config_fields import field_default, flag_name


def _flag(cfg, name: str) -> str:
    f = next(x for x in dataclasses.fields(cfg) if x.name == name)
    return f.metadata.get("flag", flag_name(name))


def moved(cfg, names) -> list[str]:
    """The flags among `names` whose value is not the field's default."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    return [_flag(cfg, n) for n in names if n in fields and getattr(cfg, n) != field_default(fields[n])]


def _refuse(cfg, names, why: str) -> list[str]:
    flags = moved(cfg, names)
    return [f"{', '.join(flags)}: {why}; drop {'it' if len(flags) == 1 else 'them'}"] if flags else []


GENERATION = ("adapters", "closed_book", "judge", "gate", "gate_threshold", "select", "probe", "batch_size",
              "max_new_tokens", "base_model", "limit", "seed", "k")


def _eval(cfg) -> list[str]:
    if cfg.only == "retrieval":  # evaluate_retrieval scores every row with gold_ids; nothing is generated
        return _refuse(cfg, GENERATION, "--only retrieval generates nothing and scores every question")
    return _refuse(cfg, ["gate_threshold"], "takes effect only with --gate") if not cfg.gate else []


def _generator(cfg) -> list[str]:
    if cfg.examples:  # prepared examples already hold their passages
        return _refuse(cfg, ["p_oracle", "num_distractors", "mode", "no_oracle"],
                       "--examples are prepared RAFT examples (their passages already chosen)")
    if cfg.no_oracle == "both":
        return _refuse(cfg, ["p_oracle"], "--no-oracle both writes every question with and without its oracle")
    return []


SAMPLING = ("n_samples", "temperature", "max_new_tokens", "judge", "p_oracle")


def _dpo(cfg) -> list[str]:
    if cfg.pairs_file:
        return _refuse(cfg, ["pairs", *SAMPLING, "num_distractors", "mode", "answer_over_abstain"],
                       "--pairs-file holds prepared pairs (nothing is sampled or retrieved)")
    if cfg.pairs == "contrastive":
        return _refuse(cfg, SAMPLING, "--pairs contrastive samples and scores nothing")
    return []


def _pairs(cfg) -> list[str]:
    """The embedder and the reranker: the held-out split and the inverse-cloze queries."""
    out = _refuse(cfg, ["test_fraction"], "--eval-qa is the held-out set") if cfg.eval_qa else []
    return out + (_refuse(cfg, ["ict_queries_per_chunk"], "--qa gives the training questions") if cfg.qa else [])


def _index(cfg) -> list[str]:
    hnsw, ivf = ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"), ("ivf_nlist", "ivf_nprobe")
    kind = cfg.index_type
    out = _refuse(cfg, ["ann_threshold"], f"--index-type {kind} is used whatever the size") if kind != "auto" else []
    if kind not in ("auto", "hnsw"):
        out += _refuse(cfg, hnsw, f"--index-type {kind} builds no HNSW graph")
    if kind not in ("ivf", "ivfpq"):
        out += _refuse(cfg, ivf, f"--index-type {kind} builds no IVF cells (auto picks flat or HNSW)")
    if kind != "ivfpq":
        out += _refuse(cfg, ("ivfpq_m", "ivfpq_nbits"), f"--index-type {kind} quantizes nothing")
    return out


def _ask(cfg) -> list[str]:
    return [] if cfg.judge else _refuse(cfg, ["gate_threshold"], "takes effect only with --judge")


def _serve(cfg) -> list[str]:
    return _refuse(cfg, ["backend_url"], "used only with --backend openai") if cfg.backend != "openai" else []


def _judge(cfg) -> list[str]:
    return [] if cfg.qa else _refuse(cfg, ["index"], "--index is read only to build pairs from --qa")


def _calibrate(cfg) -> list[str]:
    return [] if cfg.index else _refuse(cfg, ["k"], "-k is the passages retrieved from --index")


def _checks() -> dict[str, Callable]:
    return {"EvalConfig": _eval, "GeneratorTuneConfig": _generator, "DPOTuneConfig": _dpo,
            "EmbedderTuneConfig": _pairs, "RerankerTuneConfig": _pairs, "IndexConfig": _index, "AskConfig": _ask,
            "ServeConfig": _serve, "JudgeTuneConfig": _judge, "CalibrateConfig": _calibrate}


def problems(cfg) -> list[str]:
    """Every option of `cfg` (a command's config) set where it cannot take effect, each naming its flag."""
    check = _checks().get(type(cfg).__name__)
    return check(cfg) if check else []
