"""`hybrid run hybrid.yaml`: the whole loop from one file (the file itself: hybrid/run_config.py).

    hybrid init runs/mine                         # runs/mine/hybrid.yaml: every key, its type, default and help
    hybrid run runs/mine/hybrid.yaml              # index -> synth -> embedder -> generator -> eval
    hybrid run runs/mine/hybrid.yaml generator.max_steps=80    # redoes generator and eval only

Each stage is a command of hybrid/commands.py run as a library call, reading the previous stage's
files under `out` (index/, synth/qa.jsonl, embedder/, generator/, eval/); what the loop adds to the
command (its paths, what it reads, its output) is the stage's record in hybrid/run_stages.py. A
stage is skipped when its fingerprint — its resolved settings and the fingerprints of what it reads
(the corpus files' bytes, the upstream stages, the eval questions) — equals the one recorded in
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
from hybrid.run_config import (LoopConfig, init, init_text, load_loop, parse_overrides,  # noqa: F401 (the loop's API)
                                provenance, resolved_yaml)
from hybrid.run_stages import BY_NAME, DEFAULT_STAGES, STAGE_NAMES, STAGES, Stage, last_adapter  # noqa: F401
from hybrid.tracking import Tracker, adapter_scope
from core.atomic import not_its_own, swap_dir_into_place, write_text_atomic
from core.errors import InputError

STAGE_FILE = "hybrid_stages.json"


# --- the resolved sections -----------------------------------------------------------------------
def sections(cfg: LoopConfig) -> dict[str, Any]:
    """Each stage's config with the loop's paths and groups filled in, each validated by its own rules."""
    resolved = {}
    for stage in STAGES:
        section = dataclasses.replace(getattr(cfg, stage.name), **{k: wire(cfg) for k, wire in stage.wire.items()})
        if stage.trains:
            section.train = dataclasses.replace(section.train, groups=cfg.groups)
        resolved[stage.name] = section
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
    fp: dict[str, str] = {}

    def read(what: str) -> str | None:
        if what == "corpus":
            return tree_digest(cfg.corpus)
        if what == "eval_qa":
            return eval_qa  # None without eval questions: held as such
        if what == "adapter":
            return fp[last_adapter(cfg).name]
        return fp[what]

    for stage in STAGES:  # in order: what a stage reads is fingerprinted before it
        reads = [*stage.reads, *(r for r in stage.reads_if_staged if r in cfg.stages)]
        # a stage without an output (serve) is never up to date
        fp[stage.name] = _digest([stage.name, settings[stage.name], *map(read, reads)]) if stage.output else ""
    return fp


# --- the stages ----------------------------------------------------------------------------------
def _can_run(cfg: LoopConfig, name: str) -> bool:
    """A stage that scores the hand-written questions (eval) runs only when the loop has them (eval_qa)."""
    return not (name in BY_NAME and BY_NAME[name].needs_eval_qa) or bool(cfg.eval_qa)


def _lineage(cfg: LoopConfig, resolved: dict, stage: Stage, fp: dict[str, str]) -> dict[str, str]:
    tags = {"hybrid.access_scope": ",".join(sorted(cfg.groups)) or "public", "hybrid.index_fingerprint": fp["index"]}
    if stage.on_base_model:  # the stage's own reader where it names one (eval, probe), else the generator's
        from tuning.generation import DEFAULT_GENERATOR

        tags["hybrid.base_model"] = str(getattr(resolved[stage.name], "base_model", None)
                                        or resolved["generator"].base_model or DEFAULT_GENERATOR)
    return tags


def _foreign_outputs(cfg: LoopConfig, chosen) -> list[str]:
    """The swapped-in output directories (synth/, eval/) among `chosen` that are not the loop's own."""
    out = Path(cfg.out)
    return [f"{named(out / s.name)}: exists and is not the {s.name} stage's output (no {s.output(cfg).name} in it); "
            f"move what is in it, or set another 'out'"
            for s in STAGES if s.swapped and s.name in chosen and _can_run(cfg, s.name)
            and not_its_own(out / s.name, s.output(cfg).name)]


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
                         f"(known: {', '.join(STAGE_NAMES)})")
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
    chosen = [s for s in only or cfg.stages if _can_run(cfg, s)]
    idle = [pair for pair in overrides if (stage := pair.partition("=")[0].split(".")[0]) in STAGE_NAMES
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
    problems = [f"{name}: {p}" for name in STAGE_NAMES if name in chosen and _can_run(cfg, name)
                for p in (resolved[name].problems() if name != "index" else []) + inert(resolved[name])]
    t = cfg.tracking
    if t.backend == "mlflow" and t.log_adapters and (missing := sorted(set(cfg.groups) - set(t.store_groups))):
        problems.append(f"tracking.log_adapters: the adapter will be trained on {', '.join(cfg.groups)}; the store is "
                        f"declared for {', '.join(t.store_groups) or 'public artifacts only'} (tracking.store_groups), "
                        f"lacking {', '.join(missing)}: add them only if this store may hold them")
    if only and (bad := [s for s in only if s not in STAGE_NAMES]):
        problems.append(f"--only {named(','.join(bad), 80)}: unknown stage (known: {', '.join(STAGE_NAMES)})")
    return problems + _foreign_outputs(cfg, chosen)  # before any stage runs, not when its output is swapped in


def _stages(cfg, resolved, out, done, record_file, only, progress, log, tracker) -> dict[str, str]:
    status = {}
    for stage in [s for s in STAGES if s.name in cfg.stages or only and s.name in only]:
        name = stage.name
        if only and name not in only:
            status[name] = "skipped"
            continue
        if not _can_run(cfg, name):
            status[name] = "skipped"
            log(f"{name}: skipped (no eval_qa: no hand-written questions to score)")
            continue
        fps = fingerprints(cfg, resolved)  # recomputed: an upstream stage that just ran changed its inputs
        fp = fps[name]
        if stage.output is not None and done.get(name) == fp and stage.output(cfg).exists():
            status[name] = "up to date"
            log(f"{name}: up to date")
            continue
        partial = out / f"{name}.partial" if stage.swapped else None
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
        if tracker is not None and stage.tracked != "no":  # serving logs nothing: it opens no parent run of its own
            tracker.begin()
        stage.run(cfg, resolved[name], progress, log)
        if partial is not None:
            swap_dir_into_place(partial, out / name)
            done.pop(partial.name)
        done[name] = fp
        write_text_atomic(record_file, json.dumps(done, indent=2))
        status[name] = "ran"
        if tracker is not None and stage.tracked == "stage":
            tracker.stage(name, resolved[name], fp, _lineage(cfg, resolved, stage, fps),
                          adapter_scope(out) if name == "generator" else None)
        log(f"{name}: done in {time.perf_counter() - t0:.1f} s")
    return status
