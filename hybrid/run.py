"""`hybrid run hybrid.yaml`: the whole loop from one file (the file itself: hybrid/run_config.py).

    hybrid init runs/mine                         # runs/mine/hybrid.yaml: every key, its type, default and help
    hybrid run runs/mine/hybrid.yaml              # index -> synth -> embedder -> generator -> eval
    hybrid run runs/mine/hybrid.yaml generator.max_steps=80    # redoes generator and eval only

Each stage is the command of the same name run as a library call, reading the previous stage's
files under `out` (index/, synth/qa.jsonl, embedder/, generator/, eval/). A stage is skipped when
its fingerprint — its resolved settings and the fingerprints of what it reads (the corpus files'
bytes, the upstream stages, the eval questions) — equals the one recorded in
`out/hybrid_stages.json` when it last finished and its output is there: a Makefile for the loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from hybrid.config import named
from hybrid.inert_options import problems as inert
from hybrid.run_config import (DEFAULT_STAGES, STAGES, WIRED, LoopConfig, init, init_text,  # noqa: F401 (the loop's API)
                                load_loop, parse_overrides, provenance, resolved_yaml)
from hybrid.tracking import Tracker, adapter_scope
from core.atomic import not_its_own, swap_dir_into_place, write_text_atomic
from core.errors import InputError

STAGE_FILE = "hybrid_stages.json"
# stages that write into DIR.partial and are swapped in whole at the end: the last good output stays
# until the new one is complete, and an interrupted run with the same settings resumes the partial one
PARTIAL = {"synth": "synth", "eval": "eval"}


# --- the resolved sections -----------------------------------------------------------------------
def last_adapter(cfg: LoopConfig) -> Path:
    """The adapter the loop ends with: DPO's when dpo is among the stages, else the generator's."""
    return Path(cfg.out) / ("dpo" if "dpo" in cfg.stages else "generator")


def sections(cfg: LoopConfig) -> dict[str, Any]:
    """Each stage's config with the loop's paths and groups filled in, each validated by its own rules."""
    out = Path(cfg.out)
    adapters = {"raft": str(out / "generator"), **({"dpo": str(out / "dpo")} if "dpo" in cfg.stages else {})}
    wired = {
        "synth": {"index": str(out / "index"), "out": str(out / "synth.partial" / "qa.jsonl"), "groups": cfg.groups},
        "embedder": {"index": str(out / "index"), "out": str(out / "embedder"), "qa": str(out / "synth" / "qa.jsonl"),
                     "eval_qa": cfg.eval_qa},
        "generator": {"index": str(out / "index"), "out": str(out / "generator"), "qa": str(out / "synth" / "qa.jsonl"),
                      "examples": None},
        "dpo": {"adapter": str(out / "generator"), "out": str(out / "dpo"), "index": str(out / "index"),
                "qa": str(out / "synth" / "qa.jsonl"), "pairs_file": ""},
        # the generator's held-out questions: synthesised, answerable and not, never trained on
        "calibrate": {"adapter": str(last_adapter(cfg)), "qa": str(out / "generator" / "held_out.jsonl"),
                      "index": str(out / "index"), "groups": cfg.groups},
        "eval": {"qa": cfg.eval_qa or "", "index": str(out / "index"), "adapters": adapters,
                 "out": str(out / "eval.partial"), "groups": cfg.groups},
        "serve": {"index": str(out / "index"), "adapters": {"raft": str(last_adapter(cfg))}, "adapter_dir": None},
    }
    resolved = {"index": cfg.index}
    for name, paths in wired.items():
        section = dataclasses.replace(getattr(cfg, name), **paths)
        if name in ("embedder", "generator", "dpo"):
            section.train = dataclasses.replace(section.train, groups=cfg.groups)
        resolved[name] = section
    return resolved


# --- fingerprints --------------------------------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tree_digest(root: str | Path) -> str:
    """sha256 over every file under `root` (relative path and bytes), in sorted order."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _settings(sec, places: dict[str, str]) -> str:
    """A stage's settings with the run folder's and the input files' own paths written as names (their
    contents are fingerprinted apart), so a project moved with its hybrid.yaml (paths are absolute once
    read) is still up to date."""
    text = json.dumps(dataclasses.asdict(sec), sort_keys=True, default=str)
    for path in sorted(places, key=len, reverse=True):  # the longest first: one may lie inside another
        text = text.replace(path, places[path])
    return text


def fingerprints(cfg: LoopConfig, resolved: dict) -> dict[str, str]:
    """Each stage's fingerprint: its settings and those of everything it reads."""
    places = {str(Path(p)): name for p, name in ((cfg.out, "OUT"), (cfg.corpus, "CORPUS"), (cfg.eval_qa, "EVAL_QA"))
              if p}
    settings = {name: _settings(sec, places) for name, sec in resolved.items()}
    eval_qa = hashlib.sha256(Path(cfg.eval_qa).read_bytes()).hexdigest() if cfg.eval_qa else None
    fp = {"index": _digest(["index", settings["index"], tree_digest(cfg.corpus)])}
    fp["synth"] = _digest(["synth", settings["synth"], fp["index"]])
    fp["embedder"] = _digest(["embedder", settings["embedder"], fp["index"], fp["synth"], eval_qa])
    fp["generator"] = _digest(["generator", settings["generator"], fp["index"], fp["synth"]])
    fp["dpo"] = _digest(["dpo", settings["dpo"], fp["index"], fp["synth"], fp["generator"]])
    adapter = fp["dpo"] if "dpo" in cfg.stages else fp["generator"]
    fp["calibrate"] = _digest(["calibrate", settings["calibrate"], fp["index"], adapter])
    # the eval reads every adapter and, when calibrated, the threshold written beside the last one
    fp["eval"] = _digest(["eval", settings["eval"], fp["index"], fp["generator"], eval_qa,
                          *([fp["dpo"]] if "dpo" in cfg.stages else []),
                          *([fp["calibrate"]] if "calibrate" in cfg.stages else [])])
    fp["serve"] = ""  # never up to date: serving is not an output
    return fp


# --- the stages ----------------------------------------------------------------------------------
def _run_stage(name: str, cfg: LoopConfig, sec, progress: bool, log: Callable[[str], None]) -> None:
    out = Path(cfg.out)
    if name == "index":
        from retrieval.index import build_index

        build_index(cfg.corpus, out / "index", sec, progress=progress)
    elif name == "synth":
        # written beside the last good questions; swapped in whole only when it finishes (a rerun
        # after an interruption resumes the partial file with the same settings)
        from tuning.synth import synthesize

        synthesize(sec, progress=progress, log=log)
    elif name == "embedder":
        from retrieval.tune_embedder import tune_embedder

        tune_embedder(sec, progress=progress)
    elif name == "generator":
        from tuning.tune_generator import tune_generator

        tune_generator(sec, progress=progress, log=log)
    elif name == "dpo":
        from tuning.tune_dpo import tune_dpo

        tune_dpo(sec, progress=progress, log=log)
    elif name == "calibrate":
        from hybrid.tune_calibrate import calibrate

        calibrate(sec, log=log)
    elif name == "eval":
        from hybrid.eval import run_eval

        run_eval(sec, progress=progress)
    elif name == "serve":
        from hybrid.serve import run

        run(sec, log=log)


def _lineage(cfg: LoopConfig, resolved: dict, name: str, fp: dict[str, str]) -> dict[str, str]:
    tags = {"hybrid.access_scope": ",".join(sorted(cfg.groups)) or "public", "hybrid.index_fingerprint": fp["index"]}
    if name in ("generator", "dpo", "calibrate", "eval"):
        tags["hybrid.base_model"] = str(resolved["generator"].base_model or "smollm2")
    return tags


def _output(name: str, cfg: LoopConfig) -> Path | None:
    out = Path(cfg.out)
    if name == "serve":
        return None
    if name == "calibrate":
        from tuning.abstention import CAL_FILE

        return last_adapter(cfg) / CAL_FILE
    return out / {"index": "index", "synth": "synth/qa.jsonl", "embedder": "embedder", "generator": "generator",
                  "dpo": "dpo", "eval": "eval/report.json"}[name]


def _foreign_outputs(cfg: LoopConfig, chosen) -> list[str]:
    """The swapped-in output directories (synth/, eval/) among `chosen` that are not the loop's own."""
    out = Path(cfg.out)
    return [f"{named(out / PARTIAL[n])}: exists and is not the {n} stage's output (no {_output(n, cfg).name} in it); "
            f"move what is in it, or set another 'out'"
            for n in PARTIAL if n in chosen and (n != "eval" or cfg.eval_qa)
            and not_its_own(out / PARTIAL[n], _output(n, cfg).name)]


def read_record(path: Path) -> dict[str, str]:
    """OUT/hybrid_stages.json: {stage: fingerprint} of what last finished ({} before the first run)."""
    if not path.is_file():
        return {}
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        done = None
    if not isinstance(done, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in done.items()):
        raise InputError(f"{named(path)}: not the loop's stage record (a mapping of stage to fingerprint; truncated "
                         f"or edited?); delete it and every stage runs again")
    return done


def parse_only(text: str | None) -> list[str] | None:
    """`--only index,synth` as stage names (None: not given); text naming no stage is refused, never
    read as "not given" (which would run every stage)."""
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise InputError(f"--only '{named(text, 80)}': names no stage; give one or more, e.g. --only index,synth "
                         f"(known: {', '.join(STAGES)})")
    return names


def run_loop(cfg: LoopConfig, only: list[str] | None = None, progress: bool = True,
             log: Callable[[str], None] = print, overrides: list[str] = ()) -> dict[str, str]:
    """Run the loop's stages in order, skipping those up to date; returns {stage: "ran" | "up to date" | "skipped"}.

    `overrides`: the KEY=VALUE pairs `cfg` was loaded with; one for a stage that will not run is refused.

    Raises:
        InputError: a section's own problems (naming the section), or any stage's bad input.
    """
    out = Path(cfg.out)
    resolved = sections(cfg)
    if problems := _idle_overrides(cfg, overrides, only) + _problems(cfg, resolved, only):
        raise InputError("; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    record_file = out / STAGE_FILE
    done = read_record(record_file)
    scope = ",".join(sorted(cfg.groups)) or "public"
    # the store is checked here, before any stage; the parent run starts with the first stage that runs
    tracker = Tracker(cfg.tracking, out, {"hybrid.access_scope": scope, "hybrid.corpus": str(cfg.corpus)},
                      resolved_yaml(cfg)) if cfg.tracking.backend == "mlflow" else None
    try:
        status = _stages(cfg, resolved, out, done, record_file, only, progress, log, tracker)
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    if tracker is not None:
        tracker.end()
        log(tracker.summary())
    return status


def _idle_overrides(cfg: LoopConfig, overrides: list[str], only: list[str] | None) -> list[str]:
    """Overrides of a stage's section that this run will not run: they would change nothing but the
    fingerprints downstream (an eval rerun on the old adapter), so they are refused."""
    chosen = [s for s in only or cfg.stages if s != "eval" or cfg.eval_qa]
    idle = [pair for pair in overrides if (stage := pair.partition("=")[0].split(".")[0]) in STAGES
            and stage not in chosen]
    if not idle:
        return []
    shown = ", ".join(named(p, 80) for p in idle[:4]) + (" and more" if len(idle) > 4 else "")
    why = "" if cfg.eval_qa else "; eval runs only with eval_qa"
    return [f"override {shown}: its stage does not run here (stages run: {', '.join(chosen) or 'none'}{why}); "
            f"add the stage to --only or stages, or drop the override"]


def _problems(cfg: LoopConfig, resolved: dict, only: list[str] | None) -> list[str]:
    """Everything wrong with the chosen stages' settings, found before any stage runs."""
    chosen = only or cfg.stages
    problems = [f"{name}: {p}" for name in STAGES if name in chosen and (name != "eval" or cfg.eval_qa)
                for p in (resolved[name].problems() if name != "index" else []) + inert(resolved[name])]
    t = cfg.tracking
    if t.backend == "mlflow" and t.log_adapters and (missing := sorted(set(cfg.groups) - set(t.store_groups))):
        problems.append(f"tracking.log_adapters: the adapter will be trained on {', '.join(cfg.groups)}; the store is "
                        f"declared for {', '.join(t.store_groups) or 'public artifacts only'} (tracking.store_groups), "
                        f"lacking {', '.join(missing)}: add them only if this store may hold them")
    if only and (bad := [s for s in only if s not in STAGES]):
        problems.append(f"--only {named(','.join(bad), 80)}: unknown stage (known: {', '.join(STAGES)})")
    return problems + _foreign_outputs(cfg, chosen)  # before any stage runs, not when its output is swapped in


def _stages(cfg, resolved, out, done, record_file, only, progress, log, tracker) -> dict[str, str]:
    status = {}
    for name in [s for s in STAGES if s in cfg.stages or only and s in only]:
        if only and name not in only:
            status[name] = "skipped"
            continue
        if name == "eval" and not cfg.eval_qa:
            status[name] = "skipped"
            log("eval: skipped (no eval_qa: no hand-written questions to score)")
            continue
        fps = fingerprints(cfg, resolved)  # recomputed: an upstream stage that just ran changed its inputs
        fp = fps[name]
        if name != "serve" and done.get(name) == fp and _output(name, cfg).exists():
            status[name] = "up to date"
            log(f"{name}: up to date")
            continue
        partial = out / f"{PARTIAL[name]}.partial" if name in PARTIAL else None
        if partial is not None and (foreign := _foreign_outputs(cfg, [name])):  # put there while earlier stages ran
            raise InputError(foreign[0])
        if partial is not None:
            if partial.exists() and done.get(partial.name) != fp:
                shutil.rmtree(partial)  # a partial run with other settings cannot be resumed
            partial.mkdir(exist_ok=True)
            done[partial.name] = fp
            write_text_atomic(record_file, json.dumps(done, indent=2))
        t0 = time.perf_counter()
        log(f"{name}: running")
        if tracker is not None and name != "serve":  # serving logs nothing: it opens no parent run of its own
            tracker.begin()
        _run_stage(name, cfg, resolved[name], progress, log)
        if partial is not None:
            swap_dir_into_place(partial, out / PARTIAL[name])
            done.pop(partial.name)
        done[name] = fp
        write_text_atomic(record_file, json.dumps(done, indent=2))
        status[name] = "ran"
        if tracker is not None and name not in ("serve", "calibrate"):  # calibrate's numbers: in the eval's report
            tracker.stage(name, resolved[name], fp, _lineage(cfg, resolved, name, fps),
                          adapter_scope(out) if name == "generator" else None)
        log(f"{name}: done in {time.perf_counter() - t0:.1f} s")
    return status
